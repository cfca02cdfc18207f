// Torch-free CPU kernels of fused neighborhood attention (na_forward, na_backward), 1-D/2-D/3-D.
//
// Tiling. A query tile is a block of in-group positions of one dilation group per axis (e.g. 4x4
// for na2d): windows start and end non-decreasingly along each axis, so the union of the tile's
// windows is a dense box of keys, [first window start, last window end) per axis, and the tile is
// plain dense attention of its rows against that box with a per-pair mask (AND over axes of the
// per-axis windows). A tile holds the rows of all g = Hq / Hkv query heads of one KV head (lanes:
// position-major, head-minor), so every K/V row of the box is read once for g heads and K/V are
// never expanded. Tile shapes are chosen to minimize (box keys) x (padded lanes) per useful row.
//
// Products go through the register-blocked micro-kernel of kernels/cpu_gemm.h with lanes over
// the tile's rows, as in the MQA kernels: S^T = K_box . Q^T, O^T += V_box^T . P^T, K/V box rows
// packed (and converted from 16-bit) per chunk of <= key_block keys; the softmax is online over
// chunks (one chunk covers the box of small kernels). Masks are per-axis lane masks precomputed
// per tile, ANDed per key (a key inside every lane's window skips the mask). Scores are base 2.
//
// Backward, no atomics: dQ per query tile over the same box (recomputing P from the given lse,
// dS = P (dP - delta)); dK/dV per key tile, lanes over keys, over the inverse box of queries
// (the queries that see any key of the tile, again a dense box by monotonicity), accumulating
// in L1 for all g query heads of the KV head. grad_rpb goes to one buffer per static task range
// (summed in range order by the launcher: deterministic for a given thread count).
//
// Every function here is single-threaded and allocation-free (scratch from the caller).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_gemm.h"
#include "na_window.h"

