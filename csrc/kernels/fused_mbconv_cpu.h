// Torch-free CPU kernel of the Fused-MBConv block (EfficientNetV2):
//   a1 = act(conv_kxk(x, w_expand) + b_expand),  y = a1 . W_p^T + b_p (+ x),  or y = a1 (+ x)
// without a project. The expanded tensor a1 never reaches memory: a work item takes a run of
// output pixels of one sample (a band of output rows, row-major over (ho, wo)) and, per block of
// pixels,
//   1. gathers the k x k x Cin input patches of the block into rows (an implicit im2col in a
//      small buffer, converted to the accumulation type; taps outside the image read 0),
//   2. per chunk of expanded channels: a1 chunk = patches . W_e (the micro-kernel of
//      cpu_gemm.h; W_e packed once per call as [kh * kw * Cin][E] 16-lane rows), bias and
//      activation in place, then y_tile (+)= a1 chunk . W_p chunk (W_p packed as [E][Cout]),
//   3. adds b_p and the residual to the tile and stores it in x's dtype.
// x is read channels-last (unit channel stride, any pixel strides); y is written through four
// strides (channels-last or NCHW). Everything here is single-threaded and allocation-free: the
// launcher packs the weights into one buffer, hands each thread its scratch and claims work
// items from a TaskQueue.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_gemm.h"

