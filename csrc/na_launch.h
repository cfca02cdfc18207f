// Shared by the neighborhood-attention launchers (CPU fused, CPU unfused, CUDA): the per-axis
// configuration read from the op arguments, with every rule the kernels rely on checked once.
#pragma once
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "kernels/na_window.h"

namespace fusekit {

// Fills axes[3 - R .. 2] for rank R = kernel_size.size() (the leading axes keep their
// {length 1, kernel 1} defaults) and returns whether any axis is causal.
inline bool na_axes_from_args(const char* op, c10::IntArrayRef spatial, c10::IntArrayRef kernel_size,
                              c10::IntArrayRef stride, c10::IntArrayRef dilation, const c10::List<bool>& is_causal,
                              na::Axis* axes) {
  const int64_t R = int64_t(kernel_size.size());
  TORCH_CHECK(R >= 1 && R <= 3, op, ": kernel_size must have 1, 2 or 3 entries (the spatial rank), got ", R);
  TORCH_CHECK(int64_t(stride.size()) == R && int64_t(dilation.size()) == R && int64_t(is_causal.size()) == R, op,
              ": kernel_size, stride, dilation and is_causal must have the same length, got ", R, ", ",
              stride.size(), ", ", dilation.size(), ", ", is_causal.size());
  TORCH_CHECK(int64_t(spatial.size()) == R, op, ": the inputs have ", spatial.size(),
              " spatial dims but kernel_size has ", R, " entries");
  bool any_causal = false;
  for (int64_t a = 0; a < R; ++a) {
    na::Axis& ax = axes[3 - R + a];
    ax.length = spatial[a];
    ax.kernel = kernel_size[a];
    ax.stride = stride[a];
    ax.dilation = dilation[a];
    ax.causal = is_causal.get(a);
    any_causal |= ax.causal;
    TORCH_CHECK(ax.kernel >= 1 && ax.dilation >= 1 && ax.kernel * ax.dilation <= ax.length, op, ": axis ", a,
                " needs kernel_size >= 1, dilation >= 1 and kernel_size * dilation <= length, got kernel_size ",
                ax.kernel, ", dilation ", ax.dilation, ", length ", ax.length);
    TORCH_CHECK(ax.stride >= 1 && ax.stride <= ax.kernel, op, ": axis ", a,
                " needs 1 <= stride <= kernel_size, got stride ", ax.stride, " and kernel_size ", ax.kernel);
    // coordinates are compared in 32-bit lanes / indices by the kernels
    TORCH_CHECK(ax.length < (int64_t(1) << 30), op, ": spatial sizes must be below 2^30, got ", ax.length);
  }
  return any_causal;
}

}  // namespace fusekit
