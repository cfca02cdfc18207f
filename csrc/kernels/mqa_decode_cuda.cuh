// Device code and launch planning of the CUDA KV-cache decode attention (torch-free).
//
// One decoding step is up to three launches on one stream:
//  1. append (only with k_new / v_new): copies the new rows into the caches at
//     cache_seqlens[b] + t (rows past Lmax are dropped), so every split below sees them;
//  2. split attention: one block per (row group, split, KV head, batch). The block owns the
//     query rows r = t * g + j (token t, query head kvh * g + j) of its row group and the keys of
//     its split (chunk [s * chunk, (s + 1) * chunk) of [0, Lmax), cut down to the keys those rows
//     may see, so a sliding window reads only the window). Its warps take 16-key tiles round
//     robin; each K/V row is read from HBM once per block (16-byte cp.async, coalesced, a private
//     kStages-deep pipeline per warp, so the main loop has no block barrier) and applied to all
//     rows of the block. Online softmax in fp32 (log2 domain). The warps' partial results are
//     merged through shared memory and written straight to out / lse (one split) or to the fp32
//     workspace (several splits; a split with no visible key writes only lse = -inf);
//  3. combine (several splits only): merges each row's splits by log-sum-exp.
//
// Two compute paths share the index math, staging, pipeline and merge:
//  * fp16 / bf16: tensor cores, mma.sync m16n8k16 with fp32 accumulation. The g * n rows of a
//    KV head form the M dimension (16 or 32 rows per block, more rows -> more row groups, which
//    run side by side and share their K/V through L2). Why not CUDA cores: decode does
//    2 * g * n FMAs per K/V element, i.e. g * n / 2 FMA per byte for 16-bit caches, while an H100
//    has ~10 fp32 FMA per byte of HBM bandwidth, so a CUDA-core kernel becomes compute-bound
//    near g * n = 16..20 (MQA has g = 16..32+); with mma the tensor work per 16-key tile is
//    4 * D / 16 instructions and the kernel stays memory-bound for any g * n. P goes from the
//    QK^T accumulators to the PV A operand in registers (same fragment layout); Q / K / V come
//    from XOR-swizzled shared memory through ldmatrix (V with .trans), bank-conflict free.
//    Head-dim buckets 64, 128, 256 (D padded with zeros; k-steps / d-tiles past D skipped).
//    Fastest: D = 64 and D = 128 (no padding, rows are whole 128-byte lines). Expected:
//    memory-bound, ~80-90% of HBM copy bandwidth once B * Hkv * splits fills the GPU and each
//    split has >= ~256 keys (smaller problems are launch-latency bound).
//  * fp32: CUDA cores (fp32 inputs need fp32 products; TF32 tensor cores would lose the 1e-4
//    accuracy). 8 rows per block; QK^T with one key per lane (half-warps split the rows), PV
//    with one 16-byte column chunk per lane. Memory-bound for g * n <= ~8..16; larger groups
//    re-read K/V from L2 once per 8 rows. Head-dim buckets 32, 64, 128, 256.
// Both paths: D a multiple of 16 bytes with 16-byte aligned rows uses cp.async; any other D /
// stride / alignment stages through a slower scalar fallback (same results).
//
// Shared memory per block (bytes, at the most warps): fp16/bf16 DP 64: 66-68K (4 stages),
// DP 128: 100-104K (3 stages), DP 256: 200K (3 stages, 4 warps on H100; A100's 163K opt-in
// gets 3 warps); fp32 DP 32: 67K, 64: 100K, 128: 134K, 256: 137K (2 warps). The launcher picks
// the most warps that fit the device's opt-in limit.
//
// Every function of the kernels' work is written against the small device layer below
// (barriers, shuffles, cp.async, ldmatrix, mma) and takes the block and thread index as
// arguments, so a host emulator (FUSEKIT_MQA_EMULATE) can run the same code thread by thread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mqa_decode_cuda_params.h"

#if defined(__CUDACC__)
#define FUSEKIT_MQA_HD __host__ __device__ __forceinline__
#define FUSEKIT_MQA_DEV __device__ __forceinline__
#else
#define FUSEKIT_MQA_HD inline
#define FUSEKIT_MQA_DEV inline
#endif

#if defined(__CUDA_ARCH__)
#define FUSEKIT_MQA_UNROLL _Pragma("unroll")
#define FUSEKIT_MQA_NO_UNROLL _Pragma("unroll 1")
#else
#define FUSEKIT_MQA_UNROLL
#define FUSEKIT_MQA_NO_UNROLL
#endif

namespace fusekit::mqa {

constexpr int kKeysPerTile = 16;    // keys per warp tile = the k of the PV mma
constexpr int kMinSplitKeys = 128;  // automatic splits never cut the cache finer than this
constexpr int kMaxSplits = 128;
constexpr int kCombineWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Device layer (real instructions on the device; the emulator's functions on the host)
// ---------------------------------------------------------------------------------------------

#if defined(FUSEKIT_MQA_EMULATE)
void emu_sync_warp();
void emu_sync_block();
float emu_shfl_xor(float v, int lane_mask);
void emu_cp_async16(void* smem_dst, const void* gmem_src, bool fill);
void emu_cp_async_commit();
void emu_cp_async_wait(int pending);
void emu_ldmatrix_x4(uint32_t* r, const void* smem_row, bool trans);
void emu_mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16);
#endif

FUSEKIT_MQA_DEV void sync_warp() {
#if defined(__CUDA_ARCH__)
  __syncwarp();
#elif defined(FUSEKIT_MQA_EMULATE)
  emu_sync_warp();
#endif
}

FUSEKIT_MQA_DEV void sync_block() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#elif defined(FUSEKIT_MQA_EMULATE)
  emu_sync_block();
#endif
}

FUSEKIT_MQA_DEV float shfl_xor(float v, int lane_mask) {
#if defined(__CUDA_ARCH__)
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#elif defined(FUSEKIT_MQA_EMULATE)
  return emu_shfl_xor(v, lane_mask);
#else
  return v;
#endif
}

// 16-byte global -> shared copy, asynchronous; fill == false writes 16 zero bytes instead.
FUSEKIT_MQA_DEV void cp_async16(void* smem_dst, const void* gmem_src, bool fill) {
#if defined(__CUDA_ARCH__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
#elif defined(FUSEKIT_MQA_EMULATE)
  emu_cp_async16(smem_dst, gmem_src, fill);
#endif
}

FUSEKIT_MQA_DEV void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(FUSEKIT_MQA_EMULATE)
  emu_cp_async_commit();
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
FUSEKIT_MQA_DEV void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#elif defined(FUSEKIT_MQA_EMULATE)
  emu_cp_async_wait(kPending);
#endif
}

// Four 8x8 b16 matrices; lane i gives the address of row i % 8 of matrix i / 8.
FUSEKIT_MQA_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
#elif defined(FUSEKIT_MQA_EMULATE)
  emu_ldmatrix_x4(r, smem_row, false);
