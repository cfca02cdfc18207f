// CPU launcher of the fused inverted-residual block (kernels/inverted_residual_cpu.h): argument
// checks, weight prepacking (accumulation type, transposed, lanes zero-padded), allocation, dtype
// and instruction-set dispatch over the threads of at::parallel_for, and the CPU registrations of
// inverted_residual_forward and inverted_residual_dw_sums.
//
// The kernels read x channels_last; an NCHW (or otherwise strided) x is copied to channels_last
// first and y is computed channels_last, then copied to NCHW: correct, but the two copies cost
// about a pass over x and y each. Channels_last in and out is the fast path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>

#include "cpu_launch.h"
#include "../kernels/inverted_residual_cpu.h"

namespace fusekit {
namespace {

using cpu::InvertedResidualParams;
using cpu::InvertedResidualPlan;
using cpu::Isa;
using cpu::TaskQueue;
const Isa kIsa = cpu::detect_isa();

// The micro-kernel per instruction set: Kit_avx512, Kit_avx2, Kit_base (kernels/cpu_gemm.h).
FUSEKIT_CPU_GEMM_KITS()

using TasksEntry = void (*)(const InvertedResidualParams&, const InvertedResidualPlan&, TaskQueue&, void*);

template <typename T> TasksEntry tasks_entry();

#define FUSEKIT_IR_ISA_ENTRY(T, NAME, ISA, ATTR)                                                               \
  ATTR void tasks_##NAME##_##ISA(const InvertedResidualParams& p, const InvertedResidualPlan& plan, TaskQueue& q, \
                                 void* s) {                                                                     \
    cpu::inverted_residual_tasks<T, Kit_##ISA>(p, plan, q, s);                                                  \
  }

#define FUSEKIT_IR_ENTRIES(T, NAME)                                                        \
  FUSEKIT_IR_ISA_ENTRY(T, NAME, avx512, FUSEKIT_TARGET_AVX512)                             \
  FUSEKIT_IR_ISA_ENTRY(T, NAME, avx2, FUSEKIT_TARGET_AVX2)                                 \
  FUSEKIT_IR_ISA_ENTRY(T, NAME, base, )                                                    \
  template <> TasksEntry tasks_entry<T>() {                                                \
    return kIsa == Isa::Avx512 ? tasks_##NAME##_avx512                                     \
           : kIsa == Isa::Avx2 ? tasks_##NAME##_avx2                                       \
                               : tasks_##NAME##_base;                                      \
  }

FUSEKIT_IR_ENTRIES(float, f32)
FUSEKIT_IR_ENTRIES(double, f64)
FUSEKIT_IR_ENTRIES(cpu::bf16_t, bf16)
FUSEKIT_IR_ENTRIES(cpu::fp16_t, f16)

// Runs the plan's tasks on every thread, each thread with its own 128-byte aligned scratch.
template <typename T>
void run_tasks(const InvertedResidualParams& p, const InvertedResidualPlan& plan) {
  if (plan.tasks <= 0) return;
  TaskQueue queue;
  queue.count = plan.tasks;
  const TasksEntry entry = tasks_entry<T>();
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), plan.tasks);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const size_t bytes = size_t(cpu::round_up(std::max<int64_t>(plan.scratch_bytes, 128), 128));
    std::unique_ptr<void, void (*)(void*)> scratch(std::aligned_alloc(128, bytes), std::free);
    TORCH_CHECK(scratch != nullptr, "fusekit: could not allocate ", bytes, " bytes of CPU scratch");
    for (int64_t i = begin; i < end; ++i) entry(p, plan, queue, scratch.get());
  });
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Same rule as the Python layer's out_memory_format: channels_last only when x is channels_last
// and not also NCHW-contiguous.
bool channels_last_out(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_vector(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name,
                  int64_t size) {
  if (!given(t)) return;
  check_same(op, x, "x", *t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, op, ": ", name, " must have shape [", size, "], got ", t->sizes());
}

// Shapes, geometry and the checks the kernels rely on; fills everything but the pointers.
InvertedResidualParams describe(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& w_expand,
                                const std::optional<at::Tensor>& b_expand, const at::Tensor& w_dw,
                                const std::optional<at::Tensor>& b_dw, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, Cin, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op, ": stride must be 2 ints >= 1, got ",
              stride);
  TORCH_CHECK(padding.size() == 4 && *std::min_element(padding.begin(), padding.end()) >= 0, op,
              ": padding must be 4 ints >= 0 (top, bottom, left, right), got ", padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
              ": dilation must be 2 ints >= 1, got ", dilation);
  TORCH_CHECK(activation >= 0 && activation <= 4, op,
              ": activation must be 0 (identity), 1 (relu), 2 (relu6), 3 (silu) or 4 (hardswish), got ", activation);
  check_same(op, x, "x", w_dw, "w_dw");
  TORCH_CHECK(w_dw.dim() == 3, op, ": w_dw must be 3-D [E, kh, kw], got shape ", w_dw.sizes());
  InvertedResidualParams p{};
  p.N = x.size(0); p.Cin = x.size(1); p.H = x.size(2); p.W = x.size(3);
  p.E = w_dw.size(0); p.kh = w_dw.size(1); p.kw = w_dw.size(2);
  TORCH_CHECK(p.Cin >= 1 && p.H >= 1 && p.W >= 1, op, ": x must have Cin, H, W >= 1, got shape ", x.sizes());
  TORCH_CHECK(p.E >= 1 && p.kh >= 1 && p.kw >= 1 && p.kh <= cpu::kIrMaxKernel, op,
              ": w_dw [E, kh, kw] needs E >= 1 and 1 <= kh <= ", cpu::kIrMaxKernel, ", kw >= 1, got ", w_dw.sizes());
  if (given(w_expand)) {
    check_same(op, x, "x", *w_expand, "w_expand");
    TORCH_CHECK(w_expand->dim() == 2 && w_expand->size(0) == p.E && w_expand->size(1) == p.Cin, op,
                ": w_expand must have shape [E, Cin] = [", p.E, ", ", p.Cin, "], got ", w_expand->sizes());
    check_vector(op, x, b_expand, "b_expand", p.E);
  } else {
    TORCH_CHECK(!given(b_expand), op, ": b_expand needs w_expand (without an expand stage a1 = x)");
    TORCH_CHECK(p.E == p.Cin, op, ": without w_expand the depthwise runs on x, so E = w_dw.shape[0] (", p.E,
                ") must equal Cin (", p.Cin, ")");
  }
  check_vector(op, x, b_dw, "b_dw", p.E);
  p.stride_h = stride[0]; p.stride_w = stride[1];
  p.pad_top = padding[0]; p.pad_left = padding[2];
  p.dil_h = dilation[0]; p.dil_w = dilation[1];
  const int64_t span_h = p.H + padding[0] + padding[1] - p.dil_h * (p.kh - 1) - 1;
  const int64_t span_w = p.W + padding[2] + padding[3] - p.dil_w * (p.kw - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, op, ": the dilated ", p.kh, "x", p.kw, " kernel does not fit the padded ",
              p.H, "x", p.W, " input (padding ", padding, ", dilation ", dilation, ")");
  p.Ho = span_h / p.stride_h + 1;
  p.Wo = span_w / p.stride_w + 1;
  p.activation = int(activation);
  return p;
}

