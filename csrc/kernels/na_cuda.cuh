// Device code of the fused CUDA neighborhood attention (torch-free): forward, and the backward
// as delta = rowsum(dO * O), a dQ (+ grad_rpb) pass and a dK / dV pass.
//
// Tiling. Queries are tiled in dilation-group coordinates: a tile is a box of T_0 x T_1 x T_2
// in-group indices of one group (g_0, g_1, g_2), so the tile's queries are a dense sub-lattice
// and, because window starts and ends never decrease with the query index (na_window.h), their
// neighbourhoods lie in one dense key box per axis: [window(first).start, window(last).end)
// of the same group. A block owns (batch, query head, tile); it walks the key box in chunks of
// 32 keys (linearized row-major), stages each chunk in shared memory (fp32) and masks each
// (query, key) pair by the query's own per-axis window, so the work per block is
// M x box instead of M x L. The tile shape is chosen on the host (na_tile_shape) to keep the
// box small: the longest axes are split first.
// The dK / dV pass is the mirror image: a block owns (batch, KV head, key tile) and walks the
// inverse box (the queries that may see some key of the tile, from key_inverse_window) for each
// of the g query heads of its KV head, so dK / dV are accumulated in registers and written once
// (no atomics, no expanded K / V). grad_rpb needs a scatter over (query, key) pairs: the dQ pass
// accumulates it in a shared-memory table per block (fp32 shared atomics) and adds the table to
// an fp32 workspace with one global atomic per entry (straight global atomics when the table
// does not fit).
//
// Compute: CUDA cores in fp32 for every dtype (fp16 / bf16 are converted when staged). A warp
// owns RW rows of the tile. Dot products over D put one key (query, in the dK / dV pass) per
// lane and read the row operands as broadcast float4s; the K / Q chunks use a pitch of DP + 4
// floats, so the lanes' float4 reads hit distinct banks. Products with P / dS put one column
// (lane + 32 c) per lane, so the accumulators are RW x DP / 32 registers per lane. Softmax in the
// log2 domain with the online rescaling of flash attention; lse is stored as a natural log.
// Head dim buckets DP = 32, 64, 128, 256 (D zero-padded; dot products stop at ceil(D / 4) * 4).
// The fp16 / bf16 forward with D <= 128 runs on tensor cores instead (na_forward_block_mma below);
// the backward always runs on CUDA cores.
//
// Every function takes the block and thread index as arguments and synchronizes through the
// device layer of mqa_decode_cuda.cuh, so the MQA host emulator (FUSEKIT_MQA_EMULATE) can run
// the same code thread by thread. Loops that contain barriers or shuffles have block-uniform
// trip counts.
#pragma once

#include <cstdint>

#include "mqa_decode_cuda.cuh"  // device layer (barriers, shuffles, exp2), Elem<T>, Chunk16, small helpers
#include "na_window.h"
#include "na_cuda_params.h"

#if defined(__CUDACC__)
#define FUSEKIT_NA_HD __host__ __device__ __forceinline__
#define FUSEKIT_NA_DEV __device__ __forceinline__
#else
#define FUSEKIT_NA_HD inline
#define FUSEKIT_NA_DEV inline
#endif

namespace fusekit::na {

using mqa::Chunk16;
using mqa::Elem;
using mqa::exp2_fast;
using mqa::kLn2;
using mqa::kLog2e;
using mqa::kNegInf;
using mqa::shfl_xor;
using mqa::sync_block;
using mqa::sync_warp;

constexpr int kChunk = 32;              // keys (queries, in the dK / dV pass) per shared-memory chunk
constexpr int kRpbSmemMaxFloats = 4096;  // largest grad_rpb table accumulated in shared memory
constexpr int kDeltaWarps = 8;

// ---------------------------------------------------------------------------------------------
// Kernel arguments (filled on the host from NaCudaParams; sizes checked to fit int32)
// ---------------------------------------------------------------------------------------------

struct NaArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* rpb = nullptr;  // [Hq, E_0, E_1, E_2] contiguous, E_a = 2 k_a - 1; null: no bias
  void* out = nullptr;        // forward output
  float* lse = nullptr;       // forward lse; backward: the given lse (read only)
  const void* grad_out = nullptr;
  const void* out_in = nullptr;  // backward: the given output
  float* delta = nullptr;        // backward workspace, lse's layout
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  float* grad_rpb = nullptr;  // fp32 workspace [Hq, E_0, E_1, E_2], zeroed by the launcher
  int B = 0, Hq = 0, Hkv = 0, g = 1, D = 0;
  Axis axis[3];
  int X[3] = {1, 1, 1};  // axis lengths
  // element strides (batch, x_0, x_1, x_2, head); lse / delta are contiguous [B, X_0, X_1, X_2, Hq]
  int64_t q_stride[5] = {}, k_stride[5] = {}, v_stride[5] = {}, out_stride[5] = {}, do_stride[5] = {},
          oin_stride[5] = {}, dq_stride[5] = {}, dk_stride[5] = {}, dv_stride[5] = {};
  // 16-byte chunk loads possible (16-byte aligned base, D and every stride multiples of 16 bytes)
  int vec_q = 0, vec_k = 0, vec_v = 0, vec_do = 0;
  float scale = 1.f, scale_log2 = kLog2e;
  int rpb_ext[3] = {1, 1, 1};
  int rpb_size = 0;   // E_0 E_1 E_2 (0 without bias)
  int rpb_smem = 0;   // the dQ pass accumulates grad_rpb in shared memory
  int tile[3] = {1, 1, 1}, tiles[3] = {1, 1, 1};    // query tiles (forward, dQ)
  int ktile[3] = {1, 1, 1}, ktiles[3] = {1, 1, 1};  // key tiles (dK / dV)
};

FUSEKIT_NA_HD int64_t tensor_offset(const int64_t* s, int b, const int* x, int h) {
  return b * s[0] + x[0] * s[1] + x[1] * s[2] + x[2] * s[3] + h * s[4];
}

FUSEKIT_NA_HD int64_t lse_index(const NaArgs& a, int b, const int* x, int h) {
  return (((static_cast<int64_t>(b) * a.X[0] + x[0]) * a.X[1] + x[1]) * a.X[2] + x[2]) * a.Hq + h;
}

// Blocks per (batch, head): the tiles of every axis (d_a groups x tiles per group).
FUSEKIT_NA_HD int64_t tiles_per_head(const int* tiles) {
  return static_cast<int64_t>(tiles[0]) * tiles[1] * tiles[2];
}

// Tile number `t` (row-major over axes) of a (tile shape, tiles per axis) pair: per axis the
// group, the first in-group index, the group length and the number of in-range indices.
struct TileAxes {
  int group[3], origin[3], glen[3], count[3];
  bool empty;
};

FUSEKIT_NA_HD TileAxes tile_axes(const NaArgs& a, int64_t t, const int* tile, const int* tiles) {
  TileAxes ta;
  ta.empty = false;
  int idx[3];
  idx[2] = static_cast<int>(t % tiles[2]);
  t /= tiles[2];
  idx[1] = static_cast<int>(t % tiles[1]);
  idx[0] = static_cast<int>(t / tiles[1]);
  for (int ax = 0; ax < 3; ++ax) {
    const int d = static_cast<int>(a.axis[ax].dilation);
    ta.group[ax] = idx[ax] % d;
    ta.origin[ax] = idx[ax] / d * tile[ax];
    ta.glen[ax] = static_cast<int>(group_length(a.axis[ax], ta.group[ax]));
    const int c = ta.glen[ax] - ta.origin[ax];
    ta.count[ax] = c < tile[ax] ? c : tile[ax];
    if (ta.count[ax] <= 0) ta.empty = true;
  }
  return ta;
}