namespace fusekit {

// A [batch, X0, X1, X2, head, dim] view with unit dim stride (lower ranks: leading axes of
// length 1, stride 0). Element strides.
struct NaTensor {
  void* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0;
  int64_t spatial_stride[3] = {0, 0, 0};
};

struct NaParams {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  na::Axis axis[3];                     // padded to 3 axes (leading {L 1, k 1, s 1, d 1})
  NaTensor q, k, v, out;
  NaTensor grad_out, grad_q, grad_k, grad_v;  // backward
  const void* rpb = nullptr;  // accumulation type, contiguous [Hq][2k0-1][2k1-1][2k2-1]; null: none
  void* lse = nullptr;        // accumulation type, contiguous [B][L0][L1][L2][Hq] (natural log)
  void* delta = nullptr;      // backward: rowsum(dO * O), same layout and type as lse
  double scale = 1.0;
};

namespace cpu {

struct NaPlan {
  int64_t group = 1;                  // query heads per KV head
  int64_t tile[3] = {1, 1, 1};        // in-group positions per axis of a tile
  int64_t per_group[3] = {1, 1, 1};   // tiles per dilation group along each axis (longest group)
  int64_t tiles = 0;                  // tiles per (batch, KV head)
  int64_t lanes = kVecLanes;          // query tiles: positions x group, key tiles: positions; rounded
  int64_t box_cap[3] = {1, 1, 1};     // query tiles: bound on the box extent per axis
  int64_t key_block = 128;            // forward / dQ: box keys per chunk; dK/dV: query positions per chunk
  int64_t tasks = 0;
  int64_t claim = 1;                  // consecutive tasks per queue claim (the launcher sets it)
  int64_t scratch_bytes = 0;
  int64_t rpb_elems = 0;              // Hq * prod(2k - 1) (grad_rpb buffer per task range)
};

// ----------------------------------------------------------------------------------------------
// tiles and boxes
// ----------------------------------------------------------------------------------------------

inline int64_t longest_group(const na::Axis& a) { return ceil_div(a.length, a.dilation); }

// In-group positions [start, start + count) of dilation group `group` (length len) along one axis.
struct AxisTile {
  int64_t group, start, count, len;
};

// A task: batch b, KV head kvh, one tile per axis. False when the tile lies past its group's end.
struct NaItem {
  int64_t b, kvh;
  AxisTile ax[3];
};

// Tasks run KV heads fastest: the heads of a position share cache lines (heads-last layout), and
// neighbouring tiles (next in order) share most of their box, which stays in L2.
inline bool na_item(const NaParams& p, const NaPlan& plan, int64_t task, NaItem& it) {
  it.kvh = task % p.kv_heads;
  const int64_t rest = task / p.kv_heads;
  int64_t tile = rest % plan.tiles;
  it.b = rest / plan.tiles;
  for (int a = 2; a >= 0; --a) {
    const na::Axis& ax = p.axis[a];
    const int64_t n = ax.dilation * plan.per_group[a], idx = tile % n;
    tile /= n;
    AxisTile& t = it.ax[a];
    t.group = idx / plan.per_group[a];
    t.start = idx % plan.per_group[a] * plan.tile[a];
    t.len = na::group_length(ax, t.group);
    t.count = std::min(plan.tile[a], t.len - t.start);
    if (t.count <= 0) return false;
  }
  return true;
}

// A dense box of positions: in-group [first, first + ext) of each axis' group, walked row-major.
struct Box {
  int64_t first[3], ext[3], group[3];
  int64_t size() const { return ext[0] * ext[1] * ext[2]; }
};

// Element offset of box position c (per-axis box coordinates) in a tensor, from the head's origin.
FUSEKIT_INLINE int64_t box_offset(const NaParams& p, const Box& box, const NaTensor& t, const int64_t c[3]) {
  int64_t off = 0;
  for (int a = 0; a < 3; ++a)
    off += ((box.first[a] + c[a]) * p.axis[a].dilation + box.group[a]) * t.spatial_stride[a];
  return off;
}

FUSEKIT_INLINE void box_coords(const Box& box, int64_t flat, int64_t c[3]) {
  c[2] = flat % box.ext[2];
  c[1] = flat / box.ext[2] % box.ext[1];
  c[0] = flat / (box.ext[2] * box.ext[1]);
}

FUSEKIT_INLINE void box_next(const Box& box, int64_t c[3]) {
  if (++c[2] < box.ext[2]) return;
  c[2] = 0;
  if (++c[1] < box.ext[1]) return;
  c[1] = 0;
  ++c[0];
}

// The keys the windows of a query tile reach (monotone windows: first start to last end).
inline Box query_tile_box(const NaParams& p, const NaItem& it) {
  Box box;
  for (int a = 0; a < 3; ++a) {
    const AxisTile& t = it.ax[a];
    const na::Range lo = na::window_in_group(p.axis[a], t.start, t.len);
    const na::Range hi = na::window_in_group(p.axis[a], t.start + t.count - 1, t.len);
    box.first[a] = lo.start;
    box.ext[a] = hi.end - lo.start;
    box.group[a] = t.group;
  }
  return box;
}

// The queries whose windows reach a key tile (inverse windows are monotone too).
inline Box key_tile_box(const NaParams& p, const NaItem& it) {
  Box box;
  for (int a = 0; a < 3; ++a) {
    const na::Axis& ax = p.axis[a];
    const AxisTile& t = it.ax[a];
    const na::Window lo = na::key_inverse_window(ax, t.start * ax.dilation + t.group);
    const na::Window hi = na::key_inverse_window(ax, (t.start + t.count - 1) * ax.dilation + t.group);
    box.first[a] = lo.first / ax.dilation;
    box.ext[a] = std::max<int64_t>(hi.first / ax.dilation + hi.count - box.first[a], 0);
    box.group[a] = t.group;
  }
  return box;
}

// rpb strides per axis (element offsets of one index step) and per head.
FUSEKIT_INLINE void rpb_strides(const NaParams& p, int64_t rs[3], int64_t& head_stride) {
  rs[2] = 1;
  rs[1] = 2 * p.axis[2].kernel - 1;
  rs[0] = rs[1] * (2 * p.axis[1].kernel - 1);
  head_stride = rs[0] * (2 * p.axis[0].kernel - 1);
}

// ----------------------------------------------------------------------------------------------
// plans
// ----------------------------------------------------------------------------------------------

// Tile shape: at most max(32, heads) lanes (positions x heads) per tile; minimizes box keys x
// (padded lanes + per-key overhead) per useful lane.
inline void choose_tile(const NaParams& p, int64_t heads, int64_t tile[3]) {
  double best = std::numeric_limits<double>::infinity();
  const int64_t cap = std::max<int64_t>(32, heads);
  int64_t lim[3];
  for (int a = 0; a < 3; ++a) lim[a] = std::min<int64_t>(cap, longest_group(p.axis[a]));
  for (int64_t t0 = 1; t0 <= lim[0]; ++t0)
    for (int64_t t1 = 1; t1 <= lim[1]; ++t1)
      for (int64_t t2 = 1; t2 <= lim[2]; ++t2) {
        const int64_t t[3] = {t0, t1, t2}, rows = t0 * t1 * t2 * heads;
        if (rows > cap) continue;
        double box = 1, pad = 1;
        for (int a = 0; a < 3; ++a) {
          const na::Axis& ax = p.axis[a];
          const int64_t lg = longest_group(ax), tiles = ceil_div(lg, t[a]);
          box *= double(std::min(lg, t[a] + ax.kernel - 1 + ax.stride - 1));
          pad *= double(tiles * t[a]) / double(lg);  // positions past the group end
        }
        const double cost = box * double(round_up(rows, kVecLanes) + 8) * pad / double(rows);
        if (cost < best * 0.999) {
          best = cost;
          for (int a = 0; a < 3; ++a) tile[a] = t[a];
        }
      }
}

inline void plan_tiles(const NaParams& p, NaPlan& plan) {
  int64_t tiles = 1;
  for (int a = 0; a < 3; ++a) {
    plan.per_group[a] = ceil_div(longest_group(p.axis[a]), plan.tile[a]);
    tiles *= p.axis[a].dilation * plan.per_group[a];
  }
  plan.tiles = tiles;
  plan.tasks = p.batch * p.kv_heads * tiles;
  int64_t rs[3], hs;
  rpb_strides(p, rs, hs);
  plan.rpb_elems = p.q_heads * hs;
}

// The largest box of keys a query tile of `tile` in-group positions reaches along one axis.
inline int64_t max_box_extent(const na::Axis& a, int64_t tile) {
  int64_t most = 1;
  for (int64_t g = 0; g < a.dilation; ++g) {
    const int64_t len = na::group_length(a, g);
    for (int64_t s = 0; s < len; s += tile) {
      const int64_t last = std::min(s + tile, len) - 1;
      most = std::max(most, na::window_in_group(a, last, len).end - na::window_in_group(a, s, len).start);
    }
  }
  return most;
}

// Query-tile passes (forward, dQ) share one scratch layout: lanes over rows.
template <typename A>
struct QueryTileScratch {
  A *qt, *ot, *st, *m, *l, *alpha, *kc, *vc;
  A *dot, *pt, *lse2, *delta;   // dQ pass
  IntOf<A>* mask[3];            // per axis: [box extent][lanes], -1 where the box coordinate is in the lane's window
  int64_t* rpb_off;             // per lane: rpb offset of box key 0
  QueryTileScratch(Carver& c, const NaPlan& plan, int64_t D, bool backward) {
    const int64_t Mp = plan.lanes, N = plan.key_block;
    qt = c.take<A>(D * Mp);       // Q^T scaled to base 2
    ot = c.take<A>(D * Mp);       // O^T / dQ^T accumulator
    st = c.take<A>(N * Mp);       // S^T, then P^T (or dS^T)
    m = c.take<A>(Mp); l = c.take<A>(Mp); alpha = c.take<A>(Mp);
    kc = c.take<A>(N * D); vc = c.take<A>(N * D);  // packed K, V rows of a chunk of the box
    dot = backward ? c.take<A>(D * Mp) : nullptr;  // dO^T
    pt = backward ? c.take<A>(N * Mp) : nullptr;   // dP^T
    lse2 = c.take<A>(Mp); delta = c.take<A>(Mp);
    for (int a = 0; a < 3; ++a) mask[a] = c.take<IntOf<A>>(plan.box_cap[a] * Mp);
    rpb_off = c.take<int64_t>(Mp);
  }
};

template <typename T>
inline NaPlan make_query_plan(const NaParams& p, bool backward) {
  using A = typename AccOf<T>::type;
  NaPlan plan;
  plan.group = p.q_heads / p.kv_heads;
  choose_tile(p, plan.group, plan.tile);
  plan_tiles(p, plan);
  plan.lanes = round_up(plan.tile[0] * plan.tile[1] * plan.tile[2] * plan.group, kVecLanes);
  for (int a = 0; a < 3; ++a) plan.box_cap[a] = max_box_extent(p.axis[a], plan.tile[a]);
  plan.key_block = 128;
  Carver c{0};
  QueryTileScratch<A>(c, plan, p.head_dim, backward);
  plan.scratch_bytes = c.used;
  return plan;
}

template <typename A>
struct KeyTileScratch {
  A *kt, *vt, *dk, *dv, *qr, *dor, *s, *dp, *lse2, *delta, *row;
  IntOf<A>* coord[3];   // per axis: [lanes] key-tile coordinate of each key lane (padded: huge)
  int64_t* lo[3];       // per axis: [rows] window of each query row, in key-tile coordinates
  int64_t* hi[3];
  int64_t *rpb_row, *rpb_key;
  KeyTileScratch(Carver& c, const NaPlan& plan, int64_t D) {
    const int64_t Np = plan.lanes, Dp = round_up(D, kVecLanes), M = plan.key_block * plan.group;
    kt = c.take<A>(D * Np); vt = c.take<A>(D * Np);   // K^T, V^T of the key tile
    dk = c.take<A>(Np * Dp); dv = c.take<A>(Np * Dp);
    qr = c.take<A>(M * Dp); dor = c.take<A>(M * Dp);  // Q, dO rows of a chunk of the query box
    s = c.take<A>(M * Np); dp = c.take<A>(M * Np);    // S then P, dP then dS
    lse2 = c.take<A>(M); delta = c.take<A>(M);
    row = c.take<A>(D);
    for (int a = 0; a < 3; ++a) {
      coord[a] = c.take<IntOf<A>>(Np);
      lo[a] = c.take<int64_t>(M);
      hi[a] = c.take<int64_t>(M);
    }
    rpb_row = c.take<int64_t>(M);
    rpb_key = c.take<int64_t>(Np);
  }
};

template <typename T>
inline NaPlan make_key_plan(const NaParams& p) {
  using A = typename AccOf<T>::type;
  NaPlan plan;
  plan.group = p.q_heads / p.kv_heads;
  choose_tile(p, 1, plan.tile);
  plan_tiles(p, plan);
  plan.lanes = round_up(plan.tile[0] * plan.tile[1] * plan.tile[2], kVecLanes);
  plan.key_block = std::max<int64_t>(1, 128 / plan.group);  // query positions per chunk
  Carver c{0};
  KeyTileScratch<A>(c, plan, p.head_dim);
  plan.scratch_bytes = c.used;
  return plan;
}

// ----------------------------------------------------------------------------------------------
// query tiles (forward, dQ)
// ----------------------------------------------------------------------------------------------

template <typename T>
FUSEKIT_INLINE T* na_ptr(const NaTensor& t, int64_t b, const int64_t x[3], int64_t h) {
  return static_cast<T*>(t.data) + b * t.batch_stride + x[0] * t.spatial_stride[0] + x[1] * t.spatial_stride[1] +
         x[2] * t.spatial_stride[2] + h * t.head_stride;
}

FUSEKIT_INLINE int64_t na_row_index(const NaParams& p, int64_t b, const int64_t x[3], int64_t h) {
  return (((b * p.axis[0].length + x[0]) * p.axis[1].length + x[1]) * p.axis[2].length + x[2]) * p.q_heads + h;
}

// The rows of a query tile: positions of it.ax (row-major) x the g heads of KV head it.kvh.
struct QueryRows {
  int64_t g, M, Mp;
  int64_t pos_count[3];
};

FUSEKIT_INLINE void tile_position(const NaItem& it, int64_t pos, int64_t q_ig[3]) {
  q_ig[2] = it.ax[2].start + pos % it.ax[2].count;
  q_ig[1] = it.ax[1].start + pos / it.ax[2].count % it.ax[1].count;
  q_ig[0] = it.ax[0].start + pos / (it.ax[2].count * it.ax[1].count);
}

FUSEKIT_INLINE void axis_position(const NaParams& p, const int64_t ig[3], const int64_t group[3], int64_t x[3]) {
  for (int a = 0; a < 3; ++a) x[a] = ig[a] * p.axis[a].dilation + group[a];
}

// Per-axis lane masks against the box, the box range inside every row's window (keys there need
// no mask), and per-lane rpb offsets.
template <typename A>
FUSEKIT_INLINE void setup_query_lanes(const NaParams& p, const NaItem& it, const Box& box, const QueryRows& qr,
                                      QueryTileScratch<A>& sc, int64_t inner_lo[3], int64_t inner_hi[3]) {
  int64_t rs[3], hs;
  rpb_strides(p, rs, hs);
  for (int a = 0; a < 3; ++a) {
    inner_lo[a] = 0;
    inner_hi[a] = box.ext[a];
    std::fill(sc.mask[a], sc.mask[a] + box.ext[a] * qr.Mp, IntOf<A>(0));
  }
  for (int64_t r = 0; r < qr.M; ++r) {
    int64_t q_ig[3];
    tile_position(it, r / qr.g, q_ig);
    int64_t off = (it.kvh * qr.g + r % qr.g) * hs;
    for (int a = 0; a < 3; ++a) {
      const na::Range w = na::window_in_group(p.axis[a], q_ig[a], it.ax[a].len);
      const int64_t lo = w.start - box.first[a], hi = w.end - box.first[a];
      inner_lo[a] = std::max(inner_lo[a], lo);
      inner_hi[a] = std::min(inner_hi[a], hi);
      for (int64_t c = lo; c < hi; ++c) sc.mask[a][c * qr.Mp + r] = IntOf<A>(-1);
      off += (box.first[a] - q_ig[a] + p.axis[a].kernel - 1) * rs[a];
    }
    sc.rpb_off[r] = off;
  }
}

// Box keys [k0, k0 + n) of S^T (base-2 scores, row j = key k0 + j): -inf outside a lane's
// window, + rpb * log2(e) inside.
template <typename A>
FUSEKIT_INLINE void mask_box_scores(const NaParams& p, const Box& box, const QueryRows& qr,
                                    const QueryTileScratch<A>& sc, const int64_t inner_lo[3],
                                    const int64_t inner_hi[3], A* st, int64_t k0, int64_t n) {
  using vec = typename VecOf<A>::type;
  using ivec = typename IVecOf<A>::type;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const A* rpb = static_cast<const A*>(p.rpb);
  int64_t rs[3], hs;
  rpb_strides(p, rs, hs);
  const int64_t Mp = qr.Mp, nv = Mp / kVecLanes;
  int64_t c[3];
  box_coords(box, k0, c);
  for (int64_t j = 0; j < n; ++j, box_next(box, c)) {
    A* row = st + j * Mp;
    const bool inside = c[0] >= inner_lo[0] && c[0] < inner_hi[0] && c[1] >= inner_lo[1] && c[1] < inner_hi[1] &&
                        c[2] >= inner_lo[2] && c[2] < inner_hi[2];
    const int64_t key_off = c[0] * rs[0] + c[1] * rs[1] + c[2] * rs[2];
    if (inside) {
      if (rpb != nullptr)
        for (int64_t r = 0; r < qr.M; ++r) row[r] += rpb[sc.rpb_off[r] + key_off] * A(kLog2e);
      continue;
    }
    const IntOf<A>* m0 = sc.mask[0] + c[0] * Mp;
    const IntOf<A>* m1 = sc.mask[1] + c[1] * Mp;
    const IntOf<A>* m2 = sc.mask[2] + c[2] * Mp;
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t o = v * kVecLanes;
      const ivec mk = ivec_at<A>(m0 + o) & ivec_at<A>(m1 + o) & ivec_at<A>(m2 + o);
      vec& s = vec_at(row + o);
      s = mk ? s : vec{} + kNegInf;
      if (rpb != nullptr)
        for (int l = 0; l < kVecLanes; ++l)
          if (mk[l]) s[l] += rpb[sc.rpb_off[o + l] + key_off] * A(kLog2e);
    }
  }
}

// Packs box keys [k0, k0 + n) of one head (K or V) as rows [n][D] of the accumulation type.
template <typename T, typename A>
FUSEKIT_INLINE void pack_box_rows(const NaParams& p, const Box& box, const NaTensor& t, const T* head, A* dst,
                                  int64_t k0, int64_t n) {
  const int64_t D = p.head_dim;
  int64_t c[3];
  box_coords(box, k0, c);
  const int64_t next_head = t.head_stride, bytes = D * int64_t(sizeof(T));
  for (int64_t j = 0; j < n; ++j, box_next(box, c)) {
    const T* src = head + box_offset(p, box, t, c);
    // the next task is the next KV head of this tile: bring its rows in (prefetches never fault)
    for (int64_t b = 0; b < bytes; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(src + next_head) + b, 0, 2);
    load_row(dst + j * D, src, D);
  }
}

// Q^T (or dO^T) of the tile rows, times mul; padded lanes 0.
template <typename T, typename A>
FUSEKIT_INLINE void pack_tile_transposed(const NaParams& p, const NaItem& it, const QueryRows& qr, const NaTensor& t,
                                         A* dst, A mul, A* row) {
  const int64_t D = p.head_dim;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = qr.M; r < qr.Mp; ++r) dst[d * qr.Mp + r] = A(0);
  const int64_t group[3] = {it.ax[0].group, it.ax[1].group, it.ax[2].group};
  for (int64_t r = 0; r < qr.M; ++r) {
    int64_t q_ig[3], x[3];
    tile_position(it, r / qr.g, q_ig);
    axis_position(p, q_ig, group, x);
    load_row(row, na_ptr<const T>(t, it.b, x, it.kvh * qr.g + r % qr.g), D);
    for (int64_t d = 0; d < D; ++d) dst[d * qr.Mp + r] = row[d] * mul;
  }
}

