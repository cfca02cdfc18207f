// Torch-free CPU kernels of the depthwise convolution family.
//
// Scheme: channels are processed in blocks of kLanes (16). For each work item (image n,
// segment, channel block, band of output rows) the needed input rows of the block are packed
// once into a zero-padded scratch tile laid out [row][col][lane] in the accumulation type. The
// same microkernel then serves NCHW and NHWC, any stride, dilation and padding, and the
// transposed direction (backward-input packs grad_out upsampled by the stride and uses the
// flipped kernel). Accumulators for a whole output row live in an L1-resident row buffer, so
// the kernel taps stream from L1 whatever the kernel size.
//
// Work is split by the caller (the launcher uses at::parallel_for) into ranges of work items;
// every function here is single-threaded and allocation-free (scratch comes from the caller).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_isa.h"
#include "depthwise_conv2d_params.h"

namespace fusekit::cpu {

constexpr int kLanes = kVecLanes;  // channels per block: one VecOf vector (an AVX-512 fp32 register)
constexpr int kOutBlock = 8;     // output columns (forward) / taps (backward-weight) held in registers
constexpr int kMaxGroupBlocks = 8;  // channel blocks one work item may pack together

// ----------------------------------------------------------------------------------------------
// work decomposition
// ----------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class Direction { Forward, BackwardInput, BackwardWeight };

// Geometry of one segment seen as a "forward" convolution from a (virtual) source to a target.
struct SegmentGeometry {
  int64_t kh, kw;
  int64_t src_H, src_W;       // real source sizes (x or grad_out)
  int64_t up_h, up_w;         // source upsampling (the stride, in backward-input)
  int64_t off_h, off_w;       // virtual source row/col of tile row/col 0 for target row/col 0
  int64_t tgt_H, tgt_W;       // target sizes (y or grad_x)
  int64_t step_h, step_w;     // conv stride over the tile
  int64_t dil_h, dil_w;
  bool flip;                  // use the flipped kernel
};

inline SegmentGeometry segment_geometry(const DepthwiseConv2dParams& p, const DepthwiseSegment& s, Direction d) {
  SegmentGeometry g{};
  g.kh = s.kh; g.kw = s.kw; g.dil_h = p.dil_h; g.dil_w = p.dil_w;
  if (d == Direction::BackwardInput) {
    g.src_H = p.Ho; g.src_W = p.Wo; g.up_h = p.stride_h; g.up_w = p.stride_w;
    g.off_h = (s.kh - 1) * p.dil_h - s.pad_top;
    g.off_w = (s.kw - 1) * p.dil_w - s.pad_left;
    g.tgt_H = p.H; g.tgt_W = p.W; g.step_h = 1; g.step_w = 1; g.flip = true;
  } else {
    g.src_H = p.H; g.src_W = p.W; g.up_h = 1; g.up_w = 1;
    g.off_h = s.pad_top; g.off_w = s.pad_left;
    g.tgt_H = p.Ho; g.tgt_W = p.Wo; g.step_h = p.stride_h; g.step_w = p.stride_w; g.flip = false;
  }
  return g;
}

// Tile sizes for a band of `band` target rows.
inline int64_t tile_rows(const SegmentGeometry& g, int64_t band) {
  return (band - 1) * g.step_h + (g.kh - 1) * g.dil_h + 1;
}
inline int64_t tile_cols(const SegmentGeometry& g) {
  return (g.tgt_W - 1) * g.step_w + (g.kw - 1) * g.dil_w + 1;
}

struct Plan {
  int64_t band = 1;              // target rows per work item
  int64_t bands = 1;             // bands per (n, channel group)
  int64_t group = 1;             // channel blocks per work item (channels_last packs them in one pass)
  int64_t units = 0;             // channel groups over all segments
  int64_t items = 0;             // N * units * bands
  int64_t scratch_elems = 0;     // accumulation-type elements of scratch one thread needs
  int64_t grad_weight_elems = 0; // backward-weight: per-thread accumulator elements (weights + bias)
};

inline int64_t segment_blocks(const DepthwiseSegment& s) { return ceil_div(s.c_end - s.c_begin, kLanes); }
inline int64_t segment_units(const DepthwiseSegment& s, int64_t group) { return ceil_div(segment_blocks(s), group); }

// Chooses the band height: tiles small enough to stay in L2, and enough items for every thread.
inline Plan make_plan(const DepthwiseConv2dParams& p, Direction d, int threads, int64_t acc_bytes) {
  Plan plan;
  int64_t tgt_H = d == Direction::BackwardInput ? p.H : p.Ho;
  int64_t max_tile = 0, max_cols = 0, max_taps = 0, max_blocks = 1;
  for (int s = 0; s < p.num_segments; ++s) {
    max_blocks = std::max(max_blocks, segment_blocks(p.seg[s]));
    if (p.seg[s].kh > 0) {
      plan.grad_weight_elems += (p.seg[s].c_end - p.seg[s].c_begin) * (p.seg[s].kh * p.seg[s].kw + 1);
      max_taps = std::max(max_taps, p.seg[s].kh * p.seg[s].kw);
    }
  }
  constexpr int64_t kTileBudget = 1 << 20;  // bytes of packed input per item (L2 is >= 1 MiB per core)
  auto tile_bytes = [&](int64_t b) {
    int64_t worst = 0;
    for (int s = 0; s < p.num_segments; ++s) {
      if (p.seg[s].kh == 0) continue;
      SegmentGeometry g = segment_geometry(p, p.seg[s], d);
      worst = std::max(worst, tile_rows(g, b) * tile_cols(g));
    }
    return worst * kLanes * acc_bytes;
  };
  auto items = [&](int64_t group, int64_t band) {
    int64_t units = 0;
    for (int s = 0; s < p.num_segments; ++s) units += segment_units(p.seg[s], group);
    return p.N * units * ceil_div(tgt_H, band);
  };
  // channels_last rows hold every channel of a pixel contiguously: packing several blocks per item
  // reads them in one streaming pass instead of one strided 64-byte read per block
  int64_t group = (p.channels_last && d != Direction::BackwardWeight) ? std::min<int64_t>(max_blocks, 8) : 1;
  int64_t halo = 0;  // extra tile rows a band needs beyond its own
  for (int s = 0; s < p.num_segments; ++s)
    if (p.seg[s].kh > 0) halo = std::max(halo, (p.seg[s].kh - 1) * p.dil_h);
  int64_t band = std::max<int64_t>(tgt_H, 1);
  // shrink bands while they stay at least twice the halo (repacked per band), then the group
  while (band > 2 * halo && band > 1 && group * tile_bytes(band) > kTileBudget) band = ceil_div(band, 2);
  while (group > 1 && group * tile_bytes(band) > kTileBudget) group = ceil_div(group, 2);
  while (band > 1 && group * tile_bytes(band) > kTileBudget) band = ceil_div(band, 2);
  while (band > 4 && items(group, band) < 4 * int64_t(threads)) band = ceil_div(band, 2);
  while (group > 1 && items(group, band) < 4 * int64_t(threads)) group = ceil_div(group, 2);
  plan.group = group;
  plan.band = band;
  plan.bands = ceil_div(tgt_H, band);
  for (int s = 0; s < p.num_segments; ++s) plan.units += segment_units(p.seg[s], group);
  plan.items = p.N * plan.units * plan.bands;
  for (int s = 0; s < p.num_segments; ++s) {
    if (p.seg[s].kh == 0) continue;
    SegmentGeometry g = segment_geometry(p, p.seg[s], d);
    max_tile = std::max(max_tile, tile_rows(g, band) * tile_cols(g));
    max_cols = std::max(max_cols, g.tgt_W);
  }
  // per block: tile + packed weights + row accumulators (or the packed grad_out band) + alignment slack
  int64_t second = d == Direction::BackwardWeight ? band * p.Wo : max_cols;
  plan.scratch_elems = group * (max_tile + max_taps + second + 4) * kLanes;
  return plan;
}

// One work item: channels [c0, c0 + nc) of segment seg (ceil(nc / kLanes) blocks), image n,
// target rows [row0, row0 + rows).
struct ItemIndex { int64_t n; int seg; int64_t c0; int64_t nc; int64_t row0; int64_t rows; };

inline int block_lanes(const ItemIndex& it, int64_t b) { return int(std::min<int64_t>(kLanes, it.nc - b * kLanes)); }
inline int64_t item_blocks(const ItemIndex& it) { return ceil_div(it.nc, kLanes); }

inline ItemIndex decode_item(const DepthwiseConv2dParams& p, const Plan& plan, int64_t tgt_H, int64_t item) {
  ItemIndex it{};
  int64_t band_idx = item % plan.bands;
  int64_t rest = item / plan.bands;
  int64_t unit = rest % plan.units;
  it.n = rest / plan.units;
  int s = 0;
  while (unit >= segment_units(p.seg[s], plan.group)) unit -= segment_units(p.seg[s++], plan.group);
  it.seg = s;
  it.c0 = p.seg[s].c_begin + unit * plan.group * kLanes;
  it.nc = std::min<int64_t>(plan.group * kLanes, p.seg[s].c_end - it.c0);
  it.row0 = band_idx * plan.band;
  it.rows = std::min(plan.band, tgt_H - it.row0);
  return it;
}

// ----------------------------------------------------------------------------------------------
// packing
// ----------------------------------------------------------------------------------------------

// One full block of kLanes channels to / from storage as whole vectors (GCC keeps the
// element-wise loops scalar).
template <typename T, typename A>
FUSEKIT_INLINE void load_lanes(A* __restrict__ d, const T* __restrict__ s) {
  typename VecOf<A>::type x;
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(&x, s, sizeof(x));
  } else {
    A tmp[kLanes];
    for (int l = 0; l < kLanes; ++l) tmp[l] = to_acc(s[l]);
    std::memcpy(&x, tmp, sizeof(x));
  }
  std::memcpy(d, &x, sizeof(x));
}