#endif
}

FUSEKIT_MQA_DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
#elif defined(FUSEKIT_MQA_EMULATE)
  emu_ldmatrix_x4(r, smem_row, true);
#endif
}

// c (16x8 fp32) += a (16x16, row) * b (16x8, col), 16-bit inputs.
template <typename T>
FUSEKIT_MQA_DEV void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 2 && std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif defined(FUSEKIT_MQA_EMULATE)
  emu_mma_16816(c, a, b0, b1, !std::is_same_v<T, __half>);
#endif
}

// 2^x (x = -inf gives 0); the fast approximate instruction on the device.
FUSEKIT_MQA_HD float exp2_fast(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

constexpr float kNegInf = -__builtin_huge_valf();

FUSEKIT_MQA_HD int imin(int a, int b) { return a < b ? a : b; }
FUSEKIT_MQA_HD int imax(int a, int b) { return a > b ? a : b; }
FUSEKIT_MQA_HD int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
FUSEKIT_MQA_HD int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
FUSEKIT_MQA_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }  // a >= 0, b > 0

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

template <typename T> struct Elem;
template <> struct Elem<float> {
  FUSEKIT_MQA_HD static float to_float(float v) { return v; }
  FUSEKIT_MQA_HD static float from_float(float v) { return v; }
};
template <> struct Elem<__half> {
  FUSEKIT_MQA_HD static float to_float(__half v) { return __half2float(v); }
  FUSEKIT_MQA_HD static __half from_float(float v) { return __float2half_rn(v); }
  // (lo, hi) rounded to 16 bits and packed as one mma operand register
  FUSEKIT_MQA_HD static uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
};
template <> struct Elem<__nv_bfloat16> {
  FUSEKIT_MQA_HD static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  FUSEKIT_MQA_HD static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  FUSEKIT_MQA_HD static uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
};

struct alignas(16) Chunk16 {
  uint32_t w[4];
};

FUSEKIT_MQA_HD void copy16(void* dst, const void* src) {
  *static_cast<Chunk16*>(dst) = *static_cast<const Chunk16*>(src);
}

FUSEKIT_MQA_HD void zero16(void* dst) { *static_cast<Chunk16*>(dst) = Chunk16{{0u, 0u, 0u, 0u}}; }

// Shared-memory tiles are rows of DP elements in 16-byte chunks; chunk c of row r is stored at
// chunk c ^ (r % 8), so the 8 rows read by one ldmatrix matrix (or the 8 lanes of one LDS.128
// phase) hit 8 different bank groups. Needs >= 8 chunks per row (DP * sizeof(T) >= 128).
template <typename T, int DP>
FUSEKIT_MQA_HD int tile_offset(int row, int chunk) {
  constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  static_assert(DP * sizeof(T) >= 128, "swizzle needs 8 chunks per row");
  return row * DP + ((chunk ^ (row & 7)) * kElems);
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments and index math
// ---------------------------------------------------------------------------------------------

struct DecodeArgs {
  const void* q = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int32_t* seqlens = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  float* ws_out = nullptr;
  float* ws_lse = nullptr;
  int B = 0, n = 0, Hq = 0, Hkv = 0, g = 1, D = 0, Lmax = 0;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t kc_stride[3] = {0, 0, 0};
  int64_t vc_stride[3] = {0, 0, 0};
  int64_t kn_stride[3] = {0, 0, 0};
  int64_t vn_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};
  float scale_log2 = 0.f;  // scale * log2(e)
  int causal = 0;
  int window_left = -1, window_right = -1;
  int append = 0;
  int splits = 1, chunk = 0;  // split s covers keys [s * chunk, (s + 1) * chunk)
  int rows = 0;               // g * n query rows per KV head
  int rows_per_block = 16, row_groups = 1;
  int warps = 4;  // warps per attention block (blockDim.x / 32)
  int vec_q = 0, vec_kv = 0, vec_new = 0;  // rows are whole 16-byte chunks at 16-byte aligned addresses
  int d_chunks = 0;                        // 16-byte chunks of a row (D * sizeof(T) / 16, vector paths)
};

// Keys the cache holds for sequence b before / after the append (clamped to [0, Lmax]).
FUSEKIT_MQA_HD int cache_fill(const DecodeArgs& a, int b) {
  const int s = a.seqlens[b];
  return s < 0 ? 0 : (s > a.Lmax ? a.Lmax : s);
}

FUSEKIT_MQA_HD int sequence_keys(const DecodeArgs& a, int b) {
  const int64_t s = cache_fill(a, b) + (a.append ? static_cast<int64_t>(a.n) : 0);
  return static_cast<int>(lmin(s, a.Lmax));
}

// Keys [lo, hi] query token t of a sequence with L keys may see (empty when lo > hi): it sits
// at key position L - n + t (bottom-right alignment).
struct KeyRange {
  int lo, hi;
};

FUSEKIT_MQA_HD KeyRange row_key_range(const DecodeArgs& a, int L, int t) {
  const int64_t pos = static_cast<int64_t>(L) - a.n + t;
  int64_t lo = 0, hi = static_cast<int64_t>(L) - 1;
  if (a.causal) hi = lmin(hi, pos);
  if (a.window_right >= 0) hi = lmin(hi, pos + a.window_right);
  if (a.window_left >= 0) lo = lmax(lo, pos - a.window_left);
  // not normalized when empty: lo and hi are each nondecreasing in t, so the keys of rows
  // t0 .. t1 lie in [lo(t0), hi(t1)] even when some of those rows see nothing
  return {static_cast<int>(lo), static_cast<int>(hi)};
}

// What one attention block works on.
struct BlockWork {
  int b, kvh, split, row0, rows_here;  // rows row0 .. row0 + rows_here - 1 of this KV head
  int L;                               // keys of the sequence
  int k_lo, k_hi;                      // keys [k_lo, k_hi) this block reads (empty when k_lo >= k_hi)
};

// Block order: row group fastest, then split, KV head, batch (the row groups of one chunk run
// side by side and share its K/V through L2).
// The grid has at most INT_MAX blocks, so 32-bit division suffices (64-bit division is a
// subroutine call on the device).
FUSEKIT_MQA_HD BlockWork block_work(const DecodeArgs& a, int64_t blk) {
  BlockWork w;
  const int idx = static_cast<int>(blk);
  const int rg = idx % a.row_groups;
  int rest = idx / a.row_groups;
  w.split = rest % a.splits;
  rest /= a.splits;
  w.kvh = rest % a.Hkv;
  w.b = rest / a.Hkv;
  w.row0 = rg * a.rows_per_block;
  w.rows_here = imin(a.rows_per_block, a.rows - w.row0);
  w.L = sequence_keys(a, w.b);
  // rows are ordered by token, and the key range of a token grows with it
  const KeyRange first = row_key_range(a, w.L, w.row0 / a.g);
  const KeyRange last = row_key_range(a, w.L, (w.row0 + w.rows_here - 1) / a.g);
  const int64_t s_lo = static_cast<int64_t>(w.split) * a.chunk;
  w.k_lo = static_cast<int>(lmax(s_lo, first.lo));
  w.k_hi = static_cast<int>(lmin(s_lo + a.chunk, static_cast<int64_t>(last.hi) + 1));
  return w;
}

