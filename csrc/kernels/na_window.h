// Neighborhood-attention windows along one axis (DESIGN.md 5.1), shared by the CPU and CUDA
// kernels (torch-free; host and device). Multi-dimensional NA is the AND over axes of these rules,
// so every kernel works axis by axis: a query's neighbourhood is the product of its per-axis
// windows, and the queries that see a key are the product of its per-axis inverse ranges.
//
// Coordinates: i (query) and j (key) in [0, L). Dilation d splits an axis into d groups
// (g = i % d); inside a group a position has in-group index i / d, the group has
// L_g = ceil((L - g) / d) >= k positions (k * d <= L), and windows are computed in group
// indices and mapped back by j = j' * d + g.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEKIT_NA_HD __host__ __device__ __forceinline__
#else
#define FUSEKIT_NA_HD inline
#endif

namespace fusekit {
namespace na {

struct Axis {
  int64_t length = 1;    // L
  int64_t kernel = 1;    // k (1 only for the padding axes of a lower-rank problem, where L = 1)
  int64_t stride = 1;    // s, 1 <= s <= k
  int64_t dilation = 1;  // d, k * d <= L
  bool causal = false;
};

// The in-group window of in-group index ig: keys start <= j' < end (end - start = k unless causal).
struct Range {
  int64_t start, end;
};

FUSEKIT_NA_HD int64_t group_length(const Axis& a, int64_t group) {
  return (a.length - group + a.dilation - 1) / a.dilation;
}

FUSEKIT_NA_HD Range window_in_group(const Axis& a, int64_t ig, int64_t group_len) {
  const int64_t s = a.stride, k = a.kernel;
  if (a.causal) {
    int64_t leader = (ig / s) * s + s - 1;
    if (leader > group_len - 1) leader = group_len - 1;
    int64_t start = leader - k + 1;
    if (start < 0) start = 0;
    return {start, ig + 1};
  }
  int64_t leader = (ig / s) * s + s / 2;
  if (leader > group_len - 1) leader = group_len - 1;
  int64_t start = leader - k / 2;
  if (start > group_len - k) start = group_len - k;  // slide inward at the far border
  if (start < 0) start = 0;
  return {start, start + k};
}

// Window of query i in axis coordinates: keys first, first + step, ..., first + (count-1) * step
// with step = d; slot n (0 <= n < k) of the unfused ops is key first + n * step when n < count.
struct Window {
  int64_t first, count;
};

FUSEKIT_NA_HD Window query_window(const Axis& a, int64_t i) {
  const int64_t g = i % a.dilation;
  const Range r = window_in_group(a, i / a.dilation, group_length(a, g));
  return {r.start * a.dilation + g, r.end - r.start};
}

// Queries that see key j, in axis coordinates: first, first + d, ..., (count of them). Windows'
// starts and ends never decrease with the query index, so the set is one run of the group;
// found by binary search (O(log L)).
FUSEKIT_NA_HD Window key_inverse_window(const Axis& a, int64_t j) {
  const int64_t g = j % a.dilation, jg = j / a.dilation, len = group_length(a, g);
  int64_t lo = 0, hi = len;  // first query whose window ends after jg
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (window_in_group(a, mid, len).end > jg) hi = mid; else lo = mid + 1;
  }
  const int64_t first = lo;
  lo = first; hi = len;      // first query whose window starts after jg
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (window_in_group(a, mid, len).start > jg) hi = mid; else lo = mid + 1;
  }
  return {first * a.dilation + g, lo - first};
}

// Relative-positional-bias index along an axis for query i and neighbour key j (same group):
// (j - i) / d + k - 1, in [0, 2k - 2].
FUSEKIT_NA_HD int64_t rpb_index(const Axis& a, int64_t i, int64_t j) {
  return (j - i) / a.dilation + a.kernel - 1;
}

}  // namespace na
}  // namespace fusekit

#undef FUSEKIT_NA_HD
