// Torch-free CPU kernels of the fused inverted-residual block (MobileNetV2 / MBConv, BN folded):
// inverted_residual_forward (y = project(act(dw(act(expand(x)))) * gate) + b_p (+ x)) and
// inverted_residual_dw_sums (per sample and expanded channel: sums of d, d*d, act(d)).
//
// Scheme (x and y channels_last): a task is one sample and a band of output rows. The expanded
// channels are processed in chunks of `chunk` lanes (the block is separable over them). For a
// chunk, the band's output rows are walked top-down; the a1 rows they read live in a ring of
// window_rows rows (zero-padded left/right, each input row expanded once per band and chunk:
// no halo recompute inside a band), computed by the cpu_gemm.h micro-kernel ([W, Cin] x [Cin,
// chunk]) with bias + activation applied while the row is hot. The k x k depthwise runs over
// whole 16-lane vectors of channels, 8 output columns in registers; activation and gate give the
// band's a2 [pixels, chunk], and one project GEMM per chunk accumulates [pixels, chunk] x [chunk,
// Cout] into the band's fp32 output tile. After the last chunk: + b_project (+ x), store in x's
// dtype. a1, d and a2 never leave the per-thread scratch.
//
// Every function here is single-threaded and allocation-free: the launcher prepacks the weights
// (accumulation type, transposed, lanes zero-padded), hands each thread a scratch block and the
// tasks through a TaskQueue.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_gemm.h"
#include "cpu_isa.h"