namespace fusekit {

struct FusedMbconvParams {
  const void* x = nullptr;                   // [N, H, W, Cin] elements apart by the strides below
  int64_t x_sn = 0, x_sh = 0, x_sw = 0;      // unit channel stride
  void* y = nullptr;                         // [N, Cout, Ho, Wo] through four strides
  int64_t y_sn = 0, y_sc = 0, y_sh = 0, y_sw = 0;
  int64_t batch = 0, in_h = 0, in_w = 0, in_c = 0, expanded = 0, out_c = 0, out_h = 0, out_w = 0;
  int64_t kh = 1, kw = 1, stride_h = 1, stride_w = 1, pad_top = 0, pad_left = 0, dil_h = 1, dil_w = 1;
  int activation = 0;       // 0 identity, 1 relu, 2 relu6, 3 silu, 4 hardswish
  bool has_project = false; // false: y = a1 (out_c == expanded)
  bool residual = false;    // y += x (out_c == in_c, out_h == in_h, out_w == in_w)
};

namespace cpu {

// Sizes of the packed weights, the scratch and the work items.
struct FusedMbconvPlan {
  int64_t depth = 0;        // kh * kw * Cin: the expand product's depth
  int64_t e_pad = 0;        // E rounded up to whole vectors
  int64_t out_pad = 0;      // Cout rounded up (project) or 0
  int64_t e_chunk = 0;      // expanded channels per pass (a multiple of the vector width)
  int64_t block_pixels = 0; // M: rows of one product
  int64_t item_pixels = 0;  // output pixels of one work item (a multiple of M)
  int64_t items_per_sample = 0, items = 0;
  // packed weights (accumulation type, 128-byte aligned arrays): offsets in bytes
  int64_t w_expand_at = 0, b_expand_at = 0, w_project_at = 0, b_project_at = 0, packed_bytes = 0;
  int64_t scratch_bytes = 0;
};

template <typename A>
FusedMbconvPlan make_fused_mbconv_plan(const FusedMbconvParams& p, int64_t threads) {
  FusedMbconvPlan plan;
  plan.depth = p.kh * p.kw * p.in_c;
  plan.e_pad = round_up(p.expanded, kVecLanes);
  plan.out_pad = p.has_project ? round_up(p.out_c, kVecLanes) : 0;
  // a1 chunks of at most 256 lanes keep the chunk and the output tile in L1/L2 next to the patches
  const int64_t chunks = ceil_div(plan.e_pad, 256);
  plan.e_chunk = round_up(ceil_div(plan.e_pad, chunks), kVecLanes);
  // M: a multiple of 6 and 12 (the micro-kernel's row blocks), fewer when the patch rows are long
  // (about L1's size; measured flat from 12 to 144 pixels on the EfficientNetV2-S blocks)
  const int64_t budget = 48 * 1024 / int64_t(sizeof(A));
  plan.block_pixels = std::clamp<int64_t>(budget / std::max<int64_t>(plan.depth, 1) / 12 * 12, 12, 48);
  const int64_t pixels = p.out_h * p.out_w;
  plan.block_pixels = std::min(plan.block_pixels, round_up(pixels, 6));
  // work items: whole blocks, about 8 per thread over the batch (balance) but never below one block
  const int64_t want_items = std::max<int64_t>(1, 8 * threads / std::max<int64_t>(p.batch, 1));
  const int64_t blocks = ceil_div(pixels, plan.block_pixels);
  plan.item_pixels = ceil_div(blocks, std::min(blocks, want_items)) * plan.block_pixels;
  plan.items_per_sample = ceil_div(pixels, plan.item_pixels);
  plan.items = p.batch * plan.items_per_sample;

  Carver packed{0};
  plan.w_expand_at = int64_t(packed.used); packed.take<A>(plan.depth * plan.e_pad);
  plan.b_expand_at = int64_t(packed.used); packed.take<A>(plan.e_pad);
  plan.w_project_at = int64_t(packed.used); packed.take<A>(p.has_project ? p.expanded * plan.out_pad : 0);
  plan.b_project_at = int64_t(packed.used); packed.take<A>(plan.out_pad);
  plan.packed_bytes = packed.used;

  Carver scratch{0};
  scratch.take<A>(plan.block_pixels * plan.depth);      // patches
  scratch.take<A>(plan.block_pixels * plan.e_chunk);    // a1 chunk
  scratch.take<A>(plan.block_pixels * plan.out_pad);    // output tile (project)
  scratch.take<A>(std::max(plan.out_pad, plan.e_chunk)); // one residual row
  plan.scratch_bytes = scratch.used;
  return plan;
}

// Packs the weights once per call into `packed` (plan.packed_bytes, 128-byte aligned):
// W_e as [(i * kw + j) * Cin + c][e_pad] from w_expand [E, Cin, kh, kw], W_p as [E][out_pad] from
// w_project [Cout, E] (both contiguous), biases padded with zeros. Padded lanes are zero, so the
// padded a1 lanes are act(0) = 0 for every activation.
template <typename T>
void pack_fused_mbconv_weights(const FusedMbconvParams& p, const FusedMbconvPlan& plan, const T* w_expand,
                               const T* b_expand, const T* w_project, const T* b_project, void* packed) {
  using A = typename AccOf<T>::type;
  char* base = static_cast<char*>(packed);
  std::memset(base, 0, size_t(plan.packed_bytes));
  A* we = reinterpret_cast<A*>(base + plan.w_expand_at);
  const int64_t E = p.expanded, C = p.in_c, taps = p.kh * p.kw;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < taps; ++t) we[(t * C + c) * plan.e_pad + e] = to_acc(w_expand[(e * C + c) * taps + t]);
  if (b_expand != nullptr) {
    A* be = reinterpret_cast<A*>(base + plan.b_expand_at);
    for (int64_t e = 0; e < E; ++e) be[e] = to_acc(b_expand[e]);
  }
  if (p.has_project) {
    A* wp = reinterpret_cast<A*>(base + plan.w_project_at);
    for (int64_t o = 0; o < p.out_c; ++o)
      for (int64_t e = 0; e < E; ++e) wp[e * plan.out_pad + o] = to_acc(w_project[o * E + e]);
    if (b_project != nullptr) {
      A* bp = reinterpret_cast<A*>(base + plan.b_project_at);
      for (int64_t o = 0; o < p.out_c; ++o) bp[o] = to_acc(b_project[o]);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// pieces of a work item
// ----------------------------------------------------------------------------------------------

// n >= 1 elements to the accumulation type. Same type: whole vectors plus one last vector that
// overlaps the previous one (no element loop, which compilers turn into a libc call per row).
template <typename T, typename A>
FUSEKIT_INLINE void copy_row(A* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    using vec = typename VecOf<A>::type;
    if (n < kVecLanes) {
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
      return;
    }
    int64_t i = 0;
    for (; i + kVecLanes <= n; i += kVecLanes) std::memcpy(dst + i, src + i, sizeof(vec));
    if (i < n) std::memcpy(dst + n - kVecLanes, src + n - kVecLanes, sizeof(vec));
  } else {
    load_row<T, A>(dst, src, n);
  }
}

// Patch rows of output pixels [first, first + m) of sample n: row r = [tap][Cin], depth apart.
// A kernel row whose taps all fall inside the image and lie back to back in memory (dense
// channels-last x, no horizontal dilation) is one copy of kw * Cin elements.
template <typename T, typename A>
FUSEKIT_INLINE void gather_patches(const FusedMbconvParams& p, int64_t n, int64_t first, int64_t m, int64_t depth,
                                   A* __restrict__ patches) {
  const T* xs = static_cast<const T*>(p.x) + n * p.x_sn;
  const int64_t C = p.in_c, span = p.dil_w * (p.kw - 1);
  const bool dense_taps = p.dil_w == 1 && p.x_sw == C;
  int64_t ho = first / p.out_w, wo = first % p.out_w;
  for (int64_t r = 0; r < m; ++r) {
    A* row = patches + r * depth;
    const int64_t h0 = ho * p.stride_h - p.pad_top, w0 = wo * p.stride_w - p.pad_left;
    const bool cols_in = w0 >= 0 && w0 + span < p.in_w;
    for (int64_t i = 0; i < p.kh; ++i, row += p.kw * C) {
      const int64_t hi = h0 + i * p.dil_h;
      if (hi < 0 || hi >= p.in_h) {
        std::memset(row, 0, size_t(p.kw * C) * sizeof(A));
        continue;
      }
      const T* src = xs + hi * p.x_sh;
      if (cols_in && dense_taps) {
        copy_row<T, A>(row, src + w0 * p.x_sw, p.kw * C);
        continue;
      }
      for (int64_t j = 0; j < p.kw; ++j) {
        const int64_t wi = w0 + j * p.dil_w;
        if (wi >= 0 && wi < p.in_w)
          copy_row<T, A>(row + j * C, src + wi * p.x_sw, C);
        else
          std::memset(row + j * C, 0, size_t(C) * sizeof(A));
      }
    }
    if (++wo == p.out_w) { wo = 0; ++ho; }
  }
}

// u = act(u), in place (vectors wider than the baseline ABI's registers never cross a call).
template <int Act, typename A, typename V = typename VecOf<A>::type>
FUSEKIT_INLINE void activate(V& u) {
  if constexpr (Act == 1) {
    u = u > A(0) ? u : V{};
  } else if constexpr (Act == 2) {
    u = u > A(0) ? u : V{};
    u = u < A(6) ? u : V{} + A(6);
  } else if constexpr (Act == 3) {
    // u * sigmoid(u) = u / (1 + 2^(-u log2 e)); the exponent is capped at 126, inside exp2_vec's
    // range (the quotient is ~0 there either way)
    V t = u * A(-kLog2e);
    t = t < A(126) ? t : V{} + A(126);
    exp2_vec(t);
    u = u / (A(1) + t);
  } else if constexpr (Act == 4) {
    V r = u + A(3);
    r = r > A(0) ? r : V{};
    r = r < A(6) ? r : V{} + A(6);
    u = u * r * A(1.0 / 6.0);
  }
}

// tile[r][0, vecs * 16) = act(tile + bias) for r < m.
template <int Act, typename A>
FUSEKIT_INLINE void bias_activation_rows(A* tile, int64_t ld, int64_t m, int64_t vecs, const A* bias) {
  using vec = typename VecOf<A>::type;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t v = 0; v < vecs; ++v) {
      vec& u = vec_at(tile + r * ld + v * kVecLanes);
      u += vec_at(bias + v * kVecLanes);
      activate<Act, A>(u);
    }
}

template <typename A>
FUSEKIT_INLINE void bias_activation(int act, A* tile, int64_t ld, int64_t m, int64_t vecs, const A* bias) {
  switch (act) {
    case 1: return bias_activation_rows<1>(tile, ld, m, vecs, bias);
    case 2: return bias_activation_rows<2>(tile, ld, m, vecs, bias);
    case 3: return bias_activation_rows<3>(tile, ld, m, vecs, bias);
    case 4: return bias_activation_rows<4>(tile, ld, m, vecs, bias);
    default: return bias_activation_rows<0>(tile, ld, m, vecs, bias);
  }
}

// Stores channels [c0, c0 + cc) of output pixels [first, first + m): y = tile (+ bias) (+ x).
// tile row r holds channel c0 + k at k; bias (or null) is indexed from channel 0; row_buf holds
// one output row in the accumulation type before its conversion.
template <typename T, typename A>
FUSEKIT_INLINE void store_tile(const FusedMbconvParams& p, int64_t n, int64_t first, int64_t m, const A* tile,
                               int64_t ld, int64_t c0, int64_t cc, const A* bias, A* __restrict__ row_buf) {
  const T* xs = static_cast<const T*>(p.x) + n * p.x_sn + c0;
  T* ys = static_cast<T*>(p.y) + n * p.y_sn + c0 * p.y_sc;
  int64_t ho = first / p.out_w, wo = first % p.out_w;
  for (int64_t r = 0; r < m; ++r) {
    const A* t = tile + r * ld;
    A* __restrict__ out = row_buf;
    if (p.residual) {
      const T* res = xs + ho * p.x_sh + wo * p.x_sw;
      if constexpr (std::is_same_v<T, A>) {
        for (int64_t k = 0; k < cc; ++k) out[k] = t[k] + res[k];
      } else {
        load_row<T, A>(out, res, cc);
        for (int64_t k = 0; k < cc; ++k) out[k] += t[k];
      }
    } else {
      for (int64_t k = 0; k < cc; ++k) out[k] = t[k];
    }
    if (bias != nullptr)
      for (int64_t k = 0; k < cc; ++k) out[k] += bias[c0 + k];
    T* yp = ys + ho * p.y_sh + wo * p.y_sw;
    if (p.y_sc == 1) {
      if constexpr (std::is_same_v<T, A>) {
        for (int64_t k = 0; k < cc; ++k) yp[k] = out[k];
      } else {
        for (int64_t k = 0; k < cc; ++k) yp[k] = from_acc<T>(out[k]);
      }
    } else {
      for (int64_t k = 0; k < cc; ++k) yp[k * p.y_sc] = from_acc<T>(out[k]);
    }
    if (++wo == p.out_w) { wo = 0; ++ho; }
  }
}

// Claims work items from q until none is left. scratch: plan.scratch_bytes, 128-byte aligned.
template <typename T, class Kit>
FUSEKIT_INLINE void fused_mbconv_tasks(const FusedMbconvParams& p, const FusedMbconvPlan& plan, const void* packed,
                                       TaskQueue& q, void* scratch) {
  using A = typename AccOf<T>::type;
  const char* pk = static_cast<const char*>(packed);
  const A* w_expand = reinterpret_cast<const A*>(pk + plan.w_expand_at);
  const A* b_expand = reinterpret_cast<const A*>(pk + plan.b_expand_at);
  const A* w_project = reinterpret_cast<const A*>(pk + plan.w_project_at);
  const A* b_project = reinterpret_cast<const A*>(pk + plan.b_project_at);
  Carver carve{reinterpret_cast<uintptr_t>(scratch)};
  A* patches = carve.take<A>(plan.block_pixels * plan.depth);
  A* a1 = carve.take<A>(plan.block_pixels * plan.e_chunk);
  A* out_tile = carve.take<A>(plan.block_pixels * plan.out_pad);
  A* row_buf = carve.take<A>(std::max(plan.out_pad, plan.e_chunk));

  const int64_t pixels = p.out_h * p.out_w, E = p.expanded, K = plan.depth;
  const int64_t ld_a1 = plan.e_chunk, out_vecs = plan.out_pad / kVecLanes;
  int64_t item;
  while (q.claim(item)) {
    const int64_t n = item / plan.items_per_sample;
    const int64_t begin = item % plan.items_per_sample * plan.item_pixels;
    const int64_t end = std::min(begin + plan.item_pixels, pixels);
    for (int64_t first = begin; first < end; first += plan.block_pixels) {
      const int64_t m = std::min(plan.block_pixels, end - first);
      gather_patches<T, A>(p, n, first, m, K, patches);
      for (int64_t e0 = 0; e0 < E; e0 += plan.e_chunk) {
        const int64_t ec = std::min(plan.e_chunk, E - e0), ec_vecs = ceil_div(ec, kVecLanes);
        Kit::gemm(Gemm<A>{a1, ld_a1, patches, K, 1, w_expand + e0, plan.e_pad, m, ec_vecs, K, GemmInit::Zero,
                          nullptr});
        bias_activation(p.activation, a1, ld_a1, m, ec_vecs, b_expand + e0);
        if (p.has_project)
          Kit::gemm(Gemm<A>{out_tile, plan.out_pad, a1, ld_a1, 1, w_project + e0 * plan.out_pad, plan.out_pad, m,
                            out_vecs, ec, e0 == 0 ? GemmInit::Zero : GemmInit::Add, nullptr});
        else
          store_tile<T, A>(p, n, first, m, a1, ld_a1, e0, ec, nullptr, row_buf);
      }
      if (p.has_project) store_tile<T, A>(p, n, first, m, out_tile, plan.out_pad, 0, p.out_c, b_project, row_buf);
    }
  }
}

}  // namespace cpu
}  // namespace fusekit
