// CUDA launcher of the fused inverted-residual blocks (inverted_residual_forward,
// inverted_residual_dw_sums, fused_mbconv_forward): argument checks, allocation of the outputs and
// the dw_sums workspace, device guard and current stream around the torch-free kernels of
// inverted_residual_kernels.cu, and the CUDA registrations. Compiled by the host compiler (not nvcc).
//
// x may have any strides (the kernels index it through its strides; NCHW-dense and
// channels_last-dense x read coalesced); y follows x's layout (layout_of). Weights, biases and the
// gate are made contiguous.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../depthwise_conv2d_common.h"  // layout_of, conv_out_size, check_same
#include "inverted_residual_cuda.h"

namespace fusekit {
namespace {

// Sizes the kernels hold in int32 (with headroom for chunk / tile arithmetic).
constexpr int64_t kMaxSize = int64_t{1} << 30;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

ScalarKind cuda_kind(const char* op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return ScalarKind::Float32;
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": dtype ", x.scalar_type(),
                       " is not supported on CUDA (float32, float16, bfloat16; float64 runs on the CPU backend)");
  }
}

void check_size(const char* op, int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= kMaxSize, op, ": ", what, " = ", v, " exceeds the range of the CUDA kernels (2^30)");
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A contiguous copy (or the tensor itself) of an optional operand of shape `shape`.
const void* operand(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name,
                    at::IntArrayRef shape, std::optional<at::Tensor>& keep) {
  if (!given(t)) return nullptr;
  check_same(op, x, *t, name);
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t->sizes());
  keep = t->contiguous();
  return keep->const_data_ptr();
}

// x, the k x k stage configuration and the output size: fills N, Cin, H, W, strides of x, kernel
// geometry, Ho, Wo, activation.
void describe_input(const char* op, InvertedResidualCudaParams& p, const at::Tensor& x, int64_t kh, int64_t kw,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, Cin, H, W], got shape ", x.sizes());
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op, ": stride must be 2 ints >= 1, got ",
              stride);
  TORCH_CHECK(padding.size() == 4 && padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0, op,
              ": padding must be 4 ints (top, bottom, left, right) >= 0, got ", padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
              ": dilation must be 2 ints >= 1, got ", dilation);
  TORCH_CHECK(activation >= 0 && activation <= 4, op,
              ": activation must be 0 (identity), 1 (relu), 2 (relu6), 3 (silu) or 4 (hardswish), got ", activation);
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": the kernel must be at least 1x1, got ", kh, "x", kw);
  p.N = x.size(0);
  p.Cin = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  TORCH_CHECK(p.Cin >= 1 && p.H >= 1 && p.W >= 1, op, ": x must have Cin, H, W >= 1, got shape ", x.sizes());
  const int64_t* s = x.strides().data();
  for (int i = 0; i < 4; ++i) p.x_stride[i] = s[i];
  p.kh = kh;
  p.kw = kw;
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_top = padding[0];
  p.pad_left = padding[2];
  p.dil_h = dilation[0];
  p.dil_w = dilation[1];
  check_size(op, p.Cin, "Cin");
  check_size(op, p.H + padding[0] + padding[1], "padded H");
  check_size(op, p.W + padding[2] + padding[3], "padded W");
  for (int64_t v : {kh, kw, stride[0], stride[1], dilation[0], dilation[1]}) check_size(op, v, "kernel geometry");
  TORCH_CHECK(dilation[0] * (kh - 1) < p.H + padding[0] + padding[1] &&
                  dilation[1] * (kw - 1) < p.W + padding[2] + padding[3],
              op, ": the dilated ", kh, "x", kw, " kernel does not fit the padded ", p.H, "x", p.W, " input");
  p.Ho = conv_out_size(p.H, kh, stride[0], dilation[0], padding[0], padding[1]);
  p.Wo = conv_out_size(p.W, kw, stride[1], dilation[1], padding[2], padding[3]);
  p.activation = static_cast<int>(activation);
}

void check_residual(const char* op, const InvertedResidualCudaParams& p) {
  TORCH_CHECK(!p.residual || (p.Cout == p.Cin && p.Ho == p.H && p.Wo == p.W), op,
              ": residual needs Cout == Cin and an output of the input's size; got Cin ", p.Cin, ", Cout ", p.Cout,
              ", input ", p.H, "x", p.W, ", output ", p.Ho, "x", p.Wo);
}