namespace fusekit::cpu {

constexpr int64_t kIrMaxKernel = 64;

enum IrActivation : int { kIrIdentity = 0, kIrRelu = 1, kIrRelu6 = 2, kIrSilu = 3, kIrHardswish = 4 };

struct InvertedResidualParams {
  const void* x;  // [N, H, W, Cin] channels_last contiguous, storage type T
  void* y;        // forward: [N, Ho, Wo, Cout] channels_last contiguous; null for dw_sums
  int64_t N, H, W, Cin, E, Cout, Ho, Wo;
  int64_t kh, kw, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
  int activation;
  bool residual;  // y += x (Cout == Cin, Ho == H, Wo == W)
  // prepacked in the accumulation type A, lanes past E / Cout zero:
  const void* w_expand;   // [Cin][Ep] = w_expand^T; null: a1 = x (E == Cin, no activation)
  const void* b_expand;   // [Ep]
  const void* w_dw;       // [kh * kw][Ep]
  const void* b_dw;       // [Ep]
  const void* w_project;  // [E][Cp] = w_project^T (forward)
  const void* b_project;  // [Cp] (forward)
  const void* gate;       // [N][Ep] or null (forward)
  double* partial_sums;   // dw_sums: [tasks][3][Ep], one row per task (combined in a fixed order)
};

struct InvertedResidualPlan {
  int64_t Ep, Cp;         // E and Cout rounded up to whole vectors
  int64_t chunk;          // expanded channels per chunk (a multiple of kVecLanes)
  int64_t Wp;             // a1 row width with the left/right padding
  int64_t window_rows;    // ring rows: the (kh - 1) * dil_h + 1 rows one output row reads, plus
                          // (ahead - 1) * stride_h rows expanded in advance
  int64_t band_rows, bands, tasks;
  int64_t scratch_bytes;  // per thread
};

// Scratch of one thread (Carver over the block; the same carving measures it in the plan).
template <typename A>
struct IrScratch {
  A* ring;           // [window_rows][Wp][chunk] a1 rows, padding columns zero
  A* zero_row;       // [Wp][chunk] zeros: taps above / below the image
  int64_t* ring_row; // [window_rows] input row each ring slot holds (-1: none)
  A* x_row;          // [window_rows][W][Cin] x rows converted to A (16-bit x)
  A* stage;          // [window_rows][W][chunk] expand GEMM output before bias + activation
  A* a2;             // [band_rows * Wo][chunk] activated, gated depthwise output (dw_sums: one row of d)
  A* out;            // [band_rows * Wo][Cp] project accumulator (forward)
  double* sums;      // [3][chunk] (dw_sums)
};

template <typename T>
inline IrScratch<typename AccOf<T>::type> carve_ir_scratch(const InvertedResidualParams& p,
                                                            const InvertedResidualPlan& plan, uintptr_t base,
                                                            int64_t* used) {
  using A = typename AccOf<T>::type;
  const bool forward = p.y != nullptr;
  const int64_t px = forward ? plan.band_rows * p.Wo : p.Wo;
  Carver cv{base};
  IrScratch<A> s;
  s.ring = cv.take<A>(plan.window_rows * plan.Wp * plan.chunk);
  s.zero_row = cv.take<A>(plan.Wp * plan.chunk);
  s.ring_row = cv.take<int64_t>(plan.window_rows);
  s.x_row = std::is_same_v<T, A> ? nullptr : cv.take<A>(plan.window_rows * p.W * p.Cin);
  s.stage = cv.take<A>(plan.window_rows * p.W * plan.chunk);
  s.a2 = cv.take<A>(px * plan.chunk);
  s.out = forward ? cv.take<A>(px * plan.Cp) : nullptr;
  s.sums = forward ? nullptr : cv.take<double>(3 * plan.chunk);
  if (used) *used = cv.used;
  return s;
}

// Bands: as many output rows as keep a2 + the output tile within ~768 KiB (L2-resident; fewer
// bands = fewer a1 halo rows recomputed), but at least 2 tasks per thread when the batch alone
// does not give them.
template <typename T>
inline InvertedResidualPlan make_inverted_residual_plan(const InvertedResidualParams& p, int threads) {
  using A = typename AccOf<T>::type;
  InvertedResidualPlan plan{};
  plan.Ep = round_up(p.E, kVecLanes);
  plan.Cp = round_up(p.Cout, kVecLanes);
  const int64_t max_chunk = std::is_same_v<A, double> ? 32 : 64;  // the micro-kernel's widest block
  const int64_t chunks = ceil_div(plan.Ep, max_chunk);
  plan.chunk = round_up(ceil_div(plan.Ep, chunks), kVecLanes);   // even chunks: E = 96 -> 2 x 48
  plan.Wp = p.W + p.pad_left + std::max<int64_t>(0, (p.Wo - 1) * p.stride_w + (p.kw - 1) * p.dil_w + 1 - p.W - p.pad_left);
  plan.window_rows = (p.kh - 1) * p.dil_h + 1;
  const bool forward = p.y != nullptr;
  const int64_t px_bytes = int64_t(sizeof(A)) * (plan.chunk + (forward ? plan.Cp : 0));
  const int64_t px_max = std::max<int64_t>(p.Wo, (int64_t(768) << 10) / px_bytes);
  int64_t band_rows = std::max<int64_t>(1, std::min<int64_t>(p.Ho, px_max / p.Wo));
  const int64_t want_bands = ceil_div(2 * int64_t(std::max(threads, 1)), std::max<int64_t>(p.N, 1));
  band_rows = std::min(band_rows, std::max<int64_t>(1, ceil_div(p.Ho, want_bands)));
  plan.bands = ceil_div(p.Ho, band_rows);
  plan.band_rows = ceil_div(p.Ho, plan.bands);  // balance the bands
  plan.bands = ceil_div(p.Ho, plan.band_rows);
  plan.tasks = p.N * plan.bands;
  // narrow rows: expand several rows per GEMM (>= ~64 pixels) by keeping more rows in the ring
  const int64_t ahead = p.stride_h <= plan.window_rows
                            ? std::min(plan.band_rows, std::max<int64_t>(1, ceil_div(64, p.stride_h * p.W)))
                            : 1;
  plan.window_rows += (ahead - 1) * p.stride_h;
  carve_ir_scratch<T>(p, plan, 0, &plan.scratch_bytes);
  return plan;
}

// ----------------------------------------------------------------------------------------------
// activation over rows of vectors (one pass over an L1-resident row, activation switched outside)
// ----------------------------------------------------------------------------------------------

// In place (vectors wider than the baseline ABI's registers never cross a function boundary).
template <int Act, typename A>
FUSEKIT_INLINE void activate(typename VecOf<A>::type& u) {
  using vec = typename VecOf<A>::type;
  if constexpr (Act == kIrRelu) {
    u = u > A(0) ? u : vec{};
  } else if constexpr (Act == kIrRelu6) {
    u = u > A(0) ? u : vec{};
    u = u < A(6) ? u : vec{} + A(6);
  } else if constexpr (Act == kIrSilu) {
    // u * sigmoid(u) = u / (1 + 2^(-u log2 e)); the exponent clamped where exp2_vec is exact
    vec t = u * A(-kLog2e);
    t = t < A(126) ? t : vec{} + A(126);
    exp2_vec(t);
    u = u / (t + A(1));
  } else if constexpr (Act == kIrHardswish) {
    vec t = u + A(3);
    t = t > A(0) ? t : vec{};
    t = t < A(6) ? t : vec{} + A(6);
    u = u * t * A(1.0 / 6.0);
  }
}

// dst[r * stride + l] = act(src[.] + bias[l]) * scale[l] for r < n, l < lanes (whole vectors);
// bias / scale may be null, src may be dst.
template <int Act, typename A>
FUSEKIT_INLINE void bias_act_rows_impl(A* dst, const A* src, int64_t n, int64_t stride, int64_t lanes, const A* bias,
                                       const A* scale) {
  using vec = typename VecOf<A>::type;
  for (int64_t v = 0; v < lanes; v += kVecLanes) {
    const vec b = bias ? vec_at(bias + v) : vec{};
    const vec s = scale ? vec_at(scale + v) : vec{} + A(1);
    for (int64_t r = 0; r < n; ++r) {
      vec u = vec_at(src + r * stride + v) + b;
      activate<Act, A>(u);
      vec_at(dst + r * stride + v) = scale ? u * s : u;
    }
  }
}

template <typename A>
FUSEKIT_INLINE void bias_act_rows(int act, A* dst, const A* src, int64_t n, int64_t stride, int64_t lanes,
                                  const A* bias, const A* scale) {
  switch (act) {
    case kIrRelu: return bias_act_rows_impl<kIrRelu>(dst, src, n, stride, lanes, bias, scale);
    case kIrRelu6: return bias_act_rows_impl<kIrRelu6>(dst, src, n, stride, lanes, bias, scale);
    case kIrSilu: return bias_act_rows_impl<kIrSilu>(dst, src, n, stride, lanes, bias, scale);
    case kIrHardswish: return bias_act_rows_impl<kIrHardswish>(dst, src, n, stride, lanes, bias, scale);
    default: return bias_act_rows_impl<kIrIdentity>(dst, src, n, stride, lanes, bias, scale);
  }
}

// ----------------------------------------------------------------------------------------------
// depthwise: one output row of one chunk, NB output columns x one 16-lane vector in registers
// ----------------------------------------------------------------------------------------------

struct DwRowGeometry {
  int64_t kh, kw;
  int64_t col_step;  // stride_w * chunk: next output column
  int64_t tap_step;  // dil_w * chunk: next tap column
  int64_t Ep;        // weight tap stride
};

// acc[b] = bias + sum_{i, j} rows[i][off + b * col_step + j * tap_step] * w[(i * kw + j) * Ep];
// KW > 0: kw == KW (the tap row's weights stay in registers), KW == 0: any kw.
template <typename A, int KW, int NB>
FUSEKIT_INLINE void dw_columns(const DwRowGeometry& g, const A* const* rows, int64_t off, const A* w, const A* bias,
                               A* dst, int64_t dst_step) {
  using vec = typename VecOf<A>::type;
  vec acc[NB];
  const vec b0 = vec_at(bias);
  for (int b = 0; b < NB; ++b) acc[b] = b0;
  for (int64_t i = 0; i < g.kh; ++i) {
    const A* r = rows[i] + off;
    const A* wi = w + i * g.kw * g.Ep;
    if constexpr (KW > 0) {
      vec wv[KW];
      for (int j = 0; j < KW; ++j) wv[j] = vec_at(wi + j * g.Ep);
#pragma GCC unroll 8
      for (int j = 0; j < KW; ++j)
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) acc[b] += vec_at(r + b * g.col_step + j * g.tap_step) * wv[j];
    } else {
      for (int64_t j = 0; j < g.kw; ++j) {
        const vec wj = vec_at(wi + j * g.Ep);
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) acc[b] += vec_at(r + b * g.col_step + j * g.tap_step) * wj;
      }
    }
  }
  for (int b = 0; b < NB; ++b) vec_at(dst + b * dst_step) = acc[b];
}

