// CPU launcher of the multi-query / grouped-query attention family: argument checks, allocation,
// dtype and instruction-set dispatch of the torch-free kernels of kernels/mqa_cpu.h over the
// threads of at::parallel_for, and the CPU registrations of mqa_forward, mqa_backward, mqa_decode.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <tuple>

#include "cpu_launch.h"
#include "../kernels/mqa_cpu.h"

namespace fusekit {
namespace {

using cpu::Isa;
using cpu::MqaPlan;
using cpu::TaskQueue;
const Isa kIsa = cpu::detect_isa();

// The micro-kernel per instruction set: Kit_avx512, Kit_avx2, Kit_base (kernels/cpu_gemm.h).
FUSEKIT_CPU_GEMM_KITS()

using AttentionEntry = void (*)(const MqaParams&, const MqaPlan&, TaskQueue&, void*);
using DecodeEntry = void (*)(const MqaDecodeParams&, const MqaPlan&, TaskQueue&, void*);

struct MqaEntries {
  AttentionEntry forward, backward_kv, backward_q;
  DecodeEntry decode;
};

template <typename T> const MqaEntries& entries();

#define FUSEKIT_MQA_ISA_ENTRIES(T, NAME, ISA, ATTR)                                                             \
  ATTR void forward_##NAME##_##ISA(const MqaParams& p, const MqaPlan& plan, TaskQueue& q, void* s) {            \
    cpu::forward_tasks<T, Kit_##ISA>(p, plan, q, s);                                                           \
  }                                                                                                           \
  ATTR void backward_kv_##NAME##_##ISA(const MqaParams& p, const MqaPlan& plan, TaskQueue& q, void* s) {        \
    cpu::backward_kv_tasks<T, Kit_##ISA>(p, plan, q, s);                                                       \
  }                                                                                                           \
  ATTR void backward_q_##NAME##_##ISA(const MqaParams& p, const MqaPlan& plan, TaskQueue& q, void* s) {         \
    cpu::backward_q_tasks<T, Kit_##ISA>(p, plan, q, s);                                                        \
  }                                                                                                           \
  ATTR void decode_##NAME##_##ISA(const MqaDecodeParams& p, const MqaPlan& plan, TaskQueue& q, void* s) {       \
    cpu::decode_tasks<T, Kit_##ISA>(p, plan, q, s);                                                            \
  }

#define FUSEKIT_MQA_ENTRIES(T, NAME)                                                                          \
  FUSEKIT_MQA_ISA_ENTRIES(T, NAME, avx512, FUSEKIT_TARGET_AVX512)                                             \
  FUSEKIT_MQA_ISA_ENTRIES(T, NAME, avx2, FUSEKIT_TARGET_AVX2)                                                 \
  FUSEKIT_MQA_ISA_ENTRIES(T, NAME, base, )                                                                    \
  template <> const MqaEntries& entries<T>() {                                                                \
    static const MqaEntries table[3] = {                                                                      \
        {forward_##NAME##_avx512, backward_kv_##NAME##_avx512, backward_q_##NAME##_avx512, decode_##NAME##_avx512}, \
        {forward_##NAME##_avx2, backward_kv_##NAME##_avx2, backward_q_##NAME##_avx2, decode_##NAME##_avx2},     \
        {forward_##NAME##_base, backward_kv_##NAME##_base, backward_q_##NAME##_base, decode_##NAME##_base}};    \
    return table[kIsa == Isa::Avx512 ? 0 : kIsa == Isa::Avx2 ? 1 : 2];                                        \
  }

FUSEKIT_MQA_ENTRIES(float, f32)
FUSEKIT_MQA_ENTRIES(double, f64)
FUSEKIT_MQA_ENTRIES(cpu::bf16_t, bf16)
FUSEKIT_MQA_ENTRIES(cpu::fp16_t, f16)

// Runs `tasks` work items of an entry on every thread, each thread with its own 128-byte aligned scratch.
template <typename Entry, typename Params>
void run_tasks(Entry entry, const Params& p, const MqaPlan& plan, int64_t tasks) {
  if (tasks <= 0) return;
  TaskQueue queue;
  queue.count = tasks;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const size_t bytes = size_t(cpu::round_up(std::max<int64_t>(plan.scratch_bytes, 128), 128));
    std::unique_ptr<void, void (*)(void*)> scratch(std::aligned_alloc(128, bytes), std::free);
    TORCH_CHECK(scratch != nullptr, "fusekit: could not allocate ", bytes, " bytes of CPU scratch");
    for (int64_t i = begin; i < end; ++i) entry(p, plan, queue, scratch.get());
  });
}

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

MqaTensor view_of(const at::Tensor& t) {
  MqaTensor v;
  v.data = const_cast<void*>(t.const_data_ptr());
  if (t.dim() == 4) {
    v.batch_stride = t.stride(0); v.row_stride = t.stride(1); v.head_stride = t.stride(2);
  } else {
    v.row_stride = t.stride(0); v.head_stride = t.stride(1);
  }
  return v;
}

// cu_seqlens: int32 [B + 1] from 0, non-decreasing, inside the packed tensor's rows, every length
// <= bound. Returns the longest length (it sizes the launch, whatever bound the caller passed).
int64_t check_cu_seqlens(const char* op, const at::Tensor& cu, const char* name, int64_t entries, int64_t rows,
                         int64_t bound, const char* bound_name) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1, op, ": ",
              name, " must be a 1-D int32 CPU tensor [B + 1], got ", cu.scalar_type(), " ", cu.sizes());
  TORCH_CHECK(cu.numel() == entries, op, ": cu_seqlens_q and cu_seqlens_k must both have B + 1 entries, got ",
              entries, " and ", cu.numel());
  const at::Tensor c = cu.contiguous();
  const int32_t* o = c.const_data_ptr<int32_t>();
  TORCH_CHECK(o[0] == 0, op, ": ", name, "[0] must be 0, got ", o[0]);
  int64_t longest = 0;
  for (int64_t b = 0; b + 1 < c.numel(); ++b) {
    TORCH_CHECK(o[b + 1] >= o[b], op, ": ", name, " must be non-decreasing, got ", o[b], " then ", o[b + 1]);
    TORCH_CHECK(o[b + 1] - o[b] <= bound, op, ": sequence ", b, " has ", o[b + 1] - o[b], " tokens (", name,
                "), more than ", bound_name, " = ", bound);
    longest = std::max<int64_t>(longest, o[b + 1] - o[b]);
  }
  TORCH_CHECK(o[c.numel() - 1] <= rows, op, ": ", name, " ends at ", o[c.numel() - 1], ", past the ", rows,
              " rows of the packed tensor");
  return longest;
}

