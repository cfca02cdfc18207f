// CUDA kernels of the fused inverted-residual blocks (torch-free) and their host entry points.
// The block work lives in ../kernels/inverted_residual_cuda.cuh; the kernels here bind it to
// blockIdx / threadIdx / dynamic shared memory (DeviceBlock: one phase, then a barrier).
//
// Instantiations: {fp32, fp16, bf16} x activation {identity, relu, relu6, silu, hardswish} x
// depthwise kernel {3x3, 5x5, 7x7, any} for the forward and the dw_sums partials; {fp32, fp16,
// bf16} x activation for the fused MBConv; one partial-reduction kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "../kernels/inverted_residual_cuda.cuh"
#include "inverted_residual_cuda.h"

// sm_80 is the oldest target the package builds for; older archs (if listed) get trapping kernels.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FUSEKIT_IR_ARCH_OK 0
#else
#define FUSEKIT_IR_ARCH_OK 1
#endif

namespace fusekit::ir {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

struct DeviceBlock {
  template <typename F> __host__ __device__ __forceinline__ void phase(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
#endif
  }
};

// Two resident blocks per SM as the register target (<= 128 registers per thread).
template <typename T, int ACT, int K, bool kSums>
__global__ void __launch_bounds__(kThreads, 2) inverted_residual_kernel(const IrArgs a) {
#if FUSEKIT_IR_ARCH_OK
  extern __shared__ __align__(16) float ir_smem[];
  DeviceBlock blk;
  inverted_residual_block<T, ACT, K, kSums>(a, blockIdx.x, ir_smem, blk);
#else
  __trap();
#endif
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, 2) fused_mbconv_kernel(const IrArgs a) {
#if FUSEKIT_IR_ARCH_OK
  extern __shared__ __align__(16) float ir_smem[];
  DeviceBlock blk;
  fused_mbconv_block<T, ACT>(a, blockIdx.x, ir_smem, blk);
#else
  __trap();
#endif
}

__global__ void __launch_bounds__(kThreads) reduce_sum_partials_kernel(const IrArgs a, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < count) reduce_sum_partials(a, i);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

struct DeviceInfo {
  size_t smem_optin = 48 * 1024;
  int num_sms = 1;
};

DeviceInfo device_info() {
  DeviceInfo info;
  int device = 0, v = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return info;
  }
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess && v > 0) {
    info.smem_optin = static_cast<size_t>(v);
  }
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && v > 0) {
    info.num_sms = v;
  }
  cudaGetLastError();
  return info;
}

// The launch plan of `op` on the current device; false when no tile fits.
bool plan(const InvertedResidualCudaParams& p, IrOp op, IrArgs& a) {
  a = ir_args(p, op);
  const DeviceInfo info = device_info();
  return ir_choose_tile(a, op, info.smem_optin, info.num_sms);
}

template <typename Fn>
cudaError_t with_element_type(ScalarKind dtype, Fn fn) {
  switch (dtype) {
    case ScalarKind::Float32: return fn(float{});
    case ScalarKind::Float16: return fn(__half{});
    case ScalarKind::BFloat16: return fn(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename Fn>
cudaError_t with_activation(int activation, Fn fn) {
  switch (activation) {
    case 0: return fn(std::integral_constant<int, 0>{});
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: return cudaErrorInvalidValue;
  }
}

// Square 3 / 5 kernels (MobileNetV2, EfficientNet) get unrolled taps in the forward kernel; other
// sizes and the statistics pass (training, squeeze-excitation) the generic loop (K = 0). Fewer
// instantiations keep the build time of this file in check.
template <typename Fn>
cudaError_t with_kernel_size(int kh, int kw, IrOp op, Fn fn) {
  if (op == IrOp::Forward && kh == kw && kh == 3) return fn(std::integral_constant<int, 3>{});
  if (op == IrOp::Forward && kh == kw && kh == 5) return fn(std::integral_constant<int, 5>{});
  return fn(std::integral_constant<int, 0>{});
}

cudaError_t launch(const void* fn, const IrArgs& a, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(a.smem_floats) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  IrArgs args = a;
  void* kernel_args[] = {&args};
  return cudaLaunchKernel(fn, dim3(static_cast<unsigned>(a.num_blocks)), dim3(kThreads), kernel_args, smem, stream);
}

cudaError_t run(const InvertedResidualCudaParams& p, ScalarKind dtype, IrOp op, cudaStream_t stream) {
  IrArgs a;
  if (!plan(p, op, a)) return cudaErrorInvalidConfiguration;
  if (a.num_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if (a.num_blocks == 0) {  // no output pixels: empty y; the sums of an empty set are 0
    if (op == IrOp::DwSums && p.N > 0) {
      return cudaMemsetAsync(p.sums, 0, static_cast<size_t>(p.N) * 3 * p.E * sizeof(float), stream);
    }
    return cudaSuccess;
  }
  return with_element_type(dtype, [&](auto elem) {
    using T = decltype(elem);
    return with_activation(p.activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      if (op == IrOp::FusedMbconv) return launch(reinterpret_cast<const void*>(&fused_mbconv_kernel<T, ACT>), a, stream);
      return with_kernel_size(a.kh, a.kw, op, [&](auto ksize) {
        constexpr int K = decltype(ksize)::value;
        if (op == IrOp::Forward) {
          return launch(reinterpret_cast<const void*>(&inverted_residual_kernel<T, ACT, K, false>), a, stream);
        }
        if constexpr (K != 0) {
          return cudaErrorInvalidValue;  // not reached: the statistics pass always takes the generic loop
        } else {
          cudaError_t err = launch(reinterpret_cast<const void*>(&inverted_residual_kernel<T, ACT, 0, true>), a, stream);
          if (err != cudaSuccess) return err;
          const int64_t count = a.N * 3 * a.E;
          const int64_t blocks = (count + kThreads - 1) / kThreads;
          if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
          reduce_sum_partials_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, count);
          return cudaGetLastError();
        }
      });
    });
  });
}

}  // namespace
}  // namespace fusekit::ir

namespace fusekit::cuda {

size_t inverted_residual_min_smem_bytes(const InvertedResidualCudaParams& p, InvertedResidualOp op) {
  ir::IrArgs a = ir::ir_args(p, op);
  return ir::ir_plan(a, op, 1, 4);  // the smallest candidate tile of ir_choose_tile
}

size_t inverted_residual_device_smem_bytes() { return ir::device_info().smem_optin; }

int64_t inverted_residual_dw_sums_workspace_floats(const InvertedResidualCudaParams& p) {
  ir::IrArgs a;
  if (!ir::plan(p, InvertedResidualOp::DwSums, a)) return 0;
  return a.num_blocks * 3 * a.E;
}

cudaError_t inverted_residual_forward(const InvertedResidualCudaParams& p, ScalarKind dtype, cudaStream_t stream) {
  return ir::run(p, dtype, InvertedResidualOp::Forward, stream);
}

cudaError_t inverted_residual_dw_sums(const InvertedResidualCudaParams& p, ScalarKind dtype, cudaStream_t stream) {
  return ir::run(p, dtype, InvertedResidualOp::DwSums, stream);
}

cudaError_t fused_mbconv_forward(const InvertedResidualCudaParams& p, ScalarKind dtype, cudaStream_t stream) {
  return ir::run(p, dtype, InvertedResidualOp::FusedMbconv, stream);
}

}  // namespace fusekit::cuda
