// CPU launcher of the unfused neighborhood-attention ops (na_qk, na_qk_backward, na_av,
// na_av_backward): argument checks, allocation, dtype and instruction-set dispatch of the
// torch-free passes of kernels/na_unfused_cpu.h over the threads of at::parallel_for, and their
// CPU registrations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../na_launch.h"
#include "cpu_launch.h"
#include "../kernels/na_unfused_cpu.h"

namespace fusekit {
namespace {

using cpu::Isa;
const Isa kIsa = cpu::detect_isa();

using TasksEntry = void (*)(const NaUnfusedParams&, int64_t, int64_t);
using SumsEntry = void (*)(const NaUnfusedParams&, int64_t, int64_t, void* rpb_acc);

struct NaUnfusedEntries {
  TasksEntry dots;
  SumsEntry sums;
  TasksEntry inverse;
};

template <typename T> const NaUnfusedEntries& entries();

// One entry per pass, dtype and instruction set; the kernel templates are inlined into them.
#define FUSEKIT_NA_ISA_ENTRIES(T, NAME, ISA, ATTR)                                                        \
  ATTR void dots_##NAME##_##ISA(const NaUnfusedParams& p, int64_t b, int64_t e) {                          \
    cpu::slot_dots<T, cpu::AccOf<T>::type>(p, b, e);                                                      \
  }                                                                                                       \
  ATTR void sums_##NAME##_##ISA(const NaUnfusedParams& p, int64_t b, int64_t e, void* r) {                 \
    cpu::slot_weighted_sums<T, cpu::AccOf<T>::type>(p, b, e, static_cast<cpu::AccOf<T>::type*>(r));         \
  }                                                                                                       \
  ATTR void inverse_##NAME##_##ISA(const NaUnfusedParams& p, int64_t b, int64_t e) {                       \
    cpu::inverse_weighted_sums<T, cpu::AccOf<T>::type>(p, b, e);                                          \
  }

#define FUSEKIT_NA_ENTRIES(T, NAME)                                                                       \
  FUSEKIT_NA_ISA_ENTRIES(T, NAME, avx512, FUSEKIT_TARGET_AVX512)                                          \
  FUSEKIT_NA_ISA_ENTRIES(T, NAME, avx2, FUSEKIT_TARGET_AVX2)                                              \
  FUSEKIT_NA_ISA_ENTRIES(T, NAME, base, )                                                                 \
  template <> const NaUnfusedEntries& entries<T>() {                                                      \
    static const NaUnfusedEntries table[3] = {{dots_##NAME##_avx512, sums_##NAME##_avx512, inverse_##NAME##_avx512}, \
                                              {dots_##NAME##_avx2, sums_##NAME##_avx2, inverse_##NAME##_avx2},       \
                                              {dots_##NAME##_base, sums_##NAME##_base, inverse_##NAME##_base}};      \
    return table[kIsa == Isa::Avx512 ? 0 : kIsa == Isa::Avx2 ? 1 : 2];                                    \
  }

FUSEKIT_NA_ENTRIES(float, f32)
FUSEKIT_NA_ENTRIES(double, f64)
FUSEKIT_NA_ENTRIES(cpu::bf16_t, bf16)
FUSEKIT_NA_ENTRIES(cpu::fp16_t, f16)

// Splits `tasks` into one contiguous range per thread (chunk c of `chunks`): f(begin, end, c).
// Fixed ranges make the per-chunk grad_rpb sums deterministic for a given thread count.
template <typename F>
void run_chunks(int64_t tasks, int64_t chunks, F&& f) {
  if (tasks <= 0) return;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) f(c * tasks / chunks, (c + 1) * tasks / chunks, c);
  });
}

int64_t chunks_for(int64_t tasks) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)); }

// The validated configuration of one call: axes padded to 3 with leading {L 1, k 1, s 1, d 1}.
struct NaConfig {
  int64_t rank = 0;
  na::Axis axis[kNaMaxRank];
  NaAxisTable table[kNaMaxRank];
  std::vector<int64_t> spatial;  // the R real lengths
  int64_t tokens = 1, slots = 1;
};

NaConfig make_config(const char* op, at::IntArrayRef spatial, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  NaConfig cfg;
  const int64_t R = int64_t(kernel_size.size());
  na_axes_from_args(op, spatial, kernel_size, stride, dilation, is_causal, cfg.axis);
  cfg.rank = R;
  for (int64_t a = 0; a < R; ++a) cfg.spatial.push_back(spatial[a]);
  for (int64_t a = 0; a < kNaMaxRank; ++a) {
    cfg.table[a].build(cfg.axis[a]);
    cfg.tokens *= cfg.axis[a].length;
    cfg.slots *= cfg.axis[a].kernel;
  }
  return cfg;
}