// Shapes of q/k/v and of the packed batch; fills the size fields of p. Reads cu_seqlens (CPU
// memory) to check what the kernels rely on: offsets inside the tensors, lengths <= max_seqlen.
void describe_attention(const char* op, MqaParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                        int64_t max_q, int64_t max_k) {
  const bool packed = cu_q.has_value() && cu_q->defined();
  TORCH_CHECK(packed == (cu_k.has_value() && cu_k->defined()), op,
              ": cu_seqlens_q and cu_seqlens_k must be given together (packed batch) or both be None (dense)");
  const int64_t rank = packed ? 3 : 4;
  const char* layout = packed ? "[T, H, D] (packed)" : "[B, L, H, D]";
  TORCH_CHECK(q.dim() == rank, op, ": q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK(k.dim() == rank, op, ": k must be ", layout, ", got shape ", k.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor, got ", q.device());
  check_same(op, q, "q", k, "k");
  check_same(op, q, "q", v, "v");
  const int64_t D = q.size(-1), hq = q.size(-2), hkv = k.size(-2);
  TORCH_CHECK(D >= 1 && k.size(-1) == D, op, ": q and k/v must have the same head dim >= 1, got ", D, " and ",
              k.size(-1));
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, op, ": the query head count (", hq,
              ") must be a positive multiple of the KV head count (", hkv, ")");
  p.q_heads = hq; p.kv_heads = hkv; p.head_dim = D;
  if (!packed) {
    TORCH_CHECK(k.size(0) == q.size(0), op, ": q and k must have the same batch size, got ", q.size(0), " and ",
                k.size(0));
    p.batch = q.size(0);
    p.max_seqlen_q = q.size(1);
    p.max_seqlen_k = k.size(1);
  } else {
    TORCH_CHECK(max_q >= 0 && max_k >= 0, op, ": max_seqlen_q/k must be >= 0, got ", max_q, " and ", max_k);
    p.batch = cu_q->numel() - 1;
    p.max_seqlen_q = check_cu_seqlens(op, *cu_q, "cu_seqlens_q", cu_q->numel(), q.size(0), max_q, "max_seqlen_q");
    p.max_seqlen_k = check_cu_seqlens(op, *cu_k, "cu_seqlens_k", cu_q->numel(), k.size(0), max_k, "max_seqlen_k");
  }
  // key positions are compared in 32-bit lanes
  TORCH_CHECK(p.max_seqlen_q < (int64_t(1) << 31) && p.max_seqlen_k < (int64_t(1) << 31), op,
              ": sequence lengths must be below 2^31");
}