// Brings the Q rows and K/V box rows of a query task into cache ahead of use: within a claim
// the next task is this thread's (the next KV head, or the next tile), and its rows otherwise
// arrive as demand misses (a tile's rows are scattered over many pages).
template <typename T>
FUSEKIT_INLINE void prefetch_query_task(const NaParams& p, const NaPlan& plan, int64_t task) {
  NaItem it;
  if (task >= plan.tasks || !na_item(p, plan, task, it)) return;
  const int64_t g = plan.group, bytes = p.head_dim * int64_t(sizeof(T));
  const int64_t group[3] = {it.ax[0].group, it.ax[1].group, it.ax[2].group};
  const int64_t positions = it.ax[0].count * it.ax[1].count * it.ax[2].count;
  for (int64_t pos = 0; pos < positions; ++pos) {
    int64_t q_ig[3], x[3];
    tile_position(it, pos, q_ig);
    axis_position(p, q_ig, group, x);
    for (int64_t hh = 0; hh < g; ++hh) {
      const char* src = reinterpret_cast<const char*>(na_ptr<const T>(p.q, it.b, x, it.kvh * g + hh));
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(src + b, 0, 3);
    }
  }
  const Box box = query_tile_box(p, it);
  const int64_t zero[3] = {0, 0, 0};
  int64_t x0[3];
  axis_position(p, zero, zero, x0);
  const T* k_head = na_ptr<const T>(p.k, it.b, x0, it.kvh);
  const T* v_head = na_ptr<const T>(p.v, it.b, x0, it.kvh);
  int64_t c[3] = {0, 0, 0};
  for (int64_t j = 0, keys = box.size(); j < keys; ++j, box_next(box, c)) {
    const char* ks = reinterpret_cast<const char*>(k_head + box_offset(p, box, p.k, c));
    const char* vs = reinterpret_cast<const char*>(v_head + box_offset(p, box, p.v, c));
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(ks + b, 0, 3);
      __builtin_prefetch(vs + b, 0, 3);
    }
  }
}

