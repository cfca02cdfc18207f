// CPU launcher of fused neighborhood attention: argument checks, allocation, dtype and
// instruction-set dispatch of the torch-free kernels of kernels/na_cpu.h over the threads of
// at::parallel_for, and the CPU registrations of na_forward and na_backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <tuple>

#include "../na_launch.h"
#include "cpu_launch.h"
#include "../kernels/na_cpu.h"

namespace fusekit {
namespace {

using cpu::Isa;
using cpu::NaPlan;
using cpu::TaskQueue;
const Isa kIsa = cpu::detect_isa();

// The micro-kernel per instruction set: Kit_avx512, Kit_avx2, Kit_base (kernels/cpu_gemm.h).
FUSEKIT_CPU_GEMM_KITS()

// (params, plan, queue or null, static range [begin, end), scratch, grad_rpb buffer of the range)
using NaEntry = void (*)(const NaParams&, const NaPlan&, TaskQueue*, int64_t, int64_t, void*, void*);

struct NaEntries {
  NaEntry forward, backward_q, backward_kv;
};

template <typename T> const NaEntries& entries();

#define FUSEKIT_NA_ISA_ENTRIES(T, NAME, ISA, ATTR)                                                             \
  ATTR void na_forward_##NAME##_##ISA(const NaParams& p, const NaPlan& plan, TaskQueue* q, int64_t b, int64_t e, \
                                      void* s, void* r) {                                                      \
    cpu::forward_tasks<T, Kit_##ISA>(p, plan, q, b, e, s, r);                                                  \
  }                                                                                                            \
  ATTR void na_backward_q_##NAME##_##ISA(const NaParams& p, const NaPlan& plan, TaskQueue* q, int64_t b,       \
                                         int64_t e, void* s, void* r) {                                        \
    cpu::backward_q_tasks<T, Kit_##ISA>(p, plan, q, b, e, s, r);                                               \
  }                                                                                                            \
  ATTR void na_backward_kv_##NAME##_##ISA(const NaParams& p, const NaPlan& plan, TaskQueue* q, int64_t b,      \
                                          int64_t e, void* s, void* r) {                                       \
    cpu::backward_kv_tasks<T, Kit_##ISA>(p, plan, q, b, e, s, r);                                              \
  }

