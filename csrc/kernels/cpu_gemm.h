// What the torch-free CPU attention kernels share (MQA, neighborhood attention): vector helpers,
// exp2, 16-bit row conversion, the register-blocked GEMM micro-kernel, scratch carving, the work
// queue and the online softmax over lanes of rows.
//
// The micro-kernel: C[rows][vecs * 16] (+)= A . B, where B rows are packed 16-lane vectors and A
// elements are broadcast from any two strides, so a driver picks what the lanes run over and
// avoids transposing the operand that streams. A launcher compiles it once per instruction set
// with FUSEKIT_CPU_GEMM_KIT (bottom of this file) and the drivers call Kit::gemm.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_isa.h"

namespace fusekit {
namespace cpu {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Work items shared by the threads of one parallel region: each claims the next until none is left.
struct TaskQueue {
  std::atomic<int64_t> next{0};
  int64_t count = 0;
  bool claim(int64_t& task) {
    task = next.fetch_add(1, std::memory_order_relaxed);
    return task < count;
  }
};

// ----------------------------------------------------------------------------------------------
// vectors
// ----------------------------------------------------------------------------------------------

template <typename A> using IntOf = std::conditional_t<std::is_same_v<A, double>, int64_t, int32_t>;
template <typename A> struct IVecOf;
template <> struct IVecOf<float> { typedef int32_t type __attribute__((vector_size(kVecLanes * sizeof(int32_t)))); };
template <> struct IVecOf<double> { typedef int64_t type __attribute__((vector_size(kVecLanes * sizeof(int64_t)))); };

// The vector at p (64-byte aligned: scratch rows are whole vectors from 128-byte aligned bases).
template <typename A> FUSEKIT_INLINE typename VecOf<A>::type& vec_at(A* p) {
  return *reinterpret_cast<typename VecOf<A>::type*>(p);
}
template <typename A> FUSEKIT_INLINE const typename VecOf<A>::type& vec_at(const A* p) {
  return *reinterpret_cast<const typename VecOf<A>::type*>(p);
}
template <typename A> FUSEKIT_INLINE const typename IVecOf<A>::type& ivec_at(const IntOf<A>* p) {
  return *reinterpret_cast<const typename IVecOf<A>::type*>(p);
}

// 2^x for x <= 127 (softmax arguments are <= 0), exact 0 below 2^-126 so -inf and masked scores
// give 0. Degree-6 polynomial on [-1/2, 1/2] after rounding x to an integer: relative error
// ~1.2e-7, about one float rounding. In place: vectors wider than the baseline ABI's registers
// never cross a function boundary (everything here is inlined into per-ISA entries).
FUSEKIT_INLINE void exp2_vec(VecOf<float>::type& x) {
  using vf = VecOf<float>::type;
  using vi = IVecOf<float>::type;
  const vf xc = x < -126.0f ? vf{} - 126.0f : x;
  const vf n = (xc + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 shifter)
  const vf f = xc - n;
  vf p = vf{} + 1.5403530e-04f;                    // ln2^k / k!, k = 6 .. 0
  p = p * f + 1.3333558e-03f;
  p = p * f + 9.6181291e-03f;
  p = p * f + 5.5504109e-02f;
  p = p * f + 2.4022651e-01f;
  p = p * f + 6.9314718e-01f;
  p = p * f + 1.0f;
  const vi e = __builtin_convertvector(n, vi) << 23;
  const vf r = (vf)((vi)p + e);
  x = x < -126.0f ? vf{} : r;
}

FUSEKIT_INLINE void exp2_vec(VecOf<double>::type& x) {
  for (int l = 0; l < kVecLanes; ++l) x[l] = std::exp2(x[l]);
}

// n elements of storage type T to the accumulation type A.
template <typename T, typename A>
FUSEKIT_INLINE void load_row(A* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    // fixed-size chunks compile to vector moves; a libc call per short row (a head's D
    // elements) costs more than the copy
    constexpr int64_t kChunk = 64 / sizeof(A);
    int64_t i = 0;
    for (; i + kChunk <= n; i += kChunk) std::memcpy(dst + i, src + i, 64);
    for (; i < n; ++i) dst[i] = src[i];
  } else {
    typedef uint16_t u16v __attribute__((vector_size(kVecLanes * 2)));
    typedef uint32_t u32v __attribute__((vector_size(kVecLanes * 4)));
    typedef _Float16 h16v __attribute__((vector_size(kVecLanes * 2)));
    using vf = VecOf<float>::type;
    int64_t i = 0;
    for (; i + kVecLanes <= n; i += kVecLanes) {
      vf x;
      if constexpr (std::is_same_v<T, bf16_t>) {
        u16v u;
        std::memcpy(&u, src + i, sizeof(u));
        x = (vf)(__builtin_convertvector(u, u32v) << 16);
      } else {
        h16v h;
        std::memcpy(&h, src + i, sizeof(h));
        x = __builtin_convertvector(h, vf);
      }
      std::memcpy(dst + i, &x, sizeof(x));
    }
    for (; i < n; ++i) dst[i] = to_acc(src[i]);
  }
}

// ----------------------------------------------------------------------------------------------
// the micro-kernel: C[rows][vecs * 16] (+)= A(rows x depth) . B(depth x vecs * 16)
// ----------------------------------------------------------------------------------------------

enum class GemmInit { Zero, Add, ScaleLanes };  // C = AB; C += AB; C = C * lane_scale + AB

template <typename A>
struct Gemm {
  A* c; int64_t ldc;                          // 64-byte aligned rows (ldc a multiple of 16)
  const A* a; int64_t a_row, a_depth;         // A(r, k) = a[r * a_row + k * a_depth], any strides
  const A* b; int64_t ldb;                    // B row k = b + k * ldb, 64-byte aligned vectors
  int64_t rows, vecs, depth;
  GemmInit init;
  const A* lane_scale;                        // [vecs * 16] for GemmInit::ScaleLanes
};

// UnitRows: A rows are one element apart (a_row == 1), so row offsets are immediates.
template <typename A, int MR, int NV, bool UnitRows>
FUSEKIT_INLINE void gemm_block(const Gemm<A>& g, int64_t r0, int64_t v0) {
  using vec = typename VecOf<A>::type;
  vec c[MR][NV];
  A* cp = g.c + r0 * g.ldc + v0 * kVecLanes;
  if (g.init == GemmInit::Zero) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) c[r][v] = vec{};
  } else {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) c[r][v] = vec_at(cp + r * g.ldc + v * kVecLanes);
    if (g.init == GemmInit::ScaleLanes)
      for (int v = 0; v < NV; ++v) {
        const vec s = vec_at(g.lane_scale + (v0 + v) * kVecLanes);
        for (int r = 0; r < MR; ++r) c[r][v] *= s;
      }
  }
  const A* ap = g.a + r0 * g.a_row;
  const A* bp = g.b + v0 * kVecLanes;
  const int64_t ar = UnitRows ? 1 : g.a_row, ad = g.a_depth, ldb = g.ldb;
  for (int64_t k = 0; k < g.depth; ++k, ap += ad, bp += ldb) {
    vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = vec_at(bp + v * kVecLanes);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const A x = ap[r * ar];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) vec_at(cp + r * g.ldc + v * kVecLanes) = c[r][v];
}