template <typename T, class Kit>
FUSEKIT_INLINE void forward_task(const NaParams& p, const NaPlan& plan, int64_t task, void* scratch) {
  using A = typename AccOf<T>::type;
  NaItem it;
  if (!na_item(p, plan, task, it)) return;
  prefetch_query_task<T>(p, plan, task + 1);
  const Box box = query_tile_box(p, it);
  const int64_t g = plan.group, D = p.head_dim, M = it.ax[0].count * it.ax[1].count * it.ax[2].count * g;
  const QueryRows qr{g, M, round_up(M, kVecLanes), {it.ax[0].count, it.ax[1].count, it.ax[2].count}};
  const int64_t Mp = qr.Mp, nv = Mp / kVecLanes, N = plan.key_block;
  Carver c{reinterpret_cast<uintptr_t>(scratch)};
  QueryTileScratch<A> sc(c, plan, D, false);
  int64_t inner_lo[3], inner_hi[3];
  setup_query_lanes<A>(p, it, box, qr, sc, inner_lo, inner_hi);
  pack_tile_transposed<T, A>(p, it, qr, p.q, sc.qt, A(p.scale * kLog2e), sc.kc);
  std::fill(sc.m, sc.m + Mp, -std::numeric_limits<A>::infinity());
  std::fill(sc.l, sc.l + Mp, A(0));
  const int64_t zero[3] = {0, 0, 0};
  int64_t x0[3];
  axis_position(p, zero, zero, x0);
  const T* k_head = na_ptr<const T>(p.k, it.b, x0, it.kvh);
  const T* v_head = na_ptr<const T>(p.v, it.b, x0, it.kvh);
  const int64_t keys = box.size();
  for (int64_t k0 = 0; k0 < keys; k0 += N) {
    const int64_t n = std::min(N, keys - k0);
    pack_box_rows<T, A>(p, box, p.k, k_head, sc.kc, k0, n);
    Kit::gemm(Gemm<A>{sc.st, Mp, sc.kc, D, 1, sc.qt, Mp, n, nv, D, GemmInit::Zero, nullptr});
    mask_box_scores<A>(p, box, qr, sc, inner_lo, inner_hi, sc.st, k0, n);
    online_softmax_t<A>(sc.st, n, Mp, sc.m, sc.l, sc.alpha);
    pack_box_rows<T, A>(p, box, p.v, v_head, sc.vc, k0, n);
    Kit::gemm(Gemm<A>{sc.ot, Mp, sc.vc, 1, D, sc.st, Mp, D, nv, n, k0 == 0 ? GemmInit::Zero : GemmInit::ScaleLanes,
                      sc.alpha});
  }
  A* lse = static_cast<A*>(p.lse);
  const int64_t group[3] = {it.ax[0].group, it.ax[1].group, it.ax[2].group};
  for (int64_t r = 0; r < M; ++r) {
    int64_t q_ig[3], x[3];
    tile_position(it, r / g, q_ig);
    axis_position(p, q_ig, group, x);
    const int64_t h = it.kvh * g + r % g;
    const A l = sc.l[r];
    const A inv = l > A(0) ? A(1) / l : A(0);
    T* o = na_ptr<T>(p.out, it.b, x, h);
    for (int64_t d = 0; d < D; ++d) o[d] = from_acc<T>(sc.ot[d * Mp + r] * inv);
    lse[na_row_index(p, it.b, x, h)] =
        l > A(0) ? (sc.m[r] + std::log2(l)) * A(kLn2) : -std::numeric_limits<A>::infinity();
  }
}