#define FUSEKIT_NA_ENTRIES(T, NAME)                                                                           \
  FUSEKIT_NA_ISA_ENTRIES(T, NAME, avx512, FUSEKIT_TARGET_AVX512)                                              \
  FUSEKIT_NA_ISA_ENTRIES(T, NAME, avx2, FUSEKIT_TARGET_AVX2)                                                  \
  FUSEKIT_NA_ISA_ENTRIES(T, NAME, base, )                                                                     \
  template <> const NaEntries& entries<T>() {                                                                 \
    static const NaEntries table[3] = {                                                                       \
        {na_forward_##NAME##_avx512, na_backward_q_##NAME##_avx512, na_backward_kv_##NAME##_avx512},          \
        {na_forward_##NAME##_avx2, na_backward_q_##NAME##_avx2, na_backward_kv_##NAME##_avx2},                \
        {na_forward_##NAME##_base, na_backward_q_##NAME##_base, na_backward_kv_##NAME##_base}};               \
    return table[kIsa == Isa::Avx512 ? 0 : kIsa == Isa::Avx2 ? 1 : 2];                                        \
  }

FUSEKIT_NA_ENTRIES(float, f32)
FUSEKIT_NA_ENTRIES(double, f64)
FUSEKIT_NA_ENTRIES(cpu::bf16_t, bf16)
FUSEKIT_NA_ENTRIES(cpu::fp16_t, f16)

// Runs the plan's tasks on every thread, each with its own 128-byte aligned scratch. Dynamic
// (a shared queue) unless rpb_partial is given: then `ranges` static task ranges, range r
// accumulating grad_rpb into rpb_partial[r] (deterministic whatever thread runs it).
void run_tasks(NaEntry entry, const NaParams& p, const NaPlan& plan_in, at::Tensor* rpb_partial = nullptr) {
  if (plan_in.tasks <= 0) return;
  // claims of consecutive tasks (the heads and neighbouring tiles that share cached rows), about
  // 32 claims per thread: few enough to keep a thread on its own run, enough to balance the tail
  NaPlan plan = plan_in;
  plan.claim = std::max<int64_t>(1, plan.tasks / (32 * int64_t(at::get_num_threads())));
  const size_t bytes = size_t(cpu::round_up(std::max<int64_t>(plan.scratch_bytes, 128), 128));
  auto with_scratch = [&](auto&& body) {
    std::unique_ptr<void, void (*)(void*)> scratch(std::aligned_alloc(128, bytes), std::free);
    TORCH_CHECK(scratch != nullptr, "fusekit: could not allocate ", bytes, " bytes of CPU scratch");
    body(scratch.get());
  };
  if (rpb_partial == nullptr) {
    TaskQueue queue;
    queue.count = cpu::ceil_div(plan.tasks, plan.claim);
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), queue.count);
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      with_scratch([&](void* s) {
        for (int64_t i = begin; i < end; ++i) entry(p, plan, &queue, 0, 0, s, nullptr);
      });
    });
    return;
  }
  const int64_t ranges = rpb_partial->size(0);
  char* base = static_cast<char*>(rpb_partial->data_ptr());
  const int64_t range_bytes = rpb_partial->stride(0) * int64_t(rpb_partial->element_size());
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    with_scratch([&](void* s) {
      for (int64_t r = begin; r < end; ++r)
        entry(p, plan, nullptr, plan.tasks * r / ranges, plan.tasks * (r + 1) / ranges, s, base + r * range_bytes);
    });
  });
}

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// [B, X_0 .. X_{R-1}, H, D] with leading spatial axes padded to 3 (stride 0).
NaTensor view_of(const at::Tensor& t) {
  NaTensor v;
  const int64_t rank = t.dim() - 3;
  v.data = const_cast<void*>(t.const_data_ptr());
  v.batch_stride = t.stride(0);
  v.head_stride = t.stride(-2);
  for (int64_t a = 0; a < rank; ++a) v.spatial_stride[3 - rank + a] = t.stride(1 + a);
  return v;
}

// Shapes, configuration and rpb: everything the kernels rely on. Fills the size, axis and scale
// fields of p; returns rpb converted to the accumulation type (undefined when none).
at::Tensor describe(const char* op, NaParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                    at::IntArrayRef dilation, const c10::List<bool>& is_causal, double scale) {
  const int64_t R = int64_t(kernel_size.size());
  // rank and per-axis rules: na_axes_from_args below
  TORCH_CHECK(q.dim() == R + 3, op, ": q must be [B, *spatial(", R, "), Hq, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == R + 3, op, ": k must be [B, *spatial(", R, "), Hkv, D], got shape ", k.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor, got ", q.device());
  check_same(op, q, "q", k, "k");
  check_same(op, q, "q", v, "v");
  for (int64_t a = 0; a <= R; ++a)
    TORCH_CHECK(k.size(a) == q.size(a), op, ": q and k/v must have the same batch and spatial sizes, got ",
                q.sizes(), " and ", k.sizes());
  const int64_t D = q.size(-1), hq = q.size(-2), hkv = k.size(-2);
  TORCH_CHECK(D >= 1 && k.size(-1) == D, op, ": q and k/v must have the same head dim >= 1, got ", D, " and ",
              k.size(-1));
  TORCH_CHECK(hkv >= 1 && hq >= 1 && hq % hkv == 0, op, ": the query head count (", hq,
              ") must be a positive multiple of the KV head count (", hkv, ")");
  p.batch = q.size(0);
  p.q_heads = hq;
  p.kv_heads = hkv;
  p.head_dim = D;
  p.scale = scale;
  const bool any_causal = na_axes_from_args(op, q.sizes().slice(1, R), kernel_size, stride, dilation, is_causal,
                                             p.axis);
  if (!rpb.has_value() || !rpb->defined()) return at::Tensor();
  TORCH_CHECK(!any_causal, op, ": rpb (relative positional bias) is only supported when no axis is causal");
  check_same(op, q, "q", *rpb, "rpb");
  std::vector<int64_t> shape{hq};
  for (int64_t a = 0; a < R; ++a) shape.push_back(2 * kernel_size[a] - 1);
  TORCH_CHECK(rpb->sizes() == at::IntArrayRef(shape), op, ": rpb must be [Hq, 2k_0-1, ..] = ", shape, ", got ",
              rpb->sizes());
  return rpb->to(acc_dtype(q)).contiguous();
}