// Row blocks [r0, r1) (a multiple of MR rows) of lane block v0. The launcher compiles one
// function per (MR, NV) and instruction set (Kit::rows): a small function keeps the block's
// accumulators, row offsets and loop counters in registers.
template <typename A, int MR, int NV, bool UnitRows>
FUSEKIT_INLINE void gemm_block_rows(const Gemm<A>& g, int64_t v0, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += MR) gemm_block<A, MR, NV, UnitRows>(g, r, v0);
}

template <class Kit, typename A, int NV, int MR, bool UnitRows>
FUSEKIT_INLINE void gemm_row_tail(const Gemm<A>& g, int64_t r0, int64_t v0, int64_t left) {
  if constexpr (MR >= 1) {
    if (left == MR) return Kit::template rows<A, MR, NV, UnitRows>(g, v0, r0, r0 + MR);
    gemm_row_tail<Kit, A, NV, MR - 1, UnitRows>(g, r0, v0, left);
  }
}

template <class Kit, typename A, int NV, int MR, bool UnitRows>
FUSEKIT_INLINE void gemm_rows(const Gemm<A>& g, int64_t v0) {
  const int64_t full = g.rows / MR * MR;
  if (full > 0) Kit::template rows<A, MR, NV, UnitRows>(g, v0, 0, full);
  if (full < g.rows) gemm_row_tail<Kit, A, NV, MR - 1, UnitRows>(g, full, v0, g.rows - full);
}

// Rows per block: as many as the accumulator budget allows, at most 12 when rows of A are one
// element apart (immediate offsets), 8 when they are a stride apart (each row holds an index
// register; more spill them and steal FMA-port cycles to reload them).
template <int NV, int AccVecs, bool UnitRows>
constexpr int kBlockRows = AccVecs / NV < (UnitRows ? 12 : 8) ? AccVecs / NV : (UnitRows ? 12 : 8);

template <class Kit, typename A, int NV, int AccVecs, bool UnitRows>
FUSEKIT_INLINE void gemm_vec_tail(const Gemm<A>& g, int64_t v0, int64_t left) {
  if constexpr (NV >= 1) {
    if (left == NV) return gemm_rows<Kit, A, NV, kBlockRows<NV, AccVecs, UnitRows>, UnitRows>(g, v0);
    gemm_vec_tail<Kit, A, NV - 1, AccVecs, UnitRows>(g, v0, left);
  }
}

