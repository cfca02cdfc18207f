// CUDA kernels of the depthwise 2-D convolution family (torch-free): forward, backward-input and
// backward-weight, for fp32 / fp64 / fp16 / bf16, NCHW or NHWC, one launch per function for all
// the channel segments. The per-phase device code and the tiling planners live in
// ../kernels/depthwise_conv2d_cuda.cuh; this file holds the kernels (loops over the phases
// with the barriers between them) and the host entry points.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstring>

#include "../kernels/depthwise_conv2d_cuda.cuh"
#include "depthwise_conv2d_cuda.h"

namespace fusekit::dwconv {

template <> struct Io<__half> {
  template <typename A> FUSEKIT_DW_HD static A ld(const __half* p) {
#if defined(__CUDA_ARCH__)
    return static_cast<A>(__half2float(__ldg(p)));
#else
    return static_cast<A>(__half2float(*p));
#endif
  }
  template <typename A> FUSEKIT_DW_HD static void st(__half* p, A v) { *p = __float2half_rn(static_cast<float>(v)); }
};

template <> struct Io<__nv_bfloat16> {
  template <typename A> FUSEKIT_DW_HD static A ld(const __nv_bfloat16* p) {
#if defined(__CUDA_ARCH__)
    return static_cast<A>(__bfloat162float(__ldg(p)));
#else
    return static_cast<A>(__bfloat162float(*p));
#endif
  }
  template <typename A> FUSEKIT_DW_HD static void st(__nv_bfloat16* p, A v) {
    *p = __float2bfloat16_rn(static_cast<float>(v));
  }
};

namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Register caps: 3 resident blocks of 256 threads for the sliding kernels, 2 otherwise (the
// largest that compile without spills).
template <typename T, bool kSliding>
__global__ void __launch_bounds__(kMaxThreads, kSliding ? 3 : 2) conv_tile_kernel(const ConvTileArgs a) {
  using A = typename AccOf<T>::type;
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW;
  extern __shared__ __align__(16) unsigned char dw_smem[];
  A* src_sm = reinterpret_cast<A*>(dw_smem);
  A* w_sm = src_sm + a.w_offset;
  const int t = static_cast<int>(threadIdx.x);
  const ThreadPos tp = conv_thread(a, t);
  for (int64_t b = blockIdx.x; b < a.num_blocks; b += gridDim.x) {
    const ConvBlock k = conv_block(a, b);
    const PlaneRef pr = conv_plane(a, k, tp.g);
    A acc[RH][RW];
FUSEKIT_DW_UNROLL
    for (int rh = 0; rh < RH; ++rh)
FUSEKIT_DW_UNROLL
      for (int r = 0; r < RW; ++r) acc[rh][r] = A(0);
    for (int chunk = 0; chunk < a.num_chunks; ++chunk) {
      if (chunk > 0) __syncthreads();
      conv_stage<T, A>(a, k, chunk, src_sm, w_sm, t);
      __syncthreads();
      if (pr.seg >= 0) {
        const SegDesc& s = a.seg[pr.seg];
        const StageWin w = conv_window(a, s, k, chunk);
        if (w.i_hi > w.i_lo) {
          const A* plane_sm = src_sm + tp.g * a.plane_elems;
          const A* wp = w_sm + tp.g * a.w_plane;
          if constexpr (kSliding)
            conv_compute_sliding(a, s, w, plane_sm, wp, tp.tx, tp.ty, acc);
          else
            conv_compute_walk(a, s, w, k, plane_sm, wp, tp.tx, tp.ty, acc);
        }
      }
    }
    __syncthreads();
    conv_acc_to_smem(a, src_sm, tp, acc);
    __syncthreads();
    conv_writeback<T, A>(a, k, src_sm, t);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(256) conv_direct_kernel(const ConvTileArgs a, int64_t total) {
  using A = typename AccOf<T>::type;
  T* dst = static_cast<T*>(a.dst);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    int64_t n, c, oy, ox;
    conv_direct_coords(a, e, n, c, oy, ox);
    const A v = conv_direct_value<T, A>(a, n, c, oy, ox);
    Io<T>::st(dst + n * a.dst_stride[0] + c * a.dst_stride[1] + oy * a.dst_stride[2] + ox * a.dst_stride[3], v);
  }
}

// The sliding fp32-accumulator weight-gradient kernel fits 80 registers (3 blocks) on sm_90;
// sm_8x needs more.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define FUSEKIT_DW_WGRAD_SLIDE_BLOCKS 2
#else
#define FUSEKIT_DW_WGRAD_SLIDE_BLOCKS 3
#endif

template <typename T, bool kSliding>
__global__ void __launch_bounds__(kMaxThreads, kSliding && sizeof(typename AccOf<T>::type) == 4 ? FUSEKIT_DW_WGRAD_SLIDE_BLOCKS : 2)
    wgrad_tile_kernel(const WgradArgs a) {
  using A = typename AccOf<T>::type;
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW;
  extern __shared__ __align__(16) unsigned char dw_smem[];
  A* x_sm = reinterpret_cast<A*>(dw_smem);
  A* gy_sm = x_sm + a.gy_offset;
  A* red = x_sm + a.red_offset;
  const int t = static_cast<int>(threadIdx.x);
  const WgradRole role = wgrad_role(a, t, RH, RW);
  const int passes = a.passes_h * a.passes_w;
  for (int64_t b = blockIdx.x; b < a.num_blocks; b += gridDim.x) {
    int64_t cg, bk, it_begin, it_end;
    a.div_bpg.divmod(b, cg, bk);
    wgrad_item_range(a, bk, it_begin, it_end);
    for (int pass = 0; pass < passes; ++pass) {
      const int i_lo = (pass / a.passes_w) * a.RGp * RH;
      const int j_lo = (pass % a.passes_w) * a.CGp * RW;
      int kh_b, kw_b;  // passes past the block's largest kernel have nothing to do
      wgrad_block_kmax(a, cg, kh_b, kw_b);
      if (i_lo >= kh_b || j_lo >= kw_b) continue;
      A acc[RH][RW];
FUSEKIT_DW_UNROLL
      for (int ih = 0; ih < RH; ++ih)
FUSEKIT_DW_UNROLL
        for (int r = 0; r < RW; ++r) acc[ih][r] = A(0);
      A gsum = A(0);
      for (int64_t it = it_begin; it < it_end; ++it) {
        const WgradItem item = wgrad_item(a, it);
        __syncthreads();
        wgrad_stage<T, A>(a, cg, item, i_lo, j_lo, x_sm, gy_sm, t);
        __syncthreads();
        wgrad_compute<A, kSliding>(a, cg, item, i_lo, j_lo, role, x_sm, gy_sm, acc, gsum);
      }
      __syncthreads();
      wgrad_acc_to_smem(a, red, t, acc, gsum);
      __syncthreads();
      wgrad_flush<A>(a, cg, i_lo, j_lo, pass == 0, red, t);
    }
  }
}

constexpr int kDirectThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDirectThreads) wgrad_direct_kernel(const WgradArgs a, int64_t slabs) {
  using A = typename AccOf<T>::type;
  __shared__ A red[kDirectThreads];
  const int t = static_cast<int>(threadIdx.x);
  const int64_t positions = a.N * a.Ho * a.Wo;
  for (int64_t b = blockIdx.x; b < a.C * slabs; b += gridDim.x) {
    int64_t c, sl;
    a.div_slabs.divmod(b, c, sl);
    const int si = find_segment(a.seg, a.num_segments, c);
    if (si < 0 || a.seg[si].identity) continue;
    const SegDesc& s = a.seg[si];
    const int64_t e_begin = a.div_slabs.div(sl * positions), e_end = a.div_slabs.div((sl + 1) * positions);
    const int taps = s.kh * s.kw + (s.grad_bias != nullptr ? 1 : 0);
    for (int tap = 0; tap < taps; ++tap) {
      A part = A(0);
      for (int64_t e = e_begin + t; e < e_end; e += blockDim.x) part += wgrad_direct_term<T, A>(a, s, c, tap, e);
      red[t] = part;
      __syncthreads();
      for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) red[t] += red[t + half];
        __syncthreads();
      }
      if (t == 0) {
        A* dst = tap == s.kh * s.kw ? static_cast<A*>(s.grad_bias) + (c - s.c_begin)
                                    : static_cast<A*>(s.grad_weight) + (c - s.c_begin) * s.kh * s.kw + tap;
        atomicAdd(dst, red[0]);
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

constexpr int kMaxDevices = 64;

unsigned grid_size(int64_t blocks) { return static_cast<unsigned>(lmin(lmax(blocks, 1), INT_MAX)); }
constexpr size_t kDefaultSmem = 48 * 1024;

DeviceLimits device_limits(int& device) {
  static thread_local DeviceLimits cached[kMaxDevices];
  static thread_local bool known[kMaxDevices] = {};
  device = 0;
  cudaGetDevice(&device);
  if (device >= 0 && device < kMaxDevices && known[device]) return cached[device];
  DeviceLimits lim;
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && v > 0) lim.sm_count = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess && v > 0)
    lim.smem_optin = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) == cudaSuccess && v > 0)
    lim.smem_per_sm = v;
  if (device >= 0 && device < kMaxDevices) {
    cached[device] = lim;
    known[device] = true;
  }
  return lim;
}

// Raises a kernel's dynamic shared-memory limit above the 48 KB default (once per kernel,
// size and device: one cache per kernel instantiation).
template <auto kKernel>
cudaError_t allow_smem(size_t bytes, int device) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  static thread_local size_t granted[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices && granted[device] >= bytes) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess && device >= 0 && device < kMaxDevices) granted[device] = bytes;
  return err;
}

// Launches a tile kernel with the grid, block and dynamic shared memory of its plan.
template <auto kKernel, typename Args>
cudaError_t launch_tile(const Args& plan, int device, cudaStream_t stream) {
  const cudaError_t err = allow_smem<kKernel>(plan.smem_bytes, device);
  if (err != cudaSuccess) return err;
  kKernel<<<grid_size(plan.num_blocks), plan.threads, plan.smem_bytes, stream>>>(plan);
  return cudaSuccess;
}

// Copies the run-time pointers and strides of `from` onto a cached plan.
void rebind(ConvTileArgs& plan, const ConvTileArgs& from) {
  plan.src = from.src;
  plan.dst = from.dst;
  for (int i = 0; i < 4; ++i) {
    plan.src_stride[i] = from.src_stride[i];
    plan.dst_stride[i] = from.dst_stride[i];
  }
  for (int s = 0; s < from.num_segments; ++s) plan.seg[s] = from.seg[s];
}

void rebind(WgradArgs& plan, const WgradArgs& from) {
  plan.x = from.x;
  plan.gy = from.gy;
  for (int i = 0; i < 4; ++i) {
    plan.x_stride[i] = from.x_stride[i];
    plan.gy_stride[i] = from.gy_stride[i];
  }
  for (int s = 0; s < from.num_segments; ++s) plan.seg[s] = from.seg[s];
}

// Small per-thread caches of finished plans keyed by everything a plan depends on.
struct PlanKey {
  int64_t v[40];
};

template <typename Args>
PlanKey plan_key(const Args& a, int dtype, int device, int flag, int h_in, int w_in, int h_out, int w_out) {
  PlanKey k;
  std::memset(&k, 0, sizeof(k));
  int n = 0;
  k.v[n++] = a.N;
  k.v[n++] = a.C;
  k.v[n++] = h_in;
  k.v[n++] = w_in;
  k.v[n++] = h_out;
  k.v[n++] = w_out;
  k.v[n++] = a.sh;
  k.v[n++] = a.sw;
  k.v[n++] = a.dh;
  k.v[n++] = a.dw;
  k.v[n++] = a.channels_last;
  k.v[n++] = a.num_segments;
  k.v[n++] = dtype;
  k.v[n++] = device;
  k.v[n++] = flag;
  for (int s = 0; s < a.num_segments; ++s) {
    const SegDesc& d = a.seg[s];
    k.v[n++] = d.c_begin;
    k.v[n++] = d.c_end;
    k.v[n++] = (static_cast<int64_t>(d.kh) << 32) | static_cast<uint32_t>(d.kw);
    k.v[n++] = (static_cast<int64_t>(d.pad_h) << 32) | static_cast<uint32_t>(d.pad_w);
    k.v[n++] = d.identity;
    k.v[n++] = d.grad_bias != nullptr;
  }
  return k;
}

template <typename Args>
struct PlanCache {
  static constexpr int kEntries = 64;
  PlanKey key[kEntries];
  Args plan[kEntries];
  bool ok[kEntries];
  bool used[kEntries] = {};
  int next = 0;
  const Args* find(const PlanKey& k, bool& found_ok) const {
    for (int i = 0; i < kEntries; ++i)
      if (used[i] && std::memcmp(&key[i], &k, sizeof(k)) == 0) {
        found_ok = ok[i];
        return &plan[i];
      }
    return nullptr;
  }
  void put(const PlanKey& k, const Args& a, bool good) {
    key[next] = k;
    plan[next] = a;
    ok[next] = good;
    used[next] = true;
    next = (next + 1) % kEntries;
  }
  // The cached plan of key k rebound to the pointers and strides of `a`, or a new one made by
  // make(Args&) -> bool and cached; good: whether the tile kernel can run it.
  template <typename Make> Args get(const PlanKey& k, const Args& a, bool& good, Make make) {
    if (const Args* hit = find(k, good)) {
      Args out = *hit;
      rebind(out, a);
      return out;
    }
    Args out = a;
    good = make(out);
    put(k, out, good);
    return out;
  }
};

template <typename T>
cudaError_t run_conv(const DepthwiseConv2dParams& p, ScalarKind dtype, bool backward, const void* src, void* dst,
                     cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW, LOG_RW = RegTile<A>::LOG_RW;
  if (p.N * p.C == 0 || (backward ? p.H * p.W : p.Ho * p.Wo) == 0) return cudaSuccess;
  const bool sliding = conv_can_slide(p, backward);
  const ConvTileArgs a = make_conv_args(p, backward, sliding, src, dst);

  int device = 0;
  const DeviceLimits lim = device_limits(device);
  static thread_local PlanCache<ConvTileArgs> cache;
  const PlanKey key = plan_key(a, static_cast<int>(dtype), device, (backward ? 2 : 0) | (sliding ? 1 : 0), a.Hs, a.Ws,
                               a.Hd, a.Wd);
  bool ok = false;
  const ConvTileArgs plan = cache.get(key, a, ok, [&](ConvTileArgs& c) {
    return plan_conv_tile(c, sliding, RH, RW, LOG_RW, sizeof(A), sizeof(T), lim);
  });

  if (ok) {
    const cudaError_t err = sliding ? launch_tile<conv_tile_kernel<T, true>>(plan, device, stream)
                                    : launch_tile<conv_tile_kernel<T, false>>(plan, device, stream);
    if (err != cudaSuccess) return err;
  } else {
    // No tile fits shared memory (huge dilation x kernel extent): read global memory directly,
    // with the original (unflipped) weights.
    const ConvTileArgs d = make_conv_args(p, backward, false, src, dst);
    const int64_t total = d.N * d.C * d.Hd * d.Wd;
    conv_direct_kernel<T><<<grid_size(cdiv(total, kDirectThreads)), kDirectThreads, 0, stream>>>(d, total);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_wgrad(const DepthwiseConv2dParams& p, ScalarKind dtype, const void* grad_out, const void* in,
                      cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW, LOG_RW = RegTile<A>::LOG_RW;
  const WgradArgs a = make_wgrad_args(p, grad_out, in);
  int kh_max, kw_max;
  wgrad_kernel_extent(a, kh_max, kw_max);
  if (kh_max == 0 || a.N * a.C == 0 || a.Ho == 0 || a.Wo == 0) return cudaSuccess;

  int device = 0;
  const DeviceLimits lim = device_limits(device);
  static thread_local PlanCache<WgradArgs> cache;
  const PlanKey key = plan_key(a, static_cast<int>(dtype), device, 4, a.H, a.W, a.Ho, a.Wo);
  bool ok = false;
  const WgradArgs plan = cache.get(key, a, ok, [&](WgradArgs& w) {
    bool sliding_unused = false;
    return plan_wgrad_tile(w, sliding_unused, RH, RW, LOG_RW, sizeof(A), sizeof(T), lim);
  });
  const bool sliding = plan.dw % plan.sw == 0;
  if (ok) {
    const cudaError_t err = sliding ? launch_tile<wgrad_tile_kernel<T, true>>(plan, device, stream)
                                    : launch_tile<wgrad_tile_kernel<T, false>>(plan, device, stream);
    if (err != cudaSuccess) return err;
  } else {
    const int64_t slabs = wgrad_direct_slabs(a, kDirectThreads);
    WgradArgs d = a;
    wgrad_set_dividers(d, slabs);
    wgrad_direct_kernel<T><<<grid_size(d.C * slabs), kDirectThreads, 0, stream>>>(d, slabs);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace fusekit::dwconv

namespace fusekit::cuda {

using dwconv::run_conv;
using dwconv::run_wgrad;

namespace {

// Calls fn(T{}) with the element type T of `dtype`.
template <typename Fn>
cudaError_t with_element_type(ScalarKind dtype, Fn fn) {
  switch (dtype) {
    case ScalarKind::Float32: return fn(float{});
    case ScalarKind::Float64: return fn(double{});
    case ScalarKind::Float16: return fn(__half{});
    case ScalarKind::BFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t depthwise_conv2d_forward(const DepthwiseConv2dParams& p, ScalarKind dtype, const void* in, void* out,
                                     cudaStream_t stream) {
  return with_element_type(dtype, [&](auto elem) {
    return run_conv<decltype(elem)>(p, dtype, false, in, out, stream);
  });
}

cudaError_t depthwise_conv2d_backward_input(const DepthwiseConv2dParams& p, ScalarKind dtype, const void* grad_out,
                                            void* grad_in, cudaStream_t stream) {
  return with_element_type(dtype, [&](auto elem) {
    return run_conv<decltype(elem)>(p, dtype, true, grad_out, grad_in, stream);
  });
}

cudaError_t depthwise_conv2d_backward_weight(const DepthwiseConv2dParams& p, ScalarKind dtype, const void* grad_out,
                                             const void* in, cudaStream_t stream) {
  return with_element_type(dtype, [&](auto elem) { return run_wgrad<decltype(elem)>(p, dtype, grad_out, in, stream); });
}

}  // namespace fusekit::cuda
