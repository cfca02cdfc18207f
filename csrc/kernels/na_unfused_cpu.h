// Torch-free CPU kernels of the unfused neighborhood-attention ops (na_qk, na_av and their
// backwards, DESIGN.md 5.1): the attention weights [B, Hq, *spatial, K] are materialized, one slot
// per neighbour (row-major over the per-axis window offsets, K = prod(kernel)).
//
// The four ops reduce to three passes, each written once:
//  - slot_dots:           W[i, n] = alpha <x_i, y_slot(i,n)> (+ rpb)   na_qk; grad_attn of na_av_backward
//  - slot_weighted_sums:  o_i = alpha sum_n W[i, n] y_slot(i,n)        na_av; grad_q of na_qk_backward
//                         (optionally summing W into the rpb slots: grad_rpb)
//  - inverse_weighted_sums: o_j = alpha sum over the queries i (of the g query heads of KV head
//                         h_kv) that see key j of W[i, n(i,j)] x_i      grad_k; grad_v
// x rows are query-side (q or grad_out, Hq heads), y rows key-side (k or v, Hkv heads; query head
// h reads KV head h / g). The inverse pass walks the product of the per-axis inverse windows of a
// key, so every output row is written by one task: no atomics, no expanded K/V.
//
// Vectors run over the head dim (16-lane vectors of the accumulation type, cpu_isa.h); the
// launcher inlines these templates into one entry per instruction set. A task is (batch, head,
// block of row-major tokens): consecutive tokens share most neighbours, so a block's key rows stay
// in cache. Every function is single-threaded over a range of tasks and allocation-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "mqa_cpu.h"  // load_row, ceil_div
#include "na_window.h"

namespace fusekit {

constexpr int kNaMaxRank = 3;
constexpr int64_t kNaMaxHeadDim = 256;

// Rows [batch, x0, x1, x2, head, dim] with unit dim stride; element strides (lower ranks are
// padded with leading axes of length 1, whose stride is irrelevant).
struct NaRows {
  const void* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0;
  int64_t token_stride[kNaMaxRank] = {0, 0, 0};
};

// Per axis, for every position: the query window (first key, key count, first / d, the rpb index
// of slot 0) and the key's inverse window (first query, query count). Built once per call.
struct NaAxisTable {
  std::vector<int64_t> first, count, first_div, rpb_base, inv_first, inv_count;

  void build(const na::Axis& a) {
    const int64_t L = a.length;
    first.resize(L); count.resize(L); first_div.resize(L); rpb_base.resize(L);
    inv_first.resize(L); inv_count.resize(L);
    for (int64_t i = 0; i < L; ++i) {
      const na::Window w = na::query_window(a, i);
      first[i] = w.first;
      count[i] = w.count;
      first_div[i] = w.first / a.dilation;
      rpb_base[i] = na::rpb_index(a, i, w.first);
      const na::Window inv = na::key_inverse_window(a, i);
      inv_first[i] = inv.first;
      inv_count[i] = inv.count;
    }
  }
};

struct NaUnfusedParams {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  na::Axis axis[kNaMaxRank];
  const NaAxisTable* table = nullptr;  // [kNaMaxRank]
  int64_t tokens = 0, slots = 0;       // N = prod(length), K = prod(kernel)
  int64_t block_tokens = 64;           // tokens per task
  NaRows x, y;                         // query-side rows (Hq heads), key-side rows (Hkv heads)
  const void* weights = nullptr;       // [B, Hq, N, K] contiguous (weighted sums)
  const void* rpb = nullptr;           // slot_dots: [Hq, 2k0-1, 2k1-1, 2k2-1] contiguous, or null
  void* out = nullptr;                 // contiguous: [B, Hq, N, K] (dots), [B, N, H, D] (sums)
  double alpha = 1.0;
  bool invalid_neg_inf = false;        // slot_dots: -inf (logits) or 0 (gradients) in invalid slots

