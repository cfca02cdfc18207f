// Op-level logic of the depthwise family, shared by the CPU and CUDA launchers: checks,
// layout, allocation and params. A Runner supplies the device part:
//   Runner::conv(params, forward, src, dst)       forward (src = x) or backward-input (src = grad_out)
//   Runner::backward_weight(params, grad_out, in) += into each segment's grad_weight / grad_bias
#pragma once

#include <ATen/ATen.h>
#include <array>
#include <tuple>

#include "depthwise_conv2d_common.h"

namespace fusekit {

inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <class Runner>
at::Tensor depthwise_conv2d_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "fusekit::depthwise_conv2d";
  check_conv_config(op, x, weight.dim() == 4 ? weight.size(2) : 0, weight.dim() == 4 ? weight.size(3) : 0, stride,
                    padding, dilation);
  check_weight(op, x, weight);
  scalar_kind(x, op);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), op, ": bias must be [C], got ", bias->sizes());
    check_same(op, x, *bias, "bias");
  }
  const auto mf = layout_of(x);
  const at::Tensor xc = x.contiguous(mf);
  const at::Tensor w = weight.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  const int64_t kh = w.size(2), kw = w.size(3);
  const int64_t ho = conv_out_size(x.size(2), kh, stride[0], dilation[0], padding[0], padding[1]);
  const int64_t wo = conv_out_size(x.size(3), kw, stride[1], dilation[1], padding[2], padding[3]);
  at::Tensor y = at::empty({x.size(0), x.size(1), ho, wo}, x.options().memory_format(mf));
  if (y.numel() == 0) return y;
  DepthwiseConv2dParams p = make_params(xc, y, stride, dilation);
  add_segment(p, 0, x.size(1), kh, kw, padding[0], padding[2], w, b);
  Runner::conv(p, /*forward=*/true, xc, y);
  return y;
}

template <class Runner>
at::Tensor depthwise_conv2d_backward_input_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& weight, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "fusekit::depthwise_conv2d_backward_input";
  check_conv_config(op, x, weight.size(2), weight.size(3), stride, padding, dilation);
  check_weight(op, x, weight);
  check_same(op, x, grad_out, "grad_out");
  const auto mf = layout_of(x);
  const at::Tensor w = weight.contiguous();
  const int64_t kh = w.size(2), kw = w.size(3);
  const int64_t ho = conv_out_size(x.size(2), kh, stride[0], dilation[0], padding[0], padding[1]);
  const int64_t wo = conv_out_size(x.size(3), kw, stride[1], dilation[1], padding[2], padding[3]);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) &&
                  grad_out.size(2) == ho && grad_out.size(3) == wo,
              op, ": grad_out must be [", x.size(0), ", ", x.size(1), ", ", ho, ", ", wo, "], got ", grad_out.sizes());
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(mf));
  if (grad_x.numel() == 0) return grad_x;
  // both tensors in x's layout, so the kernels see one layout
  const at::Tensor go = grad_out.contiguous(mf);
  DepthwiseConv2dParams p = make_params(grad_x, go, stride, dilation);
  p.channels_last = mf == at::MemoryFormat::ChannelsLast;
  add_segment(p, 0, x.size(1), kh, kw, padding[0], padding[2], w, std::nullopt);
  Runner::conv(p, /*forward=*/false, go, grad_x);
  return grad_x;
}

template <class Runner>
std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_backward_weight_impl(
    const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "fusekit::depthwise_conv2d_backward_weight";
  TORCH_CHECK(kernel_size.size() == 2, op, ": kernel_size must have 2 values, got ", kernel_size);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  check_conv_config(op, x, kh, kw, stride, padding, dilation);
  check_same(op, x, grad_out, "grad_out");
  scalar_kind(x, op);
  const auto mf = layout_of(x);
  const int64_t C = x.size(1);
  const int64_t ho = conv_out_size(x.size(2), kh, stride[0], dilation[0], padding[0], padding[1]);
  const int64_t wo = conv_out_size(x.size(3), kw, stride[1], dilation[1], padding[2], padding[3]);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == C &&
                  grad_out.size(2) == ho && grad_out.size(3) == wo,
              op, ": grad_out must be [", x.size(0), ", ", C, ", ", ho, ", ", wo, "], got ", grad_out.sizes());
  at::Tensor gw = at::zeros({C, 1, kh, kw}, x.options().dtype(acc_dtype(x)));
  at::Tensor gb = at::zeros({C}, x.options().dtype(acc_dtype(x)));
  if (x.size(0) > 0) {
    const at::Tensor xc = x.contiguous(mf);
    const at::Tensor go = grad_out.contiguous(mf);
    DepthwiseConv2dParams p = make_params(xc, go, stride, dilation);
    add_segment(p, 0, C, kh, kw, padding[0], padding[2], at::Tensor(), std::nullopt);
    p.seg[0].grad_weight = gw.data_ptr();
    p.seg[0].grad_bias = gb.data_ptr();
    Runner::backward_weight(p, go, xc);
  }
  return {gw.to(x.scalar_type()), gb.to(x.scalar_type())};
}

