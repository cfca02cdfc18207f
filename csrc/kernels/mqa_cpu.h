// Torch-free CPU kernels of the multi-query / grouped-query attention family.
//
// Flash attention on a CPU core: the Lq x Lk score matrix is never materialized and K/V are never
// expanded to the query heads. A work item takes the query rows of all g = Hq / Hkv heads that
// share one KV head ("rows" below are (query position, head) pairs, position-major), so every K/V
// row it reads serves g * positions rows.
//
// One register-blocked micro-kernel does every product: C[rows][vectors] (+)= A . B, where B rows
// are packed 16-lane vectors and A elements are broadcast from any two strides. Choosing what the
// lanes run over avoids transposing the operand that streams:
//  - forward, decode and the dQ pass put the lanes over the query rows: S^T = K . Q^T and
//    O^T += V^T . P^T read K and V rows in place (fp32/fp64; 16-bit rows are converted once per
//    tile) against Q^T packed once per task, and the online softmax is elementwise over vectors
//    of rows (max, exp, sums run down the key axis, no horizontal reductions);
//  - the dK/dV pass puts the lanes over keys (K^T and V^T packed once per task) and over the head
//    dim (Q and dO packed row-major, a straight copy), accumulating dK and dV of its key block
//    in registers-then-L1 over every query row that sees it: no atomics, deterministic.
// Scores are kept in base 2 (Q scaled by scale * log2(e)) so the softmax needs exp2 only.
// Decode splits the KV sequence (flash-decoding) and lets an item walk each key tile for several
// KV heads at once: a cache row holds all heads, so the item streams whole rows instead of
// reading one head's slice per page.
//
// The products go through Kit::gemm, the micro-kernel (kernels/cpu_gemm.h) the launcher compiles
// per instruction set; the drivers here are inlined into per-ISA entries. Work items are claimed
// from a TaskQueue by each thread (dynamic scheduling: causal items of different cost balance
// across threads); every function here is single-threaded and allocation-free (scratch comes
// from the caller). All head dims 1..256 take the same blocked path; multiples of 16 waste no
// vector lanes in the dK/dV pass.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_gemm.h"

