// Torch-free description of a (multi-segment) depthwise 2-D convolution.
//
// One launch covers every channel of the input. Channels are split into up to
// kMaxDepthwiseSegments contiguous ranges ("segments"), each with its own kernel
// shape, padding and weights: a plain depthwise convolution is one segment,
// InceptionNeXt's token mixer is four (identity, square, 1 x band, band x 1).
// A segment with kh == 0 is an identity segment (output = input, stride 1 only).
//
// "in" always names the convolution's input-side tensor (x in forward, grad_x in
// backward-input) and "out" its output-side tensor (y or grad_y), whatever the
// direction of the kernel that uses the params.
#pragma once
#include <cstdint>

namespace fusekit {

constexpr int kMaxDepthwiseSegments = 4;

struct DepthwiseSegment {
  int64_t c_begin = 0, c_end = 0;   // channel range [c_begin, c_end) of in/out
  int64_t kh = 0, kw = 0;           // kernel size; kh == 0: identity segment
  int64_t pad_top = 0, pad_left = 0;
  const void* weight = nullptr;     // [c_end - c_begin, kh, kw], contiguous, element type of the data
  const void* bias = nullptr;       // [c_end - c_begin] or nullptr (forward only)
  void* grad_weight = nullptr;      // backward-weight: [c_end - c_begin, kh, kw] accumulator of
                                    // type acc_t (float for fp32/fp16/bf16, double for fp64), zero-filled by the caller
  void* grad_bias = nullptr;        // backward-weight: [c_end - c_begin] acc_t accumulator, zero-filled, or nullptr
};

struct DepthwiseConv2dParams {
  int64_t N = 0, C = 0, H = 0, W = 0;   // sizes of the convolution input
  int64_t Ho = 0, Wo = 0;               // sizes of the convolution output (same for all segments)
  int64_t stride_h = 1, stride_w = 1;
  int64_t dil_h = 1, dil_w = 1;
  int64_t in_stride[4] = {0, 0, 0, 0};  // element strides (n, c, h, w) of the input-side tensor
  int64_t out_stride[4] = {0, 0, 0, 0}; // element strides (n, c, h, w) of the output-side tensor
  bool channels_last = false;           // in and out are both NHWC-dense (true) or both NCHW-dense (false)
  int num_segments = 1;
  DepthwiseSegment seg[kMaxDepthwiseSegments];
};

// Element types the kernels are instantiated for.
enum class ScalarKind : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

}  // namespace fusekit
