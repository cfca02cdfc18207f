// CUDA kernels of the fused neighborhood attention (torch-free) and their host entry points.
// The block work lives in ../kernels/na_cuda.cuh; the kernels here bind it to blockIdx /
// threadIdx / dynamic shared memory.
//
// Instantiations: fp32 x DP in {32, 64, 128, 256} and {fp16, bf16} x DP 256 for the CUDA-core
// forward; {fp16, bf16} x DP in {64, 128} for the tensor-core forward (every 16-bit forward with
// D <= 128); {fp32, fp16, bf16} x DP in {32, 64, 128, 256} for the CUDA-core dQ and dK / dV
// kernels; the delta kernel per dtype.
// Shared memory per block (KiB) for DP 32 / 64 / 128 / 256: CUDA-core forward 29 / 45 / 77 / 104,
// dQ 38 / 62 / 110 / 136 (+ up to 16 for the grad_rpb table), dK / dV 46 / 70 / 118 / 140;
// tensor-core forward 29 (DP 64) / 53 (DP 128). Every kernel fits sm_80 / sm_90 (163 / 227 KiB
// opt-in); sm_86 / sm_89 (99 KiB) cannot run the backward for D > 64 (the launcher says so).
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "../kernels/na_cuda.cuh"
#include "na_cuda.h"

// sm_80 is the oldest target the package builds for; older archs (if listed) get trapping kernels.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FUSEKIT_NA_ARCH_OK 0
#else
#define FUSEKIT_NA_ARCH_OK 1
#endif

namespace fusekit::na {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

template <typename T, int DP>
__global__ void __launch_bounds__(NaConfig<DP>::kThreads, 1) na_forward_kernel(const NaArgs a) {
#if FUSEKIT_NA_ARCH_OK
  extern __shared__ __align__(16) unsigned char na_smem[];
  na_forward_block<T, DP>(a, blockIdx.x, static_cast<int>(threadIdx.x), na_smem);
#else
  __trap();
#endif
}

template <typename T, int DP>
__global__ void __launch_bounds__(NaMmaConfig<DP>::kThreads) na_forward_mma_kernel(const NaArgs a) {
#if FUSEKIT_NA_ARCH_OK
  extern __shared__ __align__(16) unsigned char na_smem[];
  na_forward_block_mma<T, DP>(a, blockIdx.x, static_cast<int>(threadIdx.x), na_smem);
#else
  __trap();
#endif
}

template <typename T, int DP>
__global__ void __launch_bounds__(NaConfig<DP>::kThreads, 1) na_dq_kernel(const NaArgs a) {
#if FUSEKIT_NA_ARCH_OK
  extern __shared__ __align__(16) unsigned char na_smem[];
  na_dq_block<T, DP>(a, blockIdx.x, static_cast<int>(threadIdx.x), na_smem);
#else
  __trap();
#endif
}

template <typename T, int DP>
__global__ void __launch_bounds__(NaConfig<DP>::kThreads, 1) na_dkv_kernel(const NaArgs a) {
#if FUSEKIT_NA_ARCH_OK
  extern __shared__ __align__(16) unsigned char na_smem[];
  na_dkv_block<T, DP>(a, blockIdx.x, static_cast<int>(threadIdx.x), na_smem);
#else
  __trap();
#endif
}

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32) na_delta_kernel(const NaArgs a, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;
  if (row < rows) na_delta_row<T>(a, row, static_cast<int>(threadIdx.x) % 32);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

bool supported(ScalarKind dtype) {
  return dtype == ScalarKind::Float32 || dtype == ScalarKind::Float16 || dtype == ScalarKind::BFloat16;
}

size_t smem_optin() {
  int device = 0, v = 0;
  cudaGetDevice(&device);
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess || v <= 0) {
    cudaGetLastError();
    return 48 * 1024;
  }
  return static_cast<size_t>(v);
}

template <int DP>
size_t max_smem_bytes() {
  using S = NaSmem<DP>;
  const size_t f = S::forward_bytes(), q = S::dq_bytes(0), kv = S::dkv_bytes();
  return f > q ? (f > kv ? f : kv) : (q > kv ? q : kv);
}

size_t max_smem_bytes(int dp) {
  switch (dp) {
    case 32: return max_smem_bytes<32>();
    case 64: return max_smem_bytes<64>();
    case 128: return max_smem_bytes<128>();
    default: return max_smem_bytes<256>();
  }
}

cudaError_t launch(const void* fn, int64_t blocks, int threads, size_t smem, NaArgs& a, cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  void* args[] = {&a};
  return cudaLaunchKernel(fn, dim3(static_cast<unsigned>(blocks)), dim3(threads), args, smem, stream);
}