namespace fusekit {

// A [batch, row, head, dim] view with unit dim stride (packed varlen tensors [row, head, dim] use
// no batch stride). Element strides.
struct MqaTensor {
  void* data = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
};

// Training / prefill attention (mqa_forward, mqa_backward).
struct MqaParams {
  int64_t batch = 0;                  // B (dense) or number of sequences (varlen)
  int64_t q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;  // dense: Lq, Lk; varlen: bounds of every sequence
  const int32_t* cu_seqlens_q = nullptr;       // varlen: [batch + 1] row offsets (both or neither)
  const int32_t* cu_seqlens_k = nullptr;
  MqaTensor q, k, v, out;
  MqaTensor grad_out, grad_q, grad_k, grad_v;  // backward
  void* lse = nullptr;     // accumulation type, contiguous [rows][q_heads] (rows: B * Lq or Tq)
  void* delta = nullptr;   // backward: rowsum(dO * O), same layout and type as lse
  double scale = 1.0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // < 0: unbounded
};

// KV-cache decoding (mqa_decode).
struct MqaDecodeParams {
  int64_t batch = 0, new_tokens = 0, q_heads = 0, kv_heads = 0, head_dim = 0, cache_len = 0;
  MqaTensor q, k_cache, v_cache, k_new, v_new, out;  // k_new.data == nullptr: no append
  const int32_t* cache_seqlens = nullptr;
  float* lse = nullptr;    // contiguous [batch][new_tokens][q_heads]
  void* partial = nullptr; // accumulation type, plan.partial_elems: per (b, kv head, q tile, split) O^T and lse
  double scale = 1.0;
  bool causal = true;
  int64_t window_left = -1, window_right = -1;
};

namespace cpu {

// ----------------------------------------------------------------------------------------------
// masks and sequences
// ----------------------------------------------------------------------------------------------

// Keys one query position may see: [lo(t), hi(t)), both non-decreasing in t (bottom-right aligned).
struct KeyWindow {
  int64_t lk, offset;  // offset = Lk - Lq
  bool causal;
  int64_t left, right;
  int64_t lo(int64_t t) const {
    return left >= 0 ? std::clamp<int64_t>(t + offset - left, 0, lk) : 0;
  }
  int64_t hi(int64_t t) const {
    int64_t h = lk;
    if (causal) h = std::min(h, t + offset + 1);
    if (right >= 0) h = std::min(h, t + offset + right + 1);
    return std::clamp<int64_t>(h, 0, lk);
  }
  // first position in [0, lq) whose keys reach past key j (hi > j); lq when none
  int64_t first_reaching(int64_t j, int64_t lq) const {
    int64_t a = 0, b = lq;
    while (a < b) { const int64_t m = (a + b) / 2; if (hi(m) > j) b = m; else a = m + 1; }
    return a;
  }
  // first position in [0, lq) whose keys start at or past key j (lo >= j); lq when none
  int64_t first_starting_at(int64_t j, int64_t lq) const {
    int64_t a = 0, b = lq;
    while (a < b) { const int64_t m = (a + b) / 2; if (lo(m) >= j) b = m; else a = m + 1; }
    return a;
  }
};

// One sequence of a dense or packed batch: element offsets of its first row and its lengths.
struct Sequence {
  int64_t q_row0, k_row0;  // first row in the flattened [rows] sense (lse / delta index)
  int64_t lq, lk;
};

inline Sequence sequence(const MqaParams& p, int64_t b) {
  if (p.cu_seqlens_q != nullptr) {
    const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    return {q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
  }
  return {b * p.max_seqlen_q, b * p.max_seqlen_k, p.max_seqlen_q, p.max_seqlen_k};
}

inline KeyWindow key_window(const MqaParams& p, const Sequence& s) {
  return {s.lk, s.lk - s.lq, p.causal, p.window_left, p.window_right};
}

// Pointer to row `row` (sequence-relative) of head `head` of sequence b.
template <typename T>
FUSEKIT_INLINE T* row_ptr(const MqaTensor& t, bool packed, int64_t b, int64_t seq_row0, int64_t row, int64_t head) {
  const int64_t base = packed ? (seq_row0 + row) * t.row_stride : b * t.batch_stride + row * t.row_stride;
  return static_cast<T*>(t.data) + base + head * t.head_stride;
}

// ----------------------------------------------------------------------------------------------
// plans
// ----------------------------------------------------------------------------------------------

struct MqaPlan {
  int64_t group = 1;      // query heads per KV head
  int64_t q_block = 1;    // query positions per block (a block has q_block * group rows)
  int64_t lanes = 16;     // rows of a block rounded up to whole vectors
  int64_t key_block = 64; // keys per tile (forward, dQ, decode) or per item (dK/dV)
  int64_t q_tiles = 0;    // query blocks per (sequence, KV head)
  int64_t key_tiles = 0;  // dK/dV: key blocks per (sequence, KV head)
  int64_t splits = 1;     // decode: parts of the KV sequence
  int64_t heads = 1;      // decode: KV heads per item (their K/V rows are adjacent in memory)
  int64_t tasks = 0;
  int64_t scratch_bytes = 0;
  int64_t partial_elems = 0;  // decode: accumulation-type elements of MqaDecodeParams::partial
};

template <typename T> constexpr bool kConverts = !std::is_same_v<T, typename AccOf<T>::type>;

// Rows per block: ~128 (8 vectors) feed the micro-kernel well and keep a block's buffers in L2;
// fewer when that leaves the threads too few items.
inline int64_t choose_q_block(int64_t group, int64_t max_q, int64_t units, int threads) {
  int64_t qb = std::max<int64_t>(1, 128 / group);
  qb = std::min(qb, std::max<int64_t>(max_q, 1));
  while (qb > 1 && qb * group > 32 && units * ceil_div(max_q, qb) < 4 * int64_t(threads)) qb = ceil_div(qb, 2);
  return qb;
}

// Forward, dQ pass and decode share one block layout: lanes over rows. Q^T, O^T, m, l, alpha
// exist per KV head of the item (plan.heads; 1 outside decode), at stride head_elems / Mp.
template <typename A>
struct RowBlockScratch {
  A *qt, *aux_t, *ot, *st, *pt, *m, *l, *alpha, *lse2, *delta, *kc, *vc;
  IntOf<A> *lo, *hi;
  int64_t head_elems;
  RowBlockScratch(Carver& c, const MqaPlan& plan, int64_t D, bool converts) {
    const int64_t Mp = plan.lanes, N = plan.key_block, H = plan.heads;
    head_elems = round_up(D * Mp, 32);
    qt = c.take<A>(H * head_elems);   // Q^T (scaled to base 2 in forward and decode)
    aux_t = c.take<A>(D * Mp);        // dO^T (dQ pass)
    ot = c.take<A>(H * head_elems);   // O^T / dQ^T accumulator
    st = c.take<A>(N * Mp);           // S^T, then P^T (or dS^T)
    pt = c.take<A>(N * Mp);           // dP^T (dQ pass)
    m = c.take<A>(H * Mp); l = c.take<A>(H * Mp); alpha = c.take<A>(Mp);
    lse2 = c.take<A>(Mp); delta = c.take<A>(Mp);
    lo = c.take<IntOf<A>>(Mp); hi = c.take<IntOf<A>>(Mp);
    kc = converts ? c.take<A>(N * D) : nullptr;
    vc = converts ? c.take<A>(N * D) : nullptr;
  }
};

template <typename A>
struct KeyBlockScratch {
  A *kt, *vt, *dk, *dv, *qr, *dor, *s, *dp, *lse2, *delta, *kc;
  int64_t *lo, *hi;
  KeyBlockScratch(Carver& c, const MqaPlan& plan, int64_t D) {
    const int64_t Np = round_up(plan.key_block, kVecLanes), Dp = round_up(D, kVecLanes);
    const int64_t M = plan.q_block * plan.group;
    kt = c.take<A>(D * Np); vt = c.take<A>(D * Np);        // K^T, V^T of the key block
    dk = c.take<A>(plan.key_block * Dp); dv = c.take<A>(plan.key_block * Dp);
    qr = c.take<A>(M * Dp); dor = c.take<A>(M * Dp);       // Q, dO rows of a query block
    s = c.take<A>(M * Np); dp = c.take<A>(M * Np);         // S then P, dP then dS
    lse2 = c.take<A>(M); delta = c.take<A>(M);
    lo = c.take<int64_t>(M); hi = c.take<int64_t>(M);
    kc = c.take<A>(D);
  }
};

template <typename T>
inline MqaPlan make_forward_plan(const MqaParams& p, int threads) {
  using A = typename AccOf<T>::type;
  MqaPlan plan;
  plan.group = p.q_heads / p.kv_heads;
  plan.q_block = choose_q_block(plan.group, p.max_seqlen_q, p.batch * p.kv_heads, threads);
  plan.lanes = round_up(plan.q_block * plan.group, kVecLanes);
  plan.key_block = 64;
  plan.q_tiles = ceil_div(p.max_seqlen_q, plan.q_block);
  plan.tasks = p.batch * p.kv_heads * plan.q_tiles;
  Carver c{0};
  RowBlockScratch<A>(c, plan, p.head_dim, kConverts<T>);
  plan.scratch_bytes = c.used;
  return plan;
}

// dK/dV pass: items are key blocks (128 keys: K^T / V^T packing amortized over more products,
// measured ~10% faster than 64), query blocks of ~128 rows are walked inside.
template <typename T>
inline MqaPlan make_backward_kv_plan(const MqaParams& p, int threads) {
  using A = typename AccOf<T>::type;
  MqaPlan plan;
  plan.group = p.q_heads / p.kv_heads;
  plan.q_block = std::max<int64_t>(1, 128 / plan.group);
  plan.key_block = 128;
  while (plan.key_block > 16 &&
         p.batch * p.kv_heads * ceil_div(p.max_seqlen_k, plan.key_block) < 4 * int64_t(threads))
    plan.key_block /= 2;
  plan.key_tiles = ceil_div(p.max_seqlen_k, plan.key_block);
  plan.tasks = p.batch * p.kv_heads * plan.key_tiles;
  Carver c{0};
  KeyBlockScratch<A>(c, plan, p.head_dim);
  plan.scratch_bytes = c.used;
  return plan;
}

// ----------------------------------------------------------------------------------------------
// shared pieces of the row-lane drivers (forward, decode, dQ)
// ----------------------------------------------------------------------------------------------

// The rows of one block: positions [t0, t0 + mq) x heads [h0, h0 + g) of one sequence, position-major.
struct RowBlock {
  int64_t t0, mq, g, M, Mp;
};

// lo/hi per lane (padded lanes see nothing).
template <typename A>
FUSEKIT_INLINE void fill_lane_windows(const RowBlock& rb, const KeyWindow& w, IntOf<A>* lo, IntOf<A>* hi) {
  for (int64_t r = 0; r < rb.Mp; ++r) {
    const int64_t t = rb.t0 + r / rb.g;
    lo[r] = r < rb.M ? IntOf<A>(w.lo(t)) : 0;
    hi[r] = r < rb.M ? IntOf<A>(w.hi(t)) : 0;
  }
}

// dst[d][r] = src row r [d] * mul for r < M, 0 for padded lanes. Row r = position t0 + r / g, head r % g.
template <typename T, typename A>
FUSEKIT_INLINE void pack_rows_transposed(A* dst, const RowBlock& rb, const T* first, int64_t row_stride,
                                         int64_t head_stride, int64_t D, A mul) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = rb.M; r < rb.Mp; ++r) dst[d * rb.Mp + r] = A(0);
  for (int64_t r = 0; r < rb.M; ++r) {
    const T* src = first + (r / rb.g) * row_stride + (r % rb.g) * head_stride;
    for (int64_t d = 0; d < D; ++d) dst[d * rb.Mp + r] = to_acc(src[d]) * mul;
  }
}

// n K (or V) rows of one head: in place for fp32/fp64, converted into buf for 16-bit storage.
template <typename T, typename A>
FUSEKIT_INLINE const A* key_rows(const T* first, int64_t row_stride, int64_t n, int64_t D, A* buf, int64_t& stride) {
  if constexpr (std::is_same_v<T, A>) {
    stride = row_stride;
    return first;
  } else {
    for (int64_t j = 0; j < n; ++j) load_row(buf + j * D, first + j * row_stride, D);
    stride = D;
    return buf;
  }
}

// Asks for n rows of `bytes` bytes, `stride` elements apart, to be brought into L2: K/V rows of
// one head are Hkv * D elements apart, a page or more with many KV heads, which the hardware
// prefetchers do not follow, so a tile would otherwise be read at memory latency.
template <typename T>
FUSEKIT_INLINE void prefetch_rows(const T* first, int64_t stride, int64_t n, int64_t bytes) {
  for (int64_t j = 0; j < n; ++j) {
    const char* row = reinterpret_cast<const char*>(first + j * stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
  }
}

// S^T rows j < n (key k0 + j) outside a lane's window get -inf.
template <typename A>
FUSEKIT_INLINE void mask_scores_t(A* st, int64_t n, int64_t Mp, int64_t k0, const IntOf<A>* lo, const IntOf<A>* hi,
                                  A fill) {
  using vec = typename VecOf<A>::type;
  using ivec = typename IVecOf<A>::type;
  for (int64_t v = 0; v < Mp / kVecLanes; ++v) {
    const ivec lov = ivec_at<A>(lo + v * kVecLanes), hiv = ivec_at<A>(hi + v * kVecLanes);
    for (int64_t j = 0; j < n; ++j) {
      const IntOf<A> key = IntOf<A>(k0 + j);
      vec& s = vec_at(st + j * Mp + v * kVecLanes);
      s = (key < lov) | (key >= hiv) ? vec{} + fill : s;
    }
  }
}

// K/V rows of `heads` KV heads from key 0 (head stride apart).
template <typename T>
struct KvHeads {
  const T *k, *v;
  int64_t k_rs, k_hs, v_rs, v_hs, heads;
};

// Prefetch for rows [j, j + n) of every head, only where what is read is not one contiguous
// stream (the hardware prefetchers serve those, and software prefetches issued in a burst stall
// the core once the line-fill buffers are full).
template <typename T>
FUSEKIT_INLINE void prefetch_heads(const T* first, int64_t rs, int64_t hs, int64_t heads, int64_t j, int64_t n,
                                   int64_t D) {
  if (hs == D) {
    if (rs > heads * D) prefetch_rows(first + j * rs, rs, n, heads * D * int64_t(sizeof(T)));
    return;
  }
  if (rs > D)
    for (int64_t h = 0; h < heads; ++h) prefetch_rows(first + h * hs + j * rs, rs, n, D * int64_t(sizeof(T)));
}

// Attends the rows of block rb (Q^T of each head scaled to base 2 in sc.qt, windows in sc.lo/hi)
// to keys [kb, ke) of kv.heads KV heads: leaves O^T (unnormalized), m, l per head in sc. Each key
// tile is walked for every head before the next, so the tile's rows (all heads) stream once.
template <typename T, class Kit>
FUSEKIT_INLINE void attend_block(RowBlockScratch<typename AccOf<T>::type>& sc, const MqaPlan& plan, const RowBlock& rb,
                                 const KeyWindow& w, const KvHeads<T>& kv, int64_t D, int64_t kb, int64_t ke) {
  using A = typename AccOf<T>::type;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t Mp = rb.Mp, nv = Mp / kVecLanes, N = plan.key_block, he = sc.head_elems;
  std::fill(sc.ot, sc.ot + kv.heads * he, A(0));
  std::fill(sc.m, sc.m + kv.heads * Mp, kNegInf);
  std::fill(sc.l, sc.l + kv.heads * Mp, A(0));
  // a tile inside every row's window needs no mask
  const int64_t lo_last = w.lo(rb.t0 + rb.mq - 1), hi_first = w.hi(rb.t0);
  for (int64_t j0 = kb; j0 < ke; j0 += N) {
    const int64_t n = std::min(N, ke - j0), n_next = std::min(N, ke - j0 - n);
    const bool masked = !(lo_last <= j0 && hi_first >= j0 + n);
    prefetch_heads(kv.k, kv.k_rs, kv.k_hs, kv.heads, j0 + n, n_next, D);
    prefetch_heads(kv.v, kv.v_rs, kv.v_hs, kv.heads, j0 + n, n_next, D);
    for (int64_t h = 0; h < kv.heads; ++h) {
      int64_t krs, vrs;
      const A* kr = key_rows<T, A>(kv.k + h * kv.k_hs + j0 * kv.k_rs, kv.k_rs, n, D, sc.kc, krs);
      Kit::gemm(Gemm<A>{sc.st, Mp, kr, krs, 1, sc.qt + h * he, Mp, n, nv, D, GemmInit::Zero, nullptr});
      if (masked) mask_scores_t<A>(sc.st, n, Mp, j0, sc.lo, sc.hi, kNegInf);
      online_softmax_t<A>(sc.st, n, Mp, sc.m + h * Mp, sc.l + h * Mp, sc.alpha);
      const A* vr = key_rows<T, A>(kv.v + h * kv.v_hs + j0 * kv.v_rs, kv.v_rs, n, D, sc.vc, vrs);
      Kit::gemm(Gemm<A>{sc.ot + h * he, Mp, vr, 1, vrs, sc.st, Mp, D, nv, n, GemmInit::ScaleLanes, sc.alpha});
    }
  }
}

// ----------------------------------------------------------------------------------------------
// forward
// ----------------------------------------------------------------------------------------------

// Item order: the largest query blocks first when causal (their rows see the most keys), so the
// dynamically scheduled tail is made of small items.
struct RowItem { int64_t b, kvh, tile; };
inline RowItem row_item(const MqaPlan& plan, int64_t batch, int64_t kv_heads, bool causal, int64_t task) {
  const int64_t bh = batch * kv_heads;
  const int64_t rank = task / bh, rest = task % bh;
  return {rest / kv_heads, rest % kv_heads, causal ? plan.q_tiles - 1 - rank : rank};
}

template <typename T, class Kit>
FUSEKIT_INLINE void forward_task(const MqaParams& p, const MqaPlan& plan, int64_t task, void* scratch) {
  using A = typename AccOf<T>::type;
  const RowItem it = row_item(plan, p.batch, p.kv_heads, p.causal, task);
  const Sequence s = sequence(p, it.b);
  const int64_t t0 = it.tile * plan.q_block;
  if (t0 >= s.lq) return;
  const bool packed = p.cu_seqlens_q != nullptr;
  const int64_t g = plan.group, D = p.head_dim, h0 = it.kvh * g;
  const int64_t mq = std::min(plan.q_block, s.lq - t0);
  const RowBlock rb{t0, mq, g, mq * g, round_up(mq * g, kVecLanes)};
  const KeyWindow w = key_window(p, s);
  Carver c{reinterpret_cast<uintptr_t>(scratch)};
  RowBlockScratch<A> sc(c, plan, D, kConverts<T>);
  fill_lane_windows<A>(rb, w, sc.lo, sc.hi);
  pack_rows_transposed<T, A>(sc.qt, rb, row_ptr<const T>(p.q, packed, it.b, s.q_row0, t0, h0), p.q.row_stride,
                             p.q.head_stride, D, A(p.scale * kLog2e));
  const KvHeads<T> kv{row_ptr<const T>(p.k, packed, it.b, s.k_row0, 0, it.kvh),
                      row_ptr<const T>(p.v, packed, it.b, s.k_row0, 0, it.kvh),
                      p.k.row_stride, p.k.head_stride, p.v.row_stride, p.v.head_stride, 1};
  attend_block<T, Kit>(sc, plan, rb, w, kv, D, w.lo(t0), w.hi(t0 + mq - 1));
  A* lse = static_cast<A*>(p.lse);
  for (int64_t r = 0; r < rb.M; ++r) {
    const int64_t t = t0 + r / g, h = h0 + r % g;
    const A l = sc.l[r];
    const A inv = l > A(0) ? A(1) / l : A(0);
    T* o = row_ptr<T>(p.out, packed, it.b, s.q_row0, t, h);
    for (int64_t d = 0; d < D; ++d) o[d] = from_acc<T>(sc.ot[d * rb.Mp + r] * inv);
    lse[(s.q_row0 + t) * p.q_heads + h] =
        l > A(0) ? (sc.m[r] + std::log2(l)) * A(kLn2) : -std::numeric_limits<A>::infinity();
  }
}

template <typename T, class Kit>
FUSEKIT_INLINE void forward_tasks(const MqaParams& p, const MqaPlan& plan, TaskQueue& queue, void* scratch) {
  for (int64_t task; queue.claim(task);) forward_task<T, Kit>(p, plan, task, scratch);
}

// ----------------------------------------------------------------------------------------------
// backward
// ----------------------------------------------------------------------------------------------

// delta = rowsum(dO * O) for rows [begin, end) of the flattened [rows][q_heads] layout
// (rows: B * Lq dense, Tq packed). Rows past a packed batch's last sequence get 0.
template <typename T>
FUSEKIT_INLINE void backward_delta_rows(const MqaParams& p, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  A* delta = static_cast<A*>(p.delta);
  const bool packed = p.cu_seqlens_q != nullptr;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = packed ? 0 : row / std::max<int64_t>(p.max_seqlen_q, 1);
    const int64_t t = packed ? row : row - b * p.max_seqlen_q;
    const bool valid = !packed || row < p.cu_seqlens_q[p.batch];
    for (int64_t h = 0; h < p.q_heads; ++h) {
      A acc = 0;
      if (valid) {
        const T* go = row_ptr<const T>(p.grad_out, packed, b, 0, t, h);
        const T* o = row_ptr<const T>(p.out, packed, b, 0, t, h);
        for (int64_t d = 0; d < p.head_dim; ++d) acc += to_acc(go[d]) * to_acc(o[d]);
      }
      delta[row * p.q_heads + h] = acc;
    }
  }
}

// dK/dV of one key block of one KV head: lanes over keys for S and dP, over the head dim for the
// dV += P^T dO and dK += dS^T Q products.
template <typename T, class Kit>
FUSEKIT_INLINE void backward_kv_task(const MqaParams& p, const MqaPlan& plan, int64_t task, void* scratch) {
  using A = typename AccOf<T>::type;
  using vec = typename VecOf<A>::type;
  using lvec = typename IVecOf<A>::type;
  const int64_t bh = p.batch * p.kv_heads;
  const int64_t tile = task / bh, b = (task % bh) / p.kv_heads, kvh = task % p.kv_heads;
  const Sequence s = sequence(p, b);
  const int64_t j0 = tile * plan.key_block;
  if (j0 >= s.lk) return;
  const bool packed = p.cu_seqlens_q != nullptr;
  const int64_t g = plan.group, D = p.head_dim, h0 = kvh * g;
  const int64_t n = std::min(plan.key_block, s.lk - j0);
  const int64_t Np = round_up(n, kVecLanes), Dp = round_up(D, kVecLanes), nvk = Np / kVecLanes;
  const KeyWindow w = key_window(p, s);
  Carver c{reinterpret_cast<uintptr_t>(scratch)};
  KeyBlockScratch<A> sc(c, plan, D);
  // K^T, V^T of the block, padded key lanes 0
  std::fill(sc.kt, sc.kt + D * Np, A(0));
  std::fill(sc.vt, sc.vt + D * Np, A(0));
  for (int64_t j = 0; j < n; ++j) {
    load_row(sc.kc, row_ptr<const T>(p.k, packed, b, s.k_row0, j0 + j, kvh), D);
    for (int64_t d = 0; d < D; ++d) sc.kt[d * Np + j] = sc.kc[d];
    load_row(sc.kc, row_ptr<const T>(p.v, packed, b, s.k_row0, j0 + j, kvh), D);
    for (int64_t d = 0; d < D; ++d) sc.vt[d * Np + j] = sc.kc[d];
  }
  std::fill(sc.dk, sc.dk + n * Dp, A(0));
  std::fill(sc.dv, sc.dv + n * Dp, A(0));
  // query positions whose window meets [j0, j0 + n)
  const int64_t ta = w.first_reaching(j0, s.lq), tb = w.first_starting_at(j0 + n, s.lq);
  const A c2 = A(p.scale * kLog2e);
  const A* lse = static_cast<const A*>(p.lse);
  const A* delta = static_cast<const A*>(p.delta);
  lvec key_lanes;
  for (int l = 0; l < kVecLanes; ++l) key_lanes[l] = IntOf<A>(j0 + l);
  for (int64_t t0 = ta; t0 < tb; t0 += plan.q_block) {
    const int64_t mq = std::min(plan.q_block, tb - t0), M = mq * g;
    for (int64_t r = 0; r < M; ++r) {
      const int64_t t = t0 + r / g, h = h0 + r % g;
      A* qr = sc.qr + r * Dp;
      A* dor = sc.dor + r * Dp;
      load_row(qr, row_ptr<const T>(p.q, packed, b, s.q_row0, t, h), D);
      load_row(dor, row_ptr<const T>(p.grad_out, packed, b, s.q_row0, t, h), D);
      for (int64_t d = D; d < Dp; ++d) qr[d] = dor[d] = A(0);
      const A ls = lse[(s.q_row0 + t) * p.q_heads + h];
      sc.lse2[r] = ls == -std::numeric_limits<A>::infinity() ? std::numeric_limits<A>::infinity() : ls * A(kLog2e);
      sc.delta[r] = delta[(s.q_row0 + t) * p.q_heads + h];
      sc.lo[r] = w.lo(t);
      sc.hi[r] = w.hi(t);
    }
    Kit::gemm(Gemm<A>{sc.s, Np, sc.qr, Dp, 1, sc.kt, Np, M, nvk, D, GemmInit::Zero, nullptr});
    Kit::gemm(Gemm<A>{sc.dp, Np, sc.dor, Dp, 1, sc.vt, Np, M, nvk, D, GemmInit::Zero, nullptr});
    const bool inside = w.lo(t0 + mq - 1) <= j0 && w.hi(t0) >= j0 + n;
    for (int64_t r = 0; r < M; ++r) {
      const vec bias = vec{} + sc.lse2[r], dl = vec{} + sc.delta[r];
      const lvec lo = lvec{} + IntOf<A>(sc.lo[r]), hi = lvec{} + IntOf<A>(sc.hi[r]);
      for (int64_t v = 0; v < nvk; ++v) {
        vec& sv = vec_at(sc.s + r * Np + v * kVecLanes);
        vec& dv = vec_at(sc.dp + r * Np + v * kVecLanes);
        vec pv = sv * c2 - bias;
        exp2_vec(pv);
        if (!inside) {
          const lvec key = key_lanes + IntOf<A>(v * kVecLanes);
          pv = (key < lo) | (key >= hi) ? vec{} : pv;
        }
        sv = pv;
        dv = pv * (dv - dl);
      }
    }
    // dV[j] += sum_r P[r][j] dO[r];  dK[j] += sum_r dS[r][j] Q[r]  (scale applied at the end)
    Kit::gemm(Gemm<A>{sc.dv, Dp, sc.s, 1, Np, sc.dor, Dp, n, Dp / kVecLanes, M, GemmInit::Add, nullptr});
    Kit::gemm(Gemm<A>{sc.dk, Dp, sc.dp, 1, Np, sc.qr, Dp, n, Dp / kVecLanes, M, GemmInit::Add, nullptr});
  }
  const A scale = A(p.scale);
  for (int64_t j = 0; j < n; ++j) {
    T* gk = row_ptr<T>(p.grad_k, packed, b, s.k_row0, j0 + j, kvh);
    T* gv = row_ptr<T>(p.grad_v, packed, b, s.k_row0, j0 + j, kvh);
    for (int64_t d = 0; d < D; ++d) {
      gk[d] = from_acc<T>(sc.dk[j * Dp + d] * scale);
      gv[d] = from_acc<T>(sc.dv[j * Dp + d]);
    }
  }
}

template <typename T, class Kit>
FUSEKIT_INLINE void backward_kv_tasks(const MqaParams& p, const MqaPlan& plan, TaskQueue& queue, void* scratch) {
  for (int64_t task; queue.claim(task);) backward_kv_task<T, Kit>(p, plan, task, scratch);
}

// dQ of one query block (all g heads of a KV head): lanes over rows, K and V read in place.
template <typename T, class Kit>
FUSEKIT_INLINE void backward_q_task(const MqaParams& p, const MqaPlan& plan, int64_t task, void* scratch) {
  using A = typename AccOf<T>::type;
  using vec = typename VecOf<A>::type;
  using ivec = typename IVecOf<A>::type;
  const RowItem it = row_item(plan, p.batch, p.kv_heads, p.causal, task);
  const Sequence s = sequence(p, it.b);
  const int64_t t0 = it.tile * plan.q_block;
  if (t0 >= s.lq) return;
  const bool packed = p.cu_seqlens_q != nullptr;
  const int64_t g = plan.group, D = p.head_dim, h0 = it.kvh * g;
  const int64_t mq = std::min(plan.q_block, s.lq - t0);
  const RowBlock rb{t0, mq, g, mq * g, round_up(mq * g, kVecLanes)};
  const int64_t Mp = rb.Mp, nv = Mp / kVecLanes, N = plan.key_block;
  const KeyWindow w = key_window(p, s);
  Carver c{reinterpret_cast<uintptr_t>(scratch)};
  RowBlockScratch<A> sc(c, plan, D, kConverts<T>);
  fill_lane_windows<A>(rb, w, sc.lo, sc.hi);
  pack_rows_transposed<T, A>(sc.qt, rb, row_ptr<const T>(p.q, packed, it.b, s.q_row0, t0, h0), p.q.row_stride,
                             p.q.head_stride, D, A(1));
  pack_rows_transposed<T, A>(sc.aux_t, rb, row_ptr<const T>(p.grad_out, packed, it.b, s.q_row0, t0, h0),
                             p.grad_out.row_stride, p.grad_out.head_stride, D, A(1));
  const A* lse = static_cast<const A*>(p.lse);
  const A* delta = static_cast<const A*>(p.delta);
  for (int64_t r = 0; r < Mp; ++r) {
    const int64_t idx = (s.q_row0 + t0 + r / g) * p.q_heads + h0 + r % g;
    const A ls = r < rb.M ? lse[idx] : -std::numeric_limits<A>::infinity();
    sc.lse2[r] = ls == -std::numeric_limits<A>::infinity() ? std::numeric_limits<A>::infinity() : ls * A(kLog2e);
    sc.delta[r] = r < rb.M ? delta[idx] : A(0);
  }
  std::fill(sc.ot, sc.ot + D * Mp, A(0));
  const T* k_head = row_ptr<const T>(p.k, packed, it.b, s.k_row0, 0, it.kvh);
  const T* v_head = row_ptr<const T>(p.v, packed, it.b, s.k_row0, 0, it.kvh);
  const int64_t kb = w.lo(t0), ke = w.hi(t0 + mq - 1);
  const int64_t lo_last = w.lo(t0 + mq - 1), hi_first = w.hi(t0);
  const A c2 = A(p.scale * kLog2e);
  for (int64_t j0 = kb; j0 < ke; j0 += N) {
    const int64_t n = std::min(N, ke - j0);
    int64_t krs, vrs;
    const A* kr = key_rows<T, A>(k_head + j0 * p.k.row_stride, p.k.row_stride, n, D, sc.kc, krs);
    const A* vr = key_rows<T, A>(v_head + j0 * p.v.row_stride, p.v.row_stride, n, D, sc.vc, vrs);
    Kit::gemm(Gemm<A>{sc.st, Mp, kr, krs, 1, sc.qt, Mp, n, nv, D, GemmInit::Zero, nullptr});
    Kit::gemm(Gemm<A>{sc.pt, Mp, vr, vrs, 1, sc.aux_t, Mp, n, nv, D, GemmInit::Zero, nullptr});
    const bool inside = lo_last <= j0 && hi_first >= j0 + n;
    for (int64_t v = 0; v < nv; ++v) {
      const vec bias = vec_at(sc.lse2 + v * kVecLanes), dl = vec_at(sc.delta + v * kVecLanes);
      const ivec lo = ivec_at<A>(sc.lo + v * kVecLanes), hi = ivec_at<A>(sc.hi + v * kVecLanes);
      for (int64_t j = 0; j < n; ++j) {
        vec& sv = vec_at(sc.st + j * Mp + v * kVecLanes);
        const vec dp = vec_at(sc.pt + j * Mp + v * kVecLanes);
        vec pv = sv * c2 - bias;
        exp2_vec(pv);
        if (!inside) {
          const IntOf<A> key = IntOf<A>(j0 + j);
          pv = (key < lo) | (key >= hi) ? vec{} : pv;
        }
        sv = pv * (dp - dl);
      }
    }
    // dQ^T[d][r] += sum_j K[j][d] dS^T[j][r]
    Kit::gemm(Gemm<A>{sc.ot, Mp, kr, 1, krs, sc.st, Mp, D, nv, n, GemmInit::Add, nullptr});
  }
  const A scale = A(p.scale);
  for (int64_t r = 0; r < rb.M; ++r) {
    T* gq = row_ptr<T>(p.grad_q, packed, it.b, s.q_row0, t0 + r / g, h0 + r % g);
    for (int64_t d = 0; d < D; ++d) gq[d] = from_acc<T>(sc.ot[d * Mp + r] * scale);
  }
}

template <typename T, class Kit>
FUSEKIT_INLINE void backward_q_tasks(const MqaParams& p, const MqaPlan& plan, TaskQueue& queue, void* scratch) {
  for (int64_t task; queue.claim(task);) backward_q_task<T, Kit>(p, plan, task, scratch);
}

// The dQ pass walks query blocks like the forward.
template <typename T>
inline MqaPlan make_backward_q_plan(const MqaParams& p, int threads) {
  return make_forward_plan<T>(p, threads);
}

// ----------------------------------------------------------------------------------------------
// decode
// ----------------------------------------------------------------------------------------------

// Keys of sequence b the queries attend to, after the append (clamped to the cache).
inline int64_t decode_length(const MqaDecodeParams& p, int64_t b) {
  const int64_t appended = p.k_new.data != nullptr ? p.new_tokens : 0;
  return std::clamp<int64_t>(int64_t(p.cache_seqlens[b]) + appended, 0, p.cache_len);
}

// Splits fixed by the shapes (B, Hkv, Lmax, thread count), never by cache_seqlens: enough items
// for every thread to stream the cache even at B * Hkv = 1, each at least 256 keys of a full cache.
template <typename T>
inline MqaPlan make_decode_plan(const MqaDecodeParams& p, int64_t num_splits, int threads) {
  using A = typename AccOf<T>::type;
  MqaPlan plan;
  plan.group = p.q_heads / p.kv_heads;
  plan.q_block = std::min<int64_t>(std::max<int64_t>(1, 128 / plan.group), std::max<int64_t>(p.new_tokens, 1));
  plan.lanes = round_up(plan.q_block * plan.group, kVecLanes);
  plan.key_block = 64;
  plan.q_tiles = ceil_div(p.new_tokens, plan.q_block);
  // KV heads per item: all of them when their state fits ~256 KB (their rows are adjacent)
  plan.heads = std::clamp<int64_t>((1 << 16) / (p.head_dim * plan.lanes), 1, p.kv_heads);
  const int64_t units = p.batch * ceil_div(p.kv_heads, plan.heads) * plan.q_tiles;
  int64_t splits = num_splits > 0 ? num_splits : ceil_div(4 * int64_t(threads), std::max<int64_t>(units, 1));
  if (num_splits <= 0) splits = std::min(splits, std::max<int64_t>(1, p.cache_len / 256));
  plan.splits = std::clamp<int64_t>(splits, 1, 256);
  plan.tasks = units * plan.splits;
  Carver c{0};
  RowBlockScratch<A>(c, plan, p.head_dim, kConverts<T>);
  plan.scratch_bytes = c.used;
  plan.partial_elems = p.batch * p.kv_heads * plan.q_tiles * plan.splits * (p.head_dim + 1) * plan.lanes;
  return plan;
}

// Writes k_new / v_new into the caches at cache_seqlens[b] + t (positions past the cache are dropped).
template <typename T>
inline void decode_append(const MqaDecodeParams& p) {
  if (p.k_new.data == nullptr) return;
  const size_t bytes = sizeof(T) * p.head_dim;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t t = 0; t < p.new_tokens; ++t) {
      const int64_t pos = int64_t(p.cache_seqlens[b]) + t;
      if (pos < 0 || pos >= p.cache_len) continue;
      for (int64_t h = 0; h < p.kv_heads; ++h) {
        std::memcpy(row_ptr<T>(p.k_cache, false, b, 0, pos, h), row_ptr<const T>(p.k_new, false, b, 0, t, h), bytes);
        std::memcpy(row_ptr<T>(p.v_cache, false, b, 0, pos, h), row_ptr<const T>(p.v_new, false, b, 0, t, h), bytes);
      }
    }
}