std::tuple<at::Tensor, at::Tensor> na_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const std::optional<at::Tensor>& rpb,
                                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                  at::IntArrayRef dilation, const c10::List<bool>& is_causal,
                                                  double scale) {
  constexpr const char* op = "fusekit::na_forward";
  NaParams p;
  const at::Tensor rpb_acc = describe(op, p, q_in, k_in, v_in, rpb, kernel_size, stride, dilation, is_causal, scale);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(acc_dtype(q)));
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v); p.out = view_of(out);
  p.rpb = rpb_acc.defined() ? rpb_acc.const_data_ptr() : nullptr;
  p.lse = lse.data_ptr();
  dispatch_cpu_dtype(q, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    run_tasks(entries<T>().forward, p, cpu::make_query_plan<T>(p, false));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& rpb,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation, const c10::List<bool>& is_causal,
    double scale) {
  constexpr const char* op = "fusekit::na_backward";
  NaParams p;
  const at::Tensor rpb_acc = describe(op, p, q_in, k_in, v_in, rpb, kernel_size, stride, dilation, is_causal, scale);
  const AttentionBackwardTensors t = prepare_attention_backward(op, grad_out_in, q_in, k_in, v_in, out_in, lse_in);
  const at::Tensor &q = t.q, &k = t.k, &v = t.v, &grad_out = t.grad_out, &out = t.out, &lse = t.lse;
  const at::Tensor &grad_q = t.grad_q, &grad_k = t.grad_k, &grad_v = t.grad_v, &delta = t.delta;
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v); p.out = view_of(out);
  p.grad_out = view_of(grad_out);
  p.grad_q = view_of(grad_q); p.grad_k = view_of(grad_k); p.grad_v = view_of(grad_v);
  p.rpb = rpb_acc.defined() ? rpb_acc.const_data_ptr() : nullptr;
  p.lse = const_cast<void*>(lse.const_data_ptr());
  p.delta = delta.data_ptr();
  at::Tensor grad_rpb = q.new_empty({0});
  dispatch_cpu_dtype(q, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t rows = lse.numel() / p.q_heads;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / (p.q_heads * p.head_dim)),
                     [&](int64_t b, int64_t e) { cpu::backward_delta_rows<T>(p, b, e); });
    run_tasks(entries<T>().backward_kv, p, cpu::make_key_plan<T>(p));
    const NaPlan q_plan = cpu::make_query_plan<T>(p, true);
    if (!rpb_acc.defined()) return run_tasks(entries<T>().backward_q, p, q_plan);
    const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), q_plan.tasks));
    at::Tensor partial = at::zeros({ranges, q_plan.rpb_elems}, rpb_acc.options());
    run_tasks(entries<T>().backward_q, p, q_plan, &partial);
    at::Tensor total = partial[0].clone();  // summed in range order: deterministic
    for (int64_t r = 1; r < ranges; ++r) total.add_(partial[r]);
    grad_rpb = total.view(rpb->sizes()).to(rpb->scalar_type());
  });
  return {grad_q, grad_k, grad_v, grad_rpb};
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CPU, m) {
  m.impl("na_forward", &fusekit::na_forward_cpu);
  m.impl("na_backward", &fusekit::na_backward_cpu);
}