// d for Wo output columns of one output row, all `lanes` lanes of the chunk: dst[wo * chunk + l].
template <typename A, int KW>
FUSEKIT_INLINE void dw_row_kw(const DwRowGeometry& g, const A* const* rows, int64_t Wo, int64_t lanes, int64_t chunk,
                              const A* w, const A* bias, A* dst) {
  for (int64_t v = 0; v < lanes; v += kVecLanes) {
    int64_t wo = 0;
    for (; wo + 8 <= Wo; wo += 8)
      dw_columns<A, KW, 8>(g, rows, wo * g.col_step + v, w + v, bias + v, dst + wo * chunk + v, chunk);
    if (wo + 4 <= Wo) {
      dw_columns<A, KW, 4>(g, rows, wo * g.col_step + v, w + v, bias + v, dst + wo * chunk + v, chunk);
      wo += 4;
    }
    if (wo + 2 <= Wo) {
      dw_columns<A, KW, 2>(g, rows, wo * g.col_step + v, w + v, bias + v, dst + wo * chunk + v, chunk);
      wo += 2;
    }
    if (wo < Wo) dw_columns<A, KW, 1>(g, rows, wo * g.col_step + v, w + v, bias + v, dst + wo * chunk + v, chunk);
  }
}

template <typename A>
FUSEKIT_INLINE void dw_row(const DwRowGeometry& g, const A* const* rows, int64_t Wo, int64_t lanes, int64_t chunk,
                           const A* w, const A* bias, A* dst) {
  if (g.kw == 3) return dw_row_kw<A, 3>(g, rows, Wo, lanes, chunk, w, bias, dst);
  if (g.kw == 5) return dw_row_kw<A, 5>(g, rows, Wo, lanes, chunk, w, bias, dst);
  dw_row_kw<A, 0>(g, rows, Wo, lanes, chunk, w, bias, dst);
}

// ----------------------------------------------------------------------------------------------
// one task: sample n, output rows [r0, r1), every chunk of the expanded channels
// ----------------------------------------------------------------------------------------------

// a1 rows [h0, h1) of the chunk [e0, e0 + ce) into their ring slots ([Wp][chunk], interior from
// pad_left): one GEMM over the rows' (W * rows) pixels, then bias + activation into the slots.
template <typename T, class Kit>
FUSEKIT_INLINE void expand_rows(const InvertedResidualParams& p, const InvertedResidualPlan& plan,
                                IrScratch<typename AccOf<T>::type>& s, const T* xn, int64_t h0, int64_t h1,
                                int64_t e0, int64_t ce, int64_t lanes) {
  using A = typename AccOf<T>::type;
  const int64_t C = plan.chunk, row_elems = plan.Wp * C;
  const T* x0 = xn + h0 * p.W * p.Cin;
  if (p.w_expand == nullptr) {  // a1 = x: the chunk's channels of each pixel, padding lanes zero
    for (int64_t h = h0; h < h1; ++h) {
      A* interior = s.ring + (h % plan.window_rows) * row_elems + p.pad_left * C;
      for (int64_t w = 0; w < p.W; ++w) {
        A* d = interior + w * C;
        const T* src = xn + (h * p.W + w) * p.Cin + e0;
        for (int64_t l = 0; l < ce; ++l) d[l] = to_acc(src[l]);
        for (int64_t l = ce; l < lanes; ++l) d[l] = A(0);
      }
    }
    return;
  }
  const A* a;
  if constexpr (std::is_same_v<T, A>) {
    a = x0;
  } else {
    load_row(s.x_row, x0, (h1 - h0) * p.W * p.Cin);
    a = s.x_row;
  }
  Gemm<A> g{};
  g.c = s.stage; g.ldc = C;
  g.a = a; g.a_row = p.Cin; g.a_depth = 1;
  g.b = static_cast<const A*>(p.w_expand) + e0; g.ldb = plan.Ep;
  g.rows = (h1 - h0) * p.W; g.vecs = lanes / kVecLanes; g.depth = p.Cin;
  g.init = GemmInit::Zero;
  Kit::gemm(g);
  for (int64_t h = h0; h < h1; ++h)
    bias_act_rows(p.activation, s.ring + (h % plan.window_rows) * row_elems + p.pad_left * C,
                  s.stage + (h - h0) * p.W * C, p.W, C, lanes, static_cast<const A*>(p.b_expand) + e0,
                  static_cast<const A*>(nullptr));
}