// Item: KV heads [kvh, kvh + heads) of sequence b, query block `tile`, KV split `split`.
struct DecodeItem { int64_t b, kvh, heads, tile, split; };
inline DecodeItem decode_item(const MqaDecodeParams& p, const MqaPlan& plan, int64_t task) {
  DecodeItem it;
  it.split = task % plan.splits;
  int64_t rest = task / plan.splits;
  it.tile = rest % plan.q_tiles;
  rest /= plan.q_tiles;
  const int64_t chunks = ceil_div(p.kv_heads, plan.heads);
  it.kvh = rest % chunks * plan.heads;
  it.heads = std::min(plan.heads, p.kv_heads - it.kvh);
  it.b = rest / chunks;
  return it;
}

// Partial results of (sequence, KV head, query block, split): O^T [D][lanes] then lse [lanes].
template <typename A>
inline A* decode_partial(const MqaDecodeParams& p, const MqaPlan& plan, int64_t b, int64_t kvh, int64_t tile,
                         int64_t split) {
  const int64_t unit = (b * p.kv_heads + kvh) * plan.q_tiles + tile;
  return static_cast<A*>(p.partial) + (unit * plan.splits + split) * (p.head_dim + 1) * plan.lanes;
}

// One split of the keys of one query block, for it.heads KV heads: partial O^T (normalized) and
// base-2 lse per lane.
template <typename T, class Kit>
FUSEKIT_INLINE void decode_task(const MqaDecodeParams& p, const MqaPlan& plan, int64_t task, void* scratch) {
  using A = typename AccOf<T>::type;
  const DecodeItem it = decode_item(p, plan, task);
  const int64_t g = plan.group, D = p.head_dim, n_new = p.new_tokens, lanes = plan.lanes;
  const int64_t L = decode_length(p, it.b);
  const int64_t t0 = it.tile * plan.q_block, mq = std::min(plan.q_block, n_new - t0);
  const RowBlock rb{t0, mq, g, mq * g, round_up(mq * g, kVecLanes)};
  const KeyWindow w{L, L - n_new, p.causal, p.window_left, p.window_right};
  // the split's share of [0, L), whole vectors of keys
  const int64_t chunk = round_up(ceil_div(L, plan.splits), kVecLanes);
  const int64_t kb = std::max(it.split * chunk, w.lo(t0)), ke = std::min((it.split + 1) * chunk, w.hi(t0 + mq - 1));
  if (kb >= ke) {
    for (int64_t h = 0; h < it.heads; ++h) {
      A* part_lse = decode_partial<A>(p, plan, it.b, it.kvh + h, it.tile, it.split) + D * lanes;
      std::fill(part_lse, part_lse + lanes, -std::numeric_limits<A>::infinity());
    }
    return;
  }
  Carver c{reinterpret_cast<uintptr_t>(scratch)};
  RowBlockScratch<A> sc(c, plan, D, kConverts<T>);
  fill_lane_windows<A>(rb, w, sc.lo, sc.hi);
  for (int64_t h = 0; h < it.heads; ++h)
    pack_rows_transposed<T, A>(sc.qt + h * sc.head_elems, rb,
                               row_ptr<const T>(p.q, false, it.b, 0, t0, (it.kvh + h) * g), p.q.row_stride,
                               p.q.head_stride, D, A(p.scale * kLog2e));
  const KvHeads<T> kv{row_ptr<const T>(p.k_cache, false, it.b, 0, 0, it.kvh),
                      row_ptr<const T>(p.v_cache, false, it.b, 0, 0, it.kvh), p.k_cache.row_stride,
                      p.k_cache.head_stride, p.v_cache.row_stride, p.v_cache.head_stride, it.heads};
  attend_block<T, Kit>(sc, plan, rb, w, kv, D, kb, ke);
  for (int64_t h = 0; h < it.heads; ++h) {
    A* part = decode_partial<A>(p, plan, it.b, it.kvh + h, it.tile, it.split);
    const A* ot = sc.ot + h * sc.head_elems;
    const A* m = sc.m + h * rb.Mp;
    const A* l = sc.l + h * rb.Mp;
    for (int64_t r = 0; r < rb.M; ++r) {
      const A inv = l[r] > A(0) ? A(1) / l[r] : A(0);
      for (int64_t d = 0; d < D; ++d) part[d * lanes + r] = ot[d * rb.Mp + r] * inv;
      part[D * lanes + r] = l[r] > A(0) ? m[r] + std::log2(l[r]) : -std::numeric_limits<A>::infinity();
    }
  }
}