  int64_t rpb_per_head() const {
    return (2 * axis[0].kernel - 1) * (2 * axis[1].kernel - 1) * (2 * axis[2].kernel - 1);
  }
  int64_t blocks() const { return cpu::ceil_div(tokens, block_tokens); }
  // tasks of slot_dots / slot_weighted_sums (query heads) and of inverse_weighted_sums (KV heads)
  int64_t query_tasks() const { return batch * q_heads * blocks(); }
  int64_t key_tasks() const { return batch * kv_heads * blocks(); }
};

namespace cpu {

// The per-head-dim vectors of one row: full 16-lane chunks, then a zero-padded tail chunk.
template <typename A>
struct RowVecs {
  using vec = typename VecOf<A>::type;
  int64_t full, tail;  // D / 16, D % 16
  explicit RowVecs(int64_t d) : full(d / kVecLanes), tail(d % kVecLanes) {}
  int64_t chunks() const { return full + (tail != 0); }
};

// Loads in place (vectors wider than the baseline ABI's registers never cross a call boundary).
template <typename T, typename A>
FUSEKIT_INLINE void load_chunk(typename VecOf<A>::type& v, const T* src) {
  load_row<T, A>(reinterpret_cast<A*>(&v), src, kVecLanes);
}

template <typename T, typename A>
FUSEKIT_INLINE void load_partial(typename VecOf<A>::type& v, const T* src, int64_t n) {
  v = typename VecOf<A>::type{};
  load_row<T, A>(reinterpret_cast<A*>(&v), src, n);
}

// Weighted sums keep their accumulators in registers: the head dim is walked in panels of at most
// kPanelChunks vectors, each panel one pass over the slots (D <= 64 is one panel).
constexpr int kPanelChunks = 4;

struct Panel {
  int64_t offset, full, tail;  // elements [offset, offset + full * 16 + tail)
};

inline int64_t panel_count(int64_t d) { return ceil_div(d, kPanelChunks * kVecLanes); }

inline Panel panel_of(int64_t d, int64_t index) {
  const int64_t offset = index * kPanelChunks * kVecLanes;
  const int64_t n = std::min<int64_t>(d - offset, kPanelChunks * kVecLanes);
  return {offset, n / kVecLanes, n % kVecLanes};
}

template <typename A>
FUSEKIT_INLINE void zero_panel(typename VecOf<A>::type (&acc)[kPanelChunks]) {
#pragma GCC unroll 4
  for (int c = 0; c < kPanelChunks; ++c) acc[c] = typename VecOf<A>::type{};
}

// acc += w * row[panel]
template <typename T, typename A>
FUSEKIT_INLINE void axpy_panel(typename VecOf<A>::type (&acc)[kPanelChunks], A w, const T* row, const Panel& pn) {
  typename VecOf<A>::type y;
  row += pn.offset;
#pragma GCC unroll 4
  for (int c = 0; c < kPanelChunks; ++c) {
    if (c < pn.full) {
      load_chunk<T, A>(y, row + c * kVecLanes);
      acc[c] += w * y;
    } else if (c == pn.full && pn.tail) {
      load_partial<T, A>(y, row + c * kVecLanes, pn.tail);
      acc[c] += w * y;
    }
  }
}

// dst[panel] = alpha * acc
template <typename T, typename A>
FUSEKIT_INLINE void store_panel(T* dst, const typename VecOf<A>::type (&acc)[kPanelChunks], A alpha, const Panel& pn) {
  dst += pn.offset;
  for (int c = 0; c < kPanelChunks; ++c) {
    const int64_t n = c < pn.full ? kVecLanes : c == pn.full ? pn.tail : 0;
    if (n == 0) break;
    const typename VecOf<A>::type v = acc[c] * alpha;
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(dst + c * kVecLanes, &v, sizeof(A) * n);
    } else {
      for (int64_t l = 0; l < n; ++l) dst[c * kVecLanes + l] = from_acc<T>(v[l]);
    }
  }
}

// The four horizontal sums of v[0..3] (one per lane of the result): halves folded, then a 4x4
// transpose-add, so four dot products share the shuffles.
template <typename A>
FUSEKIT_INLINE void horizontal_sums4(const typename VecOf<A>::type (&v)[4], A (&sums)[4]) {
  typedef A v8 __attribute__((vector_size(8 * sizeof(A))));
  typedef A v4 __attribute__((vector_size(4 * sizeof(A))));
  v4 q[4];
  for (int u = 0; u < 4; ++u) {  // shuffles, not memory: the halves stay in registers
    const v8 h = __builtin_shufflevector(v[u], v[u], 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v[u], v[u], 8, 9, 10, 11, 12, 13, 14, 15);
    q[u] = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  }
  const v4 s01 = __builtin_shufflevector(q[0], q[1], 0, 4, 1, 5) + __builtin_shufflevector(q[0], q[1], 2, 6, 3, 7);
  const v4 s23 = __builtin_shufflevector(q[2], q[3], 0, 4, 1, 5) + __builtin_shufflevector(q[2], q[3], 2, 6, 3, 7);
  const v4 r = __builtin_shufflevector(s01, s23, 0, 1, 4, 5) + __builtin_shufflevector(s01, s23, 2, 3, 6, 7);
  for (int u = 0; u < 4; ++u) sums[u] = r[u];
}

// <x, row u> for four rows, x as converted chunks (the tail chunk zero-padded)
template <typename T, typename A>
FUSEKIT_INLINE void dot_rows4(const typename VecOf<A>::type* x, const T* const (&rows)[4], const RowVecs<A>& rv,
                              A (&sums)[4]) {
  typename VecOf<A>::type acc[4] = {}, y;
  for (int64_t c = 0; c < rv.full; ++c) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      load_chunk<T, A>(y, rows[u] + c * kVecLanes);
      acc[u] += x[c] * y;
    }
  }
  if (rv.tail) {
    for (int u = 0; u < 4; ++u) {
      load_partial<T, A>(y, rows[u] + rv.full * kVecLanes, rv.tail);
      acc[u] += x[rv.full] * y;
    }
  }
  horizontal_sums4<A>(acc, sums);
}