// Element offset of (b, t, h) in a tensor with (batch, seq, head) strides s.
FUSEKIT_MQA_HD int64_t bth_offset(const int64_t* s, int b, int64_t t, int h) {
  return b * s[0] + t * s[1] + h * s[2];
}

// ---------------------------------------------------------------------------------------------
// Block configurations and shared-memory layout
// ---------------------------------------------------------------------------------------------

// Cross-warp merge area: float O [warps][rows][DP + 4], m, l, coef [warps][rows], then an int64
// destination offset per row (8-byte aligned since rows % 8 == 0).
FUSEKIT_MQA_HD constexpr int merge_pitch(int dp) { return dp + 4; }
FUSEKIT_MQA_HD constexpr size_t merge_bytes(int warps, int rows, int dp) {
  return sizeof(float) * (static_cast<size_t>(warps) * rows * merge_pitch(dp) + 3u * warps * rows) +
         sizeof(int64_t) * rows;
}
FUSEKIT_MQA_HD constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// The number of warps per block (DecodeArgs::warps, 1 .. kMaxWarps) is chosen at launch: the
// most whose shared memory fits the device (each warp owns kStages pipeline tiles).

// Tensor-core path (fp16 / bf16): 16 * MT rows per block.
template <int DP, int MT>
struct MmaConfig {
  static constexpr int kMaxWarps = 4, kMaxThreads = 32 * kMaxWarps, kRows = 16 * MT;
  static constexpr int kStages = DP == 64 ? 4 : 3;
  static constexpr size_t kQBytes = static_cast<size_t>(kRows) * DP * 2;
  static constexpr size_t kTileElems = 2 * kKeysPerTile * DP;  // K then V
  FUSEKIT_MQA_HD static constexpr size_t pipe_offset(int) { return kQBytes; }
  FUSEKIT_MQA_HD static constexpr size_t smem_bytes(int warps) {
    return kQBytes + cmax(static_cast<size_t>(warps) * kStages * kTileElems * 2, merge_bytes(warps, kRows, DP));
  }
};

// CUDA-core path (fp32): 8 rows per block.
template <int DP>
struct SimtConfig {
  static constexpr int kMaxWarps = DP == 256 ? 2 : 4, kMaxThreads = 32 * kMaxWarps, kRows = 8;
  // ptxas register heuristic hint (launch-bounds min blocks): 1 lets it use up to 255 registers,
  // which avoids small spills except for DP = 256, whose unhinted allocation fits without spills
  static constexpr int kMinBlocks = DP == 256 ? 0 : 1;
  static constexpr int kStages = DP == 32 ? 4 : (DP == 64 ? 3 : 2);
  static constexpr size_t kQBytes = static_cast<size_t>(kRows) * DP * 4;
  static constexpr size_t kPFloats = kRows * kKeysPerTile + kRows;  // per warp: P [rows][16], alpha [rows]
  static constexpr size_t kTileElems = 2 * kKeysPerTile * DP;
  FUSEKIT_MQA_HD static constexpr size_t pipe_offset(int warps) {
    return kQBytes + static_cast<size_t>(warps) * kPFloats * 4;
  }
  FUSEKIT_MQA_HD static constexpr size_t smem_bytes(int warps) {
    return pipe_offset(warps) +
           cmax(static_cast<size_t>(warps) * kStages * kTileElems * 4, merge_bytes(warps, kRows, DP));
  }
};

// ---------------------------------------------------------------------------------------------
// Phases shared by both paths
// ---------------------------------------------------------------------------------------------

// Query rows of the block -> q_sm [rows][DP] (swizzled, zero beyond D and beyond the block's rows).
template <typename T, int DP, int RB>
FUSEKIT_MQA_DEV void stage_q(const DecodeArgs& a, const BlockWork& w, T* q_sm, int tid, int nthreads) {
  constexpr int E = 16 / static_cast<int>(sizeof(T)), CPR = DP / E;
  const T* q = static_cast<const T*>(a.q);
  if (a.vec_q) {
    const int real_chunks = a.d_chunks;
    for (int it = tid; it < RB * CPR; it += nthreads) {
      const int lr = it / CPR, c = it % CPR;
      T* dst = q_sm + tile_offset<T, DP>(lr, c);
      if (lr < w.rows_here && c < real_chunks) {
        const int r = w.row0 + lr;
        copy16(dst, q + bth_offset(a.q_stride, w.b, r / a.g, w.kvh * a.g + r % a.g) + c * E);
      } else {
        zero16(dst);
      }
    }
  } else {
    for (int it = tid; it < RB * DP; it += nthreads) {
      const int lr = it / DP, d = it % DP;
      float v = 0.f;
      if (lr < w.rows_here && d < a.D) {
        const int r = w.row0 + lr;
        v = Elem<T>::to_float(q[bth_offset(a.q_stride, w.b, r / a.g, w.kvh * a.g + r % a.g) + d]);
      }
      q_sm[tile_offset<T, DP>(lr, d / E) + d % E] = Elem<T>::from_float(v);
    }
  }
}

// Vector path: zero the padding chunks (past D) of every stage of this warp once; the
// cp.async copies never touch them.
template <typename T, int DP, int kStages>
FUSEKIT_MQA_DEV void zero_pad_chunks(const DecodeArgs& a, T* stages, int lane) {
  constexpr int E = 16 / static_cast<int>(sizeof(T)), CPR = DP / E;
  const int real_chunks = a.d_chunks;
  if (real_chunks == CPR) return;
  constexpr int kRowsAll = kStages * 2 * kKeysPerTile;
  for (int it = lane; it < kRowsAll * CPR; it += 32) {
    const int row = it / CPR, c = it % CPR;
    if (c >= real_chunks) zero16(stages + tile_offset<T, DP>(row, c));
  }
}

