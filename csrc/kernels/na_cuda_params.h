// Torch-free description of one fused neighborhood-attention problem (fusekit::na_forward /
// na_backward on CUDA), filled by csrc/cuda/na_cuda.cpp and read by the kernels of na_cuda.cuh.
#pragma once
#include <cstdint>

#include "na_window.h"

namespace fusekit {

// q [B, X_0, X_1, X_2, Hq, D], k / v [B, X_0, X_1, X_2, Hkv, D] (a rank-R problem padded with
// leading axes {length 1, kernel 1, stride 1, dilation 1}); element strides (batch, x_0, x_1,
// x_2, head) per tensor, unit stride in D. lse and delta are contiguous [B, X_0, X_1, X_2, Hq]
// float32. rpb [Hq, 2k_0 - 1, 2k_1 - 1, 2k_2 - 1] contiguous (nullptr: no bias).
struct NaCudaParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* rpb = nullptr;
  // forward outputs
  void* out = nullptr;
  float* lse = nullptr;  // forward: written; backward: the given lse (read)
  // backward inputs, workspaces and outputs
  const void* grad_out = nullptr;
  const void* out_in = nullptr;
  float* delta = nullptr;     // [B, X_0, X_1, X_2, Hq] workspace
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  float* grad_rpb = nullptr;  // fp32 [Hq, E_0, E_1, E_2], zeroed by the caller (with rpb only)

  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  na::Axis axis[3];
  int64_t q_stride[5] = {}, k_stride[5] = {}, v_stride[5] = {};
  int64_t out_stride[5] = {};                      // forward out
  int64_t grad_out_stride[5] = {}, out_in_stride[5] = {};
  int64_t grad_q_stride[5] = {}, grad_k_stride[5] = {}, grad_v_stride[5] = {};
  float scale = 1.f;
};

}  // namespace fusekit