bool any_causal(const NaConfig& cfg) {
  for (const na::Axis& a : cfg.axis) if (a.causal) return true;
  return false;
}

// [B, *spatial, H, D] rows with unit dim stride.
NaRows rows_of(const at::Tensor& t, int64_t rank) {
  NaRows r;
  r.data = t.const_data_ptr();
  r.batch_stride = t.stride(0);
  r.head_stride = t.stride(-2);
  for (int64_t a = 0; a < rank; ++a) r.token_stride[kNaMaxRank - rank + a] = t.stride(1 + a);
  return r;
}

void check_cpu_same(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type(), " (all must match)");
}

// Checks a query-side [B, *spatial, Hq, D] and key-side [B, *spatial, Hkv, D] pair; fills the
// size fields of p. Returns the spatial sizes.
std::vector<int64_t> describe_rows(const char* op, NaUnfusedParams& p, const at::Tensor& x, const char* x_name,
                                   const at::Tensor& y, const char* y_name, int64_t rank) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", x_name, " must be a CPU tensor, got ", x.device());
  check_cpu_same(op, x, x_name, y, y_name);
  TORCH_CHECK(x.dim() == rank + 3, op, ": ", x_name, " must be [B, *spatial (", rank, "), heads, head_dim], got ",
              x.sizes());
  TORCH_CHECK(y.dim() == rank + 3, op, ": ", y_name, " must be [B, *spatial (", rank, "), heads, head_dim], got ",
              y.sizes());
  TORCH_CHECK(x.sizes().slice(0, rank + 1) == y.sizes().slice(0, rank + 1), op, ": ", x_name, " and ", y_name,
              " must have the same batch and spatial sizes, got ", x.sizes(), " and ", y.sizes());
  const int64_t D = x.size(-1), hq = x.size(-2), hkv = y.size(-2);
  TORCH_CHECK(D >= 1 && D <= kNaMaxHeadDim && y.size(-1) == D, op, ": ", x_name, " and ", y_name,
              " must have the same head dim in 1..", kNaMaxHeadDim, ", got ", D, " and ", y.size(-1));
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, op, ": the query head count (", hq,
              ") must be a positive multiple of the KV head count (", hkv, ")");
  p.batch = x.size(0);
  p.q_heads = hq;
  p.kv_heads = hkv;
  p.head_dim = D;
  return std::vector<int64_t>(x.sizes().begin() + 1, x.sizes().begin() + 1 + rank);
}

void set_geometry(NaUnfusedParams& p, const NaConfig& cfg) {
  for (int a = 0; a < kNaMaxRank; ++a) p.axis[a] = cfg.axis[a];
  p.table = cfg.table;
  p.tokens = cfg.tokens;
  p.slots = cfg.slots;
}

// attn / grad_attn [B, Hq, *spatial, K], made contiguous.
at::Tensor checked_weights(const char* op, const at::Tensor& w, const char* name, const NaUnfusedParams& p,
                           const NaConfig& cfg, const at::Tensor& like, const char* like_name) {
  check_cpu_same(op, like, like_name, w, name);
  std::vector<int64_t> shape = {p.batch, p.q_heads};
  shape.insert(shape.end(), cfg.spatial.begin(), cfg.spatial.end());
  shape.push_back(cfg.slots);
  TORCH_CHECK(w.sizes() == at::IntArrayRef(shape), op, ": ", name, " must be [B, Hq, *spatial, prod(kernel_size)] = ",
              at::IntArrayRef(shape), ", got ", w.sizes());
  return w.contiguous();
}

std::vector<int64_t> rpb_shape(const NaConfig& cfg, int64_t heads) {
  std::vector<int64_t> shape = {heads};
  for (int64_t a = kNaMaxRank - cfg.rank; a < kNaMaxRank; ++a) shape.push_back(2 * cfg.axis[a].kernel - 1);
  return shape;
}

at::Tensor rows_like(const NaUnfusedParams& p, const NaConfig& cfg, int64_t heads, const at::Tensor& like) {
  std::vector<int64_t> shape = {p.batch};
  shape.insert(shape.end(), cfg.spatial.begin(), cfg.spatial.end());
  shape.push_back(heads);
  shape.push_back(p.head_dim);
  return at::empty(shape, like.options().memory_format(at::MemoryFormat::Contiguous));
}

void run_dots(const NaUnfusedParams& p, const at::Tensor& dtype_of, const char* op) {
  dispatch_cpu_dtype(dtype_of, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const TasksEntry f = entries<T>().dots;
    const int64_t tasks = p.query_tasks();
    run_chunks(tasks, chunks_for(tasks), [&](int64_t b, int64_t e, int64_t) { f(p, b, e); });
  });
}