template <typename T, class Kit>
FUSEKIT_INLINE void inverted_residual_task(const InvertedResidualParams& p, const InvertedResidualPlan& plan,
                                           int64_t task, void* scratch) {
  using A = typename AccOf<T>::type;
  using vec = typename VecOf<A>::type;
  const bool forward = p.y != nullptr;
  IrScratch<A> s = carve_ir_scratch<T>(p, plan, reinterpret_cast<uintptr_t>(scratch), nullptr);
  const int64_t n = task / plan.bands;
  const int64_t r0 = (task % plan.bands) * plan.band_rows, r1 = std::min(p.Ho, r0 + plan.band_rows);
  const int64_t px = (r1 - r0) * p.Wo;
  const int64_t C = plan.chunk, row_elems = plan.Wp * C;
  const T* xn = static_cast<const T*>(p.x) + n * p.H * p.W * p.Cin;
  const A* w_dw = static_cast<const A*>(p.w_dw);
  const A* b_dw = static_cast<const A*>(p.b_dw);
  const A* gate = p.gate ? static_cast<const A*>(p.gate) + n * plan.Ep : nullptr;
  std::memset(s.ring, 0, sizeof(A) * plan.window_rows * row_elems);  // padding columns stay zero
  std::memset(s.zero_row, 0, sizeof(A) * row_elems);
  DwRowGeometry g{p.kh, p.kw, p.stride_w * C, p.dil_w * C, plan.Ep};
  const A* taps[kIrMaxKernel];  // the a1 row of each kernel row (launcher: kh <= kIrMaxKernel)

  const int64_t last_row = (r1 - 1) * p.stride_h - p.pad_top + (p.kh - 1) * p.dil_h;  // the band's lowest a1 row
  for (int64_t e0 = 0; e0 < p.E; e0 += C) {
    const int64_t ce = std::min(C, p.E - e0), lanes = round_up(ce, kVecLanes);
    for (int64_t k = 0; k < plan.window_rows; ++k) s.ring_row[k] = -1;
    if (!forward)
      for (int64_t k = 0; k < 3 * C; ++k) s.sums[k] = 0.0;
    for (int64_t ho = r0; ho < r1; ++ho) {
      const int64_t top = ho * p.stride_h - p.pad_top;
      for (int64_t i = 0; i < p.kh; ++i) {
        const int64_t hi = top + i * p.dil_h;
        if (hi < 0 || hi >= p.H) {
          taps[i] = s.zero_row;
          continue;
        }
        const int64_t slot = hi % plan.window_rows;  // a window's rows are consecutive: distinct slots
        A* sp = s.ring + slot * row_elems;
        if (s.ring_row[slot] != hi) {
          // rows are needed top-down: hi and everything below it is new; expand as many rows as
          // the ring holds without evicting this window (rows [top, top + window_rows) have
          // distinct slots) and the band still needs
          const int64_t h1 = std::min({p.H, top + plan.window_rows, last_row + 1});
          expand_rows<T, Kit>(p, plan, s, xn, hi, h1, e0, ce, lanes);
          for (int64_t h = hi; h < h1; ++h) s.ring_row[h % plan.window_rows] = h;
        }
        taps[i] = sp;
      }
      A* d = forward ? s.a2 + (ho - r0) * p.Wo * C : s.a2;
      dw_row(g, taps, p.Wo, lanes, C, w_dw + e0, b_dw + e0, d);
      if (forward) {
        bias_act_rows(p.activation, d, d, p.Wo, C, lanes, static_cast<const A*>(nullptr), gate ? gate + e0 : nullptr);
        continue;
      }
      // dw_sums: this row's sums of d and d*d, then of act(d) (in place), added to the task's
      // float64 partials
      for (int64_t v = 0; v < lanes; v += kVecLanes) {
        vec s0{}, s1{};
        for (int64_t wo = 0; wo < p.Wo; ++wo) {
          const vec dv = vec_at(d + wo * C + v);
          s0 += dv;
          s1 += dv * dv;
        }
        for (int l = 0; l < kVecLanes; ++l) {
          s.sums[v + l] += double(s0[l]);
          s.sums[C + v + l] += double(s1[l]);
        }
      }
      bias_act_rows(p.activation, d, d, p.Wo, C, lanes, static_cast<const A*>(nullptr), static_cast<const A*>(nullptr));
      for (int64_t v = 0; v < lanes; v += kVecLanes) {
        vec s2{};
        for (int64_t wo = 0; wo < p.Wo; ++wo) s2 += vec_at(d + wo * C + v);
        for (int l = 0; l < kVecLanes; ++l) s.sums[2 * C + v + l] += double(s2[l]);
      }
    }
    if (forward) {
      Gemm<A> pg{};
      pg.c = s.out; pg.ldc = plan.Cp;
      pg.a = s.a2; pg.a_row = C; pg.a_depth = 1;
      pg.b = static_cast<const A*>(p.w_project) + e0 * plan.Cp; pg.ldb = plan.Cp;
      pg.rows = px; pg.vecs = plan.Cp / kVecLanes; pg.depth = ce;
      pg.init = e0 == 0 ? GemmInit::Zero : GemmInit::Add;
      Kit::gemm(pg);
    } else {
      double* dst = p.partial_sums + task * 3 * plan.Ep;
      for (int k = 0; k < 3; ++k)
        for (int64_t l = 0; l < ce; ++l) dst[k * plan.Ep + e0 + l] = s.sums[k * C + l];
    }
  }
  if (!forward) return;

  // epilogue: y = out + b_project (+ x), in x's dtype
  const A* b_p = static_cast<const A*>(p.b_project);
  T* y = static_cast<T*>(p.y) + (n * p.Ho + r0) * p.Wo * p.Cout;
  const T* xres = xn + r0 * p.W * p.Cin;  // residual: Ho == H, Wo == W, Cin == Cout
  for (int64_t q = 0; q < px; ++q) {
    A* o = s.out + q * plan.Cp;
    for (int64_t v = 0; v < plan.Cp; v += kVecLanes) vec_at(o + v) += vec_at(b_p + v);
    T* yq = y + q * p.Cout;
    if (p.residual) {
      const T* xq = xres + q * p.Cin;
      for (int64_t c = 0; c < p.Cout; ++c) yq[c] = from_acc<T>(o[c] + to_acc(xq[c]));
    } else {
      for (int64_t c = 0; c < p.Cout; ++c) yq[c] = from_acc<T>(o[c]);
    }
  }
}

template <typename T, class Kit>
FUSEKIT_INLINE void inverted_residual_tasks(const InvertedResidualParams& p, const InvertedResidualPlan& plan,
                                            TaskQueue& queue, void* scratch) {
  int64_t task;
  while (queue.claim(task)) inverted_residual_task<T, Kit>(p, plan, task, scratch);
}

// S[n][k][e] = sum over the sample's bands, in band order, of the task partials (deterministic).
template <typename A>
inline void combine_dw_sums(const double* partials, const InvertedResidualPlan& plan, int64_t N, int64_t E, A* out) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < 3; ++k)
      for (int64_t e = 0; e < E; ++e) {
        double acc = 0.0;
        for (int64_t b = 0; b < plan.bands; ++b) acc += partials[((n * plan.bands + b) * 3 + k) * plan.Ep + e];
        out[(n * 3 + k) * E + e] = A(acc);
      }
}

}  // namespace fusekit::cpu
