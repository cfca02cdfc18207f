// Torch-free entry points of the fused CUDA neighborhood attention (na_kernels.cu). The
// torch-facing launcher (na_cuda.cpp) validates arguments, allocates outputs and workspaces and
// passes the current stream; these functions only enqueue kernels (never synchronize).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernels/depthwise_conv2d_params.h"  // ScalarKind
#include "../kernels/na_cuda_params.h"

namespace fusekit {

namespace cuda {

// Shared memory the kernels need on a device with this opt-in limit: false when a kernel of
// this head dim does not fit (the launcher reports it).
bool na_fits_device(int64_t D, size_t smem_optin_bytes);

// Writes out and lse. dtype: Float32, Float16 or BFloat16 (anything else: cudaErrorInvalidValue).
cudaError_t na_forward(const NaCudaParams& p, ScalarKind dtype, cudaStream_t stream);

// Writes delta, grad_q, grad_k, grad_v and (with rpb) accumulates grad_rpb.
cudaError_t na_backward(const NaCudaParams& p, ScalarKind dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusekit
