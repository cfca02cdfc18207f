// Device code and launch planning of the CUDA depthwise 2-D convolution (torch-free).
//
// Everything in this header is either __host__ __device__ or plain host C++, so the tiling,
// the index math and the per-thread work of every kernel phase can be compiled and emulated
// on the host, phase by phase (the kernels in depthwise_conv2d_kernels.cu are thin loops that
// call these phases between __syncthreads()).
//
// Kernels:
//  * conv tile kernel (forward, and backward-input): one block = G planes (n, c) x one output
//    tile of TH x TW; the input tile plus halo (for KR kernel rows at a time) and the weights
//    of those rows are staged in shared memory; each thread computes RH x RW outputs.
//      - sliding mode (input column step 1 in the staged layout): per kernel tap, RH register
//        windows of RW inputs slide one column, so RH + 1 shared loads (RH inputs, 1 weight)
//        feed RH * RW FMAs. Forward with dil_w == 1 (stride_w > 1 uses a column layout
//        de-interleaved by the stride); backward-input with unit strides and dil_w == 1
//        (forward over grad_y with the flipped kernel).
//      - walk mode (everything else): per output, the taps that touch it are walked
//        (forward: every tap; backward-input: the taps whose (o + pad - t*d) is a multiple of
//        the stride, i.e. the gather formulation).
//  * weight-gradient tile kernel: one block = a channel (NCHW) or a channel group (NHWC) and
//    a slab of (n, output tile) items; each thread owns RH x RW taps of one channel for a
//    group of output rows, the partial sums stay in registers over the whole slab and are
//    reduced through shared memory into one atomicAdd per tap and block. Sliding windows
//    (as above, over the gy columns) when stride_w divides dil_w (x de-interleaved by dil_w),
//    a per-(gy, tap) product loop otherwise.
//  * direct kernels: one thread per output (or a block-reduction per tap for the weight
//    gradient), reading global memory; used only when a tile does not fit shared memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "depthwise_conv2d_params.h"

#if defined(__CUDACC__)
#define FUSEKIT_DW_HD __host__ __device__ __forceinline__
#else
#define FUSEKIT_DW_HD inline
#endif

// Loop unrolling for the device pass only (host compilers warn on the CUDA pragma).
#if defined(__CUDA_ARCH__)
#define FUSEKIT_DW_UNROLL _Pragma("unroll")
#else
#define FUSEKIT_DW_UNROLL
#endif

// Host emulation hook: sees every shared-memory access (is_store 0/1); no-op in the kernels.
#ifndef FUSEKIT_DW_SMEM_CHECK
#define FUSEKIT_DW_SMEM_CHECK(ptr, is_store) ((void)0)
#endif

namespace fusekit::dwconv {

// ---------------------------------------------------------------------------------------------
// Small integer helpers
// ---------------------------------------------------------------------------------------------

FUSEKIT_DW_HD int imin(int a, int b) { return a < b ? a : b; }
FUSEKIT_DW_HD int imax(int a, int b) { return a > b ? a : b; }
FUSEKIT_DW_HD int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
FUSEKIT_DW_HD int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
FUSEKIT_DW_HD int round_up(int a, int m) { return (a + m - 1) / m * m; }
FUSEKIT_DW_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }  // a >= 0, b > 0
// Floor / ceil division for a signed numerator and a positive divisor.
FUSEKIT_DW_HD int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
FUSEKIT_DW_HD int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }
FUSEKIT_DW_HD int pos_mod(int64_t a, int b) {
  const int r = static_cast<int>(a % b);
  return r < 0 ? r + b : r;
}
FUSEKIT_DW_HD int gcd_int(int a, int b) {
  while (b != 0) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Division by a run-time constant with a multiply-high and a shift (numerators < 2^31).
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 0, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  FUSEKIT_DW_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    return (hi + n) >> shift;
  }
  FUSEKIT_DW_HD void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

