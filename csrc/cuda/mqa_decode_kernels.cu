// CUDA kernels of KV-cache decode attention (torch-free): append, split attention (tensor-core
// path for fp16 / bf16, CUDA-core path for fp32) and the log-sum-exp combine, with the host
// entry points. The block / warp work lives in ../kernels/mqa_decode_cuda.cuh; the kernels here
// only bind it to blockIdx / threadIdx / dynamic shared memory.
//
// Instantiations: fp16 and bf16 x (DP, MT) in {(64,1), (64,2), (128,1), (128,2), (256,1)}
// (MT = 2: 32 query rows per block, used when a KV head has more than 16); fp32 x DP in
// {32, 64, 128, 256}. Fastest: D = 64 and D = 128 (no padding). Other D pay only their padded
// k-steps (cheap next to the loads); D not a multiple of 16 bytes, or rows not 16-byte aligned,
// stage through the slower scalar fallback.
#include <cuda_runtime.h>

#include <climits>

#include "../kernels/mqa_decode_cuda.cuh"
#include "mqa_decode_cuda.h"

// cp.async, ldmatrix and bf16 mma need sm_80: older targets (if the arch list has any) get
// trapping kernels, and the launcher refuses such devices before launching.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FUSEKIT_MQA_ARCH_OK 0
#else
#define FUSEKIT_MQA_ARCH_OK 1
#endif

namespace fusekit::mqa {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

template <typename T, int DP, int MT>
__global__ void __launch_bounds__(MmaConfig<DP, MT>::kMaxThreads, 1) decode_mma_kernel(const DecodeArgs a) {
#if FUSEKIT_MQA_ARCH_OK
  extern __shared__ __align__(16) unsigned char mqa_smem[];
  decode_block_mma<T, DP, MT>(a, blockIdx.x, static_cast<int>(threadIdx.x), mqa_smem);
#else
  __trap();
#endif
}

template <int DP>
__global__ void __launch_bounds__(SimtConfig<DP>::kMaxThreads, SimtConfig<DP>::kMinBlocks)
    decode_simt_kernel(const DecodeArgs a) {
#if FUSEKIT_MQA_ARCH_OK
  extern __shared__ __align__(16) unsigned char mqa_smem[];
  decode_block_simt<DP>(a, blockIdx.x, static_cast<int>(threadIdx.x), mqa_smem);
#else
  __trap();
#endif
}

template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(const DecodeArgs a, int64_t rows) {
  __shared__ float weights[kCombineWarps][kMaxSplits];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;
  if (row < rows) combine_row<T>(a, row, static_cast<int>(threadIdx.x) % 32, weights[warp]);
}

constexpr int kAppendThreads = 256;

template <typename E>
__global__ void __launch_bounds__(kAppendThreads) append_kernel(const DecodeArgs a, int64_t items) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += step)
    append_item<E>(a, i);
}

// ---------------------------------------------------------------------------------------------
// Kernel selection and device properties
// ---------------------------------------------------------------------------------------------

constexpr int kNumKernels = 14;
constexpr int kMaxDevices = 64;

struct DecodeKernel {
  const void* fn = nullptr;
  int max_warps = 0;
  size_t smem_by_warps[5] = {};  // dynamic shared memory for 1 .. max_warps warps
  int rows_per_block = 1;
  int id = -1;  // index into the per-device caches
};

template <typename C>
DecodeKernel describe(const void* fn, int id) {
  DecodeKernel k;
  k.fn = fn;
  k.max_warps = C::kMaxWarps;
  for (int w = 1; w <= C::kMaxWarps; ++w) k.smem_by_warps[w] = C::smem_bytes(w);
  k.rows_per_block = C::kRows;
  k.id = id;
  return k;
}

template <typename T, int DP, int MT>
DecodeKernel mma_kernel(int id) {
  return describe<MmaConfig<DP, MT>>(reinterpret_cast<const void*>(&decode_mma_kernel<T, DP, MT>), id);
}