template <typename T, class Kit>
FUSEKIT_INLINE void decode_tasks(const MqaDecodeParams& p, const MqaPlan& plan, TaskQueue& queue, void* scratch) {
  for (int64_t task; queue.claim(task);) decode_task<T, Kit>(p, plan, task, scratch);
}

// Query blocks to combine: (b * Hkv + kvh) * q_tiles + tile.
inline int64_t decode_units(const MqaDecodeParams& p, const MqaPlan& plan) {
  return p.batch * p.kv_heads * plan.q_tiles;
}

// Log-sum-exp combine of the splits of query block `unit` (see decode_units).
template <typename T>
inline void decode_combine(const MqaDecodeParams& p, const MqaPlan& plan, int64_t unit) {
  using A = typename AccOf<T>::type;
  const int64_t tile = unit % plan.q_tiles, kvh = (unit / plan.q_tiles) % p.kv_heads;
  const int64_t b = unit / plan.q_tiles / p.kv_heads;
  const int64_t g = plan.group, D = p.head_dim, lanes = plan.lanes, S = plan.splits;
  const int64_t t0 = tile * plan.q_block, M = std::min(plan.q_block, p.new_tokens - t0) * g;
  const A* part0 = decode_partial<A>(p, plan, b, kvh, tile, 0);
  A weight[256];
  for (int64_t r = 0; r < M; ++r) {
    const int64_t t = t0 + r / g, h = kvh * g + r % g;
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t s = 0; s < S; ++s) mx = std::max(mx, part0[(s * (D + 1) + D) * lanes + r]);
    T* o = row_ptr<T>(p.out, false, b, 0, t, h);
    float* lse = p.lse + (b * p.new_tokens + t) * p.q_heads + h;
    if (mx == -std::numeric_limits<A>::infinity()) {
      for (int64_t d = 0; d < D; ++d) o[d] = from_acc<T>(A(0));
      *lse = -std::numeric_limits<float>::infinity();
      continue;
    }
    A total = 0;
    for (int64_t s = 0; s < S; ++s) total += weight[s] = std::exp2(part0[(s * (D + 1) + D) * lanes + r] - mx);
    for (int64_t s = 0; s < S; ++s) weight[s] /= total;
    for (int64_t d = 0; d < D; ++d) {
      A acc = 0;
      for (int64_t s = 0; s < S; ++s)
        if (weight[s] > A(0)) acc += weight[s] * part0[(s * (D + 1) + d) * lanes + r];
      o[d] = from_acc<T>(acc);
    }
    *lse = float((mx + std::log2(total)) * A(kLn2));
  }
}

}  // namespace cpu
}  // namespace fusekit
