// CUDA launcher of the fused neighborhood attention (fusekit::na_forward / na_backward):
// argument checks, allocation of the outputs and workspaces, device guard and current stream
// around the torch-free kernels of na_kernels.cu, and the CUDA registration. Compiled by the
// host compiler (not nvcc).
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>
#include <vector>

#include "../na_launch.h"
#include "na_cuda.h"

namespace fusekit {
namespace {

ScalarKind na_kind(const char* op, const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return ScalarKind::Float32;
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": dtype ", q.scalar_type(),
                       " is not supported on CUDA (float32, float16, bfloat16; float64 runs on the CPU backend)");
  }
}

void check_like(const char* op, const at::Tensor& q, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but q has dtype ", q.scalar_type());
}

// A unit stride in D, copying only when needed (arbitrary batch / spatial / head strides stay).
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// (batch, x_0, x_1, x_2, head) element strides of a [B, *spatial(R), H, D] tensor; the padding
// axes (length 1) get stride 0.
void set_strides(int64_t (&dst)[5], const at::Tensor& t) {
  const int64_t R = t.dim() - 3;
  for (int i = 0; i < 5; ++i) dst[i] = 0;
  dst[0] = t.stride(0);
  for (int64_t a = 0; a < R; ++a) dst[1 + 3 - R + a] = t.stride(1 + a);
  dst[4] = t.stride(-2);
}

void check_fits_int32(const char* op, int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, op, ": ", what, " = ", v, " exceeds the int32 range of the CUDA kernels");
}

// Shapes, configuration and rpb: everything the kernels rely on. Fills sizes, axes and scale.
void describe(const char* op, NaCudaParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size, at::IntArrayRef stride,
              at::IntArrayRef dilation, const c10::List<bool>& is_causal, double scale) {
  const int64_t R = static_cast<int64_t>(kernel_size.size());
  // rank and per-axis rules: na_axes_from_args below
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == R + 3, op, ": q must be [B, *spatial(", R, "), Hq, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == R + 3, op, ": k must be [B, *spatial(", R, "), Hkv, D], got shape ", k.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  check_like(op, q, k, "k");
  check_like(op, q, v, "v");
  for (int64_t a = 0; a <= R; ++a)
    TORCH_CHECK(k.size(a) == q.size(a), op, ": q and k/v must have the same batch and spatial sizes, got ",
                q.sizes(), " and ", k.sizes());
  const int64_t D = q.size(-1), hq = q.size(-2), hkv = k.size(-2);
  TORCH_CHECK(D >= 1 && D <= 256 && k.size(-1) == D, op,
              ": q and k/v must have the same head dim in [1, 256], got ", D, " and ", k.size(-1));
  TORCH_CHECK(hkv >= 1 && hq >= 1 && hq % hkv == 0, op, ": the query head count (", hq,
              ") must be a positive multiple of the KV head count (", hkv, ")");
  check_fits_int32(op, q.size(0), "batch");
  check_fits_int32(op, hq, "query heads");
  p.B = q.size(0);
  p.Hq = hq;
  p.Hkv = hkv;
  p.D = D;
  p.scale = static_cast<float>(scale);
  const bool any_causal = na_axes_from_args(op, q.sizes().slice(1, R), kernel_size, stride, dilation, is_causal,
                                             p.axis);
  int64_t group_tokens = 1;  // tokens of one dilation group: bounds every key / query box
  for (const na::Axis& ax : p.axis) {
    group_tokens *= (ax.length + ax.dilation - 1) / ax.dilation;
    TORCH_CHECK(group_tokens <= INT_MAX - 64, op, ": a dilation group holds more than 2^31 tokens, which the "
                "CUDA kernels' 32-bit box indices cannot address");
  }
  if (!rpb.has_value() || !rpb->defined()) return;
  TORCH_CHECK(!any_causal, op, ": rpb (relative positional bias) is only supported when no axis is causal");
  check_like(op, q, *rpb, "rpb");
  std::vector<int64_t> shape{hq};
  int64_t per_head = 1;
  for (int64_t a = 0; a < R; ++a) {
    shape.push_back(2 * kernel_size[a] - 1);
    per_head *= shape.back();
  }
  TORCH_CHECK(rpb->sizes() == at::IntArrayRef(shape), op, ": rpb must be [Hq, 2k_0-1, ..] = ", shape, ", got ",
              rpb->sizes());
  check_fits_int32(op, per_head, "rpb entries per head");
}