// The op fits the device's shared memory with its smallest tile (needs the device guard).
void check_fits(const char* op, const InvertedResidualCudaParams& p, InvertedResidualOp kind) {
  const size_t need = cuda::inverted_residual_min_smem_bytes(p, kind);
  const size_t have = cuda::inverted_residual_device_smem_bytes();
  TORCH_CHECK(need <= have, op, ": the fused CUDA kernel needs ", need, " bytes of shared memory per block for Cin=",
              p.Cin, ", Cout=", p.Cout, ", kernel ", p.kh, "x", p.kw, " (stride ", p.stride_h, "x", p.stride_w,
              ", dilation ", p.dil_h, "x", p.dil_w, ") but this device allows ", have,
              "; use the triton or cpu backend for this shape");
}

at::Tensor allocate_output(const at::Tensor& x, InvertedResidualCudaParams& p) {
  at::Tensor y = at::empty({p.N, p.Cout, p.Ho, p.Wo}, x.options().memory_format(layout_of(x)));
  const int64_t* s = y.strides().data();
  for (int i = 0; i < 4; ++i) p.y_stride[i] = s[i];
  p.channels_last = layout_of(x) == at::MemoryFormat::ChannelsLast;
  p.y = y.mutable_data_ptr();
  return y;
}

// Holds the contiguous operands alive for the launch.
struct Operands {
  std::optional<at::Tensor> w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate;
};

// Shared part of inverted_residual_forward / _dw_sums: x, expand and depthwise stages.
void describe_ir(const char* op, InvertedResidualCudaParams& p, Operands& keep, const at::Tensor& x,
                 const std::optional<at::Tensor>& w_expand, const std::optional<at::Tensor>& b_expand,
                 const at::Tensor& w_dw, const std::optional<at::Tensor>& b_dw, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation) {
  TORCH_CHECK(w_dw.dim() == 3, op, ": w_dw must be 3-D [E, kh, kw], got shape ", w_dw.sizes());
  describe_input(op, p, x, w_dw.size(1), w_dw.size(2), stride, padding, dilation, activation);
  p.E = w_dw.size(0);
  TORCH_CHECK(p.E >= 1, op, ": w_dw must have E >= 1 channels, got shape ", w_dw.sizes());
  check_size(op, p.E, "E");
  if (given(w_expand)) {
    p.w_expand = operand(op, x, w_expand, "w_expand", {p.E, p.Cin}, keep.w_expand);
  } else {
    TORCH_CHECK(!given(b_expand), op, ": b_expand needs w_expand (without an expand stage a1 = x)");
    TORCH_CHECK(p.E == p.Cin, op, ": without w_expand the depthwise runs on x, so E = w_dw.shape[0] (", p.E,
                ") must equal Cin (", p.Cin, ")");
  }
  p.b_expand = operand(op, x, b_expand, "b_expand", {p.E}, keep.b_expand);
  std::optional<at::Tensor> w_dw_opt = w_dw;
  p.w_dw = operand(op, x, w_dw_opt, "w_dw", w_dw.sizes(), keep.w_dw);
  p.b_dw = operand(op, x, b_dw, "b_dw", {p.E}, keep.b_dw);
}

at::Tensor inverted_residual_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& w_expand,
                                          const std::optional<at::Tensor>& b_expand, const at::Tensor& w_dw,
                                          const std::optional<at::Tensor>& b_dw, const at::Tensor& w_project,
                                          const std::optional<at::Tensor>& b_project,
                                          const std::optional<at::Tensor>& gate, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                                          bool residual) {
  constexpr const char* op = "fusekit.inverted_residual_forward (CUDA)";
  const ScalarKind kind = cuda_kind(op, x);
  InvertedResidualCudaParams p;
  Operands keep;
  describe_ir(op, p, keep, x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation);
  TORCH_CHECK(w_project.dim() == 2 && w_project.size(1) == p.E && w_project.size(0) >= 1, op,
              ": w_project must be [Cout, E] with E = ", p.E, ", got shape ", w_project.sizes());
  p.Cout = w_project.size(0);
  check_size(op, p.Cout, "Cout");
  p.w_project = operand(op, x, std::optional<at::Tensor>(w_project), "w_project", w_project.sizes(), keep.w_project);
  p.b_project = operand(op, x, b_project, "b_project", {p.Cout}, keep.b_project);
  p.gate = operand(op, x, gate, "gate", {p.N, p.E}, keep.gate);
  p.residual = residual;
  check_residual(op, p);
  p.x = x.const_data_ptr();

  const c10::cuda::CUDAGuard guard(x.device());
  check_fits(op, p, InvertedResidualOp::Forward);
  at::Tensor y = allocate_output(x, p);
  if (y.numel() == 0) return y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(cuda::inverted_residual_forward(p, kind, stream), op);
  return y;
}