// Rows key0 .. key0 + 15 of K and V (rows >= k_hi as zeros) -> one stage: K [16][DP], V [16][DP].
// Vector path: lane = LPR * r0 + c0 copies chunk(s) c0 (+ LPR ...) of rows r0, r0 + 32 / LPR, ...
// (consecutive lanes read consecutive 16-byte chunks of a row).
template <typename T, int DP>
FUSEKIT_MQA_DEV void load_kv_tile(const DecodeArgs& a, const T* k_bh, const T* v_bh, int key0, int k_hi, T* stage,
                                  int lane) {
  constexpr int E = 16 / static_cast<int>(sizeof(T)), CPR = DP / E, KW = kKeysPerTile;
  constexpr int LPR = CPR < 32 ? CPR : 32, RPP = 32 / LPR, CPASS = CPR / LPR;
  if (a.vec_kv) {
    const int real_chunks = a.d_chunks;
    const int c0 = lane % LPR, r0 = lane / LPR;
FUSEKIT_MQA_UNROLL
    for (int tensor = 0; tensor < 2; ++tensor) {
      const T* base = tensor == 0 ? k_bh : v_bh;
      const int64_t stride = tensor == 0 ? a.kc_stride[1] : a.vc_stride[1];
      T* dst = stage + tensor * KW * DP;
FUSEKIT_MQA_UNROLL
      for (int rr = 0; rr < KW / RPP; ++rr) {
        const int row = r0 + rr * RPP;
        const int j = key0 + row;
        const bool valid = j < k_hi;
        const T* src = base + (valid ? j : 0) * stride;
FUSEKIT_MQA_UNROLL
        for (int cp = 0; cp < CPASS; ++cp) {
          const int c = c0 + cp * LPR;
          if (c < real_chunks) cp_async16(dst + tile_offset<T, DP>(row, c), src + c * E, valid);
        }
      }
    }
  } else {  // scalar fallback (unaligned rows or D not a whole number of chunks); kept rolled
FUSEKIT_MQA_NO_UNROLL
    for (int it = lane; it < 2 * KW * DP; it += 32) {
      const int tensor = it / (KW * DP), rem = it % (KW * DP);
      const int row = rem / DP, d = rem % DP;
      const int j = key0 + row;
      float v = 0.f;
      if (j < k_hi && d < a.D)
        v = Elem<T>::to_float(tensor == 0 ? k_bh[j * a.kc_stride[1] + d] : v_bh[j * a.vc_stride[1] + d]);
      stage[tensor * KW * DP + tile_offset<T, DP>(row, d / E) + d % E] = Elem<T>::from_float(v);
    }
  }
}

// Where row lr of the block goes: element offset of its first value in out (one split) or in
// the workspace (several splits), and the index of its lse there.
struct RowDest {
  int64_t out, lse;
};

FUSEKIT_MQA_DEV RowDest row_dest(const DecodeArgs& a, const BlockWork& w, int lr) {
  const int r = w.row0 + lr;
  const int t = r / a.g, h = w.kvh * a.g + r % a.g;
  const int64_t row = (static_cast<int64_t>(w.b) * a.n + t) * a.Hq + h;
  if (a.splits == 1) return {bth_offset(a.out_stride, w.b, t, h), row};
  const int64_t slot = row * a.splits + w.split;
  return {slot * a.D, slot};
}

template <typename T>
FUSEKIT_MQA_DEV void store_value(const DecodeArgs& a, int64_t at, float v) {
  if (a.splits == 1)
    static_cast<T*>(a.out)[at] = Elem<T>::from_float(v);
  else
    a.ws_out[at] = v;
}

FUSEKIT_MQA_DEV void store_lse(const DecodeArgs& a, int64_t at, float v) {
  if (a.splits == 1)
    a.lse[at] = v;
  else
    a.ws_lse[at] = v;
}

// A block whose split holds no key its rows may see: out = 0 and lse = -inf (one split), or
// lse = -inf in the workspace (the combine skips such splits without reading their out).
template <typename T>
FUSEKIT_MQA_DEV void store_empty_block(const DecodeArgs& a, const BlockWork& w, int tid, int nthreads) {
  for (int lr = tid; lr < w.rows_here; lr += nthreads) store_lse(a, row_dest(a, w, lr).lse, kNegInf);
  if (a.splits == 1)
    for (int idx = tid; idx < w.rows_here * a.D; idx += nthreads)
      store_value<T>(a, row_dest(a, w, idx / a.D).out + idx % a.D, 0.f);
}