// Same for 64-bit numerators < 2^63 (block and element indices; avoids the slow 64-bit
// division routine, whose call also costs a stack frame).
struct FastDivmod64 {
  uint64_t divisor = 1, multiplier = 0;
  uint32_t shift = 0;
  FastDivmod64() = default;
  explicit FastDivmod64(uint64_t d) : divisor(d) {
    while (shift < 63 && (uint64_t{1} << shift) < d) ++shift;
    using u128 = unsigned __int128;
    multiplier = static_cast<uint64_t>(((u128{1} << 64) * ((u128{1} << shift) - d)) / d + 1);
  }
  FUSEKIT_DW_HD int64_t div(int64_t n) const {
    const uint64_t un = static_cast<uint64_t>(n);
#if defined(__CUDA_ARCH__)
    const uint64_t hi = __umul64hi(un, multiplier);
#else
    const uint64_t hi = static_cast<uint64_t>((static_cast<unsigned __int128>(un) * multiplier) >> 64);
#endif
    return static_cast<int64_t>((hi + un) >> shift);
  }
  FUSEKIT_DW_HD void divmod(int64_t n, int64_t& q, int64_t& r) const {
    q = div(n);
    r = n - q * static_cast<int64_t>(divisor);
  }
};

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Global loads/stores with conversion to/from the accumulator type (specialized for the
// 16-bit types in the .cu file, which is the only place that includes cuda_fp16/bf16).
template <typename T> struct Io {
  template <typename A> FUSEKIT_DW_HD static A ld(const T* p) {
#if defined(__CUDA_ARCH__)
    return static_cast<A>(__ldg(p));
#else
    return static_cast<A>(*p);
#endif
  }
  template <typename A> FUSEKIT_DW_HD static void st(T* p, A v) { *p = static_cast<T>(v); }
};

template <typename A> FUSEKIT_DW_HD void atomic_add_acc(A* p, A v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// Per-thread register tile: RH output rows (or tap rows) x RW output columns (or tap columns).
template <typename A> struct RegTile;
template <> struct RegTile<float> { static constexpr int RH = 2, RW = 8, LOG_RW = 3; };
template <> struct RegTile<double> { static constexpr int RH = 2, RW = 4, LOG_RW = 2; };

constexpr int kMaxThreads = 256;

// Shared-memory columns are "skewed": one spare slot after every RW columns, so that threads
// whose windows start RW columns apart hit different banks.
template <int LOG_RW> FUSEKIT_DW_HD int skew(int x) { return x + (x >> LOG_RW); }

template <typename A> FUSEKIT_DW_HD A sm_ld(const A* p) {
  FUSEKIT_DW_SMEM_CHECK(p, 0);
  return *p;
}
template <typename A> FUSEKIT_DW_HD void sm_st(A* p, A v) {
  FUSEKIT_DW_SMEM_CHECK(p, 1);
  *p = v;
}

// Index of logical column `col` in a row de-interleaved by `mod` (classes col % mod of `cls`
// slots each, one after the other).
FUSEKIT_DW_HD int deinterleaved_index(int col, int mod, const FastDivmod& div, int cls) {
  if (mod > 1) {
    uint32_t q, r;
    div.divmod(static_cast<uint32_t>(col), q, r);
    return static_cast<int>(r) * cls + static_cast<int>(q);
  }
  return col;
}

// minor += step, carrying whole multiples of len into major (walks over rows x columns or
// planes x rows; step may exceed len).
FUSEKIT_DW_HD void advance_wrapped(int& minor, int& major, int step, int len) {
  minor += step;
  while (minor >= len) {
    minor -= len;
    ++major;
  }
}

// How a block's threads cover rows of `cols` columns (coalesced NCHW access): thread t takes
// columns c_start, c_start + c_step, ... of the row slots r_start, r_start + r_step, ...; a
// thread with r_start >= r_step has none.
struct RowSplit {
  int c_start, c_step, r_start, r_step;
};

FUSEKIT_DW_HD RowSplit row_split(int cols, int threads, int t) {
  if (cols >= threads) return RowSplit{t, threads, 0, 1};
  const int r_start = t / cols;
  return RowSplit{t - r_start * cols, cols, r_start, threads / cols};
}

// A source plane in global memory; reads outside [0, H) x [0, W) are the zero padding.
template <typename T> struct SrcPlane {
  const T* base;
  int64_t stride_h, stride_w;
  int H, W;
};

// Stages window row `row` of a plane's source window `w` (fields row0, col0, cols) into row_sm:
// columns c_start, c_start + c_step, ... placed by slot(col).
template <typename T, typename A, typename Win, typename Slot>
FUSEKIT_DW_HD void stage_row_padded(const SrcPlane<T>& src, const Win& w, int row, int c_start, int c_step, A* row_sm,
                                    Slot slot) {
  const int64_t sr = w.row0 + row;
  const bool row_ok = sr >= 0 && sr < src.H;
  const T* row_src = src.base + sr * src.stride_h;
  for (int col = c_start; col < w.cols; col += c_step) {
    const int64_t sc = w.col0 + col;
    A v = A(0);
    if (row_ok && sc >= 0 && sc < src.W) v = Io<T>::template ld<A>(row_src + sc * src.stride_w);
    sm_st(row_sm + slot(col), v);
  }
}

// NHWC staging of one plane's source window `w` (fields row0, col0, rows, cols): the threads of
// the block walk one common rows_b x cols_b sequence (so that a warp reads consecutive channels
// of one pixel), this one from position sp0 in steps of `step`, staging what lies in its window.
template <typename T, typename A, typename Win, typename Slot>
FUSEKIT_DW_HD void stage_window_nhwc(const SrcPlane<T>& src, const Win& w, int rows_b, int cols_b, int sp0, int step,
                                     A* plane_sm, int pitch, Slot slot) {
  int row = sp0 / cols_b, col = sp0 - row * cols_b;
  while (row < rows_b) {
    if (row < w.rows && col < w.cols) {
      const int64_t sr = w.row0 + row, sc = w.col0 + col;
      A v = A(0);
      if (sr >= 0 && sr < src.H && sc >= 0 && sc < src.W)
        v = Io<T>::template ld<A>(src.base + sr * src.stride_h + sc * src.stride_w);
      sm_st(plane_sm + row * pitch + slot(col), v);
    }
    advance_wrapped(col, row, step, cols_b);
  }
}

// ---------------------------------------------------------------------------------------------
// Segments
// ---------------------------------------------------------------------------------------------

// One channel range with its kernel, in the orientation of one launch (see ConvTileArgs).
struct SegDesc {
  int64_t c_begin = 0, c_end = 0;
  int kh = 1, kw = 1;      // identity segments are described as 1 x 1 with weight 1
  int pad_h = 0, pad_w = 0;
  int identity = 0;
  const void* weight = nullptr;  // [c_end - c_begin, kh, kw] (original orientation)
  const void* bias = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
};

FUSEKIT_DW_HD int find_segment(const SegDesc* seg, int num, int64_t c) {
  for (int s = 0; s < num; ++s)
    if (c >= seg[s].c_begin && c < seg[s].c_end) return s;
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Tap walks: the taps t of one axis that touch output coordinate o, and where their source
// element lies in the staged tile (local index s0 + a * ss for the a-th tap t0 + a * ts).
// ---------------------------------------------------------------------------------------------

struct Walk {
  int count, t0, ts, s0, ss;
};

// Forward orientation: src = o * s - pad + t * d for every t in [t_lo, t_hi); the staged tile
// starts at the source index of (tile origin, t_lo), o_local is o relative to the tile origin.
FUSEKIT_DW_HD Walk walk_forward(int o_local, int s, int d, int t_lo, int t_hi) {
  return Walk{t_hi - t_lo, t_lo, 1, o_local * s, d};
}

// Gather orientation (transposed convolution): src q = (o + pad - t * d) / s for the taps
// t in [t_lo, t_hi) where it divides exactly. ts = s / gcd(s, d), qs = d / gcd(s, d);
// src0 = first staged source index.
FUSEKIT_DW_HD Walk walk_gather(int64_t o, int pad, int s, int d, int ts, int qs, int t_lo, int t_hi,
                               int64_t src0) {
  Walk w{0, t_lo, ts, 0, -qs};
  if (t_lo >= t_hi) return w;
  const int64_t base = o + pad - static_cast<int64_t>(t_lo) * d;
  int r = pos_mod(base, s);
  const int dm = d % s;
  int k = 0;
  while (r != 0 && k < ts) {  // smallest k with (base - k * d) % s == 0
    r -= dm;
    if (r < 0) r += s;
    ++k;
  }
  if (r != 0 || t_lo + k >= t_hi) return w;
  w.t0 = t_lo + k;
  w.count = (t_hi - 1 - w.t0) / ts + 1;
  w.s0 = static_cast<int>((base - static_cast<int64_t>(k) * d) / s - src0);
  return w;
}

// ---------------------------------------------------------------------------------------------
// Conv tile kernel (forward and backward-input)
// ---------------------------------------------------------------------------------------------

// "src" is the staged tensor, "dst" the computed one: forward src = x, dst = y;
// backward-input src = grad_y, dst = grad_x.
struct ConvTileArgs {
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t src_stride[4] = {0, 0, 0, 0}, dst_stride[4] = {0, 0, 0, 0};  // n, c, h, w
  int64_t N = 0, C = 0;
  int Hs = 0, Ws = 0, Hd = 0, Wd = 0;
  int sh = 1, sw = 1, dh = 1, dw = 1;
  // 0: src = o * s - pad + t * d (forward; also backward-input with unit stride and flipped
  //    weights, pad' = (k - 1) * d - pad); 1: src = (o + pad - t * d) / s (gather).
  int gather = 0;
  int flip = 0;  // stage the weights flipped in both axes
  int gts_h = 1, gqs_h = 1, gts_w = 1, gqs_w = 1;  // gather walk steps: s / gcd, d / gcd
  int channels_last = 0;
  int num_segments = 0;
  SegDesc seg[kMaxDepthwiseSegments];

  // Tiling (filled by plan_conv_tile).
  int G = 1, TXT = 1, TYT = 1, S = 1, threads = 1;  // planes per block, spatial threads per plane
  int TH = 1, TW = 1, KR = 1, kh_max = 1, kw_max = 1, num_chunks = 1;
  int hh = 1, hw = 1;                               // staged capacity: rows, logical columns
  int col_mod = 1, class_len = 1, pitch = 1, plane_elems = 1;  // staged column placement
  FastDivmod col_div;
  int wcl = 1, w_row = 1, w_plane = 1, w_offset = 0;  // weights: class length, strides, offset
  FastDivmod wdiv_plane, wdiv_row;                    // by KR * kw_max, kw_max
  int out_pitch = 1, out_plane = 1;                   // output tile staged for the store
  int64_t tiles_h = 1, tiles_w = 1, cgroups = 1, num_blocks = 0;
  FastDivmod64 div_tiles_w, div_tiles_h, div_C, div_cgroups, div_Hd, div_Wd;
  size_t smem_bytes = 0;
};

// The dividers of the sizes (tiles_* and cgroups once the tiling is chosen).
inline void conv_set_dividers(ConvTileArgs& a) {
  a.div_tiles_w = FastDivmod64(static_cast<uint64_t>(a.tiles_w));
  a.div_tiles_h = FastDivmod64(static_cast<uint64_t>(a.tiles_h));
  a.div_C = FastDivmod64(static_cast<uint64_t>(a.C > 0 ? a.C : 1));
  a.div_cgroups = FastDivmod64(static_cast<uint64_t>(a.cgroups));
  a.div_Hd = FastDivmod64(static_cast<uint64_t>(a.Hd > 0 ? a.Hd : 1));
  a.div_Wd = FastDivmod64(static_cast<uint64_t>(a.Wd > 0 ? a.Wd : 1));
}

struct ConvBlock {
  int64_t n0, c0;    // first plane of the block
  int64_t oy0, ox0;  // tile origin in dst
};

FUSEKIT_DW_HD ConvBlock conv_block(const ConvTileArgs& a, int64_t b) {
  ConvBlock k;
  int64_t rest, tx, ty, group;
  a.div_tiles_w.divmod(b, rest, tx);
  a.div_tiles_h.divmod(rest, group, ty);
  k.oy0 = ty * a.TH;
  k.ox0 = tx * a.TW;
  if (a.channels_last) {
    int64_t cgi;
    a.div_cgroups.divmod(group, k.n0, cgi);
    k.c0 = cgi * a.G;
  } else {
    a.div_C.divmod(group * a.G, k.n0, k.c0);
  }
  return k;
}

struct PlaneRef {
  int exists;  // the (n, c) plane is inside the tensor
  int seg;     // its segment, -1 when none (then it is skipped, and written as zeros)
  int64_t c_local, src_off, dst_off;
};

FUSEKIT_DW_HD PlaneRef conv_plane(const ConvTileArgs& a, const ConvBlock& k, int g) {
  PlaneRef p{0, -1, 0, 0, 0};
  int64_t n = k.n0, c = k.c0 + g;
  if (c >= a.C) {
    if (a.channels_last) return p;
    int64_t dn;
    a.div_C.divmod(c, dn, c);
    n += dn;
  }
  if (n >= a.N) return p;
  p.exists = 1;
  p.src_off = n * a.src_stride[0] + c * a.src_stride[1];
  p.dst_off = n * a.dst_stride[0] + c * a.dst_stride[1];
  p.seg = find_segment(a.seg, a.num_segments, c);
  if (p.seg >= 0) p.c_local = c - a.seg[p.seg].c_begin;
  return p;
}

struct ThreadPos {
  int g, tx, ty;
};

FUSEKIT_DW_HD ThreadPos conv_thread(const ConvTileArgs& a, int t) {
  int g, s;
  if (a.channels_last) {  // consecutive threads: consecutive channels (coalesced NHWC)
    g = t % a.G;
    s = t / a.G;
  } else {
    g = t / a.S;
    s = t - g * a.S;
  }
  return ThreadPos{g, s % a.TXT, s / a.TXT};
}

// The source window one plane stages for kernel-row chunk `chunk`: rows x cols starting at
// source (row0, col0), covering kernel rows [i_lo, i_hi).
struct StageWin {
  int64_t row0, col0;
  int rows, cols, i_lo, i_hi;
};

FUSEKIT_DW_HD StageWin conv_window(const ConvTileArgs& a, const SegDesc& s, const ConvBlock& k, int chunk) {
  StageWin w{0, 0, 0, 0, chunk * a.KR, 0};
  w.i_hi = imin(w.i_lo + a.KR, s.kh);
  if (w.i_lo >= s.kh) {
    w.i_hi = w.i_lo;
    return w;
  }
  if (!a.gather) {
    w.row0 = k.oy0 * a.sh - s.pad_h + static_cast<int64_t>(w.i_lo) * a.dh;
    w.rows = (a.TH - 1) * a.sh + (w.i_hi - w.i_lo - 1) * a.dh + 1;
    w.col0 = k.ox0 * a.sw - s.pad_w;
    w.cols = (a.TW - 1) * a.sw + (s.kw - 1) * a.dw + 1;
  } else {
    w.row0 = ceil_div(k.oy0 + s.pad_h - static_cast<int64_t>(w.i_hi - 1) * a.dh, a.sh);
    const int64_t last_row = floor_div(k.oy0 + a.TH - 1 + s.pad_h - static_cast<int64_t>(w.i_lo) * a.dh, a.sh);
    w.rows = static_cast<int>(lmax(0, last_row - w.row0 + 1));
    w.col0 = ceil_div(k.ox0 + s.pad_w - static_cast<int64_t>(s.kw - 1) * a.dw, a.sw);
    const int64_t last_col = floor_div(k.ox0 + a.TW - 1 + s.pad_w, a.sw);
    w.cols = static_cast<int>(lmax(0, last_col - w.col0 + 1));
  }
  return w;
}

// Largest window over the segments that meet the block's channels (NHWC staging walks one
// common (row, col) sequence for all the channels of a block).
FUSEKIT_DW_HD void conv_block_extent(const ConvTileArgs& a, const ConvBlock& k, int chunk, int& rows, int& cols) {
  rows = 0;
  cols = 0;
  for (int s = 0; s < a.num_segments; ++s) {
    if (a.seg[s].c_end <= k.c0 || a.seg[s].c_begin >= k.c0 + a.G) continue;
    const StageWin w = conv_window(a, a.seg[s], k, chunk);
    if (w.rows > 0 && w.cols > 0) {
      rows = imax(rows, w.rows);
      cols = imax(cols, w.cols);
    }
  }
}

// Shared-memory slot of staged column `col` (de-interleaved by col_mod, then skewed).
template <int LOG_RW> FUSEKIT_DW_HD int conv_col_slot(const ConvTileArgs& a, int col) {
  return skew<LOG_RW>(deinterleaved_index(col, a.col_mod, a.col_div, a.class_len));
}

// Slot of kernel column j in a staged weight row (de-interleaved like the columns).
FUSEKIT_DW_HD int conv_w_slot(const ConvTileArgs& a, int j) { return deinterleaved_index(j, a.col_mod, a.col_div, a.wcl); }

// Phase 1 (per thread t): stage the source windows and the weights of chunk `chunk`.
template <typename T, typename A>
FUSEKIT_DW_HD void conv_stage(const ConvTileArgs& a, const ConvBlock& k, int chunk, A* src_sm, A* w_sm, int t) {
  constexpr int LOG_RW = RegTile<A>::LOG_RW;
  const T* src = static_cast<const T*>(a.src);
  const auto slot = [&a](int col) { return conv_col_slot<LOG_RW>(a, col); };
  if (!a.channels_last) {
    // (plane, row) slots, consecutive threads along a row (coalesced NCHW reads).
    const RowSplit sp = row_split(a.hw, a.threads, t);
    if (sp.r_start < sp.r_step) {
      int g = sp.r_start / a.hh, row = sp.r_start - g * a.hh;
      while (g < a.G) {
        const int g_now = g;
        const PlaneRef p = conv_plane(a, k, g);
        StageWin w{0, 0, 0, 0, 0, 0};
        if (p.seg >= 0) w = conv_window(a, a.seg[p.seg], k, chunk);
        A* plane_sm = src_sm + g * a.plane_elems;
        const SrcPlane<T> plane_src{src + p.src_off, a.src_stride[2], a.src_stride[3], a.Hs, a.Ws};
        while (g == g_now) {
          if (row < w.rows) stage_row_padded(plane_src, w, row, sp.c_start, sp.c_step, plane_sm + row * a.pitch, slot);
          advance_wrapped(row, g, sp.r_step, a.hh);
        }
      }
    }
  } else {
    // Consecutive threads: consecutive channels at the same (row, col) (coalesced NHWC reads).
    const int g = t % a.G;
    int rows_b, cols_b;
    conv_block_extent(a, k, chunk, rows_b, cols_b);
    const PlaneRef p = conv_plane(a, k, g);
    StageWin w{0, 0, 0, 0, 0, 0};
    if (p.seg >= 0) w = conv_window(a, a.seg[p.seg], k, chunk);
    if (cols_b > 0) {
      const int sp0 = t / a.G;
      A* plane_sm = src_sm + g * a.plane_elems;
      const T* plane_src = src + p.src_off;
      int row = sp0 / cols_b, col = sp0 - row * cols_b;
      while (row < rows_b) {
        if (row < w.rows && col < w.cols) {
          const int64_t sr = w.row0 + row, sc = w.col0 + col;
          A v = A(0);
          if (sr >= 0 && sr < a.Hs && sc >= 0 && sc < a.Ws)
            v = Io<T>::template ld<A>(plane_src + sr * a.src_stride[2] + sc * a.src_stride[3]);
          sm_st(plane_sm + row * a.pitch + conv_col_slot<LOG_RW>(a, col), v);
        }
        col += a.S;
        while (col >= cols_b) {
          col -= cols_b;
          ++row;
        }
      }
    }
  }
  // Weights of kernel rows [chunk * KR, chunk * KR + KR), plane-major (consecutive threads read
  // consecutive taps of one channel).
  const int total = a.G * a.KR * a.kw_max;
  for (int e = t; e < total; e += a.threads) {
    uint32_t g, rem, ii, j;
    a.wdiv_plane.divmod(static_cast<uint32_t>(e), g, rem);
    a.wdiv_row.divmod(rem, ii, j);
    const PlaneRef p = conv_plane(a, k, static_cast<int>(g));
    if (p.seg < 0) continue;
    const SegDesc& s = a.seg[p.seg];
    const int i = chunk * a.KR + static_cast<int>(ii);
    if (i >= s.kh || static_cast<int>(j) >= s.kw) continue;
    A v = A(1);
    if (!s.identity) {
      const int si = a.flip ? s.kh - 1 - i : i;
      const int sj = a.flip ? s.kw - 1 - static_cast<int>(j) : static_cast<int>(j);
      v = Io<T>::template ld<A>(static_cast<const T*>(s.weight) + (p.c_local * s.kh + si) * s.kw + sj);
    }
    sm_st(w_sm + static_cast<int>(g) * a.w_plane + static_cast<int>(ii) * a.w_row + conv_w_slot(a, static_cast<int>(j)),
          v);
  }
}

// Phase 2, sliding mode: acc[rh][r] += sum over the chunk's taps of the output at tile-local
// (ty * RH + rh, tx * RW + r). Requires walk_forward geometry with a unit column step in the
// staged (de-interleaved) layout: column of (ox, j) = class (j % col_mod), index ox + j / col_mod.
template <typename A>
FUSEKIT_DW_HD void conv_compute_sliding(const ConvTileArgs& a, const SegDesc& s, const StageWin& w,
                                        const A* plane_sm, const A* wp, int tx, int ty,
                                        A (&acc)[RegTile<A>::RH][RegTile<A>::RW]) {
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW, LOG_RW = RegTile<A>::LOG_RW;
  const int ox0 = tx * RW, oy0 = ty * RH;
  for (int cls = 0; cls < a.col_mod; ++cls) {
    const int mcount = (s.kw - cls + a.col_mod - 1) / a.col_mod;  // taps j = cls + m * col_mod
    if (mcount <= 0) continue;
    const int base = cls * a.class_len + ox0;  // multiple of RW
    const A* w_cls = wp + cls * a.wcl;
    for (int i = w.i_lo; i < w.i_hi; ++i) {
      const A* rowp[RH];
FUSEKIT_DW_UNROLL
      for (int rh = 0; rh < RH; ++rh) rowp[rh] = plane_sm + ((oy0 + rh) * a.sh + (i - w.i_lo) * a.dh) * a.pitch;
      const A* wrow = w_cls + (i - w.i_lo) * a.w_row;
      A buf[RH][RW];
      const int sb = skew<LOG_RW>(base);
FUSEKIT_DW_UNROLL
      for (int rh = 0; rh < RH; ++rh)
FUSEKIT_DW_UNROLL
        for (int r = 0; r < RW; ++r) buf[rh][r] = sm_ld(rowp[rh] + sb + r);
      int mb = 0;
      for (; mb + RW <= mcount; mb += RW) {
        const int nb = skew<LOG_RW>(base + mb + RW);
FUSEKIT_DW_UNROLL
        for (int u = 0; u < RW; ++u) {
          const A wv = sm_ld(wrow + mb + u);
FUSEKIT_DW_UNROLL
          for (int rh = 0; rh < RH; ++rh)
FUSEKIT_DW_UNROLL
            for (int r = 0; r < RW; ++r) acc[rh][r] += buf[rh][(u + r) % RW] * wv;
          // slot u held position mb + u; it now takes mb + u + RW (needed from the next step)
FUSEKIT_DW_UNROLL
          for (int rh = 0; rh < RH; ++rh) buf[rh][u] = sm_ld(rowp[rh] + nb + u);
        }
      }
      if (mb < mcount) {
        const int nb = skew<LOG_RW>(base + mb + RW);
FUSEKIT_DW_UNROLL
        for (int u = 0; u < RW; ++u) {
          if (mb + u < mcount) {
            const A wv = sm_ld(wrow + mb + u);
FUSEKIT_DW_UNROLL
            for (int rh = 0; rh < RH; ++rh)
FUSEKIT_DW_UNROLL
              for (int r = 0; r < RW; ++r) acc[rh][r] += buf[rh][(u + r) % RW] * wv;
            if (mb + u + 1 < mcount) {
FUSEKIT_DW_UNROLL
              for (int rh = 0; rh < RH; ++rh) buf[rh][u] = sm_ld(rowp[rh] + nb + u);
            }
          }
        }
      }
    }
  }
}

// Phase 2, walk mode (any stride / dilation, forward or gather orientation).
template <typename A>
FUSEKIT_DW_HD void conv_compute_walk(const ConvTileArgs& a, const SegDesc& s, const StageWin& w, const ConvBlock& k,
                                     const A* plane_sm, const A* wp, int tx, int ty,
                                     A (&acc)[RegTile<A>::RH][RegTile<A>::RW]) {
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW, LOG_RW = RegTile<A>::LOG_RW;
  // Row walks are kept (RH of them); each column walk is computed where it is used. Steps are
  // uniform: forward (1, d), gather (s / gcd, -d / gcd).
  const int rts = a.gather ? a.gts_h : 1, rss = a.gather ? -a.gqs_h : a.dh;
  const int cts = a.gather ? a.gts_w : 1, css = a.gather ? -a.gqs_w : a.dw;
  int r_count[RH], r_t0[RH], r_s0[RH];
FUSEKIT_DW_UNROLL
  for (int rh = 0; rh < RH; ++rh) {
    const int oy = ty * RH + rh;
    const Walk wk = a.gather ? walk_gather(k.oy0 + oy, s.pad_h, a.sh, a.dh, a.gts_h, a.gqs_h, w.i_lo, w.i_hi, w.row0)
                             : walk_forward(oy, a.sh, a.dh, w.i_lo, w.i_hi);
    r_count[rh] = wk.count;
    r_t0[rh] = wk.t0 - w.i_lo;
    r_s0[rh] = wk.s0;
  }
FUSEKIT_DW_UNROLL
  for (int r = 0; r < RW; ++r) {
    const int ox = tx * RW + r;
    const Walk cw = a.gather ? walk_gather(k.ox0 + ox, s.pad_w, a.sw, a.dw, a.gts_w, a.gqs_w, 0, s.kw, w.col0)
                             : walk_forward(ox, a.sw, a.dw, 0, s.kw);
FUSEKIT_DW_UNROLL
    for (int rh = 0; rh < RH; ++rh) {
      A sum = A(0);
      for (int ia = 0; ia < r_count[rh]; ++ia) {
        const A* srow = plane_sm + (r_s0[rh] + ia * rss) * a.pitch;
        const A* wrow = wp + (r_t0[rh] + ia * rts) * a.w_row;
        for (int jb = 0; jb < cw.count; ++jb)
          sum += sm_ld(srow + skew<LOG_RW>(cw.s0 + jb * css)) * sm_ld(wrow + cw.t0 + jb * cts);
      }
      acc[rh][r] += sum;
    }
  }
}

// Phase 3: the thread's outputs into the staged output tile.
template <typename A>
FUSEKIT_DW_HD void conv_acc_to_smem(const ConvTileArgs& a, A* out_sm, const ThreadPos& tp,
                                    const A (&acc)[RegTile<A>::RH][RegTile<A>::RW]) {
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW, LOG_RW = RegTile<A>::LOG_RW;
  A* base = out_sm + tp.g * a.out_plane + skew<LOG_RW>(tp.tx * RW);
FUSEKIT_DW_UNROLL
  for (int rh = 0; rh < RH; ++rh)
FUSEKIT_DW_UNROLL
    for (int r = 0; r < RW; ++r) sm_st(base + (tp.ty * RH + rh) * a.out_pitch + r, acc[rh][r]);
}

// Bias of a plane (zero without one).
template <typename T, typename A> FUSEKIT_DW_HD A conv_plane_bias(const ConvTileArgs& a, const PlaneRef& p) {
  if (p.seg >= 0 && a.seg[p.seg].bias != nullptr)
    return Io<T>::template ld<A>(static_cast<const T*>(a.seg[p.seg].bias) + p.c_local);
  return A(0);
}

// Phase 4 (per thread t): add the bias and store the staged output tile (coalesced).
template <typename T, typename A>
FUSEKIT_DW_HD void conv_writeback(const ConvTileArgs& a, const ConvBlock& k, const A* out_sm, int t) {
  constexpr int LOG_RW = RegTile<A>::LOG_RW;
  T* dst = static_cast<T*>(a.dst);
  if (!a.channels_last) {
    const RowSplit sp = row_split(a.TW, a.threads, t);
    if (sp.r_start >= sp.r_step) return;
    int g = sp.r_start / a.TH, row = sp.r_start - g * a.TH;
    while (g < a.G) {
      const int g_now = g;
      const PlaneRef p = conv_plane(a, k, g);
      const A bias = conv_plane_bias<T, A>(a, p);
      const A* plane_out = out_sm + g * a.out_plane;
      while (g == g_now) {
        const int64_t oy = k.oy0 + row;
        if (p.exists && oy < a.Hd) {
          T* row_dst = dst + p.dst_off + oy * a.dst_stride[2];
          for (int col = sp.c_start; col < a.TW; col += sp.c_step) {
            const int64_t ox = k.ox0 + col;
            if (ox >= a.Wd) break;
            const A v = p.seg >= 0 ? sm_ld(plane_out + row * a.out_pitch + skew<LOG_RW>(col)) + bias : A(0);
            Io<T>::st(row_dst + ox * a.dst_stride[3], v);
          }
        }
        advance_wrapped(row, g, sp.r_step, a.TH);
      }
    }
  } else {
    const int g = t % a.G;
    const PlaneRef p = conv_plane(a, k, g);
    if (!p.exists) return;
    const A bias = conv_plane_bias<T, A>(a, p);
    const A* plane_out = out_sm + g * a.out_plane;
    int sp = t / a.G;
    int row = sp / a.TW, col = sp - row * a.TW;
    while (row < a.TH) {
      const int64_t oy = k.oy0 + row, ox = k.ox0 + col;
      if (oy < a.Hd && ox < a.Wd) {
        const A v = p.seg >= 0 ? sm_ld(plane_out + row * a.out_pitch + skew<LOG_RW>(col)) + bias : A(0);
        Io<T>::st(dst + p.dst_off + oy * a.dst_stride[2] + ox * a.dst_stride[3], v);
      }
      advance_wrapped(col, row, a.S, a.TW);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Direct kernels (fallback when a tile does not fit shared memory)
// ---------------------------------------------------------------------------------------------

// dst[n, c, oy, ox] straight from global memory, original (unflipped) weights; forward
// orientation (bias added) or gather orientation (a.gather, no bias).
template <typename T, typename A>
FUSEKIT_DW_HD A conv_direct_value(const ConvTileArgs& a, int64_t n, int64_t c, int64_t oy, int64_t ox) {
  const int si = find_segment(a.seg, a.num_segments, c);
  if (si < 0) return A(0);
  const SegDesc& s = a.seg[si];
  const T* src = static_cast<const T*>(a.src) + n * a.src_stride[0] + c * a.src_stride[1];
  const T* wgt = s.identity ? nullptr : static_cast<const T*>(s.weight) + (c - s.c_begin) * s.kh * s.kw;
  A acc = A(0);
  for (int i = 0; i < s.kh; ++i) {
    int64_t sy;
    if (!a.gather) {
      sy = oy * a.sh - s.pad_h + static_cast<int64_t>(i) * a.dh;
    } else {
      const int64_t num = oy + s.pad_h - static_cast<int64_t>(i) * a.dh;  // < 2^32 when >= 0
      if (num < 0 || static_cast<uint32_t>(num) % static_cast<uint32_t>(a.sh) != 0) continue;
      sy = static_cast<uint32_t>(num) / static_cast<uint32_t>(a.sh);
    }
    if (sy < 0 || sy >= a.Hs) continue;
    for (int j = 0; j < s.kw; ++j) {
      int64_t sx;
      if (!a.gather) {
        sx = ox * a.sw - s.pad_w + static_cast<int64_t>(j) * a.dw;
      } else {
        const int64_t num = ox + s.pad_w - static_cast<int64_t>(j) * a.dw;
        if (num < 0 || static_cast<uint32_t>(num) % static_cast<uint32_t>(a.sw) != 0) continue;
        sx = static_cast<uint32_t>(num) / static_cast<uint32_t>(a.sw);
      }
      if (sx < 0 || sx >= a.Ws) continue;
      const A wv = wgt ? Io<T>::template ld<A>(wgt + i * s.kw + j) : A(1);
      acc += Io<T>::template ld<A>(src + sy * a.src_stride[2] + sx * a.src_stride[3]) * wv;
    }
  }
  if (s.bias != nullptr) acc += Io<T>::template ld<A>(static_cast<const T*>(s.bias) + (c - s.c_begin));
  return acc;
}

// Linear index (in dst memory order) -> (n, c, oy, ox).
FUSEKIT_DW_HD void conv_direct_coords(const ConvTileArgs& a, int64_t e, int64_t& n, int64_t& c, int64_t& oy,
                                      int64_t& ox) {
  if (a.channels_last) {
    a.div_C.divmod(e, e, c);
    a.div_Wd.divmod(e, e, ox);
    a.div_Hd.divmod(e, n, oy);
  } else {
    a.div_Wd.divmod(e, e, ox);
    a.div_Hd.divmod(e, e, oy);
    a.div_C.divmod(e, n, c);
  }
}

// ---------------------------------------------------------------------------------------------
// Weight-gradient tile kernel
// ---------------------------------------------------------------------------------------------

// x: convolution input (staged "xs"), gy: gradient of the output.
// A block owns channel cg (NCHW, G planes = G batch items) or channels [cg * G, cg * G + G)
// (NHWC, one batch item per work item) and the items [it_begin, it_end) of its slab.
// Taps are cut into tap groups of RH x RW; a pass covers RGp x CGp tap groups.
struct WgradArgs {
  const void* x = nullptr;
  const void* gy = nullptr;
  int64_t x_stride[4] = {0, 0, 0, 0}, gy_stride[4] = {0, 0, 0, 0};
  int64_t N = 0, C = 0;
  int H = 0, W = 0, Ho = 0, Wo = 0;
  int sh = 1, sw = 1, dh = 1, dw = 1;
  int channels_last = 0;
  int num_segments = 0;
  SegDesc seg[kMaxDepthwiseSegments];

  // Tiling (filled by plan_wgrad_tile).
  int G = 1, TH = 1, TW = 1, RGp = 1, CGp = 1, TGp = 1, U = 1, threads = 1;
  int passes_h = 1, passes_w = 1;
  int hh = 1, hw = 1;  // staged x capacity (rows, logical columns)
  int x_mod = 1, x_cls = 1, x_pitch = 1, x_plane = 1;
  FastDivmod x_div;
  int g_mod = 1, g_cls = 1, g_pitch = 1, g_plane = 1;
  FastDivmod g_div;
  int gy_offset = 0, red_offset = 0;  // element offsets of the gy tile and the reduction buffer
  int64_t tiles_h = 1, tiles_w = 1, n_groups = 1, cgroups = 1, items = 0, blocks_per_group = 1, num_blocks = 0;
  FastDivmod64 div_tiles_w, div_tiles_h, div_bpg, div_Ho, div_Wo, div_slabs;
  size_t smem_bytes = 0;
};

inline void wgrad_set_dividers(WgradArgs& a, int64_t direct_slabs) {
  a.div_tiles_w = FastDivmod64(static_cast<uint64_t>(a.tiles_w));
  a.div_tiles_h = FastDivmod64(static_cast<uint64_t>(a.tiles_h));
  a.div_bpg = FastDivmod64(static_cast<uint64_t>(a.blocks_per_group));
  a.div_Ho = FastDivmod64(static_cast<uint64_t>(a.Ho > 0 ? a.Ho : 1));
  a.div_Wo = FastDivmod64(static_cast<uint64_t>(a.Wo > 0 ? a.Wo : 1));
  a.div_slabs = FastDivmod64(static_cast<uint64_t>(direct_slabs));
}

// Item range [begin, end) of block bk of a channel group.
FUSEKIT_DW_HD void wgrad_item_range(const WgradArgs& a, int64_t bk, int64_t& begin, int64_t& end) {
  begin = a.div_bpg.div(bk * a.items);
  end = a.div_bpg.div((bk + 1) * a.items);
}

struct WgradItem {
  int64_t n0;        // NCHW: first batch item of the G planes; NHWC: the batch item
  int64_t oy0, ox0;  // gy tile origin
};

FUSEKIT_DW_HD WgradItem wgrad_item(const WgradArgs& a, int64_t it) {
  WgradItem w;
  int64_t rest, tx, ty, ng;
  a.div_tiles_w.divmod(it, rest, tx);
  a.div_tiles_h.divmod(rest, ng, ty);
  w.oy0 = ty * a.TH;
  w.ox0 = tx * a.TW;
  w.n0 = a.channels_last ? ng : ng * a.G;
  return w;
}

struct WPlane {
  int active;  // plane exists and belongs to a non-identity segment
  int seg;
  int64_t c_local, x_off, gy_off;
};

FUSEKIT_DW_HD WPlane wgrad_plane(const WgradArgs& a, int64_t cg, const WgradItem& it, int g) {
  WPlane p{0, -1, 0, 0, 0};
  int64_t n, c;
  if (a.channels_last) {
    n = it.n0;
    c = cg * a.G + g;
  } else {
    n = it.n0 + g;
    c = cg;
  }
  if (n >= a.N || c >= a.C) return p;
  p.seg = find_segment(a.seg, a.num_segments, c);
  if (p.seg < 0 || a.seg[p.seg].identity) {
    p.seg = -1;
    return p;
  }
  p.active = 1;
  p.c_local = c - a.seg[p.seg].c_begin;
  p.x_off = n * a.x_stride[0] + c * a.x_stride[1];
  p.gy_off = n * a.gy_stride[0] + c * a.gy_stride[1];
  return p;
}

// Segment of plane g (-1: no plane, or an identity segment), without the memory offsets.
FUSEKIT_DW_HD int wgrad_plane_seg(const WgradArgs& a, int64_t cg, const WgradItem& it, int g) {
  const int64_t n = a.channels_last ? it.n0 : it.n0 + g;
  const int64_t c = a.channels_last ? cg * a.G + g : cg;
  if (n >= a.N || c >= a.C) return -1;
  const int si = find_segment(a.seg, a.num_segments, c);
  return (si >= 0 && !a.seg[si].identity) ? si : -1;
}

// Staged x window of one plane for the pass whose taps start at (i_lo, j_lo): the taps of the
// pass are padded to whole tap groups (the padded taps are computed and discarded).
struct WWin {
  int64_t row0, col0;
  int rows, cols;
};

template <typename A>
FUSEKIT_DW_HD WWin wgrad_window(const WgradArgs& a, const SegDesc& s, const WgradItem& it, int i_lo, int j_lo) {
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW;
  WWin w{0, 0, 0, 0};
  if (i_lo >= s.kh || j_lo >= s.kw) return w;
  const int i_end = imin(i_lo + a.RGp * RH, round_up(s.kh, RH));
  const int j_end = imin(j_lo + a.CGp * RW, round_up(s.kw, RW));
  w.row0 = it.oy0 * a.sh - s.pad_h + static_cast<int64_t>(i_lo) * a.dh;
  w.col0 = it.ox0 * a.sw - s.pad_w + static_cast<int64_t>(j_lo) * a.dw;
  w.rows = (a.TH - 1) * a.sh + (i_end - i_lo - 1) * a.dh + 1;
  w.cols = (a.TW - 1) * a.sw + (j_end - j_lo - 1) * a.dw + 1;
  return w;
}

template <int LOG_RW>
FUSEKIT_DW_HD int wgrad_x_slot(const WgradArgs& a, int col) {
  return skew<LOG_RW>(deinterleaved_index(col, a.x_mod, a.x_div, a.x_cls));
}

template <int LOG_RW>
FUSEKIT_DW_HD int wgrad_g_slot(const WgradArgs& a, int q) {
  return skew<LOG_RW>(deinterleaved_index(q, a.g_mod, a.g_div, a.g_cls));
}

// Phase 1 (per thread t): stage the gy tile and the x window of the pass.
template <typename T, typename A>
FUSEKIT_DW_HD void wgrad_stage(const WgradArgs& a, int64_t cg, const WgradItem& it, int i_lo, int j_lo, A* x_sm,
                               A* gy_sm, int t) {
  constexpr int LOG_RW = RegTile<A>::LOG_RW;
  const T* x = static_cast<const T*>(a.x);
  const T* gy = static_cast<const T*>(a.gy);
  const auto x_slot = [&a](int col) { return wgrad_x_slot<LOG_RW>(a, col); };
  if (!a.channels_last) {
    // Every plane of the block is the same channel: one window for all of them.
    const WPlane p0 = wgrad_plane(a, cg, it, 0);
    if (!p0.active) return;
    const SegDesc& s = a.seg[p0.seg];
    const WWin w = wgrad_window<A>(a, s, it, i_lo, j_lo);
    if (w.rows == 0) return;
    const int64_t n_planes = lmin(a.G, a.N - it.n0);
    // gy rows: (plane, p) slots, threads along q.
    {
      const RowSplit sp = row_split(a.TW, a.threads, t);
      if (sp.r_start < sp.r_step) {
        for (int r = sp.r_start; r < n_planes * a.TH; r += sp.r_step) {
          const int g = r / a.TH, p = r - g * a.TH;
          const int64_t oy = it.oy0 + p;
          const T* row_src = gy + p0.gy_off + g * a.gy_stride[0] + oy * a.gy_stride[2];
          A* row_sm = gy_sm + g * a.g_plane + p * a.g_pitch;
          for (int q = sp.c_start; q < a.TW; q += sp.c_step) {
            const int64_t ox = it.ox0 + q;
            A v = A(0);
            if (oy < a.Ho && ox < a.Wo) v = Io<T>::template ld<A>(row_src + ox * a.gy_stride[3]);
            sm_st(row_sm + wgrad_g_slot<LOG_RW>(a, q), v);
          }
        }
      }
    }
    // x window rows.
    {
      const RowSplit sp = row_split(a.hw, a.threads, t);
      if (sp.r_start < sp.r_step) {
        int g = sp.r_start / a.hh, row = sp.r_start - g * a.hh;
        while (g < n_planes) {
          if (row < w.rows) {
            const SrcPlane<T> plane_src{x + p0.x_off + g * a.x_stride[0], a.x_stride[2], a.x_stride[3], a.H, a.W};
            stage_row_padded(plane_src, w, row, sp.c_start, sp.c_step, x_sm + g * a.x_plane + row * a.x_pitch, x_slot);
          }
          advance_wrapped(row, g, sp.r_step, a.hh);
        }
      }
    }
  } else {
    const int g = t % a.G;
    const int sp0 = t / a.G;
    const int step = a.threads / a.G;
    const WPlane p = wgrad_plane(a, cg, it, g);
    WWin w{0, 0, 0, 0};
    if (p.active) w = wgrad_window<A>(a, a.seg[p.seg], it, i_lo, j_lo);
    // Common (row, col) sequence over the block: the largest window of its segments.
    int rows_b = 0, cols_b = 0;
    for (int si = 0; si < a.num_segments; ++si) {
      const SegDesc& s = a.seg[si];
      if (s.identity || s.c_end <= cg * a.G || s.c_begin >= cg * a.G + a.G) continue;
      const WWin ws = wgrad_window<A>(a, s, it, i_lo, j_lo);
      if (ws.rows > 0) {
        rows_b = imax(rows_b, ws.rows);
        cols_b = imax(cols_b, ws.cols);
      }
    }
    if (rows_b == 0) return;
    // gy tile
    {
      int row = sp0 / a.TW, col = sp0 - row * a.TW;
      A* plane_sm = gy_sm + g * a.g_plane;
      while (row < a.TH) {
        if (w.rows > 0) {
          const int64_t oy = it.oy0 + row, ox = it.ox0 + col;
          A v = A(0);
          if (oy < a.Ho && ox < a.Wo) v = Io<T>::template ld<A>(gy + p.gy_off + oy * a.gy_stride[2] + ox * a.gy_stride[3]);
          sm_st(plane_sm + row * a.g_pitch + wgrad_g_slot<LOG_RW>(a, col), v);
        }
        advance_wrapped(col, row, step, a.TW);
      }
    }
    // x window
    const SrcPlane<T> plane_src{x + p.x_off, a.x_stride[2], a.x_stride[3], a.H, a.W};
    stage_window_nhwc(plane_src, w, rows_b, cols_b, sp0, step, x_sm + g * a.x_plane, a.x_pitch, x_slot);
  }
}

struct WgradRole {
  int g;       // NHWC: the thread's channel in the group; NCHW: -1 (rows of all planes)
  int tg, u;   // tap group within the pass, row unit
  int di, dj;  // tap-group origin relative to the pass origin (i_lo, j_lo)
};

FUSEKIT_DW_HD WgradRole wgrad_role(const WgradArgs& a, int t, int RH, int RW) {
  WgradRole r;
  if (a.channels_last) {
    r.g = t % a.G;
    const int rest = t / a.G;
    r.tg = rest % a.TGp;
    r.u = rest / a.TGp;
  } else {
    r.g = -1;
    r.tg = t % a.TGp;
    r.u = t / a.TGp;
  }
  r.di = (r.tg / a.CGp) * RH;
  r.dj = (r.tg % a.CGp) * RW;
  return r;
}

// One gy row p of plane g against the thread's RH x RW taps, sliding mode: x column of
// (q, j) = q * sw + (j - j_lo) * dw; with q = c0 + m * g_mod (g_mod = dw / sw) that is class
// c0 * sw, index m + (j - j_lo) of the x layout de-interleaved by dw.
template <typename A>
FUSEKIT_DW_HD void wgrad_row_sliding(const WgradArgs& a, const A* x_plane, const A* grow, int p, int di, int dj,
                                     A (&acc)[RegTile<A>::RH][RegTile<A>::RW], A& gsum) {
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW, LOG_RW = RegTile<A>::LOG_RW;
  const A* xrow[RH];
FUSEKIT_DW_UNROLL
  for (int ih = 0; ih < RH; ++ih) xrow[ih] = x_plane + (p * a.sh + (di + ih) * a.dh) * a.x_pitch;
  for (int c0 = 0; c0 < a.g_mod; ++c0) {
    const int mcount = (a.TW - c0 + a.g_mod - 1) / a.g_mod;
    if (mcount <= 0) continue;
    const int xb = (c0 * a.sw) * a.x_cls + dj;  // multiple of RW
    const int gb = c0 * a.g_cls;                // multiple of RW
    A buf[RH][RW];
    const int sxb = skew<LOG_RW>(xb);
FUSEKIT_DW_UNROLL
    for (int ih = 0; ih < RH; ++ih)
FUSEKIT_DW_UNROLL
      for (int r = 0; r < RW; ++r) buf[ih][r] = sm_ld(xrow[ih] + sxb + r);
    int mb = 0;
    for (; mb + RW <= mcount; mb += RW) {
      const int nb = skew<LOG_RW>(xb + mb + RW);
      const A* gp = grow + skew<LOG_RW>(gb + mb);
FUSEKIT_DW_UNROLL
      for (int u = 0; u < RW; ++u) {
        const A gv = sm_ld(gp + u);
        gsum += gv;
FUSEKIT_DW_UNROLL
        for (int ih = 0; ih < RH; ++ih)
FUSEKIT_DW_UNROLL
          for (int r = 0; r < RW; ++r) acc[ih][r] += buf[ih][(u + r) % RW] * gv;
FUSEKIT_DW_UNROLL
        for (int ih = 0; ih < RH; ++ih) buf[ih][u] = sm_ld(xrow[ih] + nb + u);
      }
    }
    if (mb < mcount) {
      const int nb = skew<LOG_RW>(xb + mb + RW);
      const A* gp = grow + skew<LOG_RW>(gb + mb);
FUSEKIT_DW_UNROLL
      for (int u = 0; u < RW; ++u) {
        if (mb + u < mcount) {
          const A gv = sm_ld(gp + u);
          gsum += gv;
FUSEKIT_DW_UNROLL
          for (int ih = 0; ih < RH; ++ih)
FUSEKIT_DW_UNROLL
            for (int r = 0; r < RW; ++r) acc[ih][r] += buf[ih][(u + r) % RW] * gv;
          if (mb + u + 1 < mcount) {
FUSEKIT_DW_UNROLL
            for (int ih = 0; ih < RH; ++ih) buf[ih][u] = sm_ld(xrow[ih] + nb + u);
          }
        }
      }
    }
  }
}

// Same, any stride / dilation (no de-interleaving: x_mod == g_mod == 1).
template <typename A>
FUSEKIT_DW_HD void wgrad_row_generic(const WgradArgs& a, const A* x_plane, const A* grow, int p, int di, int dj,
                                     A (&acc)[RegTile<A>::RH][RegTile<A>::RW], A& gsum) {
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW, LOG_RW = RegTile<A>::LOG_RW;
  const A* xrow[RH];
FUSEKIT_DW_UNROLL
  for (int ih = 0; ih < RH; ++ih) xrow[ih] = x_plane + (p * a.sh + (di + ih) * a.dh) * a.x_pitch;
  for (int q = 0; q < a.TW; ++q) {
    const A gv = sm_ld(grow + skew<LOG_RW>(q));
    gsum += gv;
FUSEKIT_DW_UNROLL
    for (int r = 0; r < RW; ++r) {
      const int col = skew<LOG_RW>(q * a.sw + (dj + r) * a.dw);
FUSEKIT_DW_UNROLL
      for (int ih = 0; ih < RH; ++ih) acc[ih][r] += sm_ld(xrow[ih] + col) * gv;
    }
  }
}

template <typename A, bool kSliding>
FUSEKIT_DW_HD void wgrad_row(const WgradArgs& a, const A* x_plane, const A* grow, int p, int di, int dj,
                             A (&acc)[RegTile<A>::RH][RegTile<A>::RW], A& gsum) {
  if constexpr (kSliding)
    wgrad_row_sliding(a, x_plane, grow, p, di, dj, acc, gsum);
  else
    wgrad_row_generic(a, x_plane, grow, p, di, dj, acc, gsum);
}

// Phase 2 (per thread): all the rows of the item assigned to the thread's row unit.
template <typename A, bool kSliding>
FUSEKIT_DW_HD void wgrad_compute(const WgradArgs& a, int64_t cg, const WgradItem& it, int i_lo, int j_lo,
                                 const WgradRole& role, const A* x_sm, const A* gy_sm,
                                 A (&acc)[RegTile<A>::RH][RegTile<A>::RW], A& gsum) {
  if (a.channels_last) {
    const int si = wgrad_plane_seg(a, cg, it, role.g);
    if (si < 0) return;
    const SegDesc& s = a.seg[si];
    if (i_lo + role.di >= s.kh || j_lo + role.dj >= s.kw) return;
    const A* x_plane = x_sm + role.g * a.x_plane;
    const A* g_plane = gy_sm + role.g * a.g_plane;
    for (int p = role.u; p < a.TH; p += a.U)
      wgrad_row<A, kSliding>(a, x_plane, g_plane + p * a.g_pitch, p, role.di, role.dj, acc, gsum);
  } else {
    const int si = wgrad_plane_seg(a, cg, it, 0);
    if (si < 0) return;
    const SegDesc& s = a.seg[si];
    if (i_lo + role.di >= s.kh || j_lo + role.dj >= s.kw) return;
    const int rows = static_cast<int>(lmin(a.G, a.N - it.n0)) * a.TH;
    int g = role.u / a.TH, p = role.u - g * a.TH;
    for (int r = role.u; r < rows; r += a.U) {
      wgrad_row<A, kSliding>(a, x_sm + g * a.x_plane, gy_sm + g * a.g_plane + p * a.g_pitch, p, role.di, role.dj, acc,
                             gsum);
      p += a.U;
      while (p >= a.TH) {
        p -= a.TH;
        ++g;
      }
    }
  }
}

// Phase 3: partial sums into the reduction buffer ([RH * RW + 1][threads]).
template <typename A>
FUSEKIT_DW_HD void wgrad_acc_to_smem(const WgradArgs& a, A* red, int t, const A (&acc)[RegTile<A>::RH][RegTile<A>::RW],
                                     A gsum) {
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW;
FUSEKIT_DW_UNROLL
  for (int ih = 0; ih < RH; ++ih)
FUSEKIT_DW_UNROLL
    for (int r = 0; r < RW; ++r) sm_st(red + (ih * RW + r) * a.threads + t, acc[ih][r]);
  sm_st(red + RH * RW * a.threads + t, gsum);
}

// Phase 4 (per thread t): sum the row units and add into grad_weight / grad_bias.
template <typename A>
FUSEKIT_DW_HD void wgrad_flush(const WgradArgs& a, int64_t cg, int i_lo, int j_lo, bool first_pass, const A* red,
                               int t) {
  constexpr int RH = RegTile<A>::RH, RW = RegTile<A>::RW, K = RH * RW;
  const int g_count = a.channels_last ? a.G : 1;
  const int taps_out = g_count * a.TGp * K;
  const int total = taps_out + (first_pass ? g_count : 0);
  for (int o = t; o < total; o += a.threads) {
    int g, tg, kk;
    const bool is_bias = o >= taps_out;
    if (is_bias) {
      g = o - taps_out;
      tg = 0;
      kk = K;
    } else {
      g = o % g_count;
      const int rest = o / g_count;
      tg = rest / K;
      kk = rest - tg * K;
    }
    const int64_t c = a.channels_last ? cg * a.G + g : cg;
    if (c >= a.C) continue;
    const int si = find_segment(a.seg, a.num_segments, c);
    if (si < 0 || a.seg[si].identity) continue;
    const SegDesc& s = a.seg[si];
    const int64_t c_local = c - s.c_begin;
    int i = 0, j = 0;
    if (is_bias) {
      if (s.grad_bias == nullptr) continue;
    } else {
      i = i_lo + (tg / a.CGp) * RH + kk / RW;
      j = j_lo + (tg % a.CGp) * RW + kk % RW;
      if (i >= s.kh || j >= s.kw) continue;
    }
    A sum = A(0);
    for (int u = 0; u < a.U; ++u) {
      const int thr = a.channels_last ? (u * a.TGp + tg) * a.G + g : u * a.TGp + tg;
      sum += sm_ld(red + kk * a.threads + thr);
    }
    if (is_bias)
      atomic_add_acc(static_cast<A*>(s.grad_bias) + c_local, sum);
    else
      atomic_add_acc(static_cast<A*>(s.grad_weight) + (c_local * s.kh + i) * s.kw + j, sum);
  }
}

// Largest kernel among the (non-identity) segments of a block: passes past it are skipped.
FUSEKIT_DW_HD void wgrad_block_kmax(const WgradArgs& a, int64_t cg, int& kh, int& kw) {
  kh = 0;
  kw = 0;
  const int64_t c_lo = a.channels_last ? cg * a.G : cg;
  const int64_t c_hi = a.channels_last ? cg * a.G + a.G : cg + 1;
  for (int s = 0; s < a.num_segments; ++s) {
    if (a.seg[s].identity || a.seg[s].c_end <= c_lo || a.seg[s].c_begin >= c_hi) continue;
    kh = imax(kh, a.seg[s].kh);
    kw = imax(kw, a.seg[s].kw);
  }
}

// Direct weight-gradient term: gy[n, c, oy, ox] * x[n, c, oy * sh - pad_h + i * dh, ...] for
// output position e (linear over N x Ho x Wo); tap == kh * kw is the bias term.
template <typename T, typename A>
FUSEKIT_DW_HD A wgrad_direct_term(const WgradArgs& a, const SegDesc& s, int64_t c, int tap, int64_t e) {
  int64_t ox, oy, n;
  a.div_Wo.divmod(e, e, ox);
  a.div_Ho.divmod(e, n, oy);
  const A g = Io<T>::template ld<A>(static_cast<const T*>(a.gy) + n * a.gy_stride[0] + c * a.gy_stride[1] +
                                     oy * a.gy_stride[2] + ox * a.gy_stride[3]);
  if (tap == s.kh * s.kw) return g;
  const int i = tap / s.kw, j = tap - (tap / s.kw) * s.kw;
  const int64_t iy = oy * a.sh - s.pad_h + static_cast<int64_t>(i) * a.dh;
  const int64_t ix = ox * a.sw - s.pad_w + static_cast<int64_t>(j) * a.dw;
  if (iy < 0 || iy >= a.H || ix < 0 || ix >= a.W) return A(0);
  return g * Io<T>::template ld<A>(static_cast<const T*>(a.x) + n * a.x_stride[0] + c * a.x_stride[1] +
                                   iy * a.x_stride[2] + ix * a.x_stride[3]);
}


// ---------------------------------------------------------------------------------------------
// Launch planning (host only)
// ---------------------------------------------------------------------------------------------

struct DeviceLimits {
  int sm_count = 132;
  int smem_optin = 227 * 1024;   // per block, after cudaFuncSetAttribute
  int smem_per_sm = 228 * 1024;
};

// Shared-memory wavefronts of one warp access (elem: element index per lane; equal indices
// are broadcasts). 4-byte elements: 32 banks; 8-byte elements: two half-warp phases.
inline int bank_wavefronts(const int* elem, int lanes, int elem_bytes) {
  const int phases = elem_bytes == 8 ? 2 : 1;
  const int banks = elem_bytes == 8 ? 16 : 32;
  const int per_phase = 32 / phases;
  int total = 0;
  for (int ph = 0; ph < phases; ++ph) {
    int count[32] = {0};
    int seen[32][32];  // distinct elements per bank
    int worst = 0;
    const int lo = ph * per_phase, hi = imin(lanes, lo + per_phase);
    for (int l = lo; l < hi; ++l) {
      const int b = ((elem[l] % banks) + banks) % banks;
      bool dup = false;
      for (int m = 0; m < count[b] && !dup; ++m) dup = seen[b][m] == elem[l];
      if (dup) continue;
      seen[b][count[b]] = elem[l];
      worst = imax(worst, ++count[b]);
    }
    total += worst;
  }
  return total;
}

// Slots taken by n skewed columns (the last one's slot + 1).
inline int skewed_extent(int n, int log_rw) { return (n - 1) + ((n - 1) >> log_rw) + 1; }

// Searches row pitches pitch0 .. pitch0 + 7 and plane strides rows * pitch + 0 .. 31 for the
// layout with the fewest wavefronts of the first warp's access (elem_of(lane, pitch, plane))
// among those that fit (fits(plane)); stops at the first conflict-free one.
template <typename ElemOf, typename Fits>
inline void search_pitch(int pitch0, int rows, int lanes, int acc_bytes, ElemOf elem_of, Fits fits, int& best_pitch,
                         int& best_plane) {
  int elem[32];
  best_pitch = pitch0;
  best_plane = rows * pitch0;
  int best_w = 1 << 30;
  for (int dp = 0; dp < 8; ++dp) {
    const int pitch = pitch0 + dp;
    for (int dq = 0; dq < 32; ++dq) {
      const int plane = rows * pitch + dq;
      for (int l = 0; l < lanes; ++l) elem[l] = elem_of(l, pitch, plane);
      const int wv = bank_wavefronts(elem, lanes, acc_bytes);
      if (wv < best_w && fits(plane)) {
        best_w = wv;
        best_pitch = pitch;
        best_plane = plane;
      }
      if (best_w <= acc_bytes / 4) break;
    }
    if (best_w <= acc_bytes / 4) break;
  }
}

// Registers per thread the tile kernels are built for (see the launch bounds in the .cu file):
// 3 blocks of 256 threads per SM for the sliding kernels, 2 for the others.
constexpr int kSlidingRegs = 80, kWalkRegs = 128;

// Occupancy penalty of a block shape: few resident threads hide latency badly. The tile
// kernels keep 16 independent FMA chains per thread, so 512 resident threads count as enough.
inline double occupancy_factor(int threads, size_t smem_bytes, int regs, const DeviceLimits& lim) {
  threads = imax(threads, 1);
  int blocks = imin(2048 / threads, 32);
  blocks = imin(blocks, 65536 / (regs * round_up(threads, 32)));
  if (smem_bytes > 0) blocks = imin(blocks, static_cast<int>(lim.smem_per_sm / smem_bytes));
  const int resident = imax(blocks, 0) * threads;
  if (resident == 0) return 1e9;
  return 1.0 + 0.6 * (1.0 - imin(resident, 512) / 512.0);
}

inline void conv_kernel_extent(const ConvTileArgs& a, int& kh_max, int& kw_max) {
  kh_max = 1;
  kw_max = 1;
  for (int s = 0; s < a.num_segments; ++s) {
    kh_max = imax(kh_max, a.seg[s].kh);
    kw_max = imax(kw_max, a.seg[s].kw);
  }
}

// Fills the geometry of `a` for one candidate (no bank padding) and returns its shared memory.
inline size_t conv_derive(ConvTileArgs& a, bool sliding, int RH, int RW, int LOG_RW, int acc_bytes, int G, int TXT,
                          int TYT, int KR) {
  a.G = G;
  a.TXT = TXT;
  a.TYT = TYT;
  a.S = TXT * TYT;
  a.threads = G * a.S;
  a.TH = TYT * RH;
  a.TW = TXT * RW;
  a.KR = imin(KR, a.kh_max);
  a.num_chunks = static_cast<int>(cdiv(a.kh_max, a.KR));
  if (!a.gather) {
    a.hh = (a.TH - 1) * a.sh + (a.KR - 1) * a.dh + 1;
    a.hw = (a.TW - 1) * a.sw + (a.kw_max - 1) * a.dw + 1;
  } else {
    a.hh = ((a.TH - 1) + (a.KR - 1) * a.dh) / a.sh + 1;
    a.hw = ((a.TW - 1) + (a.kw_max - 1) * a.dw) / a.sw + 1;
  }
  a.col_mod = sliding ? a.sw : 1;
  a.col_div = FastDivmod(static_cast<uint32_t>(a.col_mod));
  if (sliding) {
    const int mcount_max = static_cast<int>(cdiv(a.kw_max, a.col_mod));
    a.class_len = round_up(a.TW + mcount_max, RW);
    a.wcl = mcount_max;
    a.w_row = a.col_mod * a.wcl;
  } else {
    a.class_len = round_up(a.hw, RW);
    a.wcl = a.kw_max;
    a.w_row = a.kw_max;
  }
  a.pitch = skewed_extent(a.col_mod * a.class_len, LOG_RW);
  a.plane_elems = a.hh * a.pitch;
  a.out_pitch = skewed_extent(a.TW, LOG_RW);
  a.out_plane = a.TH * a.out_pitch;
  a.w_plane = a.KR * a.w_row;
  a.w_plane |= 1;  // odd: channels of one warp (NHWC) on distinct banks
  a.wdiv_plane = FastDivmod(static_cast<uint32_t>(a.KR * a.kw_max));
  a.wdiv_row = FastDivmod(static_cast<uint32_t>(a.kw_max));
  const int region = imax(G * a.plane_elems, G * a.out_plane);
  a.w_offset = round_up(region, 4);
  a.smem_bytes = static_cast<size_t>(a.w_offset + G * a.w_plane) * acc_bytes;
  a.tiles_h = cdiv(a.Hd, a.TH);
  a.tiles_w = cdiv(a.Wd, a.TW);
  if (a.channels_last) {
    a.cgroups = cdiv(a.C, G);
    a.num_blocks = a.N * a.cgroups * a.tiles_h * a.tiles_w;
  } else {
    a.cgroups = 1;
    a.num_blocks = cdiv(a.N * a.C, G) * a.tiles_h * a.tiles_w;
  }
  return a.smem_bytes;
}

// Global-memory sector efficiency of NHWC staging: a block reads G consecutive channels.
inline double nhwc_sector_factor(int G, int64_t C, int elem_bytes) {
  const int64_t bytes = lmin(G, C) * elem_bytes;
  return bytes >= 32 ? 1.0 : 32.0 / static_cast<double>(bytes);
}

// Relative cost (thread instructions) of a derived candidate.
inline double conv_cost(const ConvTileArgs& a, bool sliding, int RH, int RW, int elem_bytes, const DeviceLimits& lim) {
  const double taps = static_cast<double>(a.kh_max) * a.kw_max;
  double per_thread;
  if (sliding) {
    per_thread = a.kh_max * (a.kw_max * (RH * RW + RH + 1.0) + a.col_mod * (RH * RW + 6.0)) + a.num_chunks * 20.0;
  } else {
    const double eff_taps = a.gather ? imax(1, static_cast<int>(taps / (a.sh * a.sw))) : taps;
    per_thread = RH * RW * eff_taps * 3.0 + (RH + RW) * (a.gather ? 30.0 : 8.0) + RH * a.kh_max * RW * 3.0;
  }
  const double compute = static_cast<double>(a.threads) * per_thread;
  const double sector = a.channels_last ? nhwc_sector_factor(a.G, a.C, elem_bytes) : 1.0;
  const double staging =
      a.num_chunks * static_cast<double>(a.G) * (a.hh * static_cast<double>(a.hw) * 10.0 * sector + a.KR * a.kw_max * 25.0);
  const double writeback = static_cast<double>(a.G) * a.TH * a.TW * 8.0 * sector;
  const double overhead = static_cast<double>(a.threads) * 60.0 * (a.num_chunks + 2);
  return static_cast<double>(a.num_blocks) * (compute + staging + writeback + overhead) *
         occupancy_factor(a.threads, a.smem_bytes, sliding ? kSlidingRegs : kWalkRegs, lim);
}

// Picks the row pitch / plane stride (and the same for the output tile) that minimize the bank
// conflicts of the first warp's compute loads and output stores.
inline void conv_tune_banks(ConvTileArgs& a, int RH, int RW, int LOG_RW, int acc_bytes, const DeviceLimits& lim) {
  const int lanes = imin(32, a.threads);
  ThreadPos tp[32];
  for (int l = 0; l < lanes; ++l) tp[l] = conv_thread(a, l);
  auto fits = [&](int plane, int out_plane) {
    const int region = imax(a.G * plane, a.G * out_plane);
    return static_cast<size_t>(round_up(region, 4) + a.G * a.w_plane) * acc_bytes <= static_cast<size_t>(lim.smem_optin);
  };
  search_pitch(
      a.pitch, a.hh, lanes, acc_bytes,
      [&](int l, int pitch, int plane) { return tp[l].g * plane + tp[l].ty * RH * a.sh * pitch + tp[l].tx * (RW + 1); },
      [&](int plane) { return fits(plane, a.out_plane); }, a.pitch, a.plane_elems);
  search_pitch(
      a.out_pitch, a.TH, lanes, acc_bytes,
      [&](int l, int op, int oplane) { return tp[l].g * oplane + tp[l].ty * RH * op + tp[l].tx * (RW + 1); },
      [&](int oplane) { return fits(a.plane_elems, oplane); }, a.out_pitch, a.out_plane);
  const int region = imax(a.G * a.plane_elems, a.G * a.out_plane);
  a.w_offset = round_up(region, 4);
  a.smem_bytes = static_cast<size_t>(a.w_offset + a.G * a.w_plane) * acc_bytes;
  (void)LOG_RW;
}

// Chooses the tile of the conv tile kernel. Expects the problem fields of `a` (sizes, strides,
// orientation, segments) to be set. Returns false when no tile fits shared memory.
inline bool plan_conv_tile(ConvTileArgs& a, bool sliding, int RH, int RW, int LOG_RW, int acc_bytes, int elem_bytes,
                           const DeviceLimits& lim) {
  conv_kernel_extent(a, a.kh_max, a.kw_max);
  if (a.sh >= 1) {
    const int gh = gcd_int(a.sh, a.dh), gw = gcd_int(a.sw, a.dw);
    a.gts_h = a.sh / gh;
    a.gqs_h = a.dh / gh;
    a.gts_w = a.sw / gw;
    a.gqs_w = a.dw / gw;
  }
  const int64_t planes = a.N * a.C;
  const int need_x = static_cast<int>(lmax(1, cdiv(a.Wd, RW)));
  const int need_y = static_cast<int>(lmax(1, cdiv(a.Hd, RH)));
  int kr_list[8], n_kr = 0;
  kr_list[n_kr++] = a.kh_max;
  for (int kr = 32; kr >= 1; kr /= 2)
    if (kr < a.kh_max) kr_list[n_kr++] = kr;

  ConvTileArgs best = a, trial = a;
  double best_cost = -1.0;
  auto consider = [&](int G, int TXT, int TYT) {
    for (int ki = 0; ki < n_kr; ++ki) {
      int g = G;
      size_t bytes = conv_derive(trial, sliding, RH, RW, LOG_RW, acc_bytes, g, TXT, TYT, kr_list[ki]);
      if (!a.channels_last) {  // NCHW: fewer planes per block when shared memory is short
        while (g > 1 && bytes > static_cast<size_t>(lim.smem_optin)) {
          g = imax(1, g / 2);
          bytes = conv_derive(trial, sliding, RH, RW, LOG_RW, acc_bytes, g, TXT, TYT, kr_list[ki]);
        }
      }
      if (bytes > static_cast<size_t>(lim.smem_optin)) continue;
      // fewer kernel rows per chunk: more staging, but less shared memory (occupancy)
      const double cost = conv_cost(trial, sliding, RH, RW, elem_bytes, lim);
      if (best_cost < 0 || cost < best_cost) {
        best_cost = cost;
        best = trial;
      }
    }
  };
  if (!a.channels_last) {
    int txs[6], n_tx = 0, tys[10], n_ty = 0;
    for (int v = 1; v <= 16; v *= 2)
      if (v < need_x) txs[n_tx++] = v;
    txs[n_tx++] = imin(need_x, 16);
    for (int v = 1; v <= 256; v *= 2)
      if (v < need_y) tys[n_ty++] = v;
    tys[n_ty++] = imin(need_y, 256);
    for (int i = 0; i < n_tx; ++i)
      for (int j = 0; j < n_ty; ++j) {
        const int S = txs[i] * tys[j];
        if (S > kMaxThreads) continue;
        const int G = static_cast<int>(lmax(1, lmin(kMaxThreads / S, planes)));
        consider(G, txs[i], tys[j]);
      }
  } else {
    for (int G = 32; G >= 1; G /= 2) {
      if (G > 1 && G / 2 >= a.C) continue;  // no wider than the channel count needs
      if (G * elem_bytes < 16 && G < a.C) continue;  // keep global segments >= 16 bytes
      for (int S = kMaxThreads / G; S >= 1; S /= 2) {
        for (int TXT = 1; TXT <= S; TXT *= 2) {
          const int TYT = S / TXT;
          // no more threads along an axis than the next power of two of what it needs
          if (TXT >= 2 * need_x || TYT >= 2 * need_y) continue;
          consider(G, TXT, TYT);
        }
      }
    }
  }
  if (best_cost < 0) return false;
  a = best;
  conv_tune_banks(a, RH, RW, LOG_RW, acc_bytes, lim);
  conv_set_dividers(a);
  return a.smem_bytes <= static_cast<size_t>(lim.smem_optin);
}

inline void wgrad_kernel_extent(const WgradArgs& a, int& kh_max, int& kw_max) {
  kh_max = 0;
  kw_max = 0;
  for (int s = 0; s < a.num_segments; ++s) {
    if (a.seg[s].identity) continue;
    kh_max = imax(kh_max, a.seg[s].kh);
    kw_max = imax(kw_max, a.seg[s].kw);
  }
}

inline size_t wgrad_derive(WgradArgs& a, bool sliding, int RH, int RW, int LOG_RW, int acc_bytes, int kh_max,
                           int kw_max, int G, int TH, int TW, int RGp, int CGp, int threads_cap) {
  a.G = G;
  a.TH = TH;
  a.TW = TW;
  a.RGp = RGp;
  a.CGp = CGp;
  a.TGp = RGp * CGp;
  const int per_unit = a.channels_last ? G * a.TGp : a.TGp;
  a.U = imax(1, threads_cap / per_unit);
  a.threads = a.U * per_unit;
  a.passes_h = static_cast<int>(cdiv(cdiv(kh_max, RH), RGp));
  a.passes_w = static_cast<int>(cdiv(cdiv(kw_max, RW), CGp));
  a.hh = (TH - 1) * a.sh + (RGp * RH - 1) * a.dh + 1;
  a.hw = (TW - 1) * a.sw + (CGp * RW - 1) * a.dw + 1;
  a.x_mod = sliding ? a.dw : 1;
  a.g_mod = sliding ? a.dw / a.sw : 1;
  a.x_div = FastDivmod(static_cast<uint32_t>(a.x_mod));
  a.g_div = FastDivmod(static_cast<uint32_t>(a.g_mod));
  if (sliding) {
    const int mcount_max = static_cast<int>(cdiv(TW, a.g_mod));
    a.x_cls = round_up(mcount_max + CGp * RW, RW);
    a.g_cls = round_up(mcount_max, RW);
  } else {
    a.x_cls = round_up(a.hw, RW);
    a.g_cls = round_up(TW, RW);
  }
  a.x_pitch = skewed_extent(a.x_mod * a.x_cls, LOG_RW);
  a.x_plane = a.hh * a.x_pitch;
  a.g_pitch = skewed_extent(a.g_mod * a.g_cls, LOG_RW);
  a.g_plane = TH * a.g_pitch;
  a.gy_offset = round_up(G * a.x_plane, 4);
  a.red_offset = 0;  // reused after the last item of a pass
  const int elems = imax(a.gy_offset + G * a.g_plane, (RH * RW + 1) * a.threads);
  a.smem_bytes = static_cast<size_t>(elems) * acc_bytes;
  a.tiles_h = cdiv(a.Ho, TH);
  a.tiles_w = cdiv(a.Wo, TW);
  if (a.channels_last) {
    a.n_groups = a.N;
    a.cgroups = cdiv(a.C, G);
  } else {
    a.n_groups = cdiv(a.N, G);
    a.cgroups = a.C;
  }
  a.items = a.n_groups * a.tiles_h * a.tiles_w;
  return a.smem_bytes;
}

inline double wgrad_cost(const WgradArgs& a, bool sliding, int RH, int RW, int elem_bytes, const DeviceLimits& lim) {
  const int rows_units = a.channels_last ? a.TH : a.G * a.TH;
  const double rounds = static_cast<double>(cdiv(rows_units, a.U));
  const double per_row = sliding ? a.TW * (RH * RW + RH + 2.0) + a.g_mod * (RH * RW + 8.0) : a.TW * (RH * RW * 3.0 + 3.0);
  const double compute = static_cast<double>(a.threads) * rounds * per_row;
  const double sector = a.channels_last ? nhwc_sector_factor(a.G, a.C, elem_bytes) : 1.0;
  const double staging = static_cast<double>(a.G) * (static_cast<double>(a.hh) * a.hw + a.TH * a.TW) * 10.0 * sector;
  const double overhead = static_cast<double>(a.threads) * 80.0;
  const double item = compute + staging + overhead;
  return static_cast<double>(a.cgroups) * a.items * a.passes_h * a.passes_w * item *
         occupancy_factor(a.threads, a.smem_bytes, sliding ? kSlidingRegs : kWalkRegs, lim);
}

inline void wgrad_tune_banks(WgradArgs& a, int RH, int RW, int acc_bytes, const DeviceLimits& lim) {
  const int lanes = imin(32, a.threads);
  int lg[32], lp[32], ldi[32], ldj[32];
  for (int l = 0; l < lanes; ++l) {
    const WgradRole r = wgrad_role(a, l, RH, RW);
    if (a.channels_last) {
      lg[l] = r.g;
      lp[l] = r.u % a.TH;
    } else {
      lg[l] = (r.u / a.TH) % a.G;
      lp[l] = r.u % a.TH;
    }
    ldi[l] = r.di;
    ldj[l] = r.dj;
  }
  auto bytes_of = [&](int x_plane, int g_plane) {
    const int gy_offset = round_up(a.G * x_plane, 4);
    const int elems = imax(gy_offset + a.G * g_plane, (RH * RW + 1) * a.threads);
    return static_cast<size_t>(elems) * acc_bytes;
  };
  const size_t limit = static_cast<size_t>(lim.smem_optin);
  search_pitch(
      a.x_pitch, a.hh, lanes, acc_bytes,
      [&](int l, int xp, int xplane) {
        return lg[l] * xplane + (lp[l] * a.sh + ldi[l] * a.dh) * xp + ldj[l] + ldj[l] / RW;
      },
      [&](int xplane) { return bytes_of(xplane, a.g_plane) <= limit; }, a.x_pitch, a.x_plane);
  search_pitch(
      a.g_pitch, a.TH, lanes, acc_bytes, [&](int l, int gp, int gplane) { return lg[l] * gplane + lp[l] * gp; },
      [&](int gplane) { return bytes_of(a.x_plane, gplane) <= limit; }, a.g_pitch, a.g_plane);
  a.gy_offset = round_up(a.G * a.x_plane, 4);
  a.smem_bytes = bytes_of(a.x_plane, a.g_plane);
}

// Chooses the tiling of the weight-gradient tile kernel; `sliding` is set when the stride of
// the columns divides their dilation. Returns false when no tile fits (or nothing to do:
// a.num_blocks == 0 then).
inline bool plan_wgrad_tile(WgradArgs& a, bool& sliding, int RH, int RW, int LOG_RW, int acc_bytes, int elem_bytes,
                            const DeviceLimits& lim) {
  int kh_max, kw_max;
  wgrad_kernel_extent(a, kh_max, kw_max);
  a.num_blocks = 0;
  if (kh_max == 0 || a.N * a.C == 0 || a.Ho == 0 || a.Wo == 0) return false;
  sliding = a.dw % a.sw == 0;
  const int TGh = static_cast<int>(cdiv(kh_max, RH)), TGw = static_cast<int>(cdiv(kw_max, RW));
  WgradArgs best = a, trial = a;
  double best_cost = -1.0;
  auto consider = [&](int G, int TH, int TW, int tg_cap) {
    if (tg_cap < 1) return;
    const int CGp = imin(TGw, tg_cap);
    for (int RGp = imax(1, imin(TGh, tg_cap / CGp));; RGp = (RGp + 1) / 2) {
      // fewer threads only when the reduction buffer alone is too big
      for (int cap = kMaxThreads; cap >= 32; cap /= 2) {
        const size_t bytes = wgrad_derive(trial, sliding, RH, RW, LOG_RW, acc_bytes, kh_max, kw_max, G, TH, TW, RGp,
                                          CGp, cap);
        if (bytes <= static_cast<size_t>(lim.smem_optin)) {
          const double cost = wgrad_cost(trial, sliding, RH, RW, elem_bytes, lim);
          if (best_cost < 0 || cost < best_cost) {
            best_cost = cost;
            best = trial;
          }
          return;
        }
        if (trial.threads < cap / 2 || (RH * RW + 1) * trial.threads * acc_bytes <= lim.smem_optin) break;
      }
      if (RGp == 1) return;
    }
  };
  int ths[8], n_th = 0, tws[8], n_tw = 0;
  if (!a.channels_last) {
    for (int v = 1; v <= 64; v *= 2)
      if (v < a.Ho) ths[n_th++] = v;
    ths[n_th++] = imin(a.Ho, 64);
    for (int v = 16; v <= 256; v *= 2)
      if (v < a.Wo) tws[n_tw++] = v;
    tws[n_tw++] = imin(a.Wo, 256);
    for (int i = 0; i < n_th; ++i)
      for (int j = 0; j < n_tw; ++j)
        for (int G = 1; G <= 64; G *= 2) {
          if (G > 1 && (ths[i] < a.Ho || G / 2 >= a.N)) break;
          consider(G, ths[i], tws[j], kMaxThreads);
        }
  } else {
    for (int v = 1; v <= 32; v *= 2)
      if (v < a.Ho) ths[n_th++] = v;
    ths[n_th++] = imin(a.Ho, 32);
    for (int v = 8; v <= 64; v *= 2)
      if (v < a.Wo) tws[n_tw++] = v;
    tws[n_tw++] = imin(a.Wo, 64);
    for (int G = 32; G >= 1; G /= 2) {
      if (G > 1 && G / 2 >= a.C) continue;
      if (G * elem_bytes < 16 && G < a.C) continue;
      for (int i = 0; i < n_th; ++i)
        for (int j = 0; j < n_tw; ++j) consider(G, ths[i], tws[j], kMaxThreads / G);
    }
  }
  if (best_cost < 0) return false;
  a = best;
  wgrad_tune_banks(a, RH, RW, acc_bytes, lim);
  const int per_sm = imax(1, imin(2048 / a.threads, static_cast<int>(lim.smem_per_sm / imax(1, static_cast<int>(a.smem_bytes)))));
  const int64_t target = static_cast<int64_t>(lim.sm_count) * per_sm * 2;
  a.blocks_per_group = lmax(1, lmin(lmin(a.items, 64), cdiv(target, a.cgroups)));
  a.num_blocks = a.cgroups * a.blocks_per_group;
  wgrad_set_dividers(a, 1);
  return a.smem_bytes <= static_cast<size_t>(lim.smem_optin);
}


// ---------------------------------------------------------------------------------------------
// Kernel arguments from the launcher's params (host only)
// ---------------------------------------------------------------------------------------------

// Orientation of the segment descriptors of one launch.
enum class SegMode { Forward, BackwardFlipped, BackwardGather, WeightGrad };

inline int fill_segments(const DepthwiseConv2dParams& p, SegMode mode, SegDesc* out) {
  const int num = imin(imax(p.num_segments, 0), kMaxDepthwiseSegments);
  for (int i = 0; i < num; ++i) {
    const DepthwiseSegment& s = p.seg[i];
    SegDesc d;
    d.c_begin = s.c_begin;
    d.c_end = s.c_end;
    d.identity = s.kh == 0 ? 1 : 0;
    d.kh = d.identity ? 1 : static_cast<int>(s.kh);
    d.kw = d.identity ? 1 : static_cast<int>(s.kw);
    d.pad_h = d.identity ? 0 : static_cast<int>(s.pad_top);
    d.pad_w = d.identity ? 0 : static_cast<int>(s.pad_left);
    if (mode == SegMode::BackwardFlipped) {  // forward orientation over grad_y, flipped kernel
      d.pad_h = (d.kh - 1) * static_cast<int>(p.dil_h) - d.pad_h;
      d.pad_w = (d.kw - 1) * static_cast<int>(p.dil_w) - d.pad_w;
    }
    d.weight = d.identity ? nullptr : s.weight;
    if (mode == SegMode::Forward && !d.identity) d.bias = s.bias;  // identity: output = input
    if (mode == SegMode::WeightGrad) {
      d.grad_weight = s.grad_weight;
      d.grad_bias = s.grad_bias;
    }
    out[i] = d;
  }
  return num;
}

// Whether the conv tile kernel can run in sliding mode (unit column step in the staged layout).
inline bool conv_can_slide(const DepthwiseConv2dParams& p, bool backward) {
  return backward ? (p.stride_h == 1 && p.stride_w == 1 && p.dil_w == 1) : p.dil_w == 1;
}

// Problem fields of the conv tile kernel (tiling left to plan_conv_tile). sliding == false gives
// the walk orientation, which is also the one of the direct kernel.
inline ConvTileArgs make_conv_args(const DepthwiseConv2dParams& p, bool backward, bool sliding, const void* src,
                                   void* dst) {
  ConvTileArgs a;
  a.src = src;
  a.dst = dst;
  for (int i = 0; i < 4; ++i) {
    a.src_stride[i] = backward ? p.out_stride[i] : p.in_stride[i];
    a.dst_stride[i] = backward ? p.in_stride[i] : p.out_stride[i];
  }
  a.N = p.N;
  a.C = p.C;
  a.Hs = static_cast<int>(backward ? p.Ho : p.H);
  a.Ws = static_cast<int>(backward ? p.Wo : p.W);
  a.Hd = static_cast<int>(backward ? p.H : p.Ho);
  a.Wd = static_cast<int>(backward ? p.W : p.Wo);
  a.sh = static_cast<int>(p.stride_h);
  a.sw = static_cast<int>(p.stride_w);
  a.dh = static_cast<int>(p.dil_h);
  a.dw = static_cast<int>(p.dil_w);
  a.channels_last = p.channels_last ? 1 : 0;
  a.gather = backward && !sliding ? 1 : 0;
  a.flip = backward && sliding ? 1 : 0;
  const SegMode mode = !backward ? SegMode::Forward : (sliding ? SegMode::BackwardFlipped : SegMode::BackwardGather);
  a.num_segments = fill_segments(p, mode, a.seg);
  conv_set_dividers(a);
  return a;
}

inline WgradArgs make_wgrad_args(const DepthwiseConv2dParams& p, const void* grad_out, const void* in) {
  WgradArgs a;
  a.x = in;
  a.gy = grad_out;
  for (int i = 0; i < 4; ++i) {
    a.x_stride[i] = p.in_stride[i];
    a.gy_stride[i] = p.out_stride[i];
  }
  a.N = p.N;
  a.C = p.C;
  a.H = static_cast<int>(p.H);
  a.W = static_cast<int>(p.W);
  a.Ho = static_cast<int>(p.Ho);
  a.Wo = static_cast<int>(p.Wo);
  a.sh = static_cast<int>(p.stride_h);
  a.sw = static_cast<int>(p.stride_w);
  a.dh = static_cast<int>(p.dil_h);
  a.dw = static_cast<int>(p.dil_w);
  a.channels_last = p.channels_last ? 1 : 0;
  a.num_segments = fill_segments(p, SegMode::WeightGrad, a.seg);
  wgrad_set_dividers(a, 1);
  return a;
}

// Blocks of the weight-gradient direct kernel per channel.
inline int64_t wgrad_direct_slabs(const WgradArgs& a, int threads) {
  return lmax(1, lmin(64, cdiv(a.N * a.Ho * a.Wo, 16 * static_cast<int64_t>(threads))));
}

}  // namespace fusekit::dwconv