void set_config(MqaParams& p, double scale, bool causal, int64_t wl, int64_t wr) {
  p.scale = scale;
  p.causal = causal;
  p.window_left = wl < 0 ? -1 : wl;
  p.window_right = wr < 0 ? -1 : wr;
}

// Packed rows after the last sequence belong to none: zero outputs (and -inf lse).
void clear_unowned_rows(const at::Tensor& t, const std::optional<at::Tensor>& cu, double value) {
  if (!cu.has_value() || !cu->defined() || t.size(0) == 0) return;
  const int64_t end = cu->index({-1}).item<int64_t>();
  if (end < t.size(0)) t.narrow(0, end, t.size(0) - end).fill_(value);
}

std::tuple<at::Tensor, at::Tensor> mqa_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, const std::optional<at::Tensor>& cu_q,
                                                   const std::optional<at::Tensor>& cu_k, int64_t max_q,
                                                   int64_t max_k, double scale, bool causal, int64_t wl, int64_t wr) {
  constexpr const char* op = "fusekit::mqa_forward";
  MqaParams p;
  describe_attention(op, p, q_in, k_in, v_in, cu_q, cu_k, max_q, max_k);
  set_config(p, scale, causal, wl, wr);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(acc_dtype(q)));
  at::Tensor cq, ck;
  if (cu_q.has_value() && cu_q->defined()) {
    cq = cu_q->contiguous();
    ck = cu_k->contiguous();
    p.cu_seqlens_q = cq.const_data_ptr<int32_t>();
    p.cu_seqlens_k = ck.const_data_ptr<int32_t>();
  }
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v); p.out = view_of(out);
  p.lse = lse.data_ptr();
  dispatch_cpu_dtype(q, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const MqaPlan plan = cpu::make_forward_plan<T>(p, at::get_num_threads());
    run_tasks(entries<T>().forward, p, plan, plan.tasks);
  });
  clear_unowned_rows(out, cu_q, 0.0);
  clear_unowned_rows(lse, cu_q, -std::numeric_limits<double>::infinity());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mqa_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale, bool causal, int64_t wl,
    int64_t wr) {
  constexpr const char* op = "fusekit::mqa_backward";
  MqaParams p;
  describe_attention(op, p, q_in, k_in, v_in, cu_q, cu_k, max_q, max_k);
  set_config(p, scale, causal, wl, wr);
  const AttentionBackwardTensors t = prepare_attention_backward(op, grad_out_in, q_in, k_in, v_in, out_in, lse_in);
  const at::Tensor &q = t.q, &k = t.k, &v = t.v, &grad_out = t.grad_out, &out = t.out, &lse = t.lse;
  const at::Tensor &grad_q = t.grad_q, &grad_k = t.grad_k, &grad_v = t.grad_v, &delta = t.delta;
  at::Tensor cq, ck;
  if (cu_q.has_value() && cu_q->defined()) {
    cq = cu_q->contiguous();
    ck = cu_k->contiguous();
    p.cu_seqlens_q = cq.const_data_ptr<int32_t>();
    p.cu_seqlens_k = ck.const_data_ptr<int32_t>();
  }
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v); p.out = view_of(out);
  p.grad_out = view_of(grad_out);
  p.grad_q = view_of(grad_q); p.grad_k = view_of(grad_k); p.grad_v = view_of(grad_v);
  p.lse = const_cast<void*>(lse.const_data_ptr());
  p.delta = delta.data_ptr();
  dispatch_cpu_dtype(q, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int threads = at::get_num_threads();
    const int64_t rows = lse.numel() / std::max<int64_t>(p.q_heads, 1);
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(p.q_heads * p.head_dim, 1)),
                     [&](int64_t b, int64_t e) { cpu::backward_delta_rows<T>(p, b, e); });
    const MqaPlan kv_plan = cpu::make_backward_kv_plan<T>(p, threads);
    run_tasks(entries<T>().backward_kv, p, kv_plan, kv_plan.tasks);
    const MqaPlan q_plan = cpu::make_backward_q_plan<T>(p, threads);
    run_tasks(entries<T>().backward_q, p, q_plan, q_plan.tasks);
  });
  clear_unowned_rows(grad_q, cu_q, 0.0);
  clear_unowned_rows(grad_k, cu_k, 0.0);
  clear_unowned_rows(grad_v, cu_k, 0.0);
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> mqa_decode_cpu(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                  const std::optional<at::Tensor>& k_new_in,
                                                  const std::optional<at::Tensor>& v_new_in, double scale,
                                                  bool causal, int64_t wl, int64_t wr, int64_t num_splits) {
  constexpr const char* op = "fusekit::mqa_decode";
  TORCH_CHECK(q_in.dim() == 4, op, ": q must be [B, n, Hq, D], got shape ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be [B, Lmax, Hkv, D], got shape ", k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache and v_cache must have the same shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(q_in.device().is_cpu(), op, ": q must be a CPU tensor, got ", q_in.device());
  check_same(op, q_in, "q", k_cache, "k_cache");
  check_same(op, q_in, "q", v_cache, "v_cache");
  TORCH_CHECK(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1, op,
              ": k_cache and v_cache must have a unit stride in the head dim (they are written in place)");
  const int64_t B = q_in.size(0), n = q_in.size(1), hq = q_in.size(2), D = q_in.size(3);
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B, op, ": q and k_cache must have the same batch size, got ", B, " and ",
              k_cache.size(0));
  TORCH_CHECK(D >= 1 && k_cache.size(3) == D, op, ": q and the caches must have the same head dim >= 1, got ", D,
              " and ", k_cache.size(3));
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, op, ": the query head count (", hq,
              ") must be a positive multiple of the KV head count (", hkv, ")");
  TORCH_CHECK(cache_seqlens.device().is_cpu() && cache_seqlens.scalar_type() == at::kInt &&
                  cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
              op, ": cache_seqlens must be a 1-D int32 CPU tensor [B] = [", B, "], got ", cache_seqlens.scalar_type(),
              " ", cache_seqlens.sizes());
  TORCH_CHECK(num_splits >= 0, op, ": num_splits must be >= 0 (0 = automatic), got ", num_splits);
  TORCH_CHECK(k_cache.size(1) < (int64_t(1) << 31), op, ": the cache length must be below 2^31");
  const bool append = k_new_in.has_value() && k_new_in->defined();
  TORCH_CHECK(append == (v_new_in.has_value() && v_new_in->defined()), op,
              ": k_new and v_new must be given together (or both be None)");
  at::Tensor k_new, v_new;
  if (append) {
    for (const auto& [t, name] : {std::pair{&*k_new_in, "k_new"}, std::pair{&*v_new_in, "v_new"}}) {
      check_same(op, q_in, "q", *t, name);
      TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == n && t->size(2) == hkv && t->size(3) == D, op,
                  ": ", name, " must be [B, n, Hkv, D] = [", B, ", ", n, ", ", hkv, ", ", D, "], got ", t->sizes());
    }
    k_new = unit_last(*k_new_in);
    v_new = unit_last(*v_new_in);
  }
  const at::Tensor q = unit_last(q_in);
  const at::Tensor seqlens = cache_seqlens.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, n, hq}, q.options().dtype(at::kFloat));
  if (B == 0 || n == 0) return {out, lse};
  MqaDecodeParams p;
  p.batch = B; p.new_tokens = n; p.q_heads = hq; p.kv_heads = hkv; p.head_dim = D; p.cache_len = k_cache.size(1);
  p.q = view_of(q); p.k_cache = view_of(k_cache); p.v_cache = view_of(v_cache); p.out = view_of(out);
  if (append) { p.k_new = view_of(k_new); p.v_new = view_of(v_new); }
  p.cache_seqlens = seqlens.const_data_ptr<int32_t>();
  p.lse = lse.data_ptr<float>();
  p.scale = scale;
  p.causal = causal;
  p.window_left = wl < 0 ? -1 : wl;
  p.window_right = wr < 0 ? -1 : wr;
  dispatch_cpu_dtype(q, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::decode_append<T>(p);
    const MqaPlan plan = cpu::make_decode_plan<T>(p, num_splits, at::get_num_threads());
    at::Tensor partial = at::empty({plan.partial_elems}, q.options().dtype(acc_dtype(q)));
    p.partial = partial.data_ptr();
    run_tasks(entries<T>().decode, p, plan, plan.tasks);
    at::parallel_for(0, cpu::decode_units(p, plan), 1, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) cpu::decode_combine<T>(p, plan, u);
    });
  });
  return {out, lse};
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CPU, m) {
  m.impl("mqa_forward", &fusekit::mqa_forward_cpu);
  m.impl("mqa_backward", &fusekit::mqa_backward_cpu);
  m.impl("mqa_decode", &fusekit::mqa_decode_cpu);
}