// Merges the warps' partial (m, l, O) (log2 domain, O unnormalized) of every row and stores
// the block's result. The caller has written its partials into the merge area.
template <typename T, int DP, int RB>
FUSEKIT_MQA_DEV void merge_and_store(const DecodeArgs& a, const BlockWork& w, float* mrg, int tid) {
  constexpr int P = merge_pitch(DP);
  const int NW = a.warps, NT = 32 * a.warps;
  const float* m_o = mrg;
  const float* m_max = m_o + NW * RB * P;
  const float* m_sum = m_max + NW * RB;
  float* m_coef = const_cast<float*>(m_sum) + NW * RB;
  int64_t* m_dest = reinterpret_cast<int64_t*>(m_coef + NW * RB);  // row_dest(...).out per row
  sync_block();
  // per row: the warps' weights, the lse, and where the row goes
  for (int lr = tid; lr < w.rows_here; lr += NT) {
    float mx = kNegInf;
    for (int wi = 0; wi < NW; ++wi) mx = fmaxf(mx, m_max[wi * RB + lr]);
    float sum = 0.f;
    if (mx != kNegInf)
      for (int wi = 0; wi < NW; ++wi)
        if (m_max[wi * RB + lr] != kNegInf) sum += m_sum[wi * RB + lr] * exp2_fast(m_max[wi * RB + lr] - mx);
    for (int wi = 0; wi < NW; ++wi) {
      const float mw = m_max[wi * RB + lr];
      m_coef[wi * RB + lr] = (sum > 0.f && mw != kNegInf) ? exp2_fast(mw - mx) / sum : 0.f;
    }
    const RowDest dst = row_dest(a, w, lr);
    store_lse(a, dst.lse, sum > 0.f ? (mx + log2f(sum)) * kLn2 : kNegInf);
    m_dest[lr] = dst.out;
  }
  sync_block();
  for (int idx = tid; idx < w.rows_here * DP; idx += NT) {
    const int lr = idx / DP, d = idx % DP;
    if (d >= a.D) continue;
    float v = 0.f;
    for (int wi = 0; wi < NW; ++wi) {
      const float c = m_coef[wi * RB + lr];
      if (c != 0.f) v += c * m_o[(wi * RB + lr) * P + d];
    }
    store_value<T>(a, m_dest[lr] + d, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core attention block (fp16 / bf16)
// ---------------------------------------------------------------------------------------------
//
// Fragments (PTX m16n8k16): lane = 4 * gid + tq. Accumulator element (i = 2 * h + e) of an 8-wide
// n tile is (row gid + 8 h, col 2 tq + e). The QK^T accumulators of 16 keys (two n tiles) are
// exactly the A operand of PV after packing pairs to 16 bits.

template <typename T, int DP, int MT>
FUSEKIT_MQA_DEV void decode_block_mma(const DecodeArgs& a, int64_t blk, int tid, unsigned char* smem) {
  using C = MmaConfig<DP, MT>;
  constexpr int RB = C::kRows, ST = C::kStages, KW = kKeysPerTile;
  constexpr int NDT = DP / 8;  // 8-wide d tiles of the output
  constexpr int TILE = static_cast<int>(C::kTileElems);
  const int NW = a.warps, NT = 32 * a.warps;
  const BlockWork w = block_work(a, blk);
  if (w.k_lo >= w.k_hi) {
    store_empty_block<T>(a, w, tid, NT);
    return;
  }
  T* q_sm = reinterpret_cast<T*>(smem);
  T* pipe = reinterpret_cast<T*>(smem + C::pipe_offset(NW));
  const int warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tq = lane & 3;
  T* stages = pipe + warp * ST * TILE;

  stage_q<T, DP, RB>(a, w, q_sm, tid, NT);
  if (a.vec_kv) zero_pad_chunks<T, DP, ST>(a, stages, lane);
  sync_block();

  int lo[MT][2], hi[MT][2];
  float m[MT][2], l[MT][2];
  float o[MT][NDT][4];
FUSEKIT_MQA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
FUSEKIT_MQA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int lr = mt * 16 + h * 8 + gid;
      KeyRange kr{1, 0};  // padding rows see nothing
      if (lr < w.rows_here) kr = row_key_range(a, w.L, (w.row0 + lr) / a.g);
      lo[mt][h] = kr.lo;
      hi[mt][h] = kr.hi;
      m[mt][h] = kNegInf;
      l[mt][h] = 0.f;
    }
FUSEKIT_MQA_UNROLL
    for (int dt = 0; dt < NDT; ++dt)
FUSEKIT_MQA_UNROLL
      for (int i = 0; i < 4; ++i) o[mt][dt][i] = 0.f;
  }

  const T* k_bh = static_cast<const T*>(a.k_cache) + w.b * a.kc_stride[0] + w.kvh * a.kc_stride[2];
  const T* v_bh = static_cast<const T*>(a.v_cache) + w.b * a.vc_stride[0] + w.kvh * a.vc_stride[2];
  // warp w takes tiles w, w + NW, ... of the block's key range
  const int ntiles = static_cast<int>(cdiv(w.k_hi - w.k_lo, KW));
  const int my_tiles = warp < ntiles ? (ntiles - 1 - warp) / NW + 1 : 0;
  const int key_step = NW * KW;
  const int my_key0 = w.k_lo + warp * KW;

FUSEKIT_MQA_UNROLL
  for (int s = 0; s < ST - 1; ++s) {
    if (s < my_tiles) load_kv_tile<T, DP>(a, k_bh, v_bh, my_key0 + s * key_step, w.k_hi, stages + s * TILE, lane);
    cp_async_commit();
  }

  // ldmatrix row addresses. Step s (k-step of QK^T, d pair of PV) reads chunk 2 s + (lane's half);
  // the swizzle only permutes the low 3 chunk bits, so four lane offsets per operand serve every
  // step: offset(s) = off[s % 4] + 64 (s / 4) elements (keeps the address registers few).
  //   Q (A operand) and V (B operand, .trans): matrices (rows 0-7 | 8-15) x (chunk half 0 | 1)
  //   K (B operand): matrices (keys 0-7, half 0), (keys 0-7, half 1), (keys 8-15, half 0), (keys 8-15, half 1)
  const int qv_row = (lane & 7) + (((lane >> 3) & 1) << 3), qv_half = lane >> 4;
  const int k_row = (lane & 7) + ((lane >> 4) << 3), k_half = (lane >> 3) & 1;
  int qv_off[4], k_off[4];
FUSEKIT_MQA_UNROLL
  for (int i = 0; i < 4; ++i) {
    qv_off[i] = tile_offset<T, DP>(qv_row, 2 * i + qv_half);
    k_off[i] = tile_offset<T, DP>(k_row, 2 * i + k_half);
  }

  for (int i = 0; i < my_tiles; ++i) {
    cp_async_wait<ST - 2>();
    sync_warp();
    {
      const int nx = i + ST - 1;
      if (nx < my_tiles)
        load_kv_tile<T, DP>(a, k_bh, v_bh, my_key0 + nx * key_step, w.k_hi, stages + (nx % ST) * TILE, lane);
      cp_async_commit();
    }
    const T* k_sm = stages + (i % ST) * TILE;
    const T* v_sm = k_sm + KW * DP;
    const int key0 = my_key0 + i * key_step;

    // S = Q K^T over the 16 keys of the tile
    float s[MT][2][4];
FUSEKIT_MQA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
FUSEKIT_MQA_UNROLL
      for (int nt = 0; nt < 2; ++nt)
FUSEKIT_MQA_UNROLL
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
FUSEKIT_MQA_UNROLL
    for (int ks = 0; ks < DP / 16; ++ks) {
      if (ks * 16 >= a.D) break;
      uint32_t kb[4];
      ldmatrix_x4(kb, k_sm + k_off[ks % 4] + 64 * (ks / 4));
FUSEKIT_MQA_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t qa[4];
        ldmatrix_x4(qa, q_sm + mt * 16 * DP + qv_off[ks % 4] + 64 * (ks / 4));
        mma_16816<T>(s[mt][0], qa, kb[0], kb[1]);
        mma_16816<T>(s[mt][1], qa, kb[2], kb[3]);
      }
    }

    // mask, online softmax, P as the A operand of PV
    uint32_t pa[MT][4];
FUSEKIT_MQA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
FUSEKIT_MQA_UNROLL
      for (int h = 0; h < 2; ++h) {
        float mx = kNegInf;
FUSEKIT_MQA_UNROLL
        for (int nt = 0; nt < 2; ++nt)
FUSEKIT_MQA_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int j = key0 + nt * 8 + 2 * tq + e;
            const bool ok = j < w.k_hi && j >= lo[mt][h] && j <= hi[mt][h];
            const float v = ok ? s[mt][nt][2 * h + e] * a.scale_log2 : kNegInf;
            s[mt][nt][2 * h + e] = v;
            mx = fmaxf(mx, v);
          }
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        const float m_new = fmaxf(m[mt][h], mx);
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        const float alpha = exp2_fast(m[mt][h] - m_use);
        m[mt][h] = m_new;
        float rs = 0.f;
FUSEKIT_MQA_UNROLL
        for (int nt = 0; nt < 2; ++nt)
FUSEKIT_MQA_UNROLL
          for (int e = 0; e < 2; ++e) {
            const float p = exp2_fast(s[mt][nt][2 * h + e] - m_use);
            s[mt][nt][2 * h + e] = p;
            rs += p;
          }
        l[mt][h] = l[mt][h] * alpha + rs;
FUSEKIT_MQA_UNROLL
        for (int dt = 0; dt < NDT; ++dt) {
          o[mt][dt][2 * h] *= alpha;
          o[mt][dt][2 * h + 1] *= alpha;
        }
      }
      pa[mt][0] = Elem<T>::pack2(s[mt][0][0], s[mt][0][1]);
      pa[mt][1] = Elem<T>::pack2(s[mt][0][2], s[mt][0][3]);
      pa[mt][2] = Elem<T>::pack2(s[mt][1][0], s[mt][1][1]);
      pa[mt][3] = Elem<T>::pack2(s[mt][1][2], s[mt][1][3]);
    }

    // O += P V
