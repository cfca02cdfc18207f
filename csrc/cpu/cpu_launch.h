// Shared by the CPU launchers: the one dtype switch (from an ATen dtype to the storage type the
// torch-free kernels take, csrc/kernels/cpu_isa.h), argument checks, and the checked inputs and
// fresh outputs of an attention backward (multi-query and neighborhood attention alike).
#pragma once
#include <ATen/ATen.h>

#include "../kernels/cpu_isa.h"

#include <tuple>

namespace fusekit {

// Calls f with a null pointer of t's storage type.
template <typename F>
void dispatch_cpu_dtype(const at::Tensor& t, const char* op, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    case at::kBFloat16: return f(static_cast<cpu::bf16_t*>(nullptr));
    case at::kHalf: return f(static_cast<cpu::fp16_t*>(nullptr));
    default:
      TORCH_CHECK_TYPE(false, op, ": dtype ", t.scalar_type(), " is not supported (float32, float64, float16, bfloat16)");
  }
}

inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Unit stride over the head dim is what the kernels assume; other strides are read in place.
inline at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline void check_same(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type(), " (all must match)");
}

// An attention backward's tensors: the saved forward tensors checked against q (grad_out and out
// shaped like q, lse [q.shape[:-1]] in the accumulation dtype) with a unit-stride head dim, and
// fresh contiguous gradients plus the delta workspace (lse-shaped).
struct AttentionBackwardTensors {
  at::Tensor q, k, v, grad_out, out, lse;
  at::Tensor grad_q, grad_k, grad_v, delta;
};

inline AttentionBackwardTensors prepare_attention_backward(const char* op, const at::Tensor& grad_out,
                                                           const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& out,
                                                           const at::Tensor& lse) {
  check_same(op, q, "q", grad_out, "grad_out");
  check_same(op, q, "q", out, "out");
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": grad_out must have q's shape ", q.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == acc_dtype(q), op, ": lse must be a CPU ", acc_dtype(q),
              " tensor, got ", lse.scalar_type(), " on ", lse.device());
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, q.dim() - 1), op, ": lse must have shape q.shape[:-1] = ",
              q.sizes().slice(0, q.dim() - 1), ", got ", lse.sizes());
  AttentionBackwardTensors t;
  t.q = unit_last(q); t.k = unit_last(k); t.v = unit_last(v);
  t.grad_out = unit_last(grad_out); t.out = unit_last(out); t.lse = lse.contiguous();
  const auto contiguous = at::MemoryFormat::Contiguous;
  t.grad_q = at::empty(t.q.sizes(), t.q.options().memory_format(contiguous));
  t.grad_k = at::empty(t.k.sizes(), t.k.options().memory_format(contiguous));
  t.grad_v = at::empty(t.v.sizes(), t.v.options().memory_format(contiguous));
  t.delta = at::empty(t.lse.sizes(), t.lse.options());
  return t;
}

}  // namespace fusekit