template <class Runner>
at::Tensor inception_dwconv2d_impl(const at::Tensor& x, const at::Tensor& w_hw, const std::optional<at::Tensor>& b_hw,
                                   const at::Tensor& w_w, const std::optional<at::Tensor>& b_w, const at::Tensor& w_h,
                                   const std::optional<at::Tensor>& b_h) {
  constexpr const char* op = "fusekit::inception_dwconv2d";
  check_inception(op, x, w_hw, w_w, w_h);
  scalar_kind(x, op);
  auto contig = [&](const std::optional<at::Tensor>& b, const char* name) -> std::optional<at::Tensor> {
    if (!b.has_value() || !b->defined()) return std::nullopt;
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w_hw.size(0), op, ": ", name, " must be [gc], got ", b->sizes());
    check_same(op, x, *b, name);
    return b->contiguous();
  };
  const auto mf = layout_of(x);
  const at::Tensor xc = x.contiguous(mf);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(mf));
  if (y.numel() == 0) return y;
  const at::Tensor whw = w_hw.contiguous(), ww = w_w.contiguous(), wh = w_h.contiguous();
  DepthwiseConv2dParams p = make_params(xc, y, {1, 1}, {1, 1});
  add_inception_segments(p, x.size(1), whw, contig(b_hw, "b_hw"), ww, contig(b_w, "b_w"), wh, contig(b_h, "b_h"));
  Runner::conv(p, /*forward=*/true, xc, y);
  return y;
}

template <class Runner>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
inception_dwconv2d_backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_hw,
                                 const at::Tensor& w_w, const at::Tensor& w_h, std::array<bool, 2> output_mask) {
  constexpr const char* op = "fusekit::inception_dwconv2d_backward";
  check_inception(op, x, w_hw, w_w, w_h);
  check_same(op, x, grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(output_mask.size() == 2, op, ": output_mask must have 2 values");
  const auto mf = layout_of(x);
  const at::Tensor whw = w_hw.contiguous(), ww = w_w.contiguous(), wh = w_h.contiguous();
  const at::Tensor go = grad_out.contiguous(mf);
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor grad_x = empty;
  if (output_mask[0]) {
    grad_x = at::empty(x.sizes(), x.options().memory_format(mf));
    if (grad_x.numel() > 0) {
      DepthwiseConv2dParams p = make_params(grad_x, go, {1, 1}, {1, 1});
      p.channels_last = mf == at::MemoryFormat::ChannelsLast;
      add_inception_segments(p, x.size(1), whw, std::nullopt, ww, std::nullopt, wh, std::nullopt);
      Runner::conv(p, /*forward=*/false, go, grad_x);
    }
  }
  if (!output_mask[1]) return {grad_x, empty, empty, empty, empty, empty, empty};
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor gw[3] = {at::zeros(whw.sizes(), acc), at::zeros(ww.sizes(), acc), at::zeros(wh.sizes(), acc)};
  at::Tensor gb[3] = {at::zeros({w_hw.size(0)}, acc), at::zeros({w_hw.size(0)}, acc), at::zeros({w_hw.size(0)}, acc)};
  if (x.numel() > 0 && w_hw.size(0) > 0) {
    const at::Tensor xc = x.contiguous(mf);
    DepthwiseConv2dParams p = make_params(xc, go, {1, 1}, {1, 1});
    add_inception_segments(p, x.size(1), whw, std::nullopt, ww, std::nullopt, wh, std::nullopt);
    // the conv segments are the last three (the identity segment exists only when C > 3gc)
    for (int s = p.num_segments - 3, k = 0; s < p.num_segments; ++s, ++k) {
      p.seg[s].grad_weight = gw[k].data_ptr();
      p.seg[s].grad_bias = gb[k].data_ptr();
    }
    Runner::backward_weight(p, go, xc);
  }
  const auto dt = x.scalar_type();
  return {grad_x, gw[0].to(dt), gb[0].to(dt), gw[1].to(dt), gb[1].to(dt), gw[2].to(dt), gb[2].to(dt)};
}

}  // namespace fusekit