template <typename T, typename A>
FUSEKIT_INLINE void store_lanes(T* __restrict__ d, const A* __restrict__ s) {
  if constexpr (std::is_same_v<T, A>) {
    typename VecOf<A>::type x;
    std::memcpy(&x, s, sizeof(x));
    std::memcpy(d, &x, sizeof(x));
  } else {
    for (int l = 0; l < kLanes; ++l) d[l] = from_acc<T>(s[l]);
  }
}

// For each block b of the nc channels starting at src_nc0 (lanes beyond nc are 0):
// tiles[b][r][q][lane] = src[n, c0 + 16b + lane, v / up_h, u / up_w] with v = vrow0 + r,
// u = vcol0 + q when v, u are non-negative multiples of the upsampling inside the source, else 0.
// The tiles of consecutive blocks are tile_elems apart. In channels_last every pixel's channels
// are read in one contiguous pass over all blocks.
template <typename T, typename A>
FUSEKIT_INLINE void pack_tiles(A* tiles, int64_t tile_elems, int64_t rows, int64_t cols, const T* src_nc0,
                               const int64_t* st, int64_t src_H, int64_t src_W, int64_t up_h, int64_t up_w,
                               int64_t vrow0, int64_t vcol0, int64_t nc, bool channels_last) {
  const int64_t nb = ceil_div(nc, kLanes);
  const int last = int(nc - (nb - 1) * kLanes);  // lanes of the last block
  // columns q whose virtual column is a multiple of up_w inside [0, (src_W - 1) * up_w]
  const int64_t q_first = vcol0 >= 0 ? (up_w - vcol0 % up_w) % up_w : -vcol0;
  const int64_t q_end = std::min(cols, (src_W - 1) * up_w - vcol0 + 1);
  // Without upsampling and with full lanes the copy overwrites the interior: zero only the
  // padding border (a full memset costs as much as the copy at small kernels).
  for (int64_t b = 0; b < nb; ++b) {
    A* tile = tiles + b * tile_elems;
    const bool dense = up_h == 1 && up_w == 1 && (b < nb - 1 || last == kLanes);
    if (!dense) {
      std::memset(tile, 0, sizeof(A) * rows * cols * kLanes);
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t v = vrow0 + r;
      A* dst_row = tile + r * cols * kLanes;
      if (v < 0 || v >= src_H || q_end <= q_first) {
        std::memset(dst_row, 0, sizeof(A) * cols * kLanes);
      } else {
        std::memset(dst_row, 0, sizeof(A) * q_first * kLanes);
        std::memset(dst_row + q_end * kLanes, 0, sizeof(A) * (cols - q_end) * kLanes);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t v = vrow0 + r;
    if (v < 0 || v % up_h != 0 || v / up_h >= src_H) continue;
    const T* src_row = src_nc0 + (v / up_h) * st[2];
    if (channels_last) {
      for (int64_t q = q_first; q < q_end; q += up_w) {
        const T* __restrict__ s = src_row + ((vcol0 + q) / up_w) * st[3];
        A* d = tiles + (r * cols + q) * kLanes;
        for (int64_t b = 0; b < nb; ++b, s += kLanes, d += tile_elems) {
          if (b < nb - 1 || last == kLanes) {
            load_lanes(d, s);
          } else {
            for (int l = 0; l < last; ++l) d[l] = to_acc(s[l]);
          }
        }
      }
    } else {
      for (int64_t c = 0; c < nc; ++c) {
        const T* s = src_row + c * st[1];
        A* dst_row = tiles + (c / kLanes) * tile_elems + r * cols * kLanes + c % kLanes;
        for (int64_t q = q_first; q < q_end; q += up_w) dst_row[q * kLanes] = to_acc(s[((vcol0 + q) / up_w) * st[3]]);
      }
    }
  }
}

// wt[i][j][lane] = w[c0 + lane - c_begin][i][j] (flipped in both axes when asked), 0 for lanes >= cb.
template <typename T, typename A>
FUSEKIT_INLINE void pack_weights(A* wt, const DepthwiseSegment& s, int64_t c0, int cb, bool flip) {
  const int64_t taps = s.kh * s.kw;
  std::memset(wt, 0, sizeof(A) * taps * kLanes);
  const T* w = static_cast<const T*>(s.weight) + (c0 - s.c_begin) * taps;
  for (int l = 0; l < cb; ++l)
    for (int64_t t = 0; t < taps; ++t) wt[(flip ? taps - 1 - t : t) * kLanes + l] = to_acc(w[l * taps + t]);
}

// ----------------------------------------------------------------------------------------------
// microkernels
// ----------------------------------------------------------------------------------------------

// Unit stride and dilation: output t of a block and tap j read the same input vector x[t + j],
// so each loaded vector feeds up to J FMAs (T + J - 1 loads of x and J of w per T * J FMAs).
template <typename vec, int T, int J>
FUSEKIT_INLINE void fma_block_unit(vec (&a)[T], const vec* x, const vec* w) {
  vec wr[J];
  for (int j = 0; j < J; ++j) wr[j] = w[j];
  for (int m = 0; m < T + J - 1; ++m) {
    const vec xv = x[m];
    for (int j = 0; j < J; ++j) {
      const int t = m - j;
      if (t >= 0 && t < T) a[t] += xv * wr[j];
    }
  }
}

template <typename vec, int T>
FUSEKIT_INLINE void kernel_row_block_unit(vec* acc, const vec* x, const vec* w, int64_t kw) {
  vec a[T];
  for (int t = 0; t < T; ++t) a[t] = acc[t];
  int64_t j = 0;
  for (; j + 4 <= kw; j += 4) fma_block_unit<vec, T, 4>(a, x + j, w + j);
  if (j + 2 <= kw) { fma_block_unit<vec, T, 2>(a, x + j, w + j); j += 2; }
  if (j < kw) fma_block_unit<vec, T, 1>(a, x + j, w + j);
  for (int t = 0; t < T; ++t) acc[t] = a[t];
}

// acc[wo] += sum_j tile_row[wo * step + j * dil] * wt_row[j] for wo in [0, W): one kernel row.
// Block is the number of outputs held in registers (chosen per ISA by the launcher).
template <typename A, int Block>
FUSEKIT_INLINE void accumulate_kernel_row(typename VecOf<A>::type* acc, const A* tile_row, const A* wt_row,
                                          int64_t W, int64_t kw, int64_t step, int64_t dil) {
  using vec = typename VecOf<A>::type;
  const vec* x = reinterpret_cast<const vec*>(tile_row);
  const vec* w = reinterpret_cast<const vec*>(wt_row);
  int64_t wo = 0;
  if (step == 1 && dil == 1) {
    for (; wo + Block <= W; wo += Block) kernel_row_block_unit<vec, Block>(acc + wo, x + wo, w, kw);
    if constexpr (Block > 4)
      for (; wo + 4 <= W; wo += 4) kernel_row_block_unit<vec, 4>(acc + wo, x + wo, w, kw);
    for (; wo < W; ++wo) kernel_row_block_unit<vec, 1>(acc + wo, x + wo, w, kw);
    return;
  }
  for (; wo + kOutBlock <= W; wo += kOutBlock) {
    vec a[kOutBlock];
    for (int t = 0; t < kOutBlock; ++t) a[t] = acc[wo + t];
    for (int64_t j = 0; j < kw; ++j) {
      const vec wj = w[j];
      const vec* xj = x + wo * step + j * dil;
      for (int t = 0; t < kOutBlock; ++t) a[t] += xj[t * step] * wj;
    }
    for (int t = 0; t < kOutBlock; ++t) acc[wo + t] = a[t];
  }
  for (; wo < W; ++wo) {
    vec a = acc[wo];
    for (int64_t j = 0; j < kw; ++j) a += x[wo * step + j * dil] * w[j];
    acc[wo] = a;
  }
}

// Whether tile row with virtual source row v holds source data: kernel rows over padding (or
// between upsampled rows) only add zeros and are skipped, which matters on maps not much larger
// than the kernel.
inline bool source_row_valid(const SegmentGeometry& g, int64_t v) {
  return v >= 0 && v % g.up_h == 0 && v / g.up_h < g.src_H;
}

// Forward / backward-input of one work item of a convolution segment (all its channel blocks).
template <typename T, typename A, int Block>
FUSEKIT_INLINE void conv_item(const DepthwiseConv2dParams& p, const SegmentGeometry& g, const DepthwiseSegment& s,
                              const ItemIndex& it, const T* src, const int64_t* src_st, T* dst,
                              const int64_t* dst_st, bool use_bias, A* scratch) {
  using vec = typename VecOf<A>::type;
  const int64_t rows = tile_rows(g, it.rows), cols = tile_cols(g);
  const int64_t nb = item_blocks(it), taps = g.kh * g.kw;
  const int64_t tile_elems = rows * cols * kLanes;
  A* tiles = scratch;                                   // [nb][rows][cols][lanes]
  A* wts = tiles + nb * tile_elems;                     // [nb][taps][lanes]
  vec* accs = reinterpret_cast<vec*>(wts + nb * taps * kLanes);  // [nb][tgt_W]
  pack_tiles(tiles, tile_elems, rows, cols, src + it.n * src_st[0] + it.c0 * src_st[1], src_st, g.src_H, g.src_W,
             g.up_h, g.up_w, it.row0 * g.step_h - g.off_h, -g.off_w, it.nc, p.channels_last);
  vec bias[kMaxGroupBlocks] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t cb0 = it.c0 + b * kLanes;
    pack_weights<T>(wts + b * taps * kLanes, s, cb0, block_lanes(it, b), g.flip);
    if (use_bias && s.bias != nullptr) {
      A lanes[kLanes] = {};
      for (int l = 0; l < block_lanes(it, b); ++l) lanes[l] = to_acc(static_cast<const T*>(s.bias)[cb0 - s.c_begin + l]);
      std::memcpy(&bias[b], lanes, sizeof(lanes));
    }
  }
  T* dst_nc0 = dst + it.n * dst_st[0] + it.c0 * dst_st[1];
  for (int64_t r = 0; r < it.rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      vec* acc = accs + b * g.tgt_W;
      const A* tile = tiles + b * tile_elems + r * g.step_h * cols * kLanes;
      for (int64_t wo = 0; wo < g.tgt_W; ++wo) acc[wo] = bias[b];
      for (int64_t i = 0; i < g.kh; ++i)
        if (source_row_valid(g, it.row0 * g.step_h - g.off_h + r * g.step_h + i * g.dil_h))
          accumulate_kernel_row<A, Block>(acc, tile + i * g.dil_h * cols * kLanes, wts + (b * taps + i * g.kw) * kLanes,
                                        g.tgt_W, g.kw, g.step_w, g.dil_w);
    }
    T* out_row = dst_nc0 + (it.row0 + r) * dst_st[2];
    const A* a = reinterpret_cast<const A*>(accs);
    if (p.channels_last) {  // every channel of a pixel in one contiguous pass
      for (int64_t wo = 0; wo < g.tgt_W; ++wo) {
        T* __restrict__ o = out_row + wo * dst_st[3];
        for (int64_t b = 0; b < nb; ++b, o += kLanes) {
          const A* ab = a + (b * g.tgt_W + wo) * kLanes;
          if (block_lanes(it, b) == kLanes) {
            store_lanes(o, ab);
          } else {
            for (int l = 0; l < block_lanes(it, b); ++l) o[l] = from_acc<T>(ab[l]);
          }
        }
      }
    } else {
      for (int64_t c = 0; c < it.nc; ++c) {
        const A* ab = a + (c / kLanes) * g.tgt_W * kLanes + c % kLanes;
        T* o = out_row + c * dst_st[1];
        for (int64_t wo = 0; wo < g.tgt_W; ++wo) o[wo * dst_st[3]] = from_acc<T>(ab[wo * kLanes]);
      }
    }
  }
}