// dQ of one query tile (and its share of grad_rpb into grad_rpb_buf when rpb is given).
template <typename T, class Kit>
FUSEKIT_INLINE void backward_q_task(const NaParams& p, const NaPlan& plan, int64_t task, void* scratch,
                                    typename AccOf<T>::type* grad_rpb_buf) {
  using A = typename AccOf<T>::type;
  using vec = typename VecOf<A>::type;
  using ivec = typename IVecOf<A>::type;
  NaItem it;
  if (!na_item(p, plan, task, it)) return;
  const Box box = query_tile_box(p, it);
  const int64_t g = plan.group, D = p.head_dim, M = it.ax[0].count * it.ax[1].count * it.ax[2].count * g;
  const QueryRows qr{g, M, round_up(M, kVecLanes), {it.ax[0].count, it.ax[1].count, it.ax[2].count}};
  const int64_t Mp = qr.Mp, nv = Mp / kVecLanes, N = plan.key_block;
  Carver c{reinterpret_cast<uintptr_t>(scratch)};
  QueryTileScratch<A> sc(c, plan, D, true);
  int64_t inner_lo[3], inner_hi[3];
  setup_query_lanes<A>(p, it, box, qr, sc, inner_lo, inner_hi);
  pack_tile_transposed<T, A>(p, it, qr, p.q, sc.qt, A(p.scale * kLog2e), sc.kc);
  pack_tile_transposed<T, A>(p, it, qr, p.grad_out, sc.dot, A(1), sc.kc);
  const A* lse = static_cast<const A*>(p.lse);
  const A* delta = static_cast<const A*>(p.delta);
  const int64_t group[3] = {it.ax[0].group, it.ax[1].group, it.ax[2].group};
  for (int64_t r = 0; r < Mp; ++r) {
    A ls = -std::numeric_limits<A>::infinity(), dl = A(0);
    if (r < M) {
      int64_t q_ig[3], x[3];
      tile_position(it, r / g, q_ig);
      axis_position(p, q_ig, group, x);
      const int64_t idx = na_row_index(p, it.b, x, it.kvh * g + r % g);
      ls = lse[idx];
      dl = delta[idx];
    }
    sc.lse2[r] = ls == -std::numeric_limits<A>::infinity() ? std::numeric_limits<A>::infinity() : ls * A(kLog2e);
    sc.delta[r] = dl;
  }
  const int64_t zero[3] = {0, 0, 0};
  int64_t x0[3];
  axis_position(p, zero, zero, x0);
  const T* k_head = na_ptr<const T>(p.k, it.b, x0, it.kvh);
  const T* v_head = na_ptr<const T>(p.v, it.b, x0, it.kvh);
  int64_t rs[3], hs;
  rpb_strides(p, rs, hs);
  const int64_t keys = box.size();
  for (int64_t k0 = 0; k0 < keys; k0 += N) {
    const int64_t n = std::min(N, keys - k0);
    pack_box_rows<T, A>(p, box, p.k, k_head, sc.kc, k0, n);
    pack_box_rows<T, A>(p, box, p.v, v_head, sc.vc, k0, n);
    Kit::gemm(Gemm<A>{sc.st, Mp, sc.kc, D, 1, sc.qt, Mp, n, nv, D, GemmInit::Zero, nullptr});
    Kit::gemm(Gemm<A>{sc.pt, Mp, sc.vc, D, 1, sc.dot, Mp, n, nv, D, GemmInit::Zero, nullptr});
    mask_box_scores<A>(p, box, qr, sc, inner_lo, inner_hi, sc.st, k0, n);
    // dS = P (dP - delta), P = exp2(S - lse2) (masked scores are -inf: P = 0)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t v = 0; v < nv; ++v) {
        vec& sv = vec_at(sc.st + j * Mp + v * kVecLanes);
        const vec dp = vec_at(sc.pt + j * Mp + v * kVecLanes);
        vec pv = sv - vec_at(sc.lse2 + v * kVecLanes);
        exp2_vec(pv);
        sv = pv * (dp - vec_at(sc.delta + v * kVecLanes));
      }
    if (grad_rpb_buf != nullptr) {
      int64_t cc[3];
      box_coords(box, k0, cc);
      for (int64_t j = 0; j < n; ++j, box_next(box, cc)) {
        const int64_t key_off = cc[0] * rs[0] + cc[1] * rs[1] + cc[2] * rs[2];
        const IntOf<A>* m0 = sc.mask[0] + cc[0] * Mp;
        const IntOf<A>* m1 = sc.mask[1] + cc[1] * Mp;
        const IntOf<A>* m2 = sc.mask[2] + cc[2] * Mp;
        for (int64_t v = 0; v < nv; ++v) {
          const int64_t o = v * kVecLanes;
          const ivec mk = ivec_at<A>(m0 + o) & ivec_at<A>(m1 + o) & ivec_at<A>(m2 + o);
          const A* ds = sc.st + j * Mp + o;
          for (int l = 0; l < kVecLanes; ++l)
            if (mk[l]) grad_rpb_buf[sc.rpb_off[o + l] + key_off] += ds[l];
        }
      }
    }
    // dQ^T[d][r] += sum_j K[j][d] dS^T[j][r]
    Kit::gemm(Gemm<A>{sc.ot, Mp, sc.kc, 1, D, sc.st, Mp, D, nv, n, k0 == 0 ? GemmInit::Zero : GemmInit::Add, nullptr});
  }
  const A scale = A(p.scale);
  for (int64_t r = 0; r < M; ++r) {
    int64_t q_ig[3], x[3];
    tile_position(it, r / g, q_ig);
    axis_position(p, q_ig, group, x);
    T* gq = na_ptr<T>(p.grad_q, it.b, x, it.kvh * g + r % g);
    for (int64_t d = 0; d < D; ++d) gq[d] = from_acc<T>(sc.ot[d * Mp + r] * scale);
  }
}

