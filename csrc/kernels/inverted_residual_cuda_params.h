// Torch-free description of one fused inverted-residual problem (fusekit::inverted_residual_forward,
// inverted_residual_dw_sums and fused_mbconv_forward on CUDA), filled by
// csrc/cuda/inverted_residual_cuda.cpp and read by the kernels of inverted_residual_cuda.cuh.
#pragma once
#include <cstdint>

namespace fusekit {

enum class InvertedResidualOp : int { Forward = 0, DwSums = 1, FusedMbconv = 2 };

// Every tensor except x and y is contiguous and has x's element type (the sums and their
// workspace are float32). Optional pointers are nullptr when absent.
//  inverted residual: w_expand [E, Cin] (nullptr: a1 = x, E == Cin), b_expand [E], w_dw [E, kh, kw],
//    b_dw [E], w_project [Cout, E], b_project [Cout], gate [N, E];
//  fused MBConv: w_expand [E, Cin, kh, kw], b_expand [E], w_project [Cout, E] (nullptr: y = a1,
//    Cout == E), b_project [Cout].
struct InvertedResidualCudaParams {
  const void* x = nullptr;
  const void* w_expand = nullptr;
  const void* b_expand = nullptr;
  const void* w_dw = nullptr;
  const void* b_dw = nullptr;
  const void* w_project = nullptr;
  const void* b_project = nullptr;
  const void* gate = nullptr;
  void* y = nullptr;        // [N, Cout, Ho, Wo] with strides y_stride (forward ops)
  float* sums = nullptr;    // dw_sums: [N, 3, E] contiguous float32
  float* partial = nullptr; // dw_sums: workspace of inverted_residual_dw_sums_workspace_floats() floats

  int64_t N = 0, Cin = 0, H = 0, W = 0;
  int64_t E = 0, Cout = 0, Ho = 0, Wo = 0;
  int64_t kh = 1, kw = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_left = 0;  // bottom / right padding only shape Ho / Wo
  int64_t dil_h = 1, dil_w = 1;
  int64_t x_stride[4] = {0, 0, 0, 0};  // element strides (n, c, h, w) of x
  int64_t y_stride[4] = {0, 0, 0, 0};  // element strides (n, c, h, w) of y
  bool channels_last = false;          // memory order of x and y (chooses the coalesced loop order)
  int activation = 0;                  // 0 identity, 1 relu, 2 relu6, 3 silu, 4 hardswish
  bool residual = false;               // y += x (Cout == Cin, Ho == H, Wo == W)
};

}  // namespace fusekit