// Identity segment: copy rows [row0, row0 + rows) of channels [c0, c0 + nc), contiguous runs at a time.
template <typename T>
FUSEKIT_INLINE void copy_item(const ItemIndex& it, int64_t W, const T* src, const int64_t* src_st, T* dst,
                              const int64_t* dst_st, bool channels_last) {
  for (int64_t r = it.row0; r < it.row0 + it.rows; ++r) {
    const T* s = src + it.n * src_st[0] + it.c0 * src_st[1] + r * src_st[2];
    T* d = dst + it.n * dst_st[0] + it.c0 * dst_st[1] + r * dst_st[2];
    if (channels_last) {  // the item's channels of a pixel are contiguous
      for (int64_t w = 0; w < W; ++w) std::memcpy(d + w * dst_st[3], s + w * src_st[3], sizeof(T) * it.nc);
    } else {              // a row of one channel is contiguous
      for (int64_t c = 0; c < it.nc; ++c) std::memcpy(d + c * dst_st[1], s + c * src_st[1], sizeof(T) * W);
    }
  }
}

// Forward (Direction::Forward) or backward-input (Direction::BackwardInput) over items [begin, end).
// Forward: src = x (in_stride), dst = y (out_stride). Backward-input: src = grad_y, dst = grad_x.
template <typename T, int Block>
FUSEKIT_INLINE void conv_items(const DepthwiseConv2dParams& p, const Plan& plan, Direction d, const T* src, T* dst,
                               int64_t begin, int64_t end, typename AccOf<T>::type* scratch) {
  using A = typename AccOf<T>::type;
  const bool fwd = d == Direction::Forward;
  const int64_t* src_st = fwd ? p.in_stride : p.out_stride;
  const int64_t* dst_st = fwd ? p.out_stride : p.in_stride;
  const int64_t tgt_H = fwd ? p.Ho : p.H;
  for (int64_t item = begin; item < end; ++item) {
    const ItemIndex it = decode_item(p, plan, tgt_H, item);
    const DepthwiseSegment& s = p.seg[it.seg];
    if (s.kh == 0) {
      copy_item(it, fwd ? p.Wo : p.W, src, src_st, dst, dst_st, p.channels_last);
      continue;
    }
    conv_item<T, A, Block>(p, segment_geometry(p, s, d), s, it, src, src_st, dst, dst_st, fwd, scratch);
  }
}