// t [rows, cols] (any strides) as a zero-padded [rows, padded_cols] tensor of the accumulation type.
at::Tensor pack(const at::Tensor& t, int64_t padded_cols, at::ScalarType acc) {
  at::Tensor out = at::zeros({t.size(0), padded_cols}, t.options().dtype(acc));
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

at::Tensor pack_vector(const std::optional<at::Tensor>& t, int64_t padded, const at::Tensor& x) {
  at::Tensor out = at::zeros({padded}, x.options().dtype(acc_dtype(x)));
  if (given(t)) out.narrow(0, 0, t->size(0)).copy_(*t);
  return out;
}

// The packed weights a call's kernels read (kept alive by the launcher while they run).
struct PackedWeights {
  at::Tensor w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate;
};

void pack_dw_stage(PackedWeights& w, InvertedResidualParams& p, const InvertedResidualPlan& plan, const at::Tensor& x,
                   const std::optional<at::Tensor>& w_expand, const std::optional<at::Tensor>& b_expand,
                   const at::Tensor& w_dw, const std::optional<at::Tensor>& b_dw) {
  const at::ScalarType acc = acc_dtype(x);
  if (given(w_expand)) {
    w.w_expand = pack(w_expand->t(), plan.Ep, acc);  // [Cin][Ep]
    w.b_expand = pack_vector(b_expand, plan.Ep, x);
    p.w_expand = w.w_expand.const_data_ptr();
    p.b_expand = w.b_expand.const_data_ptr();
  }
  w.w_dw = pack(w_dw.reshape({p.E, p.kh * p.kw}).t(), plan.Ep, acc);  // [kh * kw][Ep]
  w.b_dw = pack_vector(b_dw, plan.Ep, x);
  p.w_dw = w.w_dw.const_data_ptr();
  p.b_dw = w.b_dw.const_data_ptr();
}

at::Tensor inverted_residual_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_expand,
                                         const std::optional<at::Tensor>& b_expand, const at::Tensor& w_dw,
                                         const std::optional<at::Tensor>& b_dw, const at::Tensor& w_project,
                                         const std::optional<at::Tensor>& b_project,
                                         const std::optional<at::Tensor>& gate, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                                         bool residual) {
  const char* op = "fusekit::inverted_residual_forward";
  InvertedResidualParams p = describe(op, x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation);
  check_same(op, x, "x", w_project, "w_project");
  TORCH_CHECK(w_project.dim() == 2 && w_project.size(1) == p.E && w_project.size(0) >= 1, op,
              ": w_project must have shape [Cout, E] with E = ", p.E, ", got ", w_project.sizes());
  p.Cout = w_project.size(0);
  check_vector(op, x, b_project, "b_project", p.Cout);
  if (given(gate)) {
    check_same(op, x, "x", *gate, "gate");
    TORCH_CHECK(gate->dim() == 2 && gate->size(0) == p.N && gate->size(1) == p.E, op,
                ": gate must have shape [N, E] = [", p.N, ", ", p.E, "], got ", gate->sizes());
  }
  TORCH_CHECK(!residual || (p.Cout == p.Cin && p.Ho == p.H && p.Wo == p.W), op,
              ": residual needs Cout == Cin and an output as large as the input, got Cin ", p.Cin, ", Cout ", p.Cout,
              ", input ", p.H, "x", p.W, ", output ", p.Ho, "x", p.Wo);
  p.residual = residual;

  const bool cl_out = channels_last_out(x);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({p.N, p.Cout, p.Ho, p.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return cl_out ? y : y.contiguous();
  p.x = xc.const_data_ptr();
  p.y = y.mutable_data_ptr();

  dispatch_cpu_dtype(x, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const InvertedResidualPlan plan = cpu::make_inverted_residual_plan<T>(p, at::get_num_threads());
    PackedWeights w;
    pack_dw_stage(w, p, plan, x, w_expand, b_expand, w_dw, b_dw);
    const at::ScalarType acc = acc_dtype(x);
    w.w_project = pack(w_project.t(), plan.Cp, acc);  // [E][Cp]
    w.b_project = pack_vector(b_project, plan.Cp, x);
    p.w_project = w.w_project.const_data_ptr();
    p.b_project = w.b_project.const_data_ptr();
    if (given(gate)) {
      w.gate = pack(*gate, plan.Ep, acc);  // [N][Ep]
      p.gate = w.gate.const_data_ptr();
    }
    run_tasks<T>(p, plan);
  });
  return cl_out ? y : y.contiguous();
}

at::Tensor inverted_residual_dw_sums_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_expand,
                                         const std::optional<at::Tensor>& b_expand, const at::Tensor& w_dw,
                                         const std::optional<at::Tensor>& b_dw, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation) {
  const char* op = "fusekit::inverted_residual_dw_sums";
  InvertedResidualParams p = describe(op, x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation);
  const at::ScalarType acc = acc_dtype(x);
  at::Tensor sums = at::zeros({p.N, 3, p.E}, x.options().dtype(acc));
  if (p.N == 0) return sums;
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  p.x = xc.const_data_ptr();
  p.y = nullptr;  // dw_sums mode

  dispatch_cpu_dtype(x, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = typename cpu::AccOf<T>::type;
    const InvertedResidualPlan plan = cpu::make_inverted_residual_plan<T>(p, at::get_num_threads());
    PackedWeights w;
    pack_dw_stage(w, p, plan, x, w_expand, b_expand, w_dw, b_dw);
    at::Tensor partials = at::empty({plan.tasks, 3, plan.Ep}, x.options().dtype(at::kDouble));
    p.partial_sums = partials.mutable_data_ptr<double>();
    run_tasks<T>(p, plan);
    cpu::combine_dw_sums<A>(p.partial_sums, plan, p.N, p.E, sums.mutable_data_ptr<A>());
  });
  return sums;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusekit, CPU, m) {
  m.impl("inverted_residual_forward", &inverted_residual_forward_cpu);
  m.impl("inverted_residual_dw_sums", &inverted_residual_dw_sums_cpu);
}

}  // namespace fusekit