at::Tensor inverted_residual_dw_sums_cuda(const at::Tensor& x, const std::optional<at::Tensor>& w_expand,
                                          const std::optional<at::Tensor>& b_expand, const at::Tensor& w_dw,
                                          const std::optional<at::Tensor>& b_dw, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation) {
  constexpr const char* op = "fusekit.inverted_residual_dw_sums (CUDA)";
  const ScalarKind kind = cuda_kind(op, x);
  InvertedResidualCudaParams p;
  Operands keep;
  describe_ir(op, p, keep, x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation);
  p.x = x.const_data_ptr();
  p.channels_last = layout_of(x) == at::MemoryFormat::ChannelsLast;

  const c10::cuda::CUDAGuard guard(x.device());
  check_fits(op, p, InvertedResidualOp::DwSums);
  at::Tensor sums = at::empty({p.N, 3, p.E}, x.options().dtype(at::kFloat));
  if (sums.numel() == 0) return sums;
  const int64_t workspace = cuda::inverted_residual_dw_sums_workspace_floats(p);
  TORCH_CHECK(workspace > 0, op, ": no launch plan for this shape");
  at::Tensor partial = at::empty({workspace}, x.options().dtype(at::kFloat));
  p.sums = sums.mutable_data_ptr<float>();
  p.partial = partial.mutable_data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(cuda::inverted_residual_dw_sums(p, kind, stream), op);
  return sums;
}

at::Tensor fused_mbconv_forward_cuda(const at::Tensor& x, const at::Tensor& w_expand,
                                     const std::optional<at::Tensor>& b_expand,
                                     const std::optional<at::Tensor>& w_project,
                                     const std::optional<at::Tensor>& b_project, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                                     bool residual) {
  constexpr const char* op = "fusekit.fused_mbconv_forward (CUDA)";
  const ScalarKind kind = cuda_kind(op, x);
  InvertedResidualCudaParams p;
  Operands keep;
  TORCH_CHECK(w_expand.dim() == 4, op, ": w_expand must be 4-D [E, Cin, kh, kw], got shape ", w_expand.sizes());
  describe_input(op, p, x, w_expand.size(2), w_expand.size(3), stride, padding, dilation, activation);
  p.E = w_expand.size(0);
  TORCH_CHECK(p.E >= 1 && w_expand.size(1) == p.Cin, op, ": w_expand must be [E, Cin, kh, kw] with E >= 1 and Cin = ",
              p.Cin, ", got shape ", w_expand.sizes());
  check_size(op, p.E, "E");
  p.w_expand = operand(op, x, std::optional<at::Tensor>(w_expand), "w_expand", w_expand.sizes(), keep.w_expand);
  p.b_expand = operand(op, x, b_expand, "b_expand", {p.E}, keep.b_expand);
  if (given(w_project)) {
    TORCH_CHECK(w_project->dim() == 2 && w_project->size(1) == p.E && w_project->size(0) >= 1, op,
                ": w_project must be [Cout, E] with E = ", p.E, ", got shape ", w_project->sizes());
    p.Cout = w_project->size(0);
    check_size(op, p.Cout, "Cout");
    p.w_project = operand(op, x, w_project, "w_project", w_project->sizes(), keep.w_project);
    p.b_project = operand(op, x, b_project, "b_project", {p.Cout}, keep.b_project);
  } else {
    TORCH_CHECK(!given(b_project), op, ": b_project needs w_project (without a projection y = a1)");
    p.Cout = p.E;
  }
  p.residual = residual;
  check_residual(op, p);
  p.x = x.const_data_ptr();

  const c10::cuda::CUDAGuard guard(x.device());
  check_fits(op, p, InvertedResidualOp::FusedMbconv);
  at::Tensor y = allocate_output(x, p);
  if (y.numel() == 0) return y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(cuda::fused_mbconv_forward(p, kind, stream), op);
  return y;
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CUDA, m) {
  m.impl("inverted_residual_forward", &fusekit::inverted_residual_forward_cuda);
  m.impl("inverted_residual_dw_sums", &fusekit::inverted_residual_dw_sums_cuda);
  m.impl("fused_mbconv_forward", &fusekit::fused_mbconv_forward_cuda);
}