FUSEKIT_MQA_UNROLL
    for (int dp = 0; dp < DP / 16; ++dp) {
      if (dp * 16 >= a.D) break;
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_sm + qv_off[dp % 4] + 64 * (dp / 4));
FUSEKIT_MQA_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
        mma_16816<T>(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();

FUSEKIT_MQA_UNROLL
  for (int mt = 0; mt < MT; ++mt)
FUSEKIT_MQA_UNROLL
    for (int h = 0; h < 2; ++h) {
      l[mt][h] += shfl_xor(l[mt][h], 1);
      l[mt][h] += shfl_xor(l[mt][h], 2);
    }
  sync_block();  // every warp is done with the pipeline area, which becomes the merge area

  float* mrg = reinterpret_cast<float*>(pipe);
  constexpr int P = merge_pitch(DP);
  float* m_o = mrg + warp * RB * P;
  float* m_max = mrg + NW * RB * P;
  float* m_sum = m_max + NW * RB;
FUSEKIT_MQA_UNROLL
  for (int mt = 0; mt < MT; ++mt)
FUSEKIT_MQA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int lr = mt * 16 + h * 8 + gid;
      if (tq == 0) {
        m_max[warp * RB + lr] = m[mt][h];
        m_sum[warp * RB + lr] = l[mt][h];
      }
FUSEKIT_MQA_UNROLL
      for (int dt = 0; dt < NDT; ++dt) {
        m_o[lr * P + dt * 8 + 2 * tq] = o[mt][dt][2 * h];
        m_o[lr * P + dt * 8 + 2 * tq + 1] = o[mt][dt][2 * h + 1];
      }
    }
  // the block's work is recomputed rather than kept live across the loop (register pressure)
  merge_and_store<T, DP, RB>(a, block_work(a, blk), mrg, tid);
}

// ---------------------------------------------------------------------------------------------
// CUDA-core attention block (fp32)
// ---------------------------------------------------------------------------------------------
//
// QK^T: lane = 16 * half + key; the lane computes the scores of its key for rows
// half * 4 .. half * 4 + 3 (K row from shared memory, Q rows broadcast). Softmax statistics are
// reduced across the 16 lanes of a half. P and the rescale factors go through shared memory to
// the PV layout: lane = LPR * group + chunk, the lane owns 16-byte column chunk(s) of RPL rows.

template <int DP>
FUSEKIT_MQA_DEV void decode_block_simt(const DecodeArgs& a, int64_t blk, int tid, unsigned char* smem) {
  using C = SimtConfig<DP>;
  using T = float;
  constexpr int RB = C::kRows, ST = C::kStages, KW = kKeysPerTile;
  constexpr int CPR = DP / 4;                    // 16-byte chunks per row
  constexpr int LPR = CPR < 32 ? CPR : 32;       // PV lanes per row
  constexpr int CPL = CPR / LPR;                 // chunks per PV lane
  constexpr int RPL = RB / (32 / LPR);           // rows per PV lane
  constexpr int QR = RB / 2;                     // rows per QK lane
  constexpr int TILE = static_cast<int>(C::kTileElems);
  const int NW = a.warps, NT = 32 * a.warps;
  const BlockWork w = block_work(a, blk);
  if (w.k_lo >= w.k_hi) {
    store_empty_block<T>(a, w, tid, NT);
    return;
  }
  float* q_sm = reinterpret_cast<float*>(smem);
  float* p_all = reinterpret_cast<float*>(smem + C::kQBytes);
  float* pipe = reinterpret_cast<float*>(smem + C::pipe_offset(NW));
  const int warp = tid / 32, lane = tid % 32;
  float* p_sm = p_all + warp * C::kPFloats;  // P [RB][16], then alpha [RB]
  float* alpha_sm = p_sm + RB * KW;
  float* stages = pipe + warp * ST * TILE;

  stage_q<T, DP, RB>(a, w, q_sm, tid, NT);
  if (a.vec_kv) zero_pad_chunks<T, DP, ST>(a, stages, lane);
  sync_block();

  const int kk = lane & 15, half = lane >> 4;  // QK role
  const int cl = lane % LPR, grp = lane / LPR;  // PV role
  int lo[QR], hi[QR];
  float m[QR], l[QR];
FUSEKIT_MQA_UNROLL
  for (int i = 0; i < QR; ++i) {
    const int lr = half * QR + i;
    KeyRange kr{1, 0};
    if (lr < w.rows_here) kr = row_key_range(a, w.L, (w.row0 + lr) / a.g);
    lo[i] = kr.lo;
    hi[i] = kr.hi;
    m[i] = kNegInf;
    l[i] = 0.f;
  }
  float o[RPL][CPL][4];
FUSEKIT_MQA_UNROLL
  for (int i = 0; i < RPL; ++i)
FUSEKIT_MQA_UNROLL
    for (int c = 0; c < CPL; ++c)
FUSEKIT_MQA_UNROLL
      for (int e = 0; e < 4; ++e) o[i][c][e] = 0.f;

  const float* k_bh = static_cast<const float*>(a.k_cache) + w.b * a.kc_stride[0] + w.kvh * a.kc_stride[2];
  const float* v_bh = static_cast<const float*>(a.v_cache) + w.b * a.vc_stride[0] + w.kvh * a.vc_stride[2];
  const int ntiles = static_cast<int>(cdiv(w.k_hi - w.k_lo, KW));
  const int my_tiles = warp < ntiles ? (ntiles - 1 - warp) / NW + 1 : 0;
  const int key_step = NW * KW;
  const int my_key0 = w.k_lo + warp * KW;
  const int nch = static_cast<int>(cdiv(a.D, 4));  // chunks holding real columns

FUSEKIT_MQA_UNROLL
  for (int s = 0; s < ST - 1; ++s) {
    if (s < my_tiles) load_kv_tile<T, DP>(a, k_bh, v_bh, my_key0 + s * key_step, w.k_hi, stages + s * TILE, lane);
    cp_async_commit();
  }

  for (int i = 0; i < my_tiles; ++i) {
    cp_async_wait<ST - 2>();
    sync_warp();
    {
      const int nx = i + ST - 1;
      if (nx < my_tiles)
        load_kv_tile<T, DP>(a, k_bh, v_bh, my_key0 + nx * key_step, w.k_hi, stages + (nx % ST) * TILE, lane);
      cp_async_commit();
    }
    const float* k_sm = stages + (i % ST) * TILE;
    const float* v_sm = k_sm + KW * DP;
    const int key0 = my_key0 + i * key_step;

    float s[QR];
FUSEKIT_MQA_UNROLL
    for (int r = 0; r < QR; ++r) s[r] = 0.f;
    for (int c = 0; c < nch; ++c) {
      const float4 kv = *reinterpret_cast<const float4*>(k_sm + tile_offset<T, DP>(kk, c));
FUSEKIT_MQA_UNROLL
      for (int r = 0; r < QR; ++r) {
        const float4 qv = *reinterpret_cast<const float4*>(q_sm + tile_offset<T, DP>(half * QR + r, c));
        s[r] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
      }
    }
    const int j = key0 + kk;
FUSEKIT_MQA_UNROLL
    for (int r = 0; r < QR; ++r) {
      const bool ok = j < w.k_hi && j >= lo[r] && j <= hi[r];
      const float v = ok ? s[r] * a.scale_log2 : kNegInf;
      float mx = v;
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      mx = fmaxf(mx, shfl_xor(mx, 4));
      mx = fmaxf(mx, shfl_xor(mx, 8));
      const float m_new = fmaxf(m[r], mx);
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = exp2_fast(m[r] - m_use);
      m[r] = m_new;
      const float p = exp2_fast(v - m_use);
      l[r] = l[r] * alpha + p;  // this lane's key only; summed over the half at the end
      const int lr = half * QR + r;
      p_sm[lr * KW + kk] = p;
      if (kk == 0) alpha_sm[lr] = alpha;
    }
    sync_warp();
FUSEKIT_MQA_UNROLL
    for (int r = 0; r < RPL; ++r) {
      const float al = alpha_sm[grp * RPL + r];
FUSEKIT_MQA_UNROLL
      for (int c = 0; c < CPL; ++c)
FUSEKIT_MQA_UNROLL
        for (int e = 0; e < 4; ++e) o[r][c][e] *= al;
    }
    // four keys at a time: one broadcast float4 of P per row
    for (int k4 = 0; k4 < KW; k4 += 4) {
      float4 p4[RPL];
FUSEKIT_MQA_UNROLL
      for (int r = 0; r < RPL; ++r) p4[r] = *reinterpret_cast<const float4*>(p_sm + (grp * RPL + r) * KW + k4);
FUSEKIT_MQA_UNROLL
      for (int c = 0; c < CPL; ++c) {
        const int chunk = cl + c * LPR;
        if (chunk >= nch) continue;
FUSEKIT_MQA_UNROLL
        for (int kq = 0; kq < 4; ++kq) {
          const float4 vv = *reinterpret_cast<const float4*>(v_sm + tile_offset<T, DP>(k4 + kq, chunk));
FUSEKIT_MQA_UNROLL
          for (int r = 0; r < RPL; ++r) {
            const float p = kq == 0 ? p4[r].x : (kq == 1 ? p4[r].y : (kq == 2 ? p4[r].z : p4[r].w));
            o[r][c][0] += p * vv.x;
            o[r][c][1] += p * vv.y;
            o[r][c][2] += p * vv.z;
            o[r][c][3] += p * vv.w;
          }
        }
      }
    }
    sync_warp();  // p_sm / alpha_sm are rewritten by the next tile
  }
  cp_async_wait<0>();

FUSEKIT_MQA_UNROLL
  for (int r = 0; r < QR; ++r) {
    l[r] += shfl_xor(l[r], 1);
    l[r] += shfl_xor(l[r], 2);
    l[r] += shfl_xor(l[r], 4);
    l[r] += shfl_xor(l[r], 8);
  }
  sync_block();

  float* mrg = pipe;
  constexpr int P = merge_pitch(DP);
  float* m_max = mrg + NW * RB * P;
  float* m_sum = m_max + NW * RB;
  // the 16 lanes of a half hold the same statistics: all of them store (same value, same address)
FUSEKIT_MQA_UNROLL
  for (int r = 0; r < QR; ++r) {
    m_max[warp * RB + half * QR + r] = m[r];
    m_sum[warp * RB + half * QR + r] = l[r];
  }
FUSEKIT_MQA_UNROLL
  for (int r = 0; r < RPL; ++r)
FUSEKIT_MQA_UNROLL
    for (int c = 0; c < CPL; ++c)
FUSEKIT_MQA_UNROLL
      for (int e = 0; e < 4; ++e) mrg[(warp * RB + grp * RPL + r) * P + (cl + c * LPR) * 4 + e] = o[r][c][e];
  merge_and_store<T, DP, RB>(a, block_work(a, blk), mrg, tid);
}