cudaStream_t prepare_device(const char* op, const at::Tensor& q, int64_t D) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(prop->major >= 8, op, ": needs an sm_80 or newer GPU, ", prop->name, " is sm_", prop->major,
              prop->minor);
  TORCH_CHECK(cuda::na_fits_device(D, prop->sharedMemPerBlockOptin), op, ": head dim ", D,
              " needs more shared memory per block than ", prop->name, " offers (",
              prop->sharedMemPerBlockOptin, " bytes)");
  return at::cuda::getCurrentCUDAStream(q.device().index()).stream();
}

std::tuple<at::Tensor, at::Tensor> na_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, const std::optional<at::Tensor>& rpb,
                                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                   at::IntArrayRef dilation, const c10::List<bool>& is_causal,
                                                   double scale) {
  constexpr const char* op = "fusekit::na_forward (CUDA)";
  NaCudaParams p;
  describe(op, p, q_in, k_in, v_in, rpb, kernel_size, stride, dilation, is_causal, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const bool has_rpb = rpb.has_value() && rpb->defined();
  const at::Tensor rpb_c = has_rpb ? rpb->contiguous() : at::Tensor();
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.rpb = has_rpb ? rpb_c.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  set_strides(p.q_stride, q);
  set_strides(p.k_stride, k);
  set_strides(p.v_stride, v);
  set_strides(p.out_stride, out);
  const ScalarKind kind = na_kind(op, q);
  const cudaStream_t stream = prepare_device(op, q, p.D);
  const cudaError_t err = cuda::na_forward(p, kind, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& rpb,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation, const c10::List<bool>& is_causal,
    double scale) {
  constexpr const char* op = "fusekit::na_backward (CUDA)";
  NaCudaParams p;
  describe(op, p, q_in, k_in, v_in, rpb, kernel_size, stride, dilation, is_causal, scale);
  check_like(op, q_in, grad_out_in, "grad_out");
  check_like(op, q_in, out_in, "out");
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op,
              ": grad_out and out must have q's shape ", q_in.sizes(), ", got ", grad_out_in.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(lse_in.device() == q_in.device(), op, ": lse is on ", lse_in.device(), " but q is on ", q_in.device());
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.sizes() == q_in.sizes().slice(0, q_in.dim() - 1), op, ": lse must be [B, *spatial, Hq] = ",
              q_in.sizes().slice(0, q_in.dim() - 1), ", got ", lse_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor go = unit_last(grad_out_in), o = unit_last(out_in), lse = lse_in.contiguous();
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_q = at::empty(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor grad_k = at::empty(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor grad_v = at::empty(v.sizes(), v.options().memory_format(contiguous));
  const bool has_rpb = rpb.has_value() && rpb->defined();
  at::Tensor grad_rpb_acc = has_rpb ? at::zeros(rpb->sizes(), q.options().dtype(at::kFloat)) : at::Tensor();
  const auto finish_rpb = [&]() { return has_rpb ? grad_rpb_acc.to(rpb->scalar_type()) : q.new_empty({0}); };
  if (q.numel() == 0) {
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v, finish_rpb()};
  }
  const at::Tensor rpb_c = has_rpb ? rpb->contiguous() : at::Tensor();
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.rpb = has_rpb ? rpb_c.const_data_ptr() : nullptr;
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());  // read only in the backward
  p.grad_out = go.const_data_ptr();
  p.out_in = o.const_data_ptr();
  p.delta = delta.mutable_data_ptr<float>();
  p.grad_q = grad_q.mutable_data_ptr();
  p.grad_k = grad_k.mutable_data_ptr();
  p.grad_v = grad_v.mutable_data_ptr();
  p.grad_rpb = has_rpb ? grad_rpb_acc.mutable_data_ptr<float>() : nullptr;
  set_strides(p.q_stride, q);
  set_strides(p.k_stride, k);
  set_strides(p.v_stride, v);
  set_strides(p.grad_out_stride, go);
  set_strides(p.out_in_stride, o);
  set_strides(p.grad_q_stride, grad_q);
  set_strides(p.grad_k_stride, grad_k);
  set_strides(p.grad_v_stride, grad_v);
  const ScalarKind kind = na_kind(op, q);
  const cudaStream_t stream = prepare_device(op, q, p.D);
  const cudaError_t err = cuda::na_backward(p, kind, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return {grad_q, grad_k, grad_v, finish_rpb()};
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CUDA, m) {
  m.impl("na_forward", &fusekit::na_forward_cuda);
  m.impl("na_backward", &fusekit::na_backward_cuda);
}