// A task's (batch, head, token range) and a token's coordinates.
struct NaTask {
  int64_t b, h, t0, t1;
};

FUSEKIT_INLINE NaTask na_task(const NaUnfusedParams& p, int64_t task, int64_t heads) {
  const int64_t blocks = p.blocks();
  const int64_t blk = task % blocks, bh = task / blocks;
  const int64_t t0 = blk * p.block_tokens;
  return {bh / heads, bh % heads, t0, std::min(t0 + p.block_tokens, p.tokens)};
}

FUSEKIT_INLINE void token_coords(const NaUnfusedParams& p, int64_t t, int64_t c[kNaMaxRank]) {
  c[2] = t % p.axis[2].length;
  t /= p.axis[2].length;
  c[1] = t % p.axis[1].length;
  c[0] = t / p.axis[1].length;
}

FUSEKIT_INLINE int64_t row_offset(const NaRows& r, int64_t b, int64_t h, const int64_t c[kNaMaxRank]) {
  return b * r.batch_stride + h * r.head_stride + c[0] * r.token_stride[0] + c[1] * r.token_stride[1] +
         c[2] * r.token_stride[2];
}

// ----------------------------------------------------------------------------------------------
// slot_dots: out[b, h, i, n] = alpha <x_i, y_slot> + rpb[h, idx(i, n)]; invalid slots: fill
// ----------------------------------------------------------------------------------------------