template <class Kit, typename A, int MaxNV, int AccVecs, bool UnitRows>
FUSEKIT_INLINE void gemm_lane_blocks(const Gemm<A>& g) {
  int64_t v0 = 0;
  for (; v0 + MaxNV <= g.vecs; v0 += MaxNV)
    gemm_rows<Kit, A, MaxNV, kBlockRows<MaxNV, AccVecs, UnitRows>, UnitRows>(g, v0);
  if (v0 < g.vecs) gemm_vec_tail<Kit, A, MaxNV - 1, AccVecs, UnitRows>(g, v0, g.vecs - v0);
}

// Blocks of at most MaxNV vectors of B and AccVecs accumulator vectors (rows per block =
// AccVecs / NV, capped). Kit::gemm of the launcher; the drivers call it for every product.
template <class Kit, typename A, int MaxNV, int AccVecs>
FUSEKIT_INLINE void gemm_body(const Gemm<A>& g) {
  if (g.a_row == 1) return gemm_lane_blocks<Kit, A, MaxNV, AccVecs, true>(g);
  gemm_lane_blocks<Kit, A, MaxNV, AccVecs, false>(g);
}

// Carves 128-byte aligned arrays out of one scratch block; with a null base it only measures.
struct Carver {
  uintptr_t base;
  int64_t used = 0;
  template <typename E> E* take(int64_t n) {
    E* r = reinterpret_cast<E*>(base + used);
    used += round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(E)), 128);
    return r;
  }
};

// Online softmax over a tile S^T [n][Mp] (base-2 scores): updates m, l, writes P^T over S^T and
// alpha = exp2(m_old - m_new), the factor the O^T accumulator is rescaled by.
template <typename A>
FUSEKIT_INLINE void online_softmax_t(A* st, int64_t n, int64_t Mp, A* m, A* l, A* alpha) {
  using vec = typename VecOf<A>::type;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int64_t v = 0; v < Mp / kVecLanes; ++v) {
    A* col = st + v * kVecLanes;
    vec mx = vec{} + kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      const vec& s = vec_at(col + j * Mp);
      mx = s > mx ? s : mx;
    }
    vec& mv = vec_at(m + v * kVecLanes);
    const vec m_new = mv > mx ? mv : mx;
    const vec m_use = m_new == kNegInf ? vec{} : m_new;  // rows that saw nothing yet stay at 0
    vec sum{};
    for (int64_t j = 0; j < n; ++j) {
      vec& s = vec_at(col + j * Mp);
      s -= m_use;
      exp2_vec(s);
      sum += s;
    }
    vec a = mv - m_use;
    exp2_vec(a);
    vec_at(alpha + v * kVecLanes) = a;
    vec_at(l + v * kVecLanes) = vec_at(l + v * kVecLanes) * a + sum;
    mv = m_new;
  }
}

}  // namespace cpu
}  // namespace fusekit

// A Kit is the micro-kernel compiled for one instruction set: rows<A, MR, NV, .> runs register
// blocks of MR rows x NV vectors (one small function each), gemm blocks a whole product. The
// drivers (inlined into per-ISA entries) call Kit::gemm for every product. Budgets: MaxNV vectors
// of B and AccVecs accumulator vectors, for float / double (AVX-512: 24 of 32 zmm hold
// accumulators; AVX2 and SSE have 16 registers and a 16-lane vector spans 2 / 4 of them).
// Expand inside a launcher's anonymous namespace.
#define FUSEKIT_CPU_GEMM_KIT(ISA, ATTR, F_NV, F_ACC, D_NV, D_ACC)                                      \
  struct Kit_##ISA {                                                                                 \
    template <typename A, int MR, int NV, bool UnitRows>                                             \
    ATTR __attribute__((noinline)) static void rows(const ::fusekit::cpu::Gemm<A>& g, int64_t v0,    \
                                                    int64_t r0, int64_t r1) {                        \
      ::fusekit::cpu::gemm_block_rows<A, MR, NV, UnitRows>(g, v0, r0, r1);                           \
    }                                                                                                \
    ATTR static void gemm(const ::fusekit::cpu::Gemm<float>& g) {                                    \
      ::fusekit::cpu::gemm_body<Kit_##ISA, float, F_NV, F_ACC>(g);                                   \
    }                                                                                                \
    ATTR static void gemm(const ::fusekit::cpu::Gemm<double>& g) {                                   \
      ::fusekit::cpu::gemm_body<Kit_##ISA, double, D_NV, D_ACC>(g);                                  \
    }                                                                                                \
  };

// The three instruction sets every launcher compiles for.
#define FUSEKIT_CPU_GEMM_KITS()                                \
  FUSEKIT_CPU_GEMM_KIT(avx512, FUSEKIT_TARGET_AVX512, 4, 24, 2, 12) \
  FUSEKIT_CPU_GEMM_KIT(avx2, FUSEKIT_TARGET_AVX2, 1, 6, 1, 2)       \
  FUSEKIT_CPU_GEMM_KIT(base, , 1, 2, 1, 1)
