// Torch-free entry points of the CUDA decode attention (mqa_decode_kernels.cu). The torch-facing
// launcher (mqa_decode_cuda.cpp) validates arguments, allocates out / lse / the split workspace
// and passes the current stream; these functions only enqueue kernels (never synchronize).
#pragma once
#include <cuda_runtime_api.h>

#include "../kernels/depthwise_conv2d_params.h"  // ScalarKind
#include "../kernels/mqa_decode_cuda_params.h"

namespace fusekit::cuda {

// The number of KV splits mqa_decode will use for p (p.num_splits = 0: chosen from the shapes
// and the current device's SM count / occupancy, never from cache_seqlens). >= 1; the launcher
// sizes the workspace with it and stores it in p.num_splits.
int mqa_decode_num_splits(const MqaDecodeCudaParams& p, ScalarKind dtype);

// Appends k_new / v_new into the caches (when given), then writes out and lse. dtype: Float32,
// Float16 or BFloat16 (anything else: cudaErrorInvalidValue). p.num_splits must come from
// mqa_decode_num_splits, with ws_out / ws_lse set when it is > 1.
cudaError_t mqa_decode(const MqaDecodeCudaParams& p, ScalarKind dtype, cudaStream_t stream);

}  // namespace fusekit::cuda
