// Torch-free entry points of the fused CUDA inverted-residual blocks (inverted_residual_kernels.cu).
// The torch-facing launcher (inverted_residual_cuda.cpp) validates arguments, allocates outputs
// and the dw_sums workspace and passes the current stream; these functions only enqueue kernels
// on it (never synchronize). The plan (output tile, shared memory) depends on the sizes and on
// the current device only, so the queries below agree with the launches that follow them.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../kernels/depthwise_conv2d_params.h"  // ScalarKind
#include "../kernels/inverted_residual_cuda_params.h"

namespace fusekit::cuda {

// Shared memory the smallest output tile of `op` needs (bytes), and the current device's opt-in
// limit: the op can run when the first is <= the second.
size_t inverted_residual_min_smem_bytes(const InvertedResidualCudaParams& p, InvertedResidualOp op);
size_t inverted_residual_device_smem_bytes();

// Floats of the dw_sums workspace (p.partial): one partial per (sample, tile, statistic, channel).
int64_t inverted_residual_dw_sums_workspace_floats(const InvertedResidualCudaParams& p);

// dtype: Float32, Float16 or BFloat16 (anything else: cudaErrorInvalidValue); a plan that fits
// no tile, or a grid over INT_MAX blocks: cudaErrorInvalidConfiguration.
cudaError_t inverted_residual_forward(const InvertedResidualCudaParams& p, ScalarKind dtype, cudaStream_t stream);
// Writes p.sums [N, 3, E] (float32), using p.partial as workspace.
cudaError_t inverted_residual_dw_sums(const InvertedResidualCudaParams& p, ScalarKind dtype, cudaStream_t stream);
cudaError_t fused_mbconv_forward(const InvertedResidualCudaParams& p, ScalarKind dtype, cudaStream_t stream);

}  // namespace fusekit::cuda