// ----------------------------------------------------------------------------------------------
// key tiles (dK, dV)
// ----------------------------------------------------------------------------------------------

// dK/dV of one key tile of one KV head: lanes over keys for S and dP, over the head dim for the
// dV += P^T dO and dK += dS^T Q products, walking the query box in chunks of rows.
template <typename T, class Kit>
FUSEKIT_INLINE void backward_kv_task(const NaParams& p, const NaPlan& plan, int64_t task, void* scratch) {
  using A = typename AccOf<T>::type;
  using vec = typename VecOf<A>::type;
  using ivec = typename IVecOf<A>::type;
  NaItem it;
  if (!na_item(p, plan, task, it)) return;
  const int64_t g = plan.group, D = p.head_dim, h0 = it.kvh * g;
  const int64_t n = it.ax[0].count * it.ax[1].count * it.ax[2].count;
  const int64_t Np = round_up(n, kVecLanes), Dp = round_up(D, kVecLanes), nvk = Np / kVecLanes;
  Carver c{reinterpret_cast<uintptr_t>(scratch)};
  KeyTileScratch<A> sc(c, plan, D);
  int64_t rs[3], hs;
  rpb_strides(p, rs, hs);
  const A* rpb = static_cast<const A*>(p.rpb);
  const int64_t group[3] = {it.ax[0].group, it.ax[1].group, it.ax[2].group};
  // K^T, V^T and lane coordinates of the tile's keys (padded lanes: zero rows, never in a window)
  std::fill(sc.kt, sc.kt + D * Np, A(0));
  std::fill(sc.vt, sc.vt + D * Np, A(0));
  for (int64_t j = 0; j < Np; ++j) {
    if (j >= n) {
      for (int a = 0; a < 3; ++a) sc.coord[a][j] = IntOf<A>(1) << 30;
      sc.rpb_key[j] = 0;
      continue;
    }
    int64_t k_ig[3], x[3];
    tile_position(it, j, k_ig);
    axis_position(p, k_ig, group, x);
    for (int a = 0; a < 3; ++a) sc.coord[a][j] = IntOf<A>(k_ig[a] - it.ax[a].start);
    sc.rpb_key[j] = k_ig[0] * rs[0] + k_ig[1] * rs[1] + k_ig[2] * rs[2];
    load_row(sc.row, na_ptr<const T>(p.k, it.b, x, it.kvh), D);
    for (int64_t d = 0; d < D; ++d) sc.kt[d * Np + j] = sc.row[d];
    load_row(sc.row, na_ptr<const T>(p.v, it.b, x, it.kvh), D);
    for (int64_t d = 0; d < D; ++d) sc.vt[d * Np + j] = sc.row[d];
  }
  std::fill(sc.dk, sc.dk + Np * Dp, A(0));
  std::fill(sc.dv, sc.dv + Np * Dp, A(0));
  const Box box = key_tile_box(p, it);
  const A c2 = A(p.scale * kLog2e);
  const A* lse = static_cast<const A*>(p.lse);
  const A* delta = static_cast<const A*>(p.delta);
  const int64_t positions = box.size(), QB = plan.key_block;
  for (int64_t q0 = 0; q0 < positions; q0 += QB) {
    const int64_t mq = std::min(QB, positions - q0), M = mq * g;
    int64_t cc[3];
    box_coords(box, q0, cc);
    for (int64_t t = 0; t < mq; ++t, box_next(box, cc)) {
      int64_t q_ig[3], x[3], lo[3], hi[3];
      for (int a = 0; a < 3; ++a) {
        q_ig[a] = box.first[a] + cc[a];
        const na::Range w = na::window_in_group(p.axis[a], q_ig[a], it.ax[a].len);
        lo[a] = w.start - it.ax[a].start;
        hi[a] = w.end - it.ax[a].start;
      }
      axis_position(p, q_ig, group, x);
      for (int64_t hh = 0; hh < g; ++hh) {
        const int64_t r = t * g + hh, h = h0 + hh;
        A* qrow = sc.qr + r * Dp;
        A* dorow = sc.dor + r * Dp;
        const T* q_src = na_ptr<const T>(p.q, it.b, x, h);
        const T* do_src = na_ptr<const T>(p.grad_out, it.b, x, h);
        // the next task is the next KV head of this key tile: its query rows are g heads on
        for (int64_t b = 0; b < D * int64_t(sizeof(T)); b += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(q_src + g * p.q.head_stride) + b, 0, 2);
          __builtin_prefetch(reinterpret_cast<const char*>(do_src + g * p.grad_out.head_stride) + b, 0, 2);
        }
        load_row(qrow, q_src, D);
        load_row(dorow, do_src, D);
        for (int64_t d = D; d < Dp; ++d) qrow[d] = dorow[d] = A(0);
        const int64_t idx = na_row_index(p, it.b, x, h);
        const A ls = lse[idx];
        sc.lse2[r] = ls == -std::numeric_limits<A>::infinity() ? std::numeric_limits<A>::infinity() : ls * A(kLog2e);
        sc.delta[r] = delta[idx];
        int64_t off = h * hs;
        for (int a = 0; a < 3; ++a) {
          sc.lo[a][r] = lo[a];
          sc.hi[a][r] = hi[a];
          off += (p.axis[a].kernel - 1 - q_ig[a]) * rs[a];
        }
        sc.rpb_row[r] = off;
      }
    }
    Kit::gemm(Gemm<A>{sc.s, Np, sc.qr, Dp, 1, sc.kt, Np, M, nvk, D, GemmInit::Zero, nullptr});
    Kit::gemm(Gemm<A>{sc.dp, Np, sc.dor, Dp, 1, sc.vt, Np, M, nvk, D, GemmInit::Zero, nullptr});
    for (int64_t r = 0; r < M; ++r) {
      const vec bias = vec{} + sc.lse2[r], dl = vec{} + sc.delta[r];
      const bool inside = sc.lo[0][r] <= 0 && sc.lo[1][r] <= 0 && sc.lo[2][r] <= 0 &&
                          sc.hi[0][r] >= it.ax[0].count && sc.hi[1][r] >= it.ax[1].count &&
                          sc.hi[2][r] >= it.ax[2].count;
      const ivec lo0 = ivec{} + IntOf<A>(sc.lo[0][r]), hi0 = ivec{} + IntOf<A>(sc.hi[0][r]);
      const ivec lo1 = ivec{} + IntOf<A>(sc.lo[1][r]), hi1 = ivec{} + IntOf<A>(sc.hi[1][r]);
      const ivec lo2 = ivec{} + IntOf<A>(sc.lo[2][r]), hi2 = ivec{} + IntOf<A>(sc.hi[2][r]);
      for (int64_t v = 0; v < nvk; ++v) {
        const int64_t o = v * kVecLanes;
        vec& sv = vec_at(sc.s + r * Np + o);
        vec& dv = vec_at(sc.dp + r * Np + o);
        const ivec k0c = ivec_at<A>(sc.coord[0] + o), k1c = ivec_at<A>(sc.coord[1] + o);
        const ivec k2c = ivec_at<A>(sc.coord[2] + o);
        const ivec mk = (k0c >= lo0) & (k0c < hi0) & (k1c >= lo1) & (k1c < hi1) & (k2c >= lo2) & (k2c < hi2);
        vec pv = sv * c2 - bias;
        if (rpb != nullptr)
          for (int l = 0; l < kVecLanes; ++l)
            if (mk[l]) pv[l] += rpb[sc.rpb_row[r] + sc.rpb_key[o + l]] * A(kLog2e);
        exp2_vec(pv);
        if (!inside) pv = mk ? pv : vec{};
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
    int64_t k_ig[3], x[3];
    tile_position(it, j, k_ig);
    axis_position(p, k_ig, group, x);
    T* gk = na_ptr<T>(p.grad_k, it.b, x, it.kvh);
    T* gv = na_ptr<T>(p.grad_v, it.b, x, it.kvh);
    for (int64_t d = 0; d < D; ++d) {
      gk[d] = from_acc<T>(sc.dk[j * Dp + d] * scale);
      gv[d] = from_acc<T>(sc.dv[j * Dp + d]);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// task loops (the launcher's per-ISA entries)
// ----------------------------------------------------------------------------------------------

// Tasks from the queue when one is given (dynamic: each claim is plan.claim consecutive tasks),
// else [begin, end) (static: grad_rpb ranges).
template <typename T, class Kit>
FUSEKIT_INLINE void forward_tasks(const NaParams& p, const NaPlan& plan, TaskQueue* queue, int64_t begin, int64_t end,
                                  void* scratch, void*) {
  if (queue != nullptr)
    for (int64_t chunk; queue->claim(chunk);)
      for (int64_t task = chunk * plan.claim, last = std::min(task + plan.claim, plan.tasks); task < last; ++task)
        forward_task<T, Kit>(p, plan, task, scratch);
  else
    for (int64_t task = begin; task < end; ++task) forward_task<T, Kit>(p, plan, task, scratch);
}

template <typename T, class Kit>
FUSEKIT_INLINE void backward_q_tasks(const NaParams& p, const NaPlan& plan, TaskQueue* queue, int64_t begin,
                                     int64_t end, void* scratch, void* grad_rpb_buf) {
  using A = typename AccOf<T>::type;
  A* buf = static_cast<A*>(grad_rpb_buf);
  if (queue != nullptr)
    for (int64_t chunk; queue->claim(chunk);)
      for (int64_t task = chunk * plan.claim, last = std::min(task + plan.claim, plan.tasks); task < last; ++task)
        backward_q_task<T, Kit>(p, plan, task, scratch, buf);
  else
    for (int64_t task = begin; task < end; ++task) backward_q_task<T, Kit>(p, plan, task, scratch, buf);
}

template <typename T, class Kit>
FUSEKIT_INLINE void backward_kv_tasks(const NaParams& p, const NaPlan& plan, TaskQueue* queue, int64_t begin,
                                      int64_t end, void* scratch, void*) {
  if (queue != nullptr)
    for (int64_t chunk; queue->claim(chunk);)
      for (int64_t task = chunk * plan.claim, last = std::min(task + plan.claim, plan.tasks); task < last; ++task)
        backward_kv_task<T, Kit>(p, plan, task, scratch);
  else
    for (int64_t task = begin; task < end; ++task) backward_kv_task<T, Kit>(p, plan, task, scratch);
}

// delta = rowsum(dO * O) for flattened positions [begin, end) of [B][L0][L1][L2], every query head.
template <typename T>
inline void backward_delta_rows(const NaParams& p, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  A* delta = static_cast<A*>(p.delta);
  const int64_t L1 = p.axis[1].length, L2 = p.axis[2].length, per_batch = p.axis[0].length * L1 * L2;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / per_batch, rest = row % per_batch;
    const int64_t x[3] = {rest / (L1 * L2), rest / L2 % L1, rest % L2};
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const T* go = na_ptr<const T>(p.grad_out, b, x, h);
      const T* o = na_ptr<const T>(p.out, b, x, h);
      A acc = 0;
      for (int64_t d = 0; d < p.head_dim; ++d) acc += to_acc(go[d]) * to_acc(o[d]);
      delta[row * p.q_heads + h] = acc;
    }
  }
}

}  // namespace cpu
}  // namespace fusekit