// ---------------------------------------------------------------------------------------------
// Append and combine
// ---------------------------------------------------------------------------------------------

// Items of the append launch: (tensor, b, t, kv head, 16-byte chunk) on the vector path,
// (..., element) otherwise.
inline int64_t append_items(const DecodeArgs& a, int elem_bytes) {
  const bool vec = a.vec_kv && a.vec_new;
  const int64_t per_row = vec ? a.D * elem_bytes / 16 : a.D;
  return 2 * static_cast<int64_t>(a.B) * a.n * a.Hkv * per_row;
}

// E: element storage type of the caches (a plain 2- or 4-byte integer: the append only copies).
template <typename E>
FUSEKIT_MQA_DEV void append_item(const DecodeArgs& a, int64_t idx) {
  const bool vec = a.vec_kv && a.vec_new;
  constexpr int kPerChunk = 16 / static_cast<int>(sizeof(E));
  const int per_row = vec ? a.D / kPerChunk : a.D;
  const int c = static_cast<int>(idx % per_row);
  int64_t rest = idx / per_row;
  const int kvh = static_cast<int>(rest % a.Hkv);
  rest /= a.Hkv;
  const int t = static_cast<int>(rest % a.n);
  rest /= a.n;
  const int b = static_cast<int>(rest % a.B);
  const int tensor = static_cast<int>(rest / a.B);
  const int64_t pos = static_cast<int64_t>(cache_fill(a, b)) + t;
  if (pos >= a.Lmax) return;  // no room: the Python layer reports this case
  const int64_t* cs = tensor == 0 ? a.kc_stride : a.vc_stride;
  const int64_t* ns = tensor == 0 ? a.kn_stride : a.vn_stride;
  E* dst = static_cast<E*>(tensor == 0 ? a.k_cache : a.v_cache) + bth_offset(cs, b, pos, kvh);
  const E* src = static_cast<const E*>(tensor == 0 ? a.k_new : a.v_new) + bth_offset(ns, b, t, kvh);
  if (vec)
    copy16(dst + c * kPerChunk, src + c * kPerChunk);
  else
    dst[c] = src[c];
}

// One output row (b, t, h) from its splits: lse = log sum_s exp(lse_s),
// out = sum_s exp(lse_s - lse) out_s. Splits with lse_s = -inf are skipped (their out_s is
// never written). weights: kMaxSplits floats of shared memory for this warp.
template <typename T>
FUSEKIT_MQA_DEV void combine_row(const DecodeArgs& a, int64_t row, int lane, float* weights) {
  const int S = a.splits;
  const float* ls = a.ws_lse + row * S;
  float mx = kNegInf;
  for (int s = lane; s < S; s += 32) mx = fmaxf(mx, ls[s]);
FUSEKIT_MQA_UNROLL
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, shfl_xor(mx, o));
  float sum = 0.f;
  if (mx != kNegInf)
    for (int s = lane; s < S; s += 32) sum += ls[s] == kNegInf ? 0.f : exp2_fast((ls[s] - mx) * kLog2e);
