// Shared by the CPU launchers: the one dtype switch, from an ATen dtype to the storage type the
// torch-free kernels take (csrc/kernels/cpu_isa.h).
#pragma once
#include <ATen/ATen.h>

#include "../kernels/cpu_isa.h"

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

}  // namespace fusekit
