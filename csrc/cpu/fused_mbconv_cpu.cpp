// CPU launcher of fusekit::fused_mbconv_forward (Fused-MBConv, BN folded): argument checks, the
// layout decisions, weight packing, scratch, and the dtype / instruction-set dispatch of the
// torch-free kernel of kernels/fused_mbconv_cpu.h over the threads of at::parallel_for.
//
// Layout: the kernel reads x channels-last with any pixel strides, so channels-last x (or any x
// with a unit channel stride) is read in place and NCHW x is copied to channels-last once. The
// output follows x (channels-last when x is channels-last and not NCHW-contiguous, as the
// depthwise ops decide; NCHW otherwise) and is written in that layout directly by the kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>

#include "cpu_launch.h"
#include "../kernels/fused_mbconv_cpu.h"

namespace fusekit {
namespace {

using cpu::FusedMbconvPlan;
using cpu::Isa;
using cpu::TaskQueue;
const Isa kIsa = cpu::detect_isa();

// The micro-kernel per instruction set: Kit_avx512, Kit_avx2, Kit_base (kernels/cpu_gemm.h).
FUSEKIT_CPU_GEMM_KITS()

using TasksEntry = void (*)(const FusedMbconvParams&, const FusedMbconvPlan&, const void*, TaskQueue&, void*);

template <typename T> TasksEntry tasks_entry();

#define FUSEKIT_FUSED_MBCONV_ISA_ENTRY(T, NAME, ISA, ATTR)                                                  \
  ATTR void fused_mbconv_##NAME##_##ISA(const FusedMbconvParams& p, const FusedMbconvPlan& plan,            \
                                        const void* packed, TaskQueue& q, void* scratch) {                  \
    cpu::fused_mbconv_tasks<T, Kit_##ISA>(p, plan, packed, q, scratch);                                     \
  }

#define FUSEKIT_FUSED_MBCONV_ENTRIES(T, NAME)                                                               \
  FUSEKIT_FUSED_MBCONV_ISA_ENTRY(T, NAME, avx512, FUSEKIT_TARGET_AVX512)                                    \
  FUSEKIT_FUSED_MBCONV_ISA_ENTRY(T, NAME, avx2, FUSEKIT_TARGET_AVX2)                                        \
  FUSEKIT_FUSED_MBCONV_ISA_ENTRY(T, NAME, base, )                                                           \
  template <> TasksEntry tasks_entry<T>() {                                                                 \
    return kIsa == Isa::Avx512 ? fused_mbconv_##NAME##_avx512                                               \
           : kIsa == Isa::Avx2 ? fused_mbconv_##NAME##_avx2                                                 \
                               : fused_mbconv_##NAME##_base;                                                \
  }

FUSEKIT_FUSED_MBCONV_ENTRIES(float, f32)
FUSEKIT_FUSED_MBCONV_ENTRIES(double, f64)
FUSEKIT_FUSED_MBCONV_ENTRIES(cpu::bf16_t, bf16)
FUSEKIT_FUSED_MBCONV_ENTRIES(cpu::fp16_t, f16)

using AlignedBuffer = std::unique_ptr<void, void (*)(void*)>;

AlignedBuffer aligned_buffer(int64_t bytes) {
  const size_t size = size_t(cpu::round_up(std::max<int64_t>(bytes, 128), 128));
  AlignedBuffer buffer(std::aligned_alloc(128, size), std::free);
  TORCH_CHECK(buffer != nullptr, "fusekit: could not allocate ", size, " bytes of CPU scratch");
  return buffer;
}

void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t size, const char* size_name,
                  const at::Tensor& x) {
  check_same(op, x, "x", t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape [", size_name, "] = [", size,
              "], got ", t.sizes());
}

at::Tensor fused_mbconv_forward_cpu(const at::Tensor& x_in, const at::Tensor& w_expand_in,
                                    const std::optional<at::Tensor>& b_expand_in,
                                    const std::optional<at::Tensor>& w_project_in,
                                    const std::optional<at::Tensor>& b_project_in, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                                    bool residual) {
  constexpr const char* op = "fusekit::fused_mbconv_forward";
  TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be [N, Cin, H, W], got shape ", x_in.sizes());
  check_same(op, x_in, "x", w_expand_in, "w_expand");
  TORCH_CHECK(w_expand_in.dim() == 4, op, ": w_expand must be [E, Cin, kh, kw], got shape ", w_expand_in.sizes());
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op, ": stride must be two values >= 1, got ",
              stride);
  TORCH_CHECK(padding.size() == 4 && *std::min_element(padding.begin(), padding.end()) >= 0, op,
              ": padding must be four values (top, bottom, left, right) >= 0, got ", padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
              ": dilation must be two values >= 1, got ", dilation);
  TORCH_CHECK(activation >= 0 && activation <= 4, op,
              ": activation must be 0 (identity), 1 (relu), 2 (relu6), 3 (silu) or 4 (hardswish), got ", activation);

  FusedMbconvParams p;
  p.batch = x_in.size(0); p.in_c = x_in.size(1); p.in_h = x_in.size(2); p.in_w = x_in.size(3);
  p.expanded = w_expand_in.size(0); p.kh = w_expand_in.size(2); p.kw = w_expand_in.size(3);
  TORCH_CHECK(p.in_c >= 1 && w_expand_in.size(1) == p.in_c, op, ": w_expand must be [E, Cin, kh, kw] with Cin = ",
              p.in_c, " (x's channels), got ", w_expand_in.sizes());
  TORCH_CHECK(p.expanded >= 1 && p.kh >= 1 && p.kw >= 1, op, ": w_expand must have E, kh, kw >= 1, got ",
              w_expand_in.sizes());
  p.stride_h = stride[0]; p.stride_w = stride[1];
  p.pad_top = padding[0]; p.pad_left = padding[2];
  p.dil_h = dilation[0]; p.dil_w = dilation[1];
  p.out_h = (p.in_h + padding[0] + padding[1] - p.dil_h * (p.kh - 1) - 1) / p.stride_h + 1;
  p.out_w = (p.in_w + padding[2] + padding[3] - p.dil_w * (p.kw - 1) - 1) / p.stride_w + 1;
  TORCH_CHECK(p.in_h + padding[0] + padding[1] >= p.dil_h * (p.kh - 1) + 1 &&
                  p.in_w + padding[2] + padding[3] >= p.dil_w * (p.kw - 1) + 1,
              op, ": the padded input (", p.in_h + padding[0] + padding[1], " x ", p.in_w + padding[2] + padding[3],
              ") is smaller than the dilated kernel (", p.dil_h * (p.kh - 1) + 1, " x ", p.dil_w * (p.kw - 1) + 1, ")");
  p.activation = int(activation);

  const bool has_b_expand = b_expand_in.has_value() && b_expand_in->defined();
  if (has_b_expand) check_vector(op, *b_expand_in, "b_expand", p.expanded, "E", x_in);
  p.has_project = w_project_in.has_value() && w_project_in->defined();
  const bool has_b_project = b_project_in.has_value() && b_project_in->defined();
  if (p.has_project) {
    const at::Tensor& w = *w_project_in;
    check_same(op, x_in, "x", w, "w_project");
    TORCH_CHECK(w.dim() == 2 && w.size(1) == p.expanded && w.size(0) >= 1, op,
                ": w_project must be [Cout, E] with E = ", p.expanded, " (w_expand's rows), got ", w.sizes());
    p.out_c = w.size(0);
    if (has_b_project) check_vector(op, *b_project_in, "b_project", p.out_c, "Cout", x_in);
  } else {
    TORCH_CHECK(!has_b_project, op, ": b_project given without w_project");
    p.out_c = p.expanded;
  }
  p.residual = residual;
  TORCH_CHECK(!residual || (p.out_c == p.in_c && p.out_h == p.in_h && p.out_w == p.in_w), op,
              ": residual needs the output shape to equal x's: Cout = ", p.out_c, " vs Cin = ", p.in_c, ", ",
              p.out_h, " x ", p.out_w, " vs ", p.in_h, " x ", p.in_w);

  const bool channels_last_out = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({p.batch, p.out_c, p.out_h, p.out_w},
                           x_in.options().memory_format(channels_last_out ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;

  // the kernel reads x with a unit channel stride and any pixel strides
  const at::Tensor x = (x_in.stride(1) == 1 || p.in_c == 1) ? x_in
                                                             : x_in.contiguous(at::MemoryFormat::ChannelsLast);
  p.x = x.const_data_ptr();
  p.x_sn = x.stride(0); p.x_sh = x.stride(2); p.x_sw = x.stride(3);
  p.y = y.mutable_data_ptr();
  p.y_sn = y.stride(0); p.y_sc = y.stride(1); p.y_sh = y.stride(2); p.y_sw = y.stride(3);

  const at::Tensor w_expand = w_expand_in.contiguous();
  const at::Tensor b_expand = has_b_expand ? b_expand_in->contiguous() : at::Tensor();
  const at::Tensor w_project = p.has_project ? w_project_in->contiguous() : at::Tensor();
  const at::Tensor b_project = has_b_project ? b_project_in->contiguous() : at::Tensor();

  dispatch_cpu_dtype(x, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = typename cpu::AccOf<T>::type;
    auto data = [](const at::Tensor& t) { return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr; };
    const FusedMbconvPlan plan = cpu::make_fused_mbconv_plan<A>(p, at::get_num_threads());
    AlignedBuffer packed = aligned_buffer(plan.packed_bytes);
    cpu::pack_fused_mbconv_weights<T>(p, plan, data(w_expand), data(b_expand), data(w_project), data(b_project),
                                      packed.get());
    TaskQueue queue;
    queue.count = plan.items;
    const TasksEntry entry = tasks_entry<T>();
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), plan.items);
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      AlignedBuffer scratch = aligned_buffer(plan.scratch_bytes);
      for (int64_t i = begin; i < end; ++i) entry(p, plan, packed.get(), queue, scratch.get());
    });
  });
  return y;
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CPU, m) {
  m.impl("fused_mbconv_forward", &fusekit::fused_mbconv_forward_cpu);
}
