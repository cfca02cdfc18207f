// Torch-free entry points of the CUDA depthwise kernels (depthwise_conv2d_kernels.cu).
// The torch-facing launcher (depthwise_conv2d_cuda.cpp) validates arguments, allocates
// outputs and passes the current stream; these functions only enqueue kernels on it and
// return cudaGetLastError() (never synchronize).
#pragma once
#include <cuda_runtime_api.h>
#include "../kernels/depthwise_conv2d_params.h"

namespace fusekit::cuda {

// out[n, c, ho, wo] = bias[c] + sum_{i,j} in[n, c, ho*sh - pad_top + i*dh, wo*sw - pad_left + j*dw] * w[c, i, j]
// (identity segments copy in -> out). Writes every element of out.
cudaError_t depthwise_conv2d_forward(const DepthwiseConv2dParams& p, ScalarKind dtype,
                                     const void* in, void* out, cudaStream_t stream);

// grad_in = d(out)/d(in)^T grad_out. Writes every element of grad_in (identity segments copy).
cudaError_t depthwise_conv2d_backward_input(const DepthwiseConv2dParams& p, ScalarKind dtype,
                                            const void* grad_out, void* grad_in, cudaStream_t stream);

// Accumulates (+=) into seg[s].grad_weight[c, i, j] = sum_{n,ho,wo} grad_out * in[...]
// and seg[s].grad_bias[c] = sum_{n,ho,wo} grad_out (when non-null), for non-identity segments.
cudaError_t depthwise_conv2d_backward_weight(const DepthwiseConv2dParams& p, ScalarKind dtype,
                                             const void* grad_out, const void* in, cudaStream_t stream);

}  // namespace fusekit::cuda