template <typename T, typename A>
FUSEKIT_INLINE void slot_dots(const NaUnfusedParams& p, int64_t task_begin, int64_t task_end) {
  using vec = typename VecOf<A>::type;
  const RowVecs<A> rv(p.head_dim);
  const T* X = static_cast<const T*>(p.x.data);
  const T* Y = static_cast<const T*>(p.y.data);
  const T* rpb = static_cast<const T*>(p.rpb);
  T* out = static_cast<T*>(p.out);
  const A alpha = A(p.alpha);
  const T fill = from_acc<T>(p.invalid_neg_inf ? -std::numeric_limits<A>::infinity() : A(0));
  const na::Axis* ax = p.axis;
  const NaAxisTable* tb = p.table;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t r1 = 2 * ax[1].kernel - 1, r2 = 2 * ax[2].kernel - 1;
  const int64_t k1 = ax[1].kernel, k2 = ax[2].kernel;
  vec x[kNaMaxHeadDim / kVecLanes];
  for (int64_t task = task_begin; task < task_end; ++task) {
    const NaTask tk = na_task(p, task, p.q_heads);
    const int64_t hk = tk.h / group;
    const T* rpb_h = rpb ? rpb + tk.h * p.rpb_per_head() : nullptr;
    for (int64_t t = tk.t0; t < tk.t1; ++t) {
      int64_t c[kNaMaxRank];
      token_coords(p, t, c);
      const T* xr = X + row_offset(p.x, tk.b, tk.h, c);
      for (int64_t k = 0; k < rv.full; ++k) load_chunk<T, A>(x[k], xr + k * kVecLanes);
      if (rv.tail) load_partial<T, A>(x[rv.full], xr + rv.full * kVecLanes, rv.tail);
      const int64_t f0 = tb[0].first[c[0]], f1 = tb[1].first[c[1]], f2 = tb[2].first[c[2]];
      const int64_t n0c = tb[0].count[c[0]], n1c = tb[1].count[c[1]], n2c = tb[2].count[c[2]];
      const int64_t rb0 = tb[0].rpb_base[c[0]], rb1 = tb[1].rpb_base[c[1]], rb2 = tb[2].rpb_base[c[2]];
      T* o = out + ((tk.b * p.q_heads + tk.h) * p.tokens + t) * p.slots;
      const T* yb = Y + tk.b * p.y.batch_stride + hk * p.y.head_stride;
      for (int64_t n0 = 0; n0 < ax[0].kernel; ++n0) {
        for (int64_t n1 = 0; n1 < k1; ++n1) {
          T* os = o + (n0 * k1 + n1) * k2;
          if (n0 >= n0c || n1 >= n1c) {
            for (int64_t n2 = 0; n2 < k2; ++n2) os[n2] = fill;
            continue;
          }
          const T* yrow = yb + (f0 + n0 * ax[0].dilation) * p.y.token_stride[0] +
                          (f1 + n1 * ax[1].dilation) * p.y.token_stride[1] + f2 * p.y.token_stride[2];
          const int64_t ystep = ax[2].dilation * p.y.token_stride[2];
          const T* rrow = rpb_h ? rpb_h + ((rb0 + n0) * r1 + rb1 + n1) * r2 + rb2 : nullptr;
          for (int64_t n2 = 0; n2 < n2c; n2 += 4) {  // four slots at a time; short groups repeat a row
            const int64_t m = std::min<int64_t>(4, n2c - n2);
            const T* const rows[4] = {yrow + n2 * ystep, yrow + (n2 + std::min<int64_t>(1, m - 1)) * ystep,
                                      yrow + (n2 + std::min<int64_t>(2, m - 1)) * ystep,
                                      yrow + (n2 + std::min<int64_t>(3, m - 1)) * ystep};
            A sums[4];
            dot_rows4<T, A>(x, rows, rv, sums);
            for (int64_t u = 0; u < m; ++u) {
              A s = alpha * sums[u];
              if (rrow) s += to_acc(rrow[n2 + u]);
              os[n2 + u] = from_acc<T>(s);
            }
          }
          for (int64_t n2 = n2c; n2 < k2; ++n2) os[n2] = fill;
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// slot_weighted_sums: out[b, i, h] = alpha sum_n W[b, h, i, n] y_slot; rpb_acc[h, idx(i, n)] += W
// ----------------------------------------------------------------------------------------------

template <typename T, typename A>
FUSEKIT_INLINE void slot_weighted_sums(const NaUnfusedParams& p, int64_t task_begin, int64_t task_end,
                                       A* rpb_acc) {
  using vec = typename VecOf<A>::type;
  const int64_t panels = panel_count(p.head_dim);
  const T* W = static_cast<const T*>(p.weights);
  const T* Y = static_cast<const T*>(p.y.data);
  T* out = static_cast<T*>(p.out);
  const A alpha = A(p.alpha);
  const na::Axis* ax = p.axis;
  const NaAxisTable* tb = p.table;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t r1 = 2 * ax[1].kernel - 1, r2 = 2 * ax[2].kernel - 1;
  const int64_t k1 = ax[1].kernel, k2 = ax[2].kernel;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const NaTask tk = na_task(p, task, p.q_heads);
    const int64_t hk = tk.h / group;
    A* rpb_h = rpb_acc ? rpb_acc + tk.h * p.rpb_per_head() : nullptr;
    for (int64_t t = tk.t0; t < tk.t1; ++t) {
      int64_t c[kNaMaxRank];
      token_coords(p, t, c);
      const int64_t f0 = tb[0].first[c[0]], f1 = tb[1].first[c[1]], f2 = tb[2].first[c[2]];
      const int64_t n0c = tb[0].count[c[0]], n1c = tb[1].count[c[1]], n2c = tb[2].count[c[2]];
      const int64_t rb0 = tb[0].rpb_base[c[0]], rb1 = tb[1].rpb_base[c[1]], rb2 = tb[2].rpb_base[c[2]];
      const T* w = W + ((tk.b * p.q_heads + tk.h) * p.tokens + t) * p.slots;
      const T* yb = Y + tk.b * p.y.batch_stride + hk * p.y.head_stride;
      const int64_t ystep = ax[2].dilation * p.y.token_stride[2];
      T* o = out + ((tk.b * p.tokens + t) * p.q_heads + tk.h) * p.head_dim;
      for (int64_t pi = 0; pi < panels; ++pi) {
        const Panel pn = panel_of(p.head_dim, pi);
        vec acc[kPanelChunks];
        zero_panel<A>(acc);
        for (int64_t n0 = 0; n0 < n0c; ++n0) {
          for (int64_t n1 = 0; n1 < n1c; ++n1) {
            const T* ws = w + (n0 * k1 + n1) * k2;
            const T* yrow = yb + (f0 + n0 * ax[0].dilation) * p.y.token_stride[0] +
                            (f1 + n1 * ax[1].dilation) * p.y.token_stride[1] + f2 * p.y.token_stride[2];
            for (int64_t n2 = 0; n2 < n2c; ++n2, yrow += ystep) axpy_panel<T, A>(acc, to_acc(ws[n2]), yrow, pn);
            if (rpb_h && pi == 0) {  // grad_rpb: the weights summed into their rpb slots
              A* rrow = rpb_h + ((rb0 + n0) * r1 + rb1 + n1) * r2 + rb2;
              for (int64_t n2 = 0; n2 < n2c; ++n2) rrow[n2] += to_acc(ws[n2]);
            }
          }
        }
        store_panel<T, A>(o, acc, alpha, pn);
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// inverse_weighted_sums: out[b, j, hk] = alpha sum_{h of hk} sum_{i sees j} W[b, h, i, n(i, j)] x_i
// ----------------------------------------------------------------------------------------------

template <typename T, typename A>
FUSEKIT_INLINE void inverse_weighted_sums(const NaUnfusedParams& p, int64_t task_begin, int64_t task_end) {
  using vec = typename VecOf<A>::type;
  const int64_t panels = panel_count(p.head_dim);
  const T* W = static_cast<const T*>(p.weights);
  const T* X = static_cast<const T*>(p.x.data);
  T* out = static_cast<T*>(p.out);
  const A alpha = A(p.alpha);
  const na::Axis* ax = p.axis;
  const NaAxisTable* tb = p.table;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t k1 = ax[1].kernel, k2 = ax[2].kernel;
  const int64_t L1 = ax[1].length, L2 = ax[2].length;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const NaTask tk = na_task(p, task, p.kv_heads);
    for (int64_t t = tk.t0; t < tk.t1; ++t) {
      int64_t c[kNaMaxRank];
      token_coords(p, t, c);
      const int64_t if0 = tb[0].inv_first[c[0]], if1 = tb[1].inv_first[c[1]], if2 = tb[2].inv_first[c[2]];
      const int64_t ic0 = tb[0].inv_count[c[0]], ic1 = tb[1].inv_count[c[1]], ic2 = tb[2].inv_count[c[2]];
      const int64_t d0 = ax[0].dilation, d1 = ax[1].dilation, d2 = ax[2].dilation;
      // slot of key j in the window of query i along an axis: j / d - first(i) / d
      const int64_t jd0 = c[0] / d0, jd1 = c[1] / d1, jd2 = c[2] / d2;
      T* o = out + ((tk.b * p.tokens + t) * p.kv_heads + tk.h) * p.head_dim;
      for (int64_t pi = 0; pi < panels; ++pi) {
        const Panel pn = panel_of(p.head_dim, pi);
        vec acc[kPanelChunks];
        zero_panel<A>(acc);
        for (int64_t h = tk.h * group; h < (tk.h + 1) * group; ++h) {
          const T* wh = W + (tk.b * p.q_heads + h) * p.tokens * p.slots;
          const T* xh = X + tk.b * p.x.batch_stride + h * p.x.head_stride;
          for (int64_t a0 = 0; a0 < ic0; ++a0) {
            const int64_t i0 = if0 + a0 * d0, n0 = jd0 - tb[0].first_div[i0];
            for (int64_t a1 = 0; a1 < ic1; ++a1) {
              const int64_t i1 = if1 + a1 * d1, n1 = jd1 - tb[1].first_div[i1];
              const int64_t slot01 = (n0 * k1 + n1) * k2, tok01 = (i0 * L1 + i1) * L2;
              const T* x01 = xh + i0 * p.x.token_stride[0] + i1 * p.x.token_stride[1];
              for (int64_t a2 = 0; a2 < ic2; ++a2) {
                const int64_t i2 = if2 + a2 * d2, n2 = jd2 - tb[2].first_div[i2];
                const A wv = to_acc(wh[(tok01 + i2) * p.slots + slot01 + n2]);
                axpy_panel<T, A>(acc, wv, x01 + i2 * p.x.token_stride[2], pn);
              }
            }
          }
        }
        store_panel<T, A>(o, acc, alpha, pn);
      }
    }
  }
}

}  // namespace cpu
}  // namespace fusekit