template <int DP>
DecodeKernel simt_kernel(int id) {
  return describe<SimtConfig<DP>>(reinterpret_cast<const void*>(&decode_simt_kernel<DP>), id);
}

template <typename T>
DecodeKernel select_mma(int64_t D, int64_t rows, int base) {
  const int dp = mma_bucket(D);
  const bool two = mma_row_tiles(rows, dp) == 2;
  if (dp == 64) return two ? mma_kernel<T, 64, 2>(base + 1) : mma_kernel<T, 64, 1>(base);
  if (dp == 128) return two ? mma_kernel<T, 128, 2>(base + 3) : mma_kernel<T, 128, 1>(base + 2);
  return mma_kernel<T, 256, 1>(base + 4);
}

DecodeKernel select_kernel(ScalarKind dtype, int64_t D, int64_t rows) {
  switch (dtype) {
    case ScalarKind::Float16: return select_mma<__half>(D, rows, 0);
    case ScalarKind::BFloat16: return select_mma<__nv_bfloat16>(D, rows, 5);
    case ScalarKind::Float32:
      switch (simt_bucket(D)) {
        case 32: return simt_kernel<32>(10);
        case 64: return simt_kernel<64>(11);
        case 128: return simt_kernel<128>(12);
        default: return simt_kernel<256>(13);
      }
    default: return {};
  }
}

int element_bytes(ScalarKind dtype) { return dtype == ScalarKind::Float32 ? 4 : 2; }

bool supported(ScalarKind dtype) {
  return dtype == ScalarKind::Float32 || dtype == ScalarKind::Float16 || dtype == ScalarKind::BFloat16;
}

int current_device() {
  int device = 0;
  cudaGetDevice(&device);
  return device;
}

struct DeviceInfo {
  int sm_count = 1;
  size_t smem_optin = 48 * 1024;  // per block, after cudaFuncSetAttribute
};

DeviceInfo device_info(int device) {
  static thread_local DeviceInfo cached[kMaxDevices];
  static thread_local bool known[kMaxDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && known[device]) return cached[device];
  DeviceInfo d;
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && v > 0) d.sm_count = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess && v > 0)
    d.smem_optin = static_cast<size_t>(v);
  if (cacheable) {
    cached[device] = d;
    known[device] = true;
  }
  return d;
}

// A kernel with its block shape for a device: the most warps whose shared memory fits.
struct KernelLaunch {
  DecodeKernel k;
  int warps = 0;  // 0: does not fit the device
  size_t smem = 0;
};

KernelLaunch fit_kernel(const DecodeKernel& k, const DeviceInfo& dev) {
  KernelLaunch l{k, 0, 0};
  for (int w = k.max_warps; w >= 1; --w)
    if (k.smem_by_warps[w] <= dev.smem_optin) {
      l.warps = w;
      l.smem = k.smem_by_warps[w];
      break;
    }
  return l;
}

// Raises the kernel's dynamic shared-memory limit above the 48 KB default (once per device).
cudaError_t allow_smem(const KernelLaunch& l, int device) {
  static thread_local bool granted[kMaxDevices][kNumKernels] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (l.smem <= 48 * 1024 || (cacheable && granted[device][l.k.id])) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(l.k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.smem));
  if (err == cudaSuccess && cacheable) granted[device][l.k.id] = true;
  return err;
}

// Blocks of the kernel resident per SM (>= 1).
int resident_blocks(const KernelLaunch& l, int device) {
  static thread_local int cached[kMaxDevices][kNumKernels] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && cached[device][l.k.id] > 0) return cached[device][l.k.id];
  int n = 0;
  if (allow_smem(l, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, l.k.fn, 32 * l.warps, l.smem) != cudaSuccess || n < 1) {
    cudaGetLastError();  // a failed query only costs a worse split choice; the launch reports real errors
    n = 1;
  }
  if (cacheable) cached[device][l.k.id] = n;
  return n;
}