// Backward-weight over items [begin, end): grad_acc (plan.grad_weight_elems, laid out per
// segment as [channels][kh*kw] weights then [channels] bias) receives += contributions.
// With unit stride and dilation, tap j of a block gathers sum_t g[t] * x[t + j]: the same
// product as the forward microkernel with the roles of taps and outputs swapped, so
// fma_block_unit<vec, taps, grads>(acc, x, g) computes it.
template <typename T, int Block>
FUSEKIT_INLINE void backward_weight_items(const DepthwiseConv2dParams& p, const Plan& plan, const T* grad_out,
                                          const T* in, int64_t begin, int64_t end, typename AccOf<T>::type* scratch,
                                          typename AccOf<T>::type* grad_acc) {
  using A = typename AccOf<T>::type;
  using vec = typename VecOf<A>::type;
  for (int64_t item = begin; item < end; ++item) {
    const ItemIndex it = decode_item(p, plan, p.Ho, item);
    const DepthwiseSegment& s = p.seg[it.seg];
    if (s.kh == 0) continue;
    const SegmentGeometry g = segment_geometry(p, s, Direction::Forward);
    const int64_t rows = tile_rows(g, it.rows), cols = tile_cols(g);
    A* tile = scratch;
    A* gtile = tile + rows * cols * kLanes;
    // one channel block per item here (plan.group == 1 for the weight gradient)
    pack_tiles(tile, 0, rows, cols, in + it.n * p.in_stride[0] + it.c0 * p.in_stride[1], p.in_stride, p.H, p.W, 1,
               1, it.row0 * p.stride_h - s.pad_top, -s.pad_left, it.nc, p.channels_last);
    pack_tiles(gtile, 0, it.rows, p.Wo, grad_out + it.n * p.out_stride[0] + it.c0 * p.out_stride[1], p.out_stride,
               p.Ho, p.Wo, 1, 1, it.row0, 0, it.nc, p.channels_last);
    // this segment's slice of the accumulator
    int64_t offset = 0;
    for (int k = 0; k < it.seg; ++k)
      if (p.seg[k].kh > 0) offset += (p.seg[k].c_end - p.seg[k].c_begin) * (p.seg[k].kh * p.seg[k].kw + 1);
    const int64_t taps = s.kh * s.kw, cs = s.c_end - s.c_begin;
    A* gw = grad_acc + offset + (it.c0 - s.c_begin) * taps;
    A* gb = grad_acc + offset + cs * taps + (it.c0 - s.c_begin);
    const vec* gv = reinterpret_cast<const vec*>(gtile);
    vec* tap_acc = reinterpret_cast<vec*>(gtile + it.rows * p.Wo * kLanes);  // [kh][kw] vectors
    for (int64_t k = 0; k < taps; ++k) tap_acc[k] = vec{};
    vec bsum{};
    for (int64_t q = 0; q < it.rows * p.Wo; ++q) bsum += gv[q];
    // Row by row: one grad_out row, one input row and one kernel row of accumulators stay in L1
    // while every tap block of that kernel row sweeps them.
    for (int64_t r = 0; r < it.rows; ++r) {
      const vec* gr = gv + r * p.Wo;
      for (int64_t i = 0; i < s.kh; ++i) {
        if (!source_row_valid(g, it.row0 * p.stride_h - s.pad_top + r * p.stride_h + i * p.dil_h)) continue;
        const vec* xrow = reinterpret_cast<const vec*>(tile + (r * p.stride_h + i * p.dil_h) * cols * kLanes);
        vec* acc_row = tap_acc + i * s.kw;
        int64_t j0 = 0;
        for (; j0 + kOutBlock <= s.kw; j0 += kOutBlock) {
          vec a[kOutBlock];
          for (int t = 0; t < kOutBlock; ++t) a[t] = acc_row[j0 + t];
          const vec* x = xrow + j0 * p.dil_w;
          if (p.stride_w == 1 && p.dil_w == 1) {
            int64_t wo = 0;
            constexpr int G = Block > 1 ? Block / 2 : 1;  // grad vectors in registers beside 8 accumulators
            for (; wo + G <= p.Wo; wo += G) fma_block_unit<vec, kOutBlock, G>(a, x + wo, gr + wo);
            for (; wo < p.Wo; ++wo) fma_block_unit<vec, kOutBlock, 1>(a, x + wo, gr + wo);
          } else {
            for (int64_t wo = 0; wo < p.Wo; ++wo) {
              const vec gvo = gr[wo];
              const vec* xw = x + wo * p.stride_w;
              for (int t = 0; t < kOutBlock; ++t) a[t] += gvo * xw[t * p.dil_w];
            }
          }
          for (int t = 0; t < kOutBlock; ++t) acc_row[j0 + t] = a[t];
        }
        if (j0 + 4 <= s.kw) {  // a block of 4 taps left over from the blocks of kOutBlock
          vec a[4];
          for (int t = 0; t < 4; ++t) a[t] = acc_row[j0 + t];
          const vec* x = xrow + j0 * p.dil_w;
          if (p.stride_w == 1 && p.dil_w == 1) {
            constexpr int G = Block > 1 ? Block / 2 : 1;
            int64_t wo = 0;
            for (; wo + G <= p.Wo; wo += G) fma_block_unit<vec, 4, G>(a, x + wo, gr + wo);
            for (; wo < p.Wo; ++wo) fma_block_unit<vec, 4, 1>(a, x + wo, gr + wo);
          } else {
            for (int64_t wo = 0; wo < p.Wo; ++wo)
              for (int t = 0; t < 4; ++t) a[t] += gr[wo] * x[wo * p.stride_w + t * p.dil_w];
          }
          for (int t = 0; t < 4; ++t) acc_row[j0 + t] = a[t];
          j0 += 4;
        }
        for (; j0 < s.kw; ++j0) {  // single taps left over
          vec a = acc_row[j0];
          const vec* x = xrow + j0 * p.dil_w;
          for (int64_t wo = 0; wo < p.Wo; ++wo) a += gr[wo] * x[wo * p.stride_w];
          acc_row[j0] = a;
        }
      }
    }
    for (int l = 0; l < it.nc; ++l) {
      gb[l] += bsum[l];
      for (int64_t k = 0; k < taps; ++k) gw[l * taps + k] += tap_acc[k][l];
    }
  }
}

}  // namespace fusekit::cpu