template <typename T, int DP>
cudaError_t forward_dp(const NaCudaParams& p, cudaStream_t stream) {
  using C = NaConfig<DP>;
  NaArgs a = na_make_args(p, sizeof(T), C::kRows);
  const int64_t blocks = static_cast<int64_t>(a.B) * tiles_per_head(a.tiles) * a.Hq;
  return launch(reinterpret_cast<const void*>(&na_forward_kernel<T, DP>), blocks, C::kThreads,
                NaSmem<DP>::forward_bytes(), a, stream);
}

template <typename T, int DP>
cudaError_t forward_mma_dp(const NaCudaParams& p, cudaStream_t stream) {
  using C = NaMmaConfig<DP>;
  NaArgs a = na_make_args(p, sizeof(T), C::kRows);
  const int64_t blocks = static_cast<int64_t>(a.B) * tiles_per_head(a.tiles) * a.Hq;
  return launch(reinterpret_cast<const void*>(&na_forward_mma_kernel<T, DP>), blocks, C::kThreads,
                C::smem_bytes(), a, stream);
}

template <typename T, int DP>
cudaError_t backward_dp(const NaCudaParams& p, cudaStream_t stream) {
  using C = NaConfig<DP>;
  NaArgs a = na_make_args(p, sizeof(T), C::kRows);
  const int64_t rows = static_cast<int64_t>(a.B) * a.X[0] * a.X[1] * a.X[2] * a.Hq;
  if (rows == 0) return cudaSuccess;
  const int64_t delta_blocks = (rows + kDeltaWarps - 1) / kDeltaWarps;
  if (delta_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  na_delta_kernel<T><<<static_cast<unsigned>(delta_blocks), kDeltaWarps * 32, 0, stream>>>(a, rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const size_t optin = smem_optin();
  a.rpb_smem = a.rpb != nullptr && a.rpb_size <= kRpbSmemMaxFloats && NaSmem<DP>::dq_bytes(a.rpb_size) <= optin;
  const int64_t dq_blocks = static_cast<int64_t>(a.B) * tiles_per_head(a.tiles) * a.Hq;
  err = launch(reinterpret_cast<const void*>(&na_dq_kernel<T, DP>), dq_blocks, C::kThreads,
               NaSmem<DP>::dq_bytes(a.rpb_smem ? a.rpb_size : 0), a, stream);
  if (err != cudaSuccess) return err;
  const int64_t dkv_blocks = static_cast<int64_t>(a.B) * tiles_per_head(a.ktiles) * a.Hkv;
  return launch(reinterpret_cast<const void*>(&na_dkv_kernel<T, DP>), dkv_blocks, C::kThreads,
                NaSmem<DP>::dkv_bytes(), a, stream);
}

template <typename T>
cudaError_t forward_t(const NaCudaParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {  // tensor cores for 16-bit inputs up to D = 128
    if (p.D <= 64) return forward_mma_dp<T, 64>(p, stream);
    if (p.D <= 128) return forward_mma_dp<T, 128>(p, stream);
    return forward_dp<T, 256>(p, stream);
  } else {
    switch (na_head_bucket(p.D)) {
      case 32: return forward_dp<T, 32>(p, stream);
      case 64: return forward_dp<T, 64>(p, stream);
      case 128: return forward_dp<T, 128>(p, stream);
      default: return forward_dp<T, 256>(p, stream);
    }
  }
}

template <typename T>
cudaError_t backward_t(const NaCudaParams& p, cudaStream_t stream) {
  switch (na_head_bucket(p.D)) {
    case 32: return backward_dp<T, 32>(p, stream);
    case 64: return backward_dp<T, 64>(p, stream);
    case 128: return backward_dp<T, 128>(p, stream);
    default: return backward_dp<T, 256>(p, stream);
  }
}

bool valid_params(const NaCudaParams& p, ScalarKind dtype) {
  return supported(dtype) && p.D >= 1 && p.D <= 256 && p.Hkv >= 1 && p.Hq >= 1 && p.Hq % p.Hkv == 0;
}

}  // namespace
}  // namespace fusekit::na

namespace fusekit::cuda {

bool na_fits_device(int64_t D, size_t smem_optin_bytes) {
  return na::max_smem_bytes(na::na_head_bucket(D)) <= smem_optin_bytes;
}

cudaError_t na_forward(const NaCudaParams& p, ScalarKind dtype, cudaStream_t stream) {
  using namespace fusekit::na;
  if (!valid_params(p, dtype)) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  switch (dtype) {
    case ScalarKind::Float16: return forward_t<__half>(p, stream);
    case ScalarKind::BFloat16: return forward_t<__nv_bfloat16>(p, stream);
    default: return forward_t<float>(p, stream);
  }
}

cudaError_t na_backward(const NaCudaParams& p, ScalarKind dtype, cudaStream_t stream) {
  using namespace fusekit::na;
  if (!valid_params(p, dtype)) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  switch (dtype) {
    case ScalarKind::Float16: return backward_t<__half>(p, stream);
    case ScalarKind::BFloat16: return backward_t<__nv_bfloat16>(p, stream);
    default: return backward_t<float>(p, stream);
  }
}

}  // namespace fusekit::cuda