// Per-row data of a tile member (row-major over the tile shape), in shared memory: the
// in-group index on each axis, and for query rows the window [start, end) in group indices.
struct RowInfo {
  int ig[3];
  int ws[3], we[3];
};

FUSEKIT_NA_HD void row_multi_index(int r, const int* tile, int* ri) {
  ri[2] = r % tile[2];
  r /= tile[2];
  ri[1] = r % tile[1];
  ri[0] = r / tile[1];
}

// Fills info / offsets of the tile's query rows (row r valid iff in range on every axis;
// invalid rows get an empty window and offset -1). One thread per row.
FUSEKIT_NA_HD bool query_row_info(const NaArgs& a, const TileAxes& ta, const int* tile, int r, RowInfo& info,
                                  int* x) {
  int ri[3];
  row_multi_index(r, tile, ri);
  bool valid = true;
  for (int ax = 0; ax < 3; ++ax) {
    const int ig = ta.origin[ax] + ri[ax];
    info.ig[ax] = ig;
    if (ri[ax] >= ta.count[ax]) valid = false;
    x[ax] = ig * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
  }
  for (int ax = 0; ax < 3; ++ax) {
    if (valid) {
      const Range w = window_in_group(a.axis[ax], info.ig[ax], ta.glen[ax]);
      info.ws[ax] = static_cast<int>(w.start);
      info.we[ax] = static_cast<int>(w.end);
    } else {
      info.ws[ax] = 0;
      info.we[ax] = 0;
    }
  }
  return valid;
}

// Dense box (in group indices, per axis [start, start + len)) of the keys the tile's queries see.
FUSEKIT_NA_HD void query_tile_key_box(const NaArgs& a, const TileAxes& ta, int* start, int* len) {
  for (int ax = 0; ax < 3; ++ax) {
    const Range f = window_in_group(a.axis[ax], ta.origin[ax], ta.glen[ax]);
    const Range l = window_in_group(a.axis[ax], ta.origin[ax] + ta.count[ax] - 1, ta.glen[ax]);
    start[ax] = static_cast<int>(f.start);
    len[ax] = static_cast<int>(l.end - f.start);
  }
}

// Dense box of the queries that may see a key of the key tile (superset of the union of the
// inverse windows: the first query seeing the first key up to the last query whose window
// starts at or before the last key; both bounds are monotone in the key).
FUSEKIT_NA_HD void key_tile_query_box(const NaArgs& a, const TileAxes& ta, int* start, int* len) {
  for (int ax = 0; ax < 3; ++ax) {
    const Axis& x = a.axis[ax];
    const int64_t d = x.dilation, g = ta.group[ax];
    const Window f = key_inverse_window(x, ta.origin[ax] * d + g);
    const Window l = key_inverse_window(x, (ta.origin[ax] + ta.count[ax] - 1) * d + g);
    start[ax] = static_cast<int>(f.first / d);
    const int end = static_cast<int>(l.first / d + l.count);
    len[ax] = end > start[ax] ? end - start[ax] : 0;
  }
}

// Relative-positional-bias offset of (query in-group ig, key in-group jg) inside one head's table.
FUSEKIT_NA_HD int rpb_offset(const NaArgs& a, const int* ig, const int* jg) {
  int o = 0;
  for (int ax = 0; ax < 3; ++ax) o = o * a.rpb_ext[ax] + (jg[ax] - ig[ax] + static_cast<int>(a.axis[ax].kernel) - 1);
  return o;
}

template <typename T>
FUSEKIT_NA_HD float rpb_value(const NaArgs& a, int h, int off) {
  return Elem<T>::to_float(static_cast<const T*>(a.rpb)[static_cast<int64_t>(h) * a.rpb_size + off]);
}

FUSEKIT_NA_DEV void atomic_add_f32(float* p, float v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;  // the host emulator runs one thread at a time and never switches inside this call
#endif
}

FUSEKIT_NA_DEV float warp_max(float v) {
FUSEKIT_MQA_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, shfl_xor(v, o));
  return v;
}