FUSEKIT_MQA_UNROLL
  for (int o = 16; o > 0; o >>= 1) sum += shfl_xor(sum, o);
  const float lse = mx == kNegInf ? kNegInf : mx + log2f(sum) * kLn2;
  for (int s = lane; s < S; s += 32)
    weights[s] = (mx == kNegInf || ls[s] == kNegInf) ? 0.f : exp2_fast((ls[s] - lse) * kLog2e);
  sync_warp();
  const int h = static_cast<int>(row % a.Hq);
  const int64_t bt = row / a.Hq;
  const int t = static_cast<int>(bt % a.n), b = static_cast<int>(bt / a.n);
  T* out = static_cast<T*>(a.out) + bth_offset(a.out_stride, b, t, h);
  const float* po = a.ws_out + row * S * a.D;
  for (int d = lane; d < a.D; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      const float wgt = weights[s];
      if (wgt != 0.f) acc += wgt * po[static_cast<int64_t>(s) * a.D + d];
    }
    out[d] = Elem<T>::from_float(acc);
  }
  if (lane == 0) a.lse[row] = lse;
}

// ---------------------------------------------------------------------------------------------
// Launch planning (host)
// ---------------------------------------------------------------------------------------------

// Head-dim bucket: the tensor-core path pads D to 64 / 128 / 256, the CUDA-core path to
// 32 / 64 / 128 / 256.
inline int mma_bucket(int64_t D) { return D <= 64 ? 64 : (D <= 128 ? 128 : 256); }
inline int simt_bucket(int64_t D) { return D <= 32 ? 32 : (D <= 64 ? 64 : (D <= 128 ? 128 : 256)); }
// Tensor-core row tile: 32 rows (MT = 2) when a KV head has more than 16 query rows and the
// accumulators fit (DP <= 128), else 16.
inline int mma_row_tiles(int64_t rows, int dp) { return rows > 16 && dp <= 128 ? 2 : 1; }

// Smallest automatic split chunk: kMinSplitKeys, raised so that the fp32 partial results a
// split writes and the combine reads back (8 bytes per row and column) stay under a quarter of
// the K/V bytes it loads (2 * elem_bytes per key and column): chunk >= 16 * rows / elem_bytes.
inline int64_t min_split_keys(int64_t rows_per_block, int elem_bytes) {
  return lmax(kMinSplitKeys, 16 * rows_per_block / elem_bytes);
}

// Number of KV splits. requested > 0: that many (at most kMaxSplits and Lmax). 0: from the
// shapes only (never the sequence lengths, so a cache size always gets the same launch):
// units = attention blocks per split, slots = blocks resident on the device at once.
// No split when one split's blocks already fill 80% of the slots, else the smallest count
// whose wave efficiency (waves / ceil(waves)) is within 85% of the best, with chunks of at
// least min_keys keys. The result is normalized so that every split of
// chunk = ceil(Lmax / splits) keys starts inside the cache.
inline int choose_num_splits(int64_t units, int64_t keys, int64_t requested, int64_t slots, int64_t min_keys) {
  const int64_t cap = keys < 1 ? 1 : lmin(kMaxSplits, keys);
  int64_t s = 1;
  if (requested > 0) {
    s = lmin(requested, cap);
  } else if (units > 0 && slots > 0 && units * 5 < slots * 4) {
    const int64_t by_len = lmax(1, lmin(cap, keys / lmax(1, min_keys)));
    double eff[kMaxSplits + 1] = {};
    double best = 0.0;
    for (int64_t c = 1; c <= by_len; ++c) {
      const double waves = static_cast<double>(units * c) / static_cast<double>(slots);
      eff[c] = waves / std::ceil(waves);
      best = eff[c] > best ? eff[c] : best;
    }
    for (int64_t c = 1; c <= by_len; ++c)
      if (eff[c] >= 0.85 * best) {
        s = c;
        break;
      }
  }
  if (keys > 0) s = cdiv(keys, cdiv(keys, s));
  return static_cast<int>(s);
}

// Kernel arguments from the launcher's params (sizes already validated to fit int32).
inline DecodeArgs make_decode_args(const MqaDecodeCudaParams& p, int elem_bytes) {
  DecodeArgs a;
  a.q = p.q;
  a.k_cache = p.k_cache;
  a.v_cache = p.v_cache;
  a.seqlens = p.cache_seqlens;
  a.k_new = p.k_new;
  a.v_new = p.v_new;
  a.out = p.out;
  a.lse = p.lse;
  a.ws_out = p.ws_out;
  a.ws_lse = p.ws_lse;
  a.B = static_cast<int>(p.B);
  a.n = static_cast<int>(p.n);
  a.Hq = static_cast<int>(p.Hq);
  a.Hkv = static_cast<int>(p.Hkv);
  a.g = static_cast<int>(p.Hq / p.Hkv);
  a.D = static_cast<int>(p.D);
  a.Lmax = static_cast<int>(p.Lmax);
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = p.q_stride[i];
    a.kc_stride[i] = p.k_cache_stride[i];
    a.vc_stride[i] = p.v_cache_stride[i];
    a.kn_stride[i] = p.k_new_stride[i];
    a.vn_stride[i] = p.v_new_stride[i];
    a.out_stride[i] = p.out_stride[i];
  }
  a.scale_log2 = p.scale * kLog2e;
  a.causal = p.causal ? 1 : 0;
  // windows wider than any sequence are unbounded; keeps the key arithmetic in int32
  const int64_t wide = static_cast<int64_t>(p.Lmax) + p.n + 1;
  a.window_left = p.window_left < 0 ? -1 : static_cast<int>(lmin(p.window_left, wide));
  a.window_right = p.window_right < 0 ? -1 : static_cast<int>(lmin(p.window_right, wide));
  a.append = p.k_new != nullptr ? 1 : 0;
  a.rows = a.g * a.n;
  a.splits = p.num_splits < 1 ? 1 : static_cast<int>(p.num_splits);
  a.chunk = static_cast<int>(cdiv(p.Lmax, a.splits));
  const int per_chunk = 16 / elem_bytes;
  a.d_chunks = static_cast<int>(p.D / per_chunk);
  auto rows_vec = [&](const void* ptr, const int64_t* s) {
    return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && p.D % per_chunk == 0 &&
           s[0] % per_chunk == 0 && s[1] % per_chunk == 0 && s[2] % per_chunk == 0;
  };
  a.vec_q = rows_vec(p.q, p.q_stride);
  a.vec_kv = rows_vec(p.k_cache, p.k_cache_stride) && rows_vec(p.v_cache, p.v_cache_stride);
  a.vec_new = a.append && rows_vec(p.k_new, p.k_new_stride) && rows_vec(p.v_new, p.v_new_stride);
  return a;
}

inline void set_block_shape(DecodeArgs& a, int rows_per_block, int warps) {
  a.rows_per_block = rows_per_block;
  a.row_groups = static_cast<int>(cdiv(a.rows, rows_per_block));
  a.warps = warps;
}

}  // namespace fusekit::mqa
