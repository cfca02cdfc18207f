// Torch-facing helpers shared by the CPU and CUDA launchers of the depthwise family:
// argument checks (for direct torch.ops calls; the Python layer raises friendlier errors first),
// the layout rule, and DepthwiseConv2dParams built from tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include "kernels/depthwise_conv2d_params.h"

namespace fusekit {

inline ScalarKind scalar_kind(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::Float32;
    case at::kDouble: return ScalarKind::Float64;
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default: TORCH_CHECK_TYPE(false, op, ": dtype ", t.scalar_type(), " is not supported (float32, float64, float16, bfloat16)");
  }
}

// Output layout rule shared with the Python fake kernels: channels_last only when x is
// channels_last-dense and not also NCHW-dense.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

inline int64_t conv_out_size(int64_t size, int64_t k, int64_t s, int64_t d, int64_t lo, int64_t hi) {
  return (size + lo + hi - d * (k - 1) - 1) / s + 1;
}

inline void check_same(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but x has dtype ", x.scalar_type());
}

inline void check_conv_config(const char* op, const at::Tensor& x, int64_t kh, int64_t kw, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op, ": stride must be 2 values >= 1, got ", stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be 2 values >= 1, got ", dilation);
  TORCH_CHECK(padding.size() == 4 && padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0, op,
              ": padding must be 4 values (top, bottom, left, right) >= 0, got ", padding);
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": kernel size must be positive, got ", kh, "x", kw);
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op, ": x must have positive C, H, W, got ", x.sizes());
  const int64_t ho = conv_out_size(x.size(2), kh, stride[0], dilation[0], padding[0], padding[1]);
  const int64_t wo = conv_out_size(x.size(3), kw, stride[1], dilation[1], padding[2], padding[3]);
  TORCH_CHECK(ho >= 1 && wo >= 1, op, ": kernel ", kh, "x", kw, " (dilation ", dilation, ") is larger than the padded input");
}

inline void check_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(0) == x.size(1), op,
              ": weight must be [C, 1, kh, kw] with C = x.size(1) = ", x.size(1), ", got ", weight.sizes());
  check_same(op, x, weight, "weight");
}

// Params for a convolution whose input-side tensor is `in` and output-side tensor is `out`
// (both dense in the same layout). Segments are filled by the caller.
inline DepthwiseConv2dParams make_params(const at::Tensor& in, const at::Tensor& out, at::IntArrayRef stride,
                                         at::IntArrayRef dilation) {
  DepthwiseConv2dParams p;
  p.N = in.size(0); p.C = in.size(1); p.H = in.size(2); p.W = in.size(3);
  p.Ho = out.size(2); p.Wo = out.size(3);
  p.stride_h = stride[0]; p.stride_w = stride[1];
  p.dil_h = dilation[0]; p.dil_w = dilation[1];
  for (int d = 0; d < 4; ++d) { p.in_stride[d] = in.stride(d); p.out_stride[d] = out.stride(d); }
  p.channels_last = layout_of(in) == at::MemoryFormat::ChannelsLast;
  p.num_segments = 0;
  return p;
}

inline void add_segment(DepthwiseConv2dParams& p, int64_t c_begin, int64_t c_end, int64_t kh, int64_t kw,
                        int64_t pad_top, int64_t pad_left, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (c_end <= c_begin) return;
  DepthwiseSegment& s = p.seg[p.num_segments++];
  s.c_begin = c_begin; s.c_end = c_end; s.kh = kh; s.kw = kw; s.pad_top = pad_top; s.pad_left = pad_left;
  s.weight = weight.defined() ? weight.const_data_ptr() : nullptr;
  s.bias = bias.has_value() && bias->defined() ? bias->const_data_ptr() : nullptr;
}

// InceptionNeXt split: (C - 3gc | gc | gc | gc) -> identity | k x k | 1 x band | band x 1, "same" padding.
// Weights must already be contiguous; biases contiguous or absent.
inline void add_inception_segments(DepthwiseConv2dParams& p, int64_t C, const at::Tensor& w_hw,
                                   const std::optional<at::Tensor>& b_hw, const at::Tensor& w_w,
                                   const std::optional<at::Tensor>& b_w, const at::Tensor& w_h,
                                   const std::optional<at::Tensor>& b_h) {
  const int64_t gc = w_hw.size(0), k = w_hw.size(2), band = w_w.size(3);
  add_segment(p, 0, C - 3 * gc, 0, 0, 0, 0, at::Tensor(), std::nullopt);
  add_segment(p, C - 3 * gc, C - 2 * gc, k, k, k / 2, k / 2, w_hw, b_hw);
  add_segment(p, C - 2 * gc, C - gc, 1, band, 0, band / 2, w_w, b_w);
  add_segment(p, C - gc, C, band, 1, band / 2, 0, w_h, b_h);
}

inline void check_inception(const char* op, const at::Tensor& x, const at::Tensor& w_hw, const at::Tensor& w_w,
                            const at::Tensor& w_h) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.sizes());
  const int64_t gc = w_hw.size(0);
  TORCH_CHECK(w_hw.dim() == 4 && w_hw.size(1) == 1 && w_hw.size(2) == w_hw.size(3) && w_hw.size(2) % 2 == 1, op,
              ": w_hw must be [gc, 1, k, k] with odd k, got ", w_hw.sizes());
  TORCH_CHECK(3 * gc <= x.size(1), op, ": 3 * gc = ", 3 * gc, " exceeds C = ", x.size(1));
  TORCH_CHECK(w_w.dim() == 4 && w_w.size(0) == gc && w_w.size(1) == 1 && w_w.size(2) == 1 && w_w.size(3) % 2 == 1, op,
              ": w_w must be [gc, 1, 1, band] with odd band, got ", w_w.sizes());
  TORCH_CHECK(w_h.dim() == 4 && w_h.size(0) == gc && w_h.size(1) == 1 && w_h.size(2) == w_w.size(3) && w_h.size(3) == 1,
              op, ": w_h must be [gc, 1, band, 1], got ", w_h.sizes());
  check_same(op, x, w_hw, "w_hw");
  check_same(op, x, w_w, "w_w");
  check_same(op, x, w_h, "w_h");
}

}  // namespace fusekit