FUSEKIT_NA_DEV float warp_sum(float v) {
FUSEKIT_MQA_UNROLL
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Block configurations and shared memory
// ---------------------------------------------------------------------------------------------

// RW rows per warp keep the accumulators at 32 floats per lane (RW * DP / 32).
template <int DP>
struct NaConfig {
  static_assert(DP == 32 || DP == 64 || DP == 128 || DP == 256, "head-dim bucket");
  static constexpr int kWarps = DP >= 128 ? 8 : 4, kThreads = 32 * kWarps;
  static constexpr int kRowsPerWarp = DP <= 64 ? 16 : (DP == 128 ? 8 : 4);
  static constexpr int kRows = kWarps * kRowsPerWarp;  // tile members per block: 64 (DP <= 128) or 32
  static constexpr int kCols = DP / 32;                // accumulator columns per lane
  static constexpr int kPitch = DP + 4;                // chunk rows read one-row-per-lane
};

// Shared-memory carving with 16-byte alignment.
struct SmemCarver {
  unsigned char* base;
  size_t off = 0;
  template <typename U>
  FUSEKIT_NA_HD U* take(size_t count) {
    U* p = reinterpret_cast<U*>(base + off);
    off += (count * sizeof(U) + 15) / 16 * 16;
    return p;
  }
};

template <int DP>
struct NaSmem {
  using C = NaConfig<DP>;
  // forward: Q tile [M][DP], K chunk [32][DP+4], V chunk [32][DP], P [M][32], rows, keys
  FUSEKIT_NA_HD static constexpr size_t common_bytes() {
    return (static_cast<size_t>(C::kRows) * sizeof(RowInfo) + 15) / 16 * 16 +
           (static_cast<size_t>(C::kRows) * 8 + 15) / 16 * 16 +  // tile row offsets (int64)
           (static_cast<size_t>(kChunk) * sizeof(RowInfo) + 15) / 16 * 16 +
           2 * ((static_cast<size_t>(kChunk) * 8 + 15) / 16 * 16) +  // chunk row offsets
           3 * ((static_cast<size_t>(kChunk) * 4 + 15) / 16 * 16);  // chunk lse / delta / valid
  }
  FUSEKIT_NA_HD static constexpr size_t forward_bytes() {
    return 4 * (static_cast<size_t>(C::kRows) * DP + kChunk * C::kPitch + kChunk * DP + C::kRows * kChunk) +
           common_bytes();
  }
  // dQ: Q, dO tiles [M][DP], K, V chunks [32][DP+4], dS [M][32], optional grad_rpb table
  FUSEKIT_NA_HD static constexpr size_t dq_bytes(int rpb_table_floats) {
    return 4 * (2 * static_cast<size_t>(C::kRows) * DP + 2 * kChunk * C::kPitch + C::kRows * kChunk) +
           (static_cast<size_t>(rpb_table_floats) * 4 + 15) / 16 * 16 + common_bytes();
  }
  // dK / dV: K, V tiles [M][DP], Q, dO chunks [32][DP+4], P, dS [M][32]
  FUSEKIT_NA_HD static constexpr size_t dkv_bytes() {
    return 4 * (2 * static_cast<size_t>(C::kRows) * DP + 2 * kChunk * C::kPitch + 2 * C::kRows * kChunk) +
           common_bytes();
  }
};

// Shared-memory bookkeeping shared by the three block functions.
struct NaBookkeeping {
  RowInfo* rows;      // [M]
  int64_t* row_off;   // [M] element offset of the tile member's row (-1: invalid)
  RowInfo* crow;      // [32] chunk members
  int64_t* coff0;     // [32] chunk member offsets in the first / second staged tensor (-1: none)
  int64_t* coff1;
  float* clse;        // [32] chunk queries' lse (log2 domain)
  float* cdelta;      // [32]
  int* cvalid;        // [32]
};

template <int DP>
FUSEKIT_NA_HD NaBookkeeping carve_bookkeeping(SmemCarver& sc) {
  NaBookkeeping bk;
  bk.rows = sc.take<RowInfo>(NaConfig<DP>::kRows);
  bk.row_off = sc.take<int64_t>(NaConfig<DP>::kRows);
  bk.crow = sc.take<RowInfo>(kChunk);
  bk.coff0 = sc.take<int64_t>(kChunk);
  bk.coff1 = sc.take<int64_t>(kChunk);
  bk.clse = sc.take<float>(kChunk);
  bk.cdelta = sc.take<float>(kChunk);
  bk.cvalid = sc.take<int>(kChunk);
  return bk;
}

// Stages rows [0, nrows) of a tile into dst (fp32, `pitch` floats per row, zero-filled to DP
// columns): row r is base + off[r] (off < 0: zeros). 16-byte chunk loads when `vec`.
template <typename T, int DP>
FUSEKIT_NA_DEV void stage_rows(const T* base, const int64_t* off, int nrows, int D, bool vec, float* dst, int pitch,
                               int tid, int nthreads) {
  constexpr int E = 16 / static_cast<int>(sizeof(T));
  constexpr int CH = DP / E;
  for (int it = tid; it < nrows * CH; it += nthreads) {
    const int r = it / CH, d0 = (it % CH) * E;
    const int64_t o = off[r];
    float f[E];
    if (o < 0 || d0 >= D) {
FUSEKIT_MQA_UNROLL
      for (int e = 0; e < E; ++e) f[e] = 0.f;
    } else if (vec) {
      const Chunk16 raw = *reinterpret_cast<const Chunk16*>(base + o + d0);
      T el[E];
      memcpy(el, &raw, 16);
FUSEKIT_MQA_UNROLL
      for (int e = 0; e < E; ++e) f[e] = Elem<T>::to_float(el[e]);
    } else {
FUSEKIT_MQA_UNROLL
      for (int e = 0; e < E; ++e) f[e] = d0 + e < D ? Elem<T>::to_float(base[o + d0 + e]) : 0.f;
    }
    float* out = dst + r * pitch + d0;
FUSEKIT_MQA_UNROLL
    for (int e = 0; e < E; e += 4) *reinterpret_cast<float4*>(out + e) = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
  }
}

FUSEKIT_NA_HD bool in_window(const RowInfo& q, const int* jg) {
  return jg[0] >= q.ws[0] && jg[0] < q.we[0] && jg[1] >= q.ws[1] && jg[1] < q.we[1] && jg[2] >= q.ws[2] &&
         jg[2] < q.we[2];
}

// Member c of a dense box (row-major over len) -> in-group indices; false past the box.
FUSEKIT_NA_HD bool box_member(int c, int total, const int* start, const int* len, int* ig) {
  if (c >= total) return false;
  ig[2] = start[2] + c % len[2];
  c /= len[2];
  ig[1] = start[1] + c % len[1];
  ig[0] = start[0] + c / len[1];
  return true;
}

// Writes one row (lane owns columns lane + 32 c) of a D-wide output in T, scaled by mul.
template <typename T, int NC>
FUSEKIT_NA_DEV void store_row(T* dst, const float (&acc)[NC], float mul, int D, int lane) {
FUSEKIT_MQA_UNROLL
  for (int c = 0; c < NC; ++c) {
    const int d = lane + 32 * c;
    if (d < D) dst[d] = Elem<T>::from_float(acc[c] * mul);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: one block per (query tile, query head, batch); block index = (b * tiles + t) * Hq + h
// (heads fastest: neighbouring blocks read the same key box).
// ---------------------------------------------------------------------------------------------

template <typename T, int DP>
FUSEKIT_NA_DEV void na_forward_block(const NaArgs& a, int64_t blk, int tid, unsigned char* smem) {
  using C = NaConfig<DP>;
  constexpr int M = C::kRows, RW = C::kRowsPerWarp, NC = C::kCols, KP = C::kPitch, NT = C::kThreads;
  const int h = static_cast<int>(blk % a.Hq);
  const int64_t bt = blk / a.Hq;
  const int64_t ntiles = tiles_per_head(a.tiles);
  const int b = static_cast<int>(bt / ntiles);
  const TileAxes ta = tile_axes(a, bt % ntiles, a.tile, a.tiles);
  if (ta.empty) return;  // block-uniform: this group is shorter than the tile origin
  const int kvh = h / a.g;

  SmemCarver sc{smem};
  float* q_sm = sc.take<float>(static_cast<size_t>(M) * DP);
  float* k_sm = sc.take<float>(static_cast<size_t>(kChunk) * KP);
  float* v_sm = sc.take<float>(static_cast<size_t>(kChunk) * DP);
  float* p_sm = sc.take<float>(static_cast<size_t>(M) * kChunk);
  const NaBookkeeping bk = carve_bookkeeping<DP>(sc);

  if (tid < M) {
    RowInfo info;
    int x[3];
    const bool valid = query_row_info(a, ta, a.tile, tid, info, x);
    bk.rows[tid] = info;
    bk.row_off[tid] = valid ? tensor_offset(a.q_stride, b, x, h) : -1;
  }
  int bstart[3], blen[3];
  query_tile_key_box(a, ta, bstart, blen);
  const int box = blen[0] * blen[1] * blen[2];
  sync_block();
  stage_rows<T, DP>(static_cast<const T*>(a.q), bk.row_off, M, a.D, a.vec_q, q_sm, DP, tid, NT);

  const int warp = tid / 32, lane = tid % 32;
  const int row0 = warp * RW;
  float m[RW], l[RW], o[RW][NC];
FUSEKIT_MQA_UNROLL
  for (int r = 0; r < RW; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
FUSEKIT_MQA_UNROLL
    for (int c = 0; c < NC; ++c) o[r][c] = 0.f;
  }
  const int nd4 = (a.D + 3) / 4;
  const bool bias = a.rpb != nullptr;

  for (int c0 = 0; c0 < box; c0 += kChunk) {
    sync_block();  // the previous chunk is consumed
    if (tid < kChunk) {
      int jg[3];
      RowInfo ki{};
      const bool in = box_member(c0 + tid, box, bstart, blen, jg);
      int x[3];
      for (int ax = 0; ax < 3; ++ax) {
        ki.ig[ax] = in ? jg[ax] : -1;  // -1 fails every window test
        x[ax] = jg[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
      }
      bk.crow[tid] = ki;
      bk.coff0[tid] = in ? tensor_offset(a.k_stride, b, x, kvh) : -1;
      bk.coff1[tid] = in ? tensor_offset(a.v_stride, b, x, kvh) : -1;
    }
    sync_block();
    stage_rows<T, DP>(static_cast<const T*>(a.k), bk.coff0, kChunk, a.D, a.vec_k, k_sm, KP, tid, NT);
    stage_rows<T, DP>(static_cast<const T*>(a.v), bk.coff1, kChunk, a.D, a.vec_v, v_sm, DP, tid, NT);
    sync_block();

    // S = Q K^T: lane = key
    float s[RW];
FUSEKIT_MQA_UNROLL
    for (int r = 0; r < RW; ++r) s[r] = 0.f;
    const float* krow = k_sm + lane * KP;
    for (int c = 0; c < nd4; ++c) {
      const float4 kv = *reinterpret_cast<const float4*>(krow + 4 * c);
FUSEKIT_MQA_UNROLL
      for (int r = 0; r < RW; ++r) {
        const float4 qv = *reinterpret_cast<const float4*>(q_sm + (row0 + r) * DP + 4 * c);
        s[r] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
      }
    }
    const RowInfo key = bk.crow[lane];
FUSEKIT_MQA_UNROLL
    for (int r = 0; r < RW; ++r) {
      const RowInfo& qi = bk.rows[row0 + r];
      float x = kNegInf;
      if (in_window(qi, key.ig)) {
        x = s[r] * a.scale_log2;
        if (bias) x += rpb_value<T>(a, h, rpb_offset(a, qi.ig, key.ig)) * kLog2e;
      }
      const float m_new = fmaxf(m[r], warp_max(x));
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = exp2_fast(m[r] - m_use);
      const float p = exp2_fast(x - m_use);
      m[r] = m_new;
      l[r] = l[r] * alpha + p;  // this lane's keys; summed over the warp at the end
FUSEKIT_MQA_UNROLL
      for (int c = 0; c < NC; ++c) o[r][c] *= alpha;
      p_sm[(row0 + r) * kChunk + lane] = p;
    }
    sync_warp();
    // O += P V: lane = column
    for (int j4 = 0; j4 < kChunk; j4 += 4) {
      float vv[4][NC];
FUSEKIT_MQA_UNROLL
      for (int kq = 0; kq < 4; ++kq)
FUSEKIT_MQA_UNROLL
        for (int c = 0; c < NC; ++c) vv[kq][c] = v_sm[(j4 + kq) * DP + lane + 32 * c];
FUSEKIT_MQA_UNROLL
      for (int r = 0; r < RW; ++r) {
        const float4 p4 = *reinterpret_cast<const float4*>(p_sm + (row0 + r) * kChunk + j4);
FUSEKIT_MQA_UNROLL
        for (int c = 0; c < NC; ++c)
          o[r][c] += p4.x * vv[0][c] + p4.y * vv[1][c] + p4.z * vv[2][c] + p4.w * vv[3][c];
      }
    }
  }

FUSEKIT_MQA_UNROLL
  for (int r = 0; r < RW; ++r) {
    const float lsum = warp_sum(l[r]);
    const int row = row0 + r;
    if (bk.row_off[row] < 0) continue;
    int x[3];
    for (int ax = 0; ax < 3; ++ax) x[ax] = bk.rows[row].ig[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    store_row<T, NC>(static_cast<T*>(a.out) + tensor_offset(a.out_stride, b, x, h), o[r], inv, a.D, lane);
    if (lane == 0) a.lse[lse_index(a, b, x, h)] = lsum > 0.f ? (m[r] + log2f(lsum)) * kLn2 : kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward on tensor cores (fp16 / bf16, D <= 128): mma.sync m16n8k16 with fp32 accumulation.
// 4 warps x 16 query rows (64 tile members); per 32-key chunk a warp computes S (16 x 32) from
// register-resident Q fragments and ldmatrix'd K, masks / rescales it in registers, and reuses
// the S accumulators as the A operand of P V (V through ldmatrix.trans). K / V chunks are
// double-buffered with cp.async (16-byte chunks; a scalar staging path when rows are not 16-byte
// multiples / aligned). Shared tiles use the MQA XOR swizzle (bank-conflict-free ldmatrix).
// ---------------------------------------------------------------------------------------------

template <int DP>
struct NaMmaConfig {
  static_assert(DP == 64 || DP == 128, "tensor-core head-dim bucket");
  static constexpr int kWarps = 4, kThreads = 32 * kWarps, kRows = 16 * kWarps;
  FUSEKIT_NA_HD static constexpr size_t smem_bytes() {
    return 2 * (static_cast<size_t>(kRows) * DP + 2 * 2 * kChunk * DP) +
           (static_cast<size_t>(kRows) * sizeof(RowInfo) + 15) / 16 * 16 + static_cast<size_t>(kRows) * 8 +
           (2 * static_cast<size_t>(kChunk) * sizeof(RowInfo) + 15) / 16 * 16;
  }
};

// Issues the loads of K / V chunk c0 .. c0 + 31 of the box into one stage (K [32][DP], V [32][DP],
// swizzled) and records the chunk's key indices in crow.
template <typename T, int DP>
FUSEKIT_NA_DEV void issue_kv_chunk_mma(const NaArgs& a, int b, int kvh, const TileAxes& ta, const int* bstart,
                                       const int* blen, int box, int c0, T* stage, RowInfo* crow, int tid) {
  constexpr int E = 8, CH = DP / E, NT = NaMmaConfig<DP>::kThreads;
  if (tid < kChunk) {
    RowInfo ki{};
    int jg[3];
    const bool in = box_member(c0 + tid, box, bstart, blen, jg);
    for (int ax = 0; ax < 3; ++ax) ki.ig[ax] = in ? jg[ax] : -1;
    crow[tid] = ki;
  }
  const T* kbase = static_cast<const T*>(a.k);
  const T* vbase = static_cast<const T*>(a.v);
  if (a.vec_k && a.vec_v) {
    for (int it = tid; it < 2 * kChunk * CH; it += NT) {
      const int tensor = it / (kChunk * CH), key = (it / CH) % kChunk, c = it % CH;
      int jg[3], x[3];
      const bool in = box_member(c0 + key, box, bstart, blen, jg) && c * E < a.D;
      const T* src = tensor == 0 ? kbase : vbase;
      if (in) {
        for (int ax = 0; ax < 3; ++ax) x[ax] = jg[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
        src += tensor_offset(tensor == 0 ? a.k_stride : a.v_stride, b, x, kvh) + c * E;
      }
      mqa::cp_async16(stage + tensor * kChunk * DP + mqa::tile_offset<T, DP>(key, c), src, in);
    }
  } else {
    for (int it = tid; it < 2 * kChunk * DP; it += NT) {
      const int tensor = it / (kChunk * DP), key = (it / DP) % kChunk, d = it % DP;
      int jg[3], x[3];
      T val = Elem<T>::from_float(0.f);
      if (d < a.D && box_member(c0 + key, box, bstart, blen, jg)) {
        for (int ax = 0; ax < 3; ++ax) x[ax] = jg[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
        val = (tensor == 0 ? kbase : vbase)[tensor_offset(tensor == 0 ? a.k_stride : a.v_stride, b, x, kvh) + d];
      }
      stage[tensor * kChunk * DP + mqa::tile_offset<T, DP>(key, d / E) + d % E] = val;
    }
  }
}

template <typename T, int DP>
FUSEKIT_NA_DEV void na_forward_block_mma(const NaArgs& a, int64_t blk, int tid, unsigned char* smem) {
  using C = NaMmaConfig<DP>;
  constexpr int M = C::kRows, NT = C::kThreads, E = 8, KS = DP / 16, NC = DP / 8;
  const int h = static_cast<int>(blk % a.Hq);
  const int64_t bt = blk / a.Hq;
  const int64_t ntiles = tiles_per_head(a.tiles);
  const int b = static_cast<int>(bt / ntiles);
  const TileAxes ta = tile_axes(a, bt % ntiles, a.tile, a.tiles);
  if (ta.empty) return;
  const int kvh = h / a.g;

  SmemCarver sc{smem};
  T* q_sm = sc.take<T>(static_cast<size_t>(M) * DP);
  T* stages = sc.take<T>(static_cast<size_t>(2) * 2 * kChunk * DP);
  RowInfo* rows = sc.take<RowInfo>(M);
  int64_t* row_off = sc.take<int64_t>(M);
  RowInfo* crow = sc.take<RowInfo>(2 * kChunk);

  if (tid < M) {
    RowInfo info;
    int x[3];
    const bool valid = query_row_info(a, ta, a.tile, tid, info, x);
    rows[tid] = info;
    row_off[tid] = valid ? tensor_offset(a.q_stride, b, x, h) : -1;
  }
  int bstart[3], blen[3];
  query_tile_key_box(a, ta, bstart, blen);
  const int box = blen[0] * blen[1] * blen[2];
  const int nchunks = (box + kChunk - 1) / kChunk;
  issue_kv_chunk_mma<T, DP>(a, b, kvh, ta, bstart, blen, box, 0, stages, crow, tid);
  mqa::cp_async_commit();
  sync_block();
  {  // Q tile (scalar: once per block)
    const T* qb = static_cast<const T*>(a.q);
    for (int it = tid; it < M * DP; it += NT) {
      const int r = it / DP, d = it % DP;
      const int64_t o = row_off[r];
      q_sm[mqa::tile_offset<T, DP>(r, d / E) + d % E] = o >= 0 && d < a.D ? qb[o + d] : Elem<T>::from_float(0.f);
    }
  }
  sync_block();

  const int warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int r0 = warp * 16;
  uint32_t qf[KS][4];
FUSEKIT_MQA_UNROLL
  for (int ks = 0; ks < KS; ++ks)
    mqa::ldmatrix_x4(qf[ks], q_sm + mqa::tile_offset<T, DP>(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));
  const RowInfo rinfo[2] = {rows[r0 + g], rows[r0 + g + 8]};
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  float o[NC][4];
FUSEKIT_MQA_UNROLL
  for (int n = 0; n < NC; ++n)
FUSEKIT_MQA_UNROLL
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  const bool bias = a.rpb != nullptr;

  for (int ci = 0; ci < nchunks; ++ci) {
    if (ci + 1 < nchunks)
      issue_kv_chunk_mma<T, DP>(a, b, kvh, ta, bstart, blen, box, (ci + 1) * kChunk,
                                stages + ((ci + 1) & 1) * 2 * kChunk * DP, crow + ((ci + 1) & 1) * kChunk, tid);
    mqa::cp_async_commit();
    mqa::cp_async_wait<1>();
    sync_block();
    const T* k_sm = stages + (ci & 1) * 2 * kChunk * DP;
    const T* v_sm = k_sm + kChunk * DP;
    const RowInfo* keys = crow + (ci & 1) * kChunk;

    float s[4][4];
FUSEKIT_MQA_UNROLL
    for (int n = 0; n < 4; ++n)
FUSEKIT_MQA_UNROLL
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
FUSEKIT_MQA_UNROLL
    for (int ks = 0; ks < KS; ++ks) {
      if (ks * 16 >= a.D) break;  // zero columns
FUSEKIT_MQA_UNROLL
      for (int np = 0; np < 2; ++np) {
        uint32_t kb[4];
        mqa::ldmatrix_x4(kb, k_sm + mqa::tile_offset<T, DP>(np * 16 + (lane & 7) + (lane >> 4) * 8,
                                                             2 * ks + ((lane >> 3) & 1)));
        mqa::mma_16816<T>(s[2 * np], qf[ks], kb[0], kb[1]);
        mqa::mma_16816<T>(s[2 * np + 1], qf[ks], kb[2], kb[3]);
      }
    }
    // mask, scale, online softmax; s becomes P
FUSEKIT_MQA_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      float mx = kNegInf;
FUSEKIT_MQA_UNROLL
      for (int n = 0; n < 4; ++n)
FUSEKIT_MQA_UNROLL
        for (int e = 0; e < 2; ++e) {
          const RowInfo& key = keys[n * 8 + 2 * t + e];
          float x = kNegInf;
          if (in_window(rinfo[hr], key.ig)) {
            x = s[n][2 * hr + e] * a.scale_log2;
            if (bias) x += rpb_value<T>(a, h, rpb_offset(a, rinfo[hr].ig, key.ig)) * kLog2e;
          }
          s[n][2 * hr + e] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      const float m_new = fmaxf(m[hr], mx);
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = exp2_fast(m[hr] - m_use);
      m[hr] = m_new;
      float sum = 0.f;
FUSEKIT_MQA_UNROLL
      for (int n = 0; n < 4; ++n)
FUSEKIT_MQA_UNROLL
        for (int e = 0; e < 2; ++e) {
          const float p = exp2_fast(s[n][2 * hr + e] - m_use);
          s[n][2 * hr + e] = p;
          sum += p;
        }
      l[hr] = l[hr] * alpha + sum;
FUSEKIT_MQA_UNROLL
      for (int n = 0; n < NC; ++n) {
        o[n][2 * hr] *= alpha;
        o[n][2 * hr + 1] *= alpha;
      }
    }
    // O += P V (the S accumulators of key n-tiles 2j, 2j + 1 are the A fragment of k-step j)
FUSEKIT_MQA_UNROLL
    for (int j = 0; j < 2; ++j) {
      const uint32_t pa[4] = {Elem<T>::pack2(s[2 * j][0], s[2 * j][1]), Elem<T>::pack2(s[2 * j][2], s[2 * j][3]),
                              Elem<T>::pack2(s[2 * j + 1][0], s[2 * j + 1][1]),
                              Elem<T>::pack2(s[2 * j + 1][2], s[2 * j + 1][3])};
FUSEKIT_MQA_UNROLL
      for (int nc = 0; nc < NC; nc += 2) {
        if (nc * 8 >= a.D) break;
        uint32_t vb[4];
        mqa::ldmatrix_x4_trans(vb, v_sm + mqa::tile_offset<T, DP>(16 * j + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                                  nc + (lane >> 4)));
        mqa::mma_16816<T>(o[nc], pa, vb[0], vb[1]);
        mqa::mma_16816<T>(o[nc + 1], pa, vb[2], vb[3]);
      }
    }
    sync_block();  // this stage is reloaded two chunks later
  }
  mqa::cp_async_wait<0>();

FUSEKIT_MQA_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    float lsum = l[hr];
    lsum += shfl_xor(lsum, 1);
    lsum += shfl_xor(lsum, 2);
    const int row = r0 + g + 8 * hr;
    if (row_off[row] < 0) continue;
    int x[3];
    for (int ax = 0; ax < 3; ++ax) x[ax] = rinfo[hr].ig[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    T* dst = static_cast<T*>(a.out) + tensor_offset(a.out_stride, b, x, h);
FUSEKIT_MQA_UNROLL
    for (int n = 0; n < NC; ++n)
FUSEKIT_MQA_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int d = n * 8 + 2 * t + e;
        if (d < a.D) dst[d] = Elem<T>::from_float(o[n][2 * hr + e] * inv);
      }
    if (t == 0) a.lse[lse_index(a, b, x, h)] = lsum > 0.f ? (m[hr] + log2f(lsum)) * kLn2 : kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// delta = rowsum(dO * O) for row `row` of [B, X_0, X_1, X_2, Hq] (one warp per row).
template <typename T>
FUSEKIT_NA_DEV void na_delta_row(const NaArgs& a, int64_t row, int lane) {
  int64_t rest = row;
  const int h = static_cast<int>(rest % a.Hq);
  rest /= a.Hq;
  int x[3];
  x[2] = static_cast<int>(rest % a.X[2]);
  rest /= a.X[2];
  x[1] = static_cast<int>(rest % a.X[1]);
  rest /= a.X[1];
  x[0] = static_cast<int>(rest % a.X[0]);
  const int b = static_cast<int>(rest / a.X[0]);
  const T* go = static_cast<const T*>(a.grad_out) + tensor_offset(a.do_stride, b, x, h);
  const T* o = static_cast<const T*>(a.out_in) + tensor_offset(a.oin_stride, b, x, h);
  float acc = 0.f;
  for (int d = lane; d < a.D; d += 32) acc += Elem<T>::to_float(go[d]) * Elem<T>::to_float(o[d]);
  acc = warp_sum(acc);
  if (lane == 0) a.delta[row] = acc;
}

// dQ (and grad_rpb): one block per (query tile, query head, batch), the forward's order.
template <typename T, int DP>
FUSEKIT_NA_DEV void na_dq_block(const NaArgs& a, int64_t blk, int tid, unsigned char* smem) {
  using C = NaConfig<DP>;
  constexpr int M = C::kRows, RW = C::kRowsPerWarp, NC = C::kCols, KP = C::kPitch, NT = C::kThreads;
  const int h = static_cast<int>(blk % a.Hq);
  const int64_t bt = blk / a.Hq;
  const int64_t ntiles = tiles_per_head(a.tiles);
  const int b = static_cast<int>(bt / ntiles);
  const TileAxes ta = tile_axes(a, bt % ntiles, a.tile, a.tiles);
  if (ta.empty) return;
  const int kvh = h / a.g;
  const bool bias = a.rpb != nullptr;
  const bool table = bias && a.rpb_smem;

  SmemCarver sc{smem};
  float* q_sm = sc.take<float>(static_cast<size_t>(M) * DP);
  float* do_sm = sc.take<float>(static_cast<size_t>(M) * DP);
  float* k_sm = sc.take<float>(static_cast<size_t>(kChunk) * KP);
  float* v_sm = sc.take<float>(static_cast<size_t>(kChunk) * KP);
  float* ds_sm = sc.take<float>(static_cast<size_t>(M) * kChunk);
  float* rpb_sm = sc.take<float>(table ? a.rpb_size : 0);
  const NaBookkeeping bk = carve_bookkeeping<DP>(sc);

  if (table)
    for (int i = tid; i < a.rpb_size; i += NT) rpb_sm[i] = 0.f;
  // tile rows: Q offsets in row_off, dO offsets in k_sm's space (read before the first chunk)
  int64_t* go_off = reinterpret_cast<int64_t*>(k_sm);
  if (tid < M) {
    RowInfo info;
    int x[3];
    const bool valid = query_row_info(a, ta, a.tile, tid, info, x);
    bk.rows[tid] = info;
    bk.row_off[tid] = valid ? tensor_offset(a.q_stride, b, x, h) : -1;
    go_off[tid] = valid ? tensor_offset(a.do_stride, b, x, h) : -1;
  }
  int bstart[3], blen[3];
  query_tile_key_box(a, ta, bstart, blen);
  const int box = blen[0] * blen[1] * blen[2];
  sync_block();
  stage_rows<T, DP>(static_cast<const T*>(a.q), bk.row_off, M, a.D, a.vec_q, q_sm, DP, tid, NT);
  stage_rows<T, DP>(static_cast<const T*>(a.grad_out), go_off, M, a.D, a.vec_do, do_sm, DP, tid, NT);

  const int warp = tid / 32, lane = tid % 32;
  const int row0 = warp * RW;
  float lse2[RW], delta[RW], dq[RW][NC];
FUSEKIT_MQA_UNROLL
  for (int r = 0; r < RW; ++r) {
    lse2[r] = 0.f;
    delta[r] = 0.f;
    if (bk.row_off[row0 + r] >= 0) {
      int x[3];
      for (int ax = 0; ax < 3; ++ax)
        x[ax] = bk.rows[row0 + r].ig[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
      const int64_t li = lse_index(a, b, x, h);
      lse2[r] = a.lse[li] * kLog2e;
      delta[r] = a.delta[li];
    }
FUSEKIT_MQA_UNROLL
    for (int c = 0; c < NC; ++c) dq[r][c] = 0.f;
  }
  const int nd4 = (a.D + 3) / 4;
  float* rpb_grad_h = a.grad_rpb + static_cast<int64_t>(h) * a.rpb_size;

  for (int c0 = 0; c0 < box; c0 += kChunk) {
    sync_block();  // previous chunk consumed (and, the first time, go_off read)
    if (tid < kChunk) {
      int jg[3];
      RowInfo ki{};
      const bool in = box_member(c0 + tid, box, bstart, blen, jg);
      int x[3];
      for (int ax = 0; ax < 3; ++ax) {
        ki.ig[ax] = in ? jg[ax] : -1;
        x[ax] = jg[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
      }
      bk.crow[tid] = ki;
      bk.coff0[tid] = in ? tensor_offset(a.k_stride, b, x, kvh) : -1;
      bk.coff1[tid] = in ? tensor_offset(a.v_stride, b, x, kvh) : -1;
    }
    sync_block();
    stage_rows<T, DP>(static_cast<const T*>(a.k), bk.coff0, kChunk, a.D, a.vec_k, k_sm, KP, tid, NT);
    stage_rows<T, DP>(static_cast<const T*>(a.v), bk.coff1, kChunk, a.D, a.vec_v, v_sm, KP, tid, NT);
    sync_block();

    float s[RW], dp[RW];
FUSEKIT_MQA_UNROLL
    for (int r = 0; r < RW; ++r) s[r] = dp[r] = 0.f;
    const float* krow = k_sm + lane * KP;
    const float* vrow = v_sm + lane * KP;
    for (int c = 0; c < nd4; ++c) {
      const float4 kv = *reinterpret_cast<const float4*>(krow + 4 * c);
      const float4 vv = *reinterpret_cast<const float4*>(vrow + 4 * c);
FUSEKIT_MQA_UNROLL
      for (int r = 0; r < RW; ++r) {
        const float4 qv = *reinterpret_cast<const float4*>(q_sm + (row0 + r) * DP + 4 * c);
        const float4 gv = *reinterpret_cast<const float4*>(do_sm + (row0 + r) * DP + 4 * c);
        s[r] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
        dp[r] += gv.x * vv.x + gv.y * vv.y + gv.z * vv.z + gv.w * vv.w;
      }
    }
    const RowInfo key = bk.crow[lane];
FUSEKIT_MQA_UNROLL
    for (int r = 0; r < RW; ++r) {
      const RowInfo& qi = bk.rows[row0 + r];
      float ds = 0.f;
      if (in_window(qi, key.ig)) {
        float x = s[r] * a.scale_log2;
        int off = 0;
        if (bias) {
          off = rpb_offset(a, qi.ig, key.ig);
          x += rpb_value<T>(a, h, off) * kLog2e;
        }
        const float p = exp2_fast(x - lse2[r]);
        ds = p * (dp[r] - delta[r]);
        if (bias) atomic_add_f32(table ? rpb_sm + off : rpb_grad_h + off, ds);
      }
      ds_sm[(row0 + r) * kChunk + lane] = ds * a.scale;
    }
    sync_warp();
    // dQ += dS K: lane = column
    for (int j4 = 0; j4 < kChunk; j4 += 4) {
      float kk[4][NC];
FUSEKIT_MQA_UNROLL
      for (int kq = 0; kq < 4; ++kq)
FUSEKIT_MQA_UNROLL
        for (int c = 0; c < NC; ++c) kk[kq][c] = k_sm[(j4 + kq) * KP + lane + 32 * c];
FUSEKIT_MQA_UNROLL
      for (int r = 0; r < RW; ++r) {
        const float4 d4 = *reinterpret_cast<const float4*>(ds_sm + (row0 + r) * kChunk + j4);
FUSEKIT_MQA_UNROLL
        for (int c = 0; c < NC; ++c)
          dq[r][c] += d4.x * kk[0][c] + d4.y * kk[1][c] + d4.z * kk[2][c] + d4.w * kk[3][c];
      }
    }
  }

FUSEKIT_MQA_UNROLL
  for (int r = 0; r < RW; ++r) {
    const int row = row0 + r;
    if (bk.row_off[row] < 0) continue;
    int x[3];
    for (int ax = 0; ax < 3; ++ax) x[ax] = bk.rows[row].ig[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
    store_row<T, NC>(static_cast<T*>(a.grad_q) + tensor_offset(a.dq_stride, b, x, h), dq[r], 1.f, a.D, lane);
  }
  if (table) {
    sync_block();
    for (int i = tid; i < a.rpb_size; i += NT)
      if (rpb_sm[i] != 0.f) atomic_add_f32(rpb_grad_h + i, rpb_sm[i]);
  }
}

// dK / dV: one block per (key tile, KV head, batch); block index = (b * ktiles + t) * Hkv + kvh.
template <typename T, int DP>
FUSEKIT_NA_DEV void na_dkv_block(const NaArgs& a, int64_t blk, int tid, unsigned char* smem) {
  using C = NaConfig<DP>;
  constexpr int M = C::kRows, RW = C::kRowsPerWarp, NC = C::kCols, KP = C::kPitch, NT = C::kThreads;
  const int kvh = static_cast<int>(blk % a.Hkv);
  const int64_t bt = blk / a.Hkv;
  const int64_t ntiles = tiles_per_head(a.ktiles);
  const int b = static_cast<int>(bt / ntiles);
  const TileAxes ta = tile_axes(a, bt % ntiles, a.ktile, a.ktiles);
  if (ta.empty) return;
  const bool bias = a.rpb != nullptr;

  SmemCarver sc{smem};
  float* k_sm = sc.take<float>(static_cast<size_t>(M) * DP);
  float* v_sm = sc.take<float>(static_cast<size_t>(M) * DP);
  float* q_sm = sc.take<float>(static_cast<size_t>(kChunk) * KP);
  float* do_sm = sc.take<float>(static_cast<size_t>(kChunk) * KP);
  float* p_sm = sc.take<float>(static_cast<size_t>(M) * kChunk);
  float* ds_sm = sc.take<float>(static_cast<size_t>(M) * kChunk);
  const NaBookkeeping bk = carve_bookkeeping<DP>(sc);
  int64_t* v_off = reinterpret_cast<int64_t*>(q_sm);  // [M], used before the first chunk

  if (tid < M) {
    int ri[3];
    row_multi_index(tid, a.ktile, ri);
    RowInfo info{};
    bool valid = true;
    int x[3];
    for (int ax = 0; ax < 3; ++ax) {
      info.ig[ax] = ta.origin[ax] + ri[ax];
      if (ri[ax] >= ta.count[ax]) valid = false;
      x[ax] = info.ig[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
    }
    bk.rows[tid] = info;
    bk.row_off[tid] = valid ? tensor_offset(a.k_stride, b, x, kvh) : -1;
    v_off[tid] = valid ? tensor_offset(a.v_stride, b, x, kvh) : -1;
  }
  int bstart[3], blen[3];
  key_tile_query_box(a, ta, bstart, blen);
  const int box = blen[0] * blen[1] * blen[2];
  const int nchunks = (box + kChunk - 1) / kChunk;
  sync_block();
  stage_rows<T, DP>(static_cast<const T*>(a.k), bk.row_off, M, a.D, a.vec_k, k_sm, DP, tid, NT);
  stage_rows<T, DP>(static_cast<const T*>(a.v), v_off, M, a.D, a.vec_v, v_sm, DP, tid, NT);

  const int warp = tid / 32, lane = tid % 32;
  const int row0 = warp * RW;
  float dk[RW][NC], dv[RW][NC];
FUSEKIT_MQA_UNROLL
  for (int r = 0; r < RW; ++r)
FUSEKIT_MQA_UNROLL
    for (int c = 0; c < NC; ++c) dk[r][c] = dv[r][c] = 0.f;
  const int nd4 = (a.D + 3) / 4;

  for (int hh = 0; hh < a.g; ++hh) {
    const int h = kvh * a.g + hh;
    for (int ci = 0; ci < nchunks; ++ci) {
      sync_block();  // previous chunk consumed (and, the first time, v_off read)
      if (tid < kChunk) {
        int ig[3];
        RowInfo qi{};
        const bool in = box_member(ci * kChunk + tid, box, bstart, blen, ig);
        int x[3];
        for (int ax = 0; ax < 3; ++ax) {
          qi.ig[ax] = in ? ig[ax] : 0;
          x[ax] = qi.ig[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
          if (in) {
            const Range w = window_in_group(a.axis[ax], ig[ax], ta.glen[ax]);
            qi.ws[ax] = static_cast<int>(w.start);
            qi.we[ax] = static_cast<int>(w.end);
          }  // else empty window (0, 0)
        }
        bk.crow[tid] = qi;
        bk.coff0[tid] = in ? tensor_offset(a.q_stride, b, x, h) : -1;
        bk.coff1[tid] = in ? tensor_offset(a.do_stride, b, x, h) : -1;
        const int64_t li = lse_index(a, b, x, h);
        bk.clse[tid] = in ? a.lse[li] * kLog2e : 0.f;
        bk.cdelta[tid] = in ? a.delta[li] : 0.f;
      }
      sync_block();
      stage_rows<T, DP>(static_cast<const T*>(a.q), bk.coff0, kChunk, a.D, a.vec_q, q_sm, KP, tid, NT);
      stage_rows<T, DP>(static_cast<const T*>(a.grad_out), bk.coff1, kChunk, a.D, a.vec_do, do_sm, KP, tid, NT);
      sync_block();

      // lane = query of the chunk
      float s[RW], dp[RW];
FUSEKIT_MQA_UNROLL
      for (int r = 0; r < RW; ++r) s[r] = dp[r] = 0.f;
      const float* qrow = q_sm + lane * KP;
      const float* grow = do_sm + lane * KP;
      for (int c = 0; c < nd4; ++c) {
        const float4 qv = *reinterpret_cast<const float4*>(qrow + 4 * c);
        const float4 gv = *reinterpret_cast<const float4*>(grow + 4 * c);
FUSEKIT_MQA_UNROLL
        for (int r = 0; r < RW; ++r) {
          const float4 kv = *reinterpret_cast<const float4*>(k_sm + (row0 + r) * DP + 4 * c);
          const float4 vv = *reinterpret_cast<const float4*>(v_sm + (row0 + r) * DP + 4 * c);
          s[r] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
          dp[r] += gv.x * vv.x + gv.y * vv.y + gv.z * vv.z + gv.w * vv.w;
        }
      }
      const RowInfo qi = bk.crow[lane];
      const float lse2 = bk.clse[lane], dl = bk.cdelta[lane];
FUSEKIT_MQA_UNROLL
      for (int r = 0; r < RW; ++r) {
        const int row = row0 + r;
        float p = 0.f, ds = 0.f;
        if (bk.row_off[row] >= 0 && in_window(qi, bk.rows[row].ig)) {
          float x = s[r] * a.scale_log2;
          if (bias) x += rpb_value<T>(a, h, rpb_offset(a, qi.ig, bk.rows[row].ig)) * kLog2e;
          p = exp2_fast(x - lse2);
          ds = p * (dp[r] - dl) * a.scale;
        }
        p_sm[row * kChunk + lane] = p;
        ds_sm[row * kChunk + lane] = ds;
      }
      sync_warp();
      // dV += P^T dO, dK += dS^T Q: lane = column
      for (int j4 = 0; j4 < kChunk; j4 += 4) {
        float qq[4][NC], gg[4][NC];
FUSEKIT_MQA_UNROLL
        for (int kq = 0; kq < 4; ++kq)
FUSEKIT_MQA_UNROLL
          for (int c = 0; c < NC; ++c) {
            qq[kq][c] = q_sm[(j4 + kq) * KP + lane + 32 * c];
            gg[kq][c] = do_sm[(j4 + kq) * KP + lane + 32 * c];
          }
FUSEKIT_MQA_UNROLL
        for (int r = 0; r < RW; ++r) {
          const float4 p4 = *reinterpret_cast<const float4*>(p_sm + (row0 + r) * kChunk + j4);
          const float4 d4 = *reinterpret_cast<const float4*>(ds_sm + (row0 + r) * kChunk + j4);
FUSEKIT_MQA_UNROLL
          for (int c = 0; c < NC; ++c) {
            dv[r][c] += p4.x * gg[0][c] + p4.y * gg[1][c] + p4.z * gg[2][c] + p4.w * gg[3][c];
            dk[r][c] += d4.x * qq[0][c] + d4.y * qq[1][c] + d4.z * qq[2][c] + d4.w * qq[3][c];
          }
        }
      }
    }
  }

FUSEKIT_MQA_UNROLL
  for (int r = 0; r < RW; ++r) {
    const int row = row0 + r;
    if (bk.row_off[row] < 0) continue;
    int x[3];
    for (int ax = 0; ax < 3; ++ax) x[ax] = bk.rows[row].ig[ax] * static_cast<int>(a.axis[ax].dilation) + ta.group[ax];
    store_row<T, NC>(static_cast<T*>(a.grad_k) + tensor_offset(a.dk_stride, b, x, kvh), dk[r], 1.f, a.D, lane);
    store_row<T, NC>(static_cast<T*>(a.grad_v) + tensor_offset(a.dv_stride, b, x, kvh), dv[r], 1.f, a.D, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch planning (host)
// ---------------------------------------------------------------------------------------------

inline int na_head_bucket(int64_t D) { return D <= 32 ? 32 : (D <= 64 ? 64 : (D <= 128 ? 128 : 256)); }

// Tile shape of at most `members` (a power of two) in-group indices: doubles the axis with the
// most tiles left (ties: the later, more contiguous axis) while that helps.
inline void na_tile_shape(const NaArgs& a, int members, int* tile, int* tiles) {
  int glen[3];
  for (int ax = 0; ax < 3; ++ax) {
    const int64_t d = a.axis[ax].dilation;
    glen[ax] = static_cast<int>((a.axis[ax].length + d - 1) / d);
    tile[ax] = 1;
  }
  for (;;) {
    if (tile[0] * tile[1] * tile[2] * 2 > members) break;
    int best = -1, best_left = 1;
    for (int ax = 0; ax < 3; ++ax) {
      const int left = (glen[ax] + tile[ax] - 1) / tile[ax];
      if (left > 1 && left >= best_left) {
        best = ax;
        best_left = left;
      }
    }
    if (best < 0) break;
    tile[best] *= 2;
  }
  for (int ax = 0; ax < 3; ++ax)
    tiles[ax] = static_cast<int>(a.axis[ax].dilation) * ((glen[ax] + tile[ax] - 1) / tile[ax]);
}

// 16-byte chunk loads for a tensor: aligned base, D and every stride multiples of 16 bytes.
inline int vec_ok(const void* p, const int64_t* stride, int64_t D, int es) {
  const int64_t per = 16 / es;
  if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 != 0 || D % per != 0) return 0;
  for (int i = 0; i < 5; ++i)
    if (stride[i] % per != 0) return 0;
  return 1;
}

inline void copy5(int64_t (&dst)[5], const int64_t (&src)[5]) {
  for (int i = 0; i < 5; ++i) dst[i] = src[i];
}

// Kernel arguments from the launcher's params (sizes validated to fit int32); members: the
// block's tile size (NaConfig<DP>::kRows).
inline NaArgs na_make_args(const NaCudaParams& p, int es, int members) {
  NaArgs a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.rpb = p.rpb;
  a.out = p.out;
  a.lse = p.lse;
  a.grad_out = p.grad_out;
  a.out_in = p.out_in;
  a.delta = p.delta;
  a.grad_q = p.grad_q;
  a.grad_k = p.grad_k;
  a.grad_v = p.grad_v;
  a.grad_rpb = p.grad_rpb;
  a.B = static_cast<int>(p.B);
  a.Hq = static_cast<int>(p.Hq);
  a.Hkv = static_cast<int>(p.Hkv);
  a.g = static_cast<int>(p.Hq / p.Hkv);
  a.D = static_cast<int>(p.D);
  a.rpb_size = 1;
  for (int ax = 0; ax < 3; ++ax) {
    a.axis[ax] = p.axis[ax];
    a.X[ax] = static_cast<int>(p.axis[ax].length);
    a.rpb_ext[ax] = static_cast<int>(2 * p.axis[ax].kernel - 1);
    a.rpb_size *= a.rpb_ext[ax];
  }
  if (p.rpb == nullptr) a.rpb_size = 0;
  copy5(a.q_stride, p.q_stride);
  copy5(a.k_stride, p.k_stride);
  copy5(a.v_stride, p.v_stride);
  copy5(a.out_stride, p.out_stride);
  copy5(a.do_stride, p.grad_out_stride);
  copy5(a.oin_stride, p.out_in_stride);
  copy5(a.dq_stride, p.grad_q_stride);
  copy5(a.dk_stride, p.grad_k_stride);
  copy5(a.dv_stride, p.grad_v_stride);
  a.vec_q = vec_ok(p.q, p.q_stride, p.D, es);
  a.vec_k = vec_ok(p.k, p.k_stride, p.D, es);
  a.vec_v = vec_ok(p.v, p.v_stride, p.D, es);
  a.vec_do = vec_ok(p.grad_out, p.grad_out_stride, p.D, es);
  a.scale = p.scale;
  a.scale_log2 = p.scale * kLog2e;
  na_tile_shape(a, members, a.tile, a.tiles);
  na_tile_shape(a, members, a.ktile, a.ktiles);
  return a;
}

}  // namespace fusekit::na

#undef FUSEKIT_NA_HD
#undef FUSEKIT_NA_DEV
