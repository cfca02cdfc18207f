// Device code and launch planning of the fused CUDA inverted-residual blocks (torch-free).
//
// One thread block owns (sample n, tile of TH x TW output pixels); x and y are read / written
// once, the expanded tensors live only in shared memory (fp32). The expanded channels are walked
// in chunks of kChunk = 32 (MobileNetV2 5.1: the block is separable over expanded channels):
//
//  inverted residual (and its dw_sums twin):
//    stage x over the input halo of the tile, [halo pixels, Cin] (zero outside the image)
//    per chunk: stage W_e^T, b_e, w_dw, b_dw, gate, W_p^T of the chunk
//               a1[halo pixel, ec] = act(x W_e^T + b_e), 0 outside the image (padding applies to a1)
//               a2[pixel, ec] = act(dw(a1) + b_dw) * gate          (dw_sums: per-channel d, d^2, act(d) sums)
//               y_acc[pixel, Cout] += a2 W_p^T                     (fp32, in shared memory)
//    epilogue: y = y_acc + b_p (+ x), stored in x's layout.
//  fused MBConv:
//    stage x over the input halo; per chunk: a1[pixel, ec] = act(conv_kxk(x) + b_e) as an implicit
//    GEMM over slices of (taps x input channels), then y_acc += a1 W_p^T (or y = a1 when there is
//    no projection); same epilogue.
//
// The GEMMs run on CUDA cores in fp32 with 4 x 4 (2 x 4 for the fused conv) register micro-tiles
// whose second operand is a float4 of 4 consecutive channels; shared rows of the A operands use odd
// pitches so the lanes of a warp that read different rows hit different banks. dw_sums writes one
// partial per (block, statistic, channel) and a second kernel adds the partials of a sample in a
// fixed order (deterministic, no atomics).
//
// Every block function is a sequence of phases; Block::phase(f) runs f(thread) for every thread
// and then synchronizes (on the device: f(threadIdx.x); __syncthreads()), so a host emulator can
// run the same code thread by thread. No value lives in registers across phases.
#pragma once

#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "inverted_residual_cuda_params.h"
#include "mqa_decode_cuda.cuh"  // Elem<T> (fp32 <-> element type)

#if defined(__CUDACC__)
#define FUSEKIT_IR_HD __host__ __device__ __forceinline__
#else
#define FUSEKIT_IR_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define FUSEKIT_IR_UNROLL _Pragma("unroll")
#define FUSEKIT_IR_UNROLL4 _Pragma("unroll 4")
#else
#define FUSEKIT_IR_UNROLL
#define FUSEKIT_IR_UNROLL4
#endif

namespace fusekit::ir {

using mqa::Elem;

constexpr int kThreads = 256;
constexpr int kChunk = 32;                 // expanded channels per chunk
constexpr int kChunkPitch = kChunk + 1;    // row pitch of the a1 / a2 buffers (odd: no bank conflicts)
constexpr int kMaxTilePixels = 64;         // fused conv: (P / 2) * (kChunk / 4) micro-tiles <= kThreads
constexpr int kWeightSliceRows = 144;      // fused conv: (tap, input channel) rows of W_e staged per slice

using IrOp = InvertedResidualOp;

// ---------------------------------------------------------------------------------------------
// Element access and activations
// ---------------------------------------------------------------------------------------------

template <typename T> FUSEKIT_IR_HD float ld(const void* base, int64_t i) {
  const T* p = static_cast<const T*>(base) + i;
#if defined(__CUDA_ARCH__)
  return Elem<T>::to_float(__ldg(p));
#else
  return Elem<T>::to_float(*p);
#endif
}

template <typename T> FUSEKIT_IR_HD void st(void* base, int64_t i, float v) {
  static_cast<T*>(base)[i] = Elem<T>::from_float(v);
}

// Activation codes of the schema: 0 identity, 1 relu, 2 relu6, 3 silu, 4 hardswish.
template <int ACT> FUSEKIT_IR_HD float activate(float u) {
  if constexpr (ACT == 1) {
    return u < 0.f ? 0.f : u;
  } else if constexpr (ACT == 2) {
    return u < 0.f ? 0.f : (u > 6.f ? 6.f : u);
  } else if constexpr (ACT == 3) {
    return u / (1.f + expf(-u));
  } else if constexpr (ACT == 4) {
    const float r = u + 3.f;
    return u * (r < 0.f ? 0.f : (r > 6.f ? 6.f : r)) * (1.f / 6.f);
  } else {
    return u;
  }
}

FUSEKIT_IR_HD float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// ---------------------------------------------------------------------------------------------
// Kernel arguments: the params narrowed to int32 sizes plus the tiling and shared-memory plan
// (ir_plan). Global offsets are int64.
// ---------------------------------------------------------------------------------------------

struct IrArgs {
  const void* x = nullptr;
  const void* w_expand = nullptr;
  const void* b_expand = nullptr;
  const void* w_dw = nullptr;
  const void* b_dw = nullptr;
  const void* w_project = nullptr;
  const void* b_project = nullptr;
  const void* gate = nullptr;
  void* y = nullptr;
  float* partial = nullptr;
  float* sums = nullptr;