void run_inverse(const NaUnfusedParams& p, const at::Tensor& dtype_of, const char* op) {
  dispatch_cpu_dtype(dtype_of, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const TasksEntry f = entries<T>().inverse;
    const int64_t tasks = p.key_tasks();
    run_chunks(tasks, chunks_for(tasks), [&](int64_t b, int64_t e, int64_t) { f(p, b, e); });
  });
}

// slot_weighted_sums; with grad_rpb defined, also sums the weights into it (per-chunk buffers in
// the accumulation type, added in chunk order, then rounded once to grad_rpb's dtype).
void run_sums(const NaUnfusedParams& p, const at::Tensor& dtype_of, const char* op, at::Tensor* grad_rpb) {
  dispatch_cpu_dtype(dtype_of, op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = typename cpu::AccOf<T>::type;
    const SumsEntry f = entries<T>().sums;
    const int64_t tasks = p.query_tasks(), chunks = chunks_for(tasks);
    if (grad_rpb == nullptr) {
      run_chunks(tasks, chunks, [&](int64_t b, int64_t e, int64_t) { f(p, b, e, nullptr); });
      return;
    }
    const int64_t per_chunk = p.q_heads * p.rpb_per_head();
    std::vector<A> buffers(size_t(chunks * per_chunk), A(0));
    run_chunks(tasks, chunks, [&](int64_t b, int64_t e, int64_t c) { f(p, b, e, buffers.data() + c * per_chunk); });
    at::Tensor total = at::zeros({per_chunk}, dtype_of.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat));
    A* t = total.data_ptr<A>();
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t m = 0; m < per_chunk; ++m) t[m] += buffers[size_t(c * per_chunk + m)];
    grad_rpb->copy_(total.view(grad_rpb->sizes()));
  });
}

// ----------------------------------------------------------------------------------------------
// ops
// ----------------------------------------------------------------------------------------------

at::Tensor na_qk_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const std::optional<at::Tensor>& rpb_in,
                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation,
                     const c10::List<bool>& is_causal, double scale) {
  const char* op = "fusekit::na_qk";
  const int64_t rank = int64_t(kernel_size.size());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in);
  NaUnfusedParams p;
  const std::vector<int64_t> spatial = describe_rows(op, p, q, "q", k, "k", rank);
  const NaConfig cfg = make_config(op, spatial, kernel_size, stride, dilation, is_causal);
  set_geometry(p, cfg);
  at::Tensor rpb;
  if (rpb_in.has_value() && rpb_in->defined()) {
    TORCH_CHECK(!any_causal(cfg), op, ": rpb is only supported when no axis is causal");
    check_cpu_same(op, q, "q", *rpb_in, "rpb");
    const std::vector<int64_t> shape = rpb_shape(cfg, p.q_heads);
    TORCH_CHECK(rpb_in->sizes() == at::IntArrayRef(shape), op, ": rpb must be [Hq, 2k-1 per axis] = ",
                at::IntArrayRef(shape), ", got ", rpb_in->sizes());
    rpb = rpb_in->contiguous();
  }
  std::vector<int64_t> shape = {p.batch, p.q_heads};
  shape.insert(shape.end(), spatial.begin(), spatial.end());
  shape.push_back(cfg.slots);
  at::Tensor attn = at::empty(shape, q.options().memory_format(at::MemoryFormat::Contiguous));
  p.x = rows_of(q, rank);
  p.y = rows_of(k, rank);
  p.rpb = rpb.defined() ? rpb.const_data_ptr() : nullptr;
  p.out = attn.data_ptr();
  p.alpha = scale;
  p.invalid_neg_inf = true;
  run_dots(p, q, op);
  return attn;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> na_qk_backward_cpu(
    const at::Tensor& grad_attn_in, const at::Tensor& q_in, const at::Tensor& k_in, bool has_rpb,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation, const c10::List<bool>& is_causal,
    double scale) {
  const char* op = "fusekit::na_qk_backward";
  const int64_t rank = int64_t(kernel_size.size());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in);
  NaUnfusedParams p;
  const std::vector<int64_t> spatial = describe_rows(op, p, q, "q", k, "k", rank);
  const NaConfig cfg = make_config(op, spatial, kernel_size, stride, dilation, is_causal);
  set_geometry(p, cfg);
  TORCH_CHECK(!has_rpb || !any_causal(cfg), op, ": rpb is only supported when no axis is causal");
  const at::Tensor grad_attn = checked_weights(op, grad_attn_in, "grad_attn", p, cfg, q, "q");
  at::Tensor grad_q = rows_like(p, cfg, p.q_heads, q);
  at::Tensor grad_k = rows_like(p, cfg, p.kv_heads, k);
  at::Tensor grad_rpb = has_rpb ? at::empty(rpb_shape(cfg, p.q_heads), q.options()) : q.new_empty({0});
  p.weights = grad_attn.const_data_ptr();
  p.alpha = scale;
  // grad_q_i = scale sum_n g[i, n] k_slot (and grad_rpb from the same walk)
  p.y = rows_of(k, rank);
  p.out = grad_q.data_ptr();
  run_sums(p, q, op, has_rpb ? &grad_rpb : nullptr);
  // grad_k_j = scale sum over the queries that see j of g[i, n(i, j)] q_i
  p.x = rows_of(q, rank);
  p.out = grad_k.data_ptr();
  run_inverse(p, q, op);
  return {grad_q, grad_k, grad_rpb};
}