unsigned grid_of(int64_t blocks, int64_t cap) {
  return static_cast<unsigned>(lmax(1, lmin(blocks, cap)));
}

}  // namespace
}  // namespace fusekit::mqa

namespace fusekit::cuda {

int mqa_decode_num_splits(const MqaDecodeCudaParams& p, ScalarKind dtype) {
  using namespace fusekit::mqa;
  if (!supported(dtype) || p.B <= 0 || p.Hkv <= 0 || p.n <= 0 || p.Hq <= 0) return 1;
  const int device = current_device();
  const KernelLaunch l = fit_kernel(select_kernel(dtype, p.D, p.Hq / p.Hkv * p.n), device_info(device));
  if (l.warps == 0) return 1;
  const int64_t rows = p.Hq / p.Hkv * p.n;
  const int64_t units = p.B * p.Hkv * cdiv(rows, l.k.rows_per_block);
  const int64_t slots = static_cast<int64_t>(device_info(device).sm_count) * resident_blocks(l, device);
  return choose_num_splits(units, p.Lmax, p.num_splits, slots,
                           min_split_keys(lmin(rows, l.k.rows_per_block), element_bytes(dtype)));
}

cudaError_t mqa_decode(const MqaDecodeCudaParams& p, ScalarKind dtype, cudaStream_t stream) {
  using namespace fusekit::mqa;
  if (!supported(dtype) || p.num_splits < 1 || p.num_splits > kMaxSplits || p.Hkv <= 0 || p.D < 1 || p.D > 256)
    return cudaErrorInvalidValue;
  if (p.num_splits > 1 && (p.ws_out == nullptr || p.ws_lse == nullptr)) return cudaErrorInvalidValue;
  if (p.B == 0 || p.n == 0 || p.Hq == 0) return cudaSuccess;
  const int es = element_bytes(dtype);
  const int device = current_device();
  const KernelLaunch l = fit_kernel(select_kernel(dtype, p.D, p.Hq / p.Hkv * p.n), device_info(device));
  if (l.warps == 0) return cudaErrorInvalidConfiguration;
  DecodeArgs a = make_decode_args(p, es);
  set_block_shape(a, l.k.rows_per_block, l.warps);

  if (a.append) {
    const int64_t items = append_items(a, es);
    const unsigned grid = grid_of(cdiv(items, kAppendThreads), 65535);
    if (es == 2)
      append_kernel<uint16_t><<<grid, kAppendThreads, 0, stream>>>(a, items);
    else
      append_kernel<uint32_t><<<grid, kAppendThreads, 0, stream>>>(a, items);
  }

  const int64_t blocks = static_cast<int64_t>(a.B) * a.Hkv * a.splits * a.row_groups;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  cudaError_t err = allow_smem(l, device);
  if (err != cudaSuccess) return err;
  void* args[] = {&a};
  err = cudaLaunchKernel(l.k.fn, dim3(static_cast<unsigned>(blocks)), dim3(32 * l.warps), args, l.smem, stream);
  if (err != cudaSuccess) return err;

  if (a.splits > 1) {
    const int64_t rows = static_cast<int64_t>(a.B) * a.n * a.Hq;
    const int64_t grid = cdiv(rows, kCombineWarps);
    if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
    const dim3 g(static_cast<unsigned>(grid)), t(kCombineWarps * 32);
    switch (dtype) {
      case ScalarKind::Float16: combine_kernel<__half><<<g, t, 0, stream>>>(a, rows); break;
      case ScalarKind::BFloat16: combine_kernel<__nv_bfloat16><<<g, t, 0, stream>>>(a, rows); break;
      default: combine_kernel<float><<<g, t, 0, stream>>>(a, rows); break;
    }
  }
  return cudaGetLastError();
}

}  // namespace fusekit::cuda