  int Cin = 0, E = 0, Cout = 0, H = 0, W = 0, Ho = 0, Wo = 0;
  int kh = 1, kw = 1, sh = 1, sw = 1, pad_top = 0, pad_left = 0, dh = 1, dw = 1;
  int64_t N = 0;
  int64_t x_stride[4] = {0, 0, 0, 0};
  int64_t y_stride[4] = {0, 0, 0, 0};
  bool channels_last = false, has_expand = false, has_project = false, residual = false;

  // tiling
  int TH = 0, TW = 0, P = 0;        // output tile (TW % 4 == 0, so P % 4 == 0)
  int IH = 0, IW = 0;               // input halo of the tile
  int halo_rows = 0;                // staged halo pixels: IH * IW rounded up to 4 (extra rows are zero)
  int tiles_w = 0, tiles = 0;       // tiles per row / per sample
  int64_t num_blocks = 0;           // N * tiles
  int x_pitch = 0;                  // row pitch of the staged x (odd, >= Cin)
  int cout_pad = 0;                 // Cout rounded up to 4 (pitch of W_p^T and y_acc)
  int slice_c = 0;                  // fused conv: input channels per weight slice
  // shared-memory plan, in floats from the (16-byte aligned) base
  int off_x = 0, off_we = 0, off_a1 = 0, off_a2 = 0, off_wp = 0, off_y = 0, off_vec = 0, off_red = 0;
  int smem_floats = 0;
};

// Per-chunk channel vectors inside the off_vec region.
constexpr int kVecBe = 0, kVecBdw = kChunk, kVecGate = 2 * kChunk, kVecWdw = 3 * kChunk;

// ---------------------------------------------------------------------------------------------
// Host planning
// ---------------------------------------------------------------------------------------------

inline int round_up4(int64_t v) { return static_cast<int>((v + 3) / 4 * 4); }

// Fills the sizes from the params (the caller has checked that they fit int32).
inline IrArgs ir_args(const InvertedResidualCudaParams& p, IrOp op) {
  IrArgs a;
  a.x = p.x;
  a.w_expand = p.w_expand;
  a.b_expand = p.b_expand;
  a.w_dw = p.w_dw;
  a.b_dw = p.b_dw;
  a.w_project = op == IrOp::DwSums ? nullptr : p.w_project;
  a.b_project = op == IrOp::DwSums ? nullptr : p.b_project;
  a.gate = op == IrOp::Forward ? p.gate : nullptr;
  a.y = p.y;
  a.partial = p.partial;
  a.sums = p.sums;
  a.Cin = static_cast<int>(p.Cin);
  a.E = static_cast<int>(p.E);
  a.Cout = op == IrOp::DwSums ? 0 : static_cast<int>(p.Cout);
  a.H = static_cast<int>(p.H);
  a.W = static_cast<int>(p.W);
  a.Ho = static_cast<int>(p.Ho);
  a.Wo = static_cast<int>(p.Wo);
  a.kh = static_cast<int>(p.kh);
  a.kw = static_cast<int>(p.kw);
  a.sh = static_cast<int>(p.stride_h);
  a.sw = static_cast<int>(p.stride_w);
  a.pad_top = static_cast<int>(p.pad_top);
  a.pad_left = static_cast<int>(p.pad_left);
  a.dh = static_cast<int>(p.dil_h);
  a.dw = static_cast<int>(p.dil_w);
  a.N = p.N;
  for (int i = 0; i < 4; ++i) {
    a.x_stride[i] = p.x_stride[i];
    a.y_stride[i] = p.y_stride[i];
  }
  a.channels_last = p.channels_last;
  a.has_expand = p.w_expand != nullptr;
  a.has_project = op != IrOp::DwSums && p.w_project != nullptr;
  a.residual = op != IrOp::DwSums && p.residual;
  return a;
}

// Tiling and shared-memory plan for an output tile of TH x TW; returns the shared-memory bytes.
inline size_t ir_plan(IrArgs& a, IrOp op, int TH, int TW) {
  a.TH = TH;
  a.TW = TW;
  a.P = TH * TW;
  // Halo extents in int64: a huge dilation or stride gives a plan that fits no device.
  constexpr int64_t kHaloCap = int64_t{1} << 24;
  const int64_t ih = static_cast<int64_t>(TH - 1) * a.sh + static_cast<int64_t>(a.kh - 1) * a.dh + 1;
  const int64_t iw = static_cast<int64_t>(TW - 1) * a.sw + static_cast<int64_t>(a.kw - 1) * a.dw + 1;
  const bool halo_ok = ih <= kHaloCap && iw <= kHaloCap && ih * iw <= kHaloCap;
  a.IH = halo_ok ? static_cast<int>(ih) : 1;
  a.IW = halo_ok ? static_cast<int>(iw) : 1;
  a.halo_rows = round_up4(static_cast<int64_t>(a.IH) * a.IW);
  const int tiles_h = (a.Ho + TH - 1) / TH;
  a.tiles_w = (a.Wo + TW - 1) / TW;
  a.tiles = tiles_h * a.tiles_w;
  a.num_blocks = a.N * a.tiles;
  a.x_pitch = a.Cin | 1;
  a.cout_pad = round_up4(a.Cout);
  const int taps = a.kh * a.kw;
  a.slice_c = op == IrOp::FusedMbconv ? (kWeightSliceRows / taps < 1 ? 1 : kWeightSliceRows / taps) : 0;
  if (a.slice_c > a.Cin) a.slice_c = a.Cin;

  int64_t off = 0;
  auto take = [&off](int64_t floats) {
    const int64_t at = off;
    off += (floats + 3) / 4 * 4;  // keep every region 16-byte aligned
    return static_cast<int>(at);
  };
  const bool stage_x = op == IrOp::FusedMbconv || a.has_expand;
  a.off_x = take(stage_x ? static_cast<int64_t>(a.halo_rows) * a.x_pitch : 0);
  if (op == IrOp::FusedMbconv) {
    a.off_we = take(static_cast<int64_t>(taps) * a.slice_c * kChunk);
    a.off_a1 = take(static_cast<int64_t>(a.P) * kChunkPitch);  // conv accumulators, then a1
    a.off_a2 = a.off_a1;
    a.off_vec = take(kChunk);
  } else {
    a.off_we = take(a.has_expand ? static_cast<int64_t>(a.Cin) * kChunk : 0);
    a.off_a1 = take(static_cast<int64_t>(a.halo_rows) * kChunkPitch);
    a.off_a2 = take(op == IrOp::Forward ? static_cast<int64_t>(a.P) * kChunkPitch : 0);
    a.off_vec = take(3 * kChunk + static_cast<int64_t>(kChunk) * taps);
  }
  a.off_wp = take(a.has_project ? static_cast<int64_t>(kChunk) * a.cout_pad : 0);
  a.off_y = take(a.has_project ? static_cast<int64_t>(a.P) * a.cout_pad : 0);
  a.off_red = take(op == IrOp::DwSums ? (kThreads / kChunk) * 3 * kChunk : 0);
  if (!halo_ok) off = int64_t{1} << 40;
  a.smem_floats = static_cast<int>(off < (int64_t{1} << 30) ? off : (int64_t{1} << 30));
  return static_cast<size_t>(off) * sizeof(float);
}

// Picks the output tile: the largest candidate that leaves room for two resident blocks per SM
// (else the largest that fits), then smaller ones while the grid would not fill the SMs and the
// smaller tile computes a1 for at most 3x the input pixels its outputs cover (P * sh * sw).
// Returns false when not even the smallest tile fits smem_optin.
inline bool ir_choose_tile(IrArgs& a, IrOp op, size_t smem_optin, int num_sms) {
  constexpr int kCandidates[][2] = {{8, 8}, {4, 8}, {4, 4}, {2, 4}, {1, 4}};
  constexpr int kNum = static_cast<int>(sizeof(kCandidates) / sizeof(kCandidates[0]));
  int pick = -1;
  for (int i = 0; i < kNum && pick < 0; ++i) {
    if (ir_plan(a, op, kCandidates[i][0], kCandidates[i][1]) <= smem_optin / 2) pick = i;
  }
  for (int i = 0; i < kNum && pick < 0; ++i) {
    if (ir_plan(a, op, kCandidates[i][0], kCandidates[i][1]) <= smem_optin) pick = i;
  }
  if (pick < 0) return false;
  ir_plan(a, op, kCandidates[pick][0], kCandidates[pick][1]);
  while (pick + 1 < kNum && a.num_blocks < num_sms) {
    IrArgs smaller = a;
    if (ir_plan(smaller, op, kCandidates[pick + 1][0], kCandidates[pick + 1][1]) > smem_optin) break;
    if (op != IrOp::FusedMbconv && smaller.halo_rows > 3 * smaller.P * a.sh * a.sw) break;
    a = smaller;
    ++pick;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Block position
// ---------------------------------------------------------------------------------------------

struct IrTile {
  int64_t n = 0;
  int tile = 0;
  int oh0 = 0, ow0 = 0;  // first output pixel
  int ih0 = 0, iw0 = 0;  // input position of halo pixel (0, 0) (may be negative)
};

FUSEKIT_IR_HD IrTile ir_tile(const IrArgs& a, int64_t block) {
  IrTile t;
  t.n = block / a.tiles;
  t.tile = static_cast<int>(block - t.n * a.tiles);
  t.oh0 = (t.tile / a.tiles_w) * a.TH;
  t.ow0 = (t.tile % a.tiles_w) * a.TW;
  t.ih0 = t.oh0 * a.sh - a.pad_top;
  t.iw0 = t.ow0 * a.sw - a.pad_left;
  return t;
}

FUSEKIT_IR_HD int64_t x_offset(const IrArgs& a, int64_t n, int c, int h, int w) {
  return n * a.x_stride[0] + c * a.x_stride[1] + h * a.x_stride[2] + w * a.x_stride[3];
}

FUSEKIT_IR_HD int64_t y_offset(const IrArgs& a, int64_t n, int c, int h, int w) {
  return n * a.y_stride[0] + c * a.y_stride[1] + h * a.y_stride[2] + w * a.y_stride[3];
}

// Halo pixel hp -> image position; false outside the image or on a padding row (hp >= IH * IW).
FUSEKIT_IR_HD bool halo_pixel(const IrArgs& a, const IrTile& tl, int hp, int& h, int& w) {
  const int ih = hp / a.IW;
  h = tl.ih0 + ih;
  w = tl.iw0 + (hp - ih * a.IW);
  return ih < a.IH && h >= 0 && h < a.H && w >= 0 && w < a.W;
}

// ---------------------------------------------------------------------------------------------
// Phases (thread t of kThreads)
// ---------------------------------------------------------------------------------------------

// xs[hp, c] = x[n, c, halo pixel hp] (0 outside the image); channels_last walks c fastest,
// NCHW walks the halo pixels fastest (coalesced global reads either way).
template <typename T>
FUSEKIT_IR_HD void stage_input(const IrArgs& a, const IrTile& tl, float* sm, int t) {
  float* xs = sm + a.off_x;
  const int64_t count = static_cast<int64_t>(a.halo_rows) * a.Cin;
  for (int64_t i = t; i < count; i += kThreads) {
    int hp, c;
    if (a.channels_last) {
      hp = static_cast<int>(i / a.Cin);
      c = static_cast<int>(i - static_cast<int64_t>(hp) * a.Cin);
    } else {
      c = static_cast<int>(i / a.halo_rows);
      hp = static_cast<int>(i - static_cast<int64_t>(c) * a.halo_rows);
    }
    int h, w;
    const bool inside = halo_pixel(a, tl, hp, h, w);
    xs[hp * a.x_pitch + c] = inside ? ld<T>(a.x, x_offset(a, tl.n, c, h, w)) : 0.f;
  }
}

FUSEKIT_IR_HD void zero_output_acc(const IrArgs& a, float* sm, int t) {
  float* ys = sm + a.off_y;
  for (int i = t; i < a.P * a.cout_pad; i += kThreads) ys[i] = 0.f;
}

// W_p^T of the chunk: wps[ec, o] = w_project[o, e0 + ec] (0 beyond E and Cout).
template <typename T>
FUSEKIT_IR_HD void stage_project_weights(const IrArgs& a, int e0, float* sm, int t) {
  float* wps = sm + a.off_wp;
  for (int i = t; i < kChunk * a.cout_pad; i += kThreads) {
    const int ec = i / a.cout_pad, o = i - ec * a.cout_pad;
    const int e = e0 + ec;
    wps[i] = (e < a.E && o < a.Cout) ? ld<T>(a.w_project, static_cast<int64_t>(o) * a.E + e) : 0.f;
  }
}

// Chunk weights of the inverted residual: W_e^T [Cin, kChunk], b_e, b_dw, gate, w_dw [kChunk, taps]
// (all 0 beyond E), and W_p^T.
template <typename T>
FUSEKIT_IR_HD void stage_ir_chunk(const IrArgs& a, const IrTile& tl, int e0, float* sm, int t) {
  if (a.has_expand) {
    float* wes = sm + a.off_we;
    for (int i = t; i < a.Cin * kChunk; i += kThreads) {
      const int c = i / kChunk, e = e0 + (i - c * kChunk);
      wes[i] = e < a.E ? ld<T>(a.w_expand, static_cast<int64_t>(e) * a.Cin + c) : 0.f;
    }
  }
  float* vec = sm + a.off_vec;
  if (t < kChunk) {
    const int e = e0 + t;
    const bool ok = e < a.E;
    vec[kVecBe + t] = ok && a.b_expand ? ld<T>(a.b_expand, e) : 0.f;
    vec[kVecBdw + t] = ok && a.b_dw ? ld<T>(a.b_dw, e) : 0.f;
    vec[kVecGate + t] = !ok ? 0.f : (a.gate ? ld<T>(a.gate, tl.n * a.E + e) : 1.f);
  }
  const int taps = a.kh * a.kw;
  const int64_t base = static_cast<int64_t>(e0) * taps, total = static_cast<int64_t>(a.E) * taps;
  for (int i = t; i < kChunk * taps; i += kThreads) {
    vec[kVecWdw + i] = base + i < total ? ld<T>(a.w_dw, base + i) : 0.f;
  }
  if (a.has_project) stage_project_weights<T>(a, e0, sm, t);
}

// a1[hp, ec] = act(xs[hp, :] W_e^T[:, ec] + b_e), 0 outside the image: 4 halo pixels x 4 channels
// per micro-tile. Without an expand stage a1 = x, read straight from global memory.
template <typename T, int ACT>
FUSEKIT_IR_HD void expand_halo(const IrArgs& a, const IrTile& tl, int e0, float* sm, int t) {
  float* a1 = sm + a.off_a1;
  if (!a.has_expand) {
    for (int i = t; i < a.halo_rows * kChunk; i += kThreads) {
      const int hp = i / kChunk, ec = i - hp * kChunk;
      int h, w;
      const bool inside = halo_pixel(a, tl, hp, h, w) && e0 + ec < a.E;
      a1[hp * kChunkPitch + ec] = inside ? ld<T>(a.x, x_offset(a, tl.n, e0 + ec, h, w)) : 0.f;
    }
    return;
  }
  const float* xs = sm + a.off_x;
  const float* wes = sm + a.off_we;
  const float* be = sm + a.off_vec + kVecBe;
  const int micro_tiles = (a.halo_rows / 4) * (kChunk / 4);
  for (int m = t; m < micro_tiles; m += kThreads) {
    const int ec0 = (m % (kChunk / 4)) * 4, hp0 = (m / (kChunk / 4)) * 4;
    float acc[4][4] = {};
    const float* xrow = xs + hp0 * a.x_pitch;
    FUSEKIT_IR_UNROLL4
    for (int c = 0; c < a.Cin; ++c) {
      const float4 w = ld4(wes + c * kChunk + ec0);
      FUSEKIT_IR_UNROLL
      for (int r = 0; r < 4; ++r) {
        const float xv = xrow[r * a.x_pitch + c];
        acc[r][0] = fmaf(xv, w.x, acc[r][0]);
        acc[r][1] = fmaf(xv, w.y, acc[r][1]);
        acc[r][2] = fmaf(xv, w.z, acc[r][2]);
        acc[r][3] = fmaf(xv, w.w, acc[r][3]);
      }
    }
    FUSEKIT_IR_UNROLL
    for (int r = 0; r < 4; ++r) {
      int h, w;
      const bool inside = halo_pixel(a, tl, hp0 + r, h, w);
      FUSEKIT_IR_UNROLL
      for (int q = 0; q < 4; ++q) {
        a1[(hp0 + r) * kChunkPitch + ec0 + q] = inside ? activate<ACT>(acc[r][q] + be[ec0 + q]) : 0.f;
      }
    }
  }
}

// d = b_dw + sum_taps a1 * w_dw for the output pixels p = pg, pg + 8, ... of channel ec = t % 32.
// K > 0: K x K kernel unrolled with the weights in registers; K == 0: any kh x kw.
template <int K>
struct DwTaps {
  float w[K > 0 ? K * K : 1];
  FUSEKIT_IR_HD void load(const IrArgs& a, const float* wdw, int ec) {
    if constexpr (K > 0) {
      FUSEKIT_IR_UNROLL
      for (int i = 0; i < K * K; ++i) w[i] = wdw[ec * K * K + i];
    }
  }
  FUSEKIT_IR_HD float conv(const IrArgs& a, const float* a1c, const float* wdw, int ec, int base, float d) const {
    // a1c: a1 of channel ec (stride kChunkPitch per halo pixel); base: halo pixel of tap (0, 0)
    if constexpr (K > 0) {
      FUSEKIT_IR_UNROLL
      for (int i = 0; i < K; ++i) {
        const int row = base + i * a.dh * a.IW;
        FUSEKIT_IR_UNROLL
        for (int j = 0; j < K; ++j) d = fmaf(a1c[(row + j * a.dw) * kChunkPitch], w[i * K + j], d);
      }
    } else {
      const int taps = a.kh * a.kw;
      for (int i = 0; i < a.kh; ++i) {
        const int row = base + i * a.dh * a.IW;
        for (int j = 0; j < a.kw; ++j) {
          d = fmaf(a1c[(row + j * a.dw) * kChunkPitch], wdw[ec * taps + i * a.kw + j], d);
        }
      }
    }
    return d;
  }
};

// Forward: a2[p, ec] = act(d) * gate (0 beyond E). DwSums: per-thread sums of d, d^2, act(d) over
// its valid output pixels, written to the reduction buffer red[pg, stat, ec].
template <int ACT, int K, bool kSums>
FUSEKIT_IR_HD void depthwise_chunk(const IrArgs& a, const IrTile& tl, int e0, float* sm, int t) {
  constexpr int kGroups = kThreads / kChunk;
  const int ec = t % kChunk, pg = t / kChunk;
  const float* a1c = sm + a.off_a1 + ec;
  const float* vec = sm + a.off_vec;
  const float* wdw = vec + kVecWdw;
  DwTaps<K> taps;
  taps.load(a, wdw, ec);
  const float bias = vec[kVecBdw + ec], gate = vec[kVecGate + ec];
  const bool channel_ok = e0 + ec < a.E;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f;
  for (int p = pg; p < a.P; p += kGroups) {
    const int ph = p / a.TW, pw = p - ph * a.TW;
    const float d = taps.conv(a, a1c, wdw, ec, ph * a.sh * a.IW + pw * a.sw, bias);
    const float v = activate<ACT>(d);
    if constexpr (kSums) {
      if (channel_ok && tl.oh0 + ph < a.Ho && tl.ow0 + pw < a.Wo) {
        s0 += d;
        s1 += d * d;
        s2 += v;
      }
    } else {
      sm[a.off_a2 + p * kChunkPitch + ec] = channel_ok ? v * gate : 0.f;
    }
  }
  if constexpr (kSums) {
    float* red = sm + a.off_red + pg * 3 * kChunk + ec;
    red[0] = s0;
    red[kChunk] = s1;
    red[2 * kChunk] = s2;
  }
}

// partial[(n * tiles + tile) * 3 + stat, e] = sum over the 8 pixel groups, in order.
FUSEKIT_IR_HD void write_sum_partials(const IrArgs& a, const IrTile& tl, int e0, const float* sm, int t) {
  if (t >= 3 * kChunk) return;
  const int stat = t / kChunk, ec = t - stat * kChunk;
  if (e0 + ec >= a.E) return;
  const float* red = sm + a.off_red + t;
  float s = 0.f;
  for (int g = 0; g < kThreads / kChunk; ++g) s += red[g * 3 * kChunk];
  a.partial[((tl.n * a.tiles + tl.tile) * 3 + stat) * a.E + e0 + ec] = s;
}

// y_acc[p, o] += a2[p, :] W_p^T[:, o] over the chunk: 4 pixels x 4 output channels per micro-tile.
// Each micro-tile has the same owner thread in every chunk, so the read-modify-write is race-free.
FUSEKIT_IR_HD void project_chunk(const IrArgs& a, float* sm, int t) {
  const float* a2 = sm + a.off_a2;
  const float* wps = sm + a.off_wp;
  float* ys = sm + a.off_y;
  const int groups_o = a.cout_pad / 4;
  const int micro_tiles = (a.P / 4) * groups_o;
  for (int m = t; m < micro_tiles; m += kThreads) {
    const int pg = m / groups_o;
    const int o0 = (m - pg * groups_o) * 4, p0 = pg * 4;
    float acc[4][4] = {};
    FUSEKIT_IR_UNROLL
    for (int ec = 0; ec < kChunk; ++ec) {
      const float4 w = ld4(wps + ec * a.cout_pad + o0);
      FUSEKIT_IR_UNROLL
      for (int r = 0; r < 4; ++r) {
        const float v = a2[(p0 + r) * kChunkPitch + ec];
        acc[r][0] = fmaf(v, w.x, acc[r][0]);
        acc[r][1] = fmaf(v, w.y, acc[r][1]);
        acc[r][2] = fmaf(v, w.z, acc[r][2]);
        acc[r][3] = fmaf(v, w.w, acc[r][3]);
      }
    }
    FUSEKIT_IR_UNROLL
    for (int r = 0; r < 4; ++r) {
      float4* dst = reinterpret_cast<float4*>(ys + (p0 + r) * a.cout_pad + o0);
      float4 cur = *dst;
      cur.x += acc[r][0];
      cur.y += acc[r][1];
      cur.z += acc[r][2];
      cur.w += acc[r][3];
      *dst = cur;
    }
  }
}

// y[n, o, pixel] = y_acc + b_p (+ x[n, o, pixel]) for the tile's in-image pixels.
template <typename T>
FUSEKIT_IR_HD void store_output(const IrArgs& a, const IrTile& tl, const float* sm, int t) {
  const float* ys = sm + a.off_y;
  const int count = a.P * a.Cout;
  for (int i = t; i < count; i += kThreads) {
    int p, o;
    if (a.channels_last) {
      p = i / a.Cout;
      o = i - p * a.Cout;
    } else {
      o = i / a.P;
      p = i - o * a.P;
    }
    const int ph = p / a.TW;
    const int oh = tl.oh0 + ph, ow = tl.ow0 + (p - ph * a.TW);
    if (oh >= a.Ho || ow >= a.Wo) continue;
    float v = ys[p * a.cout_pad + o];
    if (a.b_project) v += ld<T>(a.b_project, o);
    if (a.residual) v += ld<T>(a.x, x_offset(a, tl.n, o, oh, ow));
    st<T>(a.y, y_offset(a, tl.n, o, oh, ow), v);
  }
}

// ---------------------------------------------------------------------------------------------
// Fused MBConv phases
// ---------------------------------------------------------------------------------------------

// Conv accumulators to 0 and the chunk's b_e / W_p^T.
template <typename T>
FUSEKIT_IR_HD void begin_fused_chunk(const IrArgs& a, int e0, float* sm, int t) {
  float* acc = sm + a.off_a1;
  for (int i = t; i < a.P * kChunkPitch; i += kThreads) acc[i] = 0.f;
  if (t < kChunk) {
    const int e = e0 + t;
    sm[a.off_vec + t] = e < a.E && a.b_expand ? ld<T>(a.b_expand, e) : 0.f;
  }
  if (a.has_project) stage_project_weights<T>(a, e0, sm, t);
}

// wes[(tap, c), ec] = w_expand[e0 + ec, c0 + c, tap] for the slice's slice_c input channels
// (0 beyond E and Cin).
template <typename T>
FUSEKIT_IR_HD void stage_conv_slice(const IrArgs& a, int e0, int c0, float* sm, int t) {
  float* wes = sm + a.off_we;
  const int taps = a.kh * a.kw;
  const int count = taps * a.slice_c * kChunk;
  for (int i = t; i < count; i += kThreads) {
    const int row = i / kChunk, ec = i - row * kChunk;
    const int tap = row / a.slice_c, c = c0 + (row - tap * a.slice_c);
    const int e = e0 + ec;
    wes[i] = (e < a.E && c < a.Cin)
                 ? ld<T>(a.w_expand, (static_cast<int64_t>(e) * a.Cin + c) * taps + tap)
                 : 0.f;
  }
}

// acc[p, ec] += sum over the slice's taps and channels: 2 pixels x 4 channels per thread
// (at most one micro-tile per thread since P <= kMaxTilePixels).
FUSEKIT_IR_HD void conv_slice(const IrArgs& a, int c0, float* sm, int t) {
  const int micro_tiles = (a.P / 2) * (kChunk / 4);
  if (t >= micro_tiles) return;
  const int ec0 = (t % (kChunk / 4)) * 4, p0 = (t / (kChunk / 4)) * 2;
  const float* xs = sm + a.off_x + c0;
  const float* wes = sm + a.off_we + ec0;
  const int cs = a.Cin - c0 < a.slice_c ? a.Cin - c0 : a.slice_c;
  int base[2];
  for (int r = 0; r < 2; ++r) {
    const int ph = (p0 + r) / a.TW, pw = (p0 + r) - ph * a.TW;
    base[r] = ph * a.sh * a.IW + pw * a.sw;
  }
  float acc[2][4] = {};
  for (int i = 0; i < a.kh; ++i) {
    for (int j = 0; j < a.kw; ++j) {
      const int tap_px = i * a.dh * a.IW + j * a.dw;
      const float* x0 = xs + (base[0] + tap_px) * a.x_pitch;
      const float* x1 = xs + (base[1] + tap_px) * a.x_pitch;
      const float* wt = wes + (i * a.kw + j) * a.slice_c * kChunk;
      FUSEKIT_IR_UNROLL4
      for (int c = 0; c < cs; ++c) {
        const float4 w = ld4(wt + c * kChunk);
        const float v0 = x0[c], v1 = x1[c];
        acc[0][0] = fmaf(v0, w.x, acc[0][0]);
        acc[0][1] = fmaf(v0, w.y, acc[0][1]);
        acc[0][2] = fmaf(v0, w.z, acc[0][2]);
        acc[0][3] = fmaf(v0, w.w, acc[0][3]);
        acc[1][0] = fmaf(v1, w.x, acc[1][0]);
        acc[1][1] = fmaf(v1, w.y, acc[1][1]);
        acc[1][2] = fmaf(v1, w.z, acc[1][2]);
        acc[1][3] = fmaf(v1, w.w, acc[1][3]);
      }
    }
  }
  float* dst = sm + a.off_a1;
  for (int r = 0; r < 2; ++r) {
    for (int q = 0; q < 4; ++q) dst[(p0 + r) * kChunkPitch + ec0 + q] += acc[r][q];
  }
}

// a1 = act(acc + b_e) (0 beyond E), in place for the projection; without a projection y = a1
// (+ x) is stored directly (channel e = e0 + ec of y).
template <typename T, int ACT>
FUSEKIT_IR_HD void finish_fused_chunk(const IrArgs& a, const IrTile& tl, int e0, float* sm, int t) {
  float* a1 = sm + a.off_a1;
  const float* be = sm + a.off_vec;
  for (int i = t; i < a.P * kChunk; i += kThreads) {
    int p, ec;
    if (a.has_project || a.channels_last) {
      p = i / kChunk;
      ec = i - p * kChunk;
    } else {
      ec = i / a.P;
      p = i - ec * a.P;
    }
    const int e = e0 + ec;
    const float v = e < a.E ? activate<ACT>(a1[p * kChunkPitch + ec] + be[ec]) : 0.f;
    if (a.has_project) {
      a1[p * kChunkPitch + ec] = v;
      continue;
    }
    const int ph = p / a.TW;
    const int oh = tl.oh0 + ph, ow = tl.ow0 + (p - ph * a.TW);
    if (e >= a.E || oh >= a.Ho || ow >= a.Wo) continue;
    const float res = a.residual ? ld<T>(a.x, x_offset(a, tl.n, e, oh, ow)) : 0.f;
    st<T>(a.y, y_offset(a, tl.n, e, oh, ow), v + res);
  }
}

// ---------------------------------------------------------------------------------------------
// Block drivers
// ---------------------------------------------------------------------------------------------

// inverted_residual_forward (kSums false) / inverted_residual_dw_sums partials (kSums true).
template <typename T, int ACT, int K, bool kSums, typename Block>
FUSEKIT_IR_HD void inverted_residual_block(const IrArgs& a, int64_t block, float* sm, Block& blk) {
  const IrTile tl = ir_tile(a, block);
  blk.phase([&](int t) {
    if (a.has_expand) stage_input<T>(a, tl, sm, t);
    if (!kSums) zero_output_acc(a, sm, t);
  });
  for (int e0 = 0; e0 < a.E; e0 += kChunk) {
    blk.phase([&](int t) { stage_ir_chunk<T>(a, tl, e0, sm, t); });
    blk.phase([&](int t) { expand_halo<T, ACT>(a, tl, e0, sm, t); });
    blk.phase([&](int t) { depthwise_chunk<ACT, K, kSums>(a, tl, e0, sm, t); });
    if constexpr (kSums) {
      blk.phase([&](int t) { write_sum_partials(a, tl, e0, sm, t); });
    } else {
      blk.phase([&](int t) { project_chunk(a, sm, t); });
    }
  }
  if constexpr (!kSums) blk.phase([&](int t) { store_output<T>(a, tl, sm, t); });
}

template <typename T, int ACT, typename Block>
FUSEKIT_IR_HD void fused_mbconv_block(const IrArgs& a, int64_t block, float* sm, Block& blk) {
  const IrTile tl = ir_tile(a, block);
  blk.phase([&](int t) {
    stage_input<T>(a, tl, sm, t);
    if (a.has_project) zero_output_acc(a, sm, t);
  });
  for (int e0 = 0; e0 < a.E; e0 += kChunk) {
    blk.phase([&](int t) { begin_fused_chunk<T>(a, e0, sm, t); });
    for (int c0 = 0; c0 < a.Cin; c0 += a.slice_c) {
      blk.phase([&](int t) { stage_conv_slice<T>(a, e0, c0, sm, t); });
      blk.phase([&](int t) { conv_slice(a, c0, sm, t); });
    }
    blk.phase([&](int t) { finish_fused_chunk<T, ACT>(a, tl, e0, sm, t); });
    if (a.has_project) blk.phase([&](int t) { project_chunk(a, sm, t); });
  }
  if (a.has_project) blk.phase([&](int t) { store_output<T>(a, tl, sm, t); });
}

// sums[n, stat, e] = sum over the sample's tiles (in order) of the partials.
FUSEKIT_IR_HD void reduce_sum_partials(const IrArgs& a, int64_t i) {
  const int64_t per_sample = 3 * static_cast<int64_t>(a.E);
  const int64_t n = i / per_sample, se = i - n * per_sample;
  const float* src = a.partial + n * a.tiles * per_sample + se;
  float s = 0.f;
  for (int tile = 0; tile < a.tiles; ++tile) s += src[tile * per_sample];
  a.sums[i] = s;
}

}  // namespace fusekit::ir