at::Tensor na_av_cpu(const at::Tensor& attn_in, const at::Tensor& v_in, at::IntArrayRef kernel_size,
                     at::IntArrayRef stride, at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "fusekit::na_av";
  const int64_t rank = int64_t(kernel_size.size());
  const at::Tensor v = unit_last(v_in);
  TORCH_CHECK(v.device().is_cpu(), op, ": v must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.dim() == rank + 3, op, ": v must be [B, *spatial (", rank, "), heads, head_dim], got ", v.sizes());
  TORCH_CHECK(attn_in.dim() == rank + 3, op, ": attn must be [B, Hq, *spatial (", rank, "), prod(kernel_size)], got ",
              attn_in.sizes());
  NaUnfusedParams p;
  p.batch = v.size(0);
  p.q_heads = attn_in.size(1);
  p.kv_heads = v.size(-2);
  p.head_dim = v.size(-1);
  TORCH_CHECK(p.head_dim >= 1 && p.head_dim <= kNaMaxHeadDim, op, ": head dim must be in 1..", kNaMaxHeadDim,
              ", got ", p.head_dim);
  TORCH_CHECK(p.kv_heads >= 1 && p.q_heads % p.kv_heads == 0, op, ": the query head count (", p.q_heads,
              ") must be a positive multiple of the KV head count (", p.kv_heads, ")");
  const std::vector<int64_t> spatial(v.sizes().begin() + 1, v.sizes().begin() + 1 + rank);
  const NaConfig cfg = make_config(op, spatial, kernel_size, stride, dilation, is_causal);
  set_geometry(p, cfg);
  const at::Tensor attn = checked_weights(op, attn_in, "attn", p, cfg, v, "v");
  at::Tensor out = rows_like(p, cfg, p.q_heads, v);
  p.weights = attn.const_data_ptr();
  p.y = rows_of(v, rank);
  p.out = out.data_ptr();
  p.alpha = 1.0;
  run_sums(p, v, op, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> na_av_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& attn_in,
                                                      const at::Tensor& v_in, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef dilation,
                                                      const c10::List<bool>& is_causal) {
  const char* op = "fusekit::na_av_backward";
  const int64_t rank = int64_t(kernel_size.size());
  const at::Tensor grad_out = unit_last(grad_out_in), v = unit_last(v_in);
  NaUnfusedParams p;
  const std::vector<int64_t> spatial = describe_rows(op, p, grad_out, "grad_out", v, "v", rank);
  const NaConfig cfg = make_config(op, spatial, kernel_size, stride, dilation, is_causal);
  set_geometry(p, cfg);
  const at::Tensor attn = checked_weights(op, attn_in, "attn", p, cfg, v, "v");
  std::vector<int64_t> shape = {p.batch, p.q_heads};
  shape.insert(shape.end(), spatial.begin(), spatial.end());
  shape.push_back(cfg.slots);
  at::Tensor grad_attn = at::empty(shape, v.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_v = rows_like(p, cfg, p.kv_heads, v);
  p.x = rows_of(grad_out, rank);
  p.y = rows_of(v, rank);
  p.alpha = 1.0;
  // grad_attn[i, n] = <grad_out_i, v_slot>, 0 in invalid slots
  p.out = grad_attn.data_ptr();
  p.invalid_neg_inf = false;
  run_dots(p, v, op);
  // grad_v_j = sum over the queries that see j of attn[i, n(i, j)] grad_out_i
  p.weights = attn.const_data_ptr();
  p.out = grad_v.data_ptr();
  run_inverse(p, v, op);
  return {grad_attn, grad_v};
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CPU, m) {
  m.impl("na_qk", &fusekit::na_qk_cpu);
  m.impl("na_qk_backward", &fusekit::na_qk_backward_cpu);
  m.impl("na_av", &fusekit::na_av_cpu);
  m.impl("na_av_backward", &fusekit::na_av_backward_cpu);
}
