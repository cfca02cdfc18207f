// CUDA launcher of fusekit::mqa_decode: argument checks, allocation of out / lse and of the fp32
// split workspace, device guard and current stream around the torch-free kernels of
// mqa_decode_kernels.cu, and the CUDA registration. Compiled by the host compiler (not nvcc).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "mqa_decode_cuda.h"

namespace fusekit {
namespace {

constexpr const char* kOp = "fusekit::mqa_decode (CUDA)";

ScalarKind decode_kind(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return ScalarKind::Float32;
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, kOp, ": dtype ", q.scalar_type(),
                       " is not supported (float32, float16, bfloat16; float64 runs on the CPU backend)");
  }
}

void check_like_q(const at::Tensor& q, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
                   " but q has dtype ", q.scalar_type());
}

void check_fits_int32(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, kOp, ": ", what, " = ", v, " exceeds the int32 range of the kernels");
}

// A unit stride in D, copying only when needed (arbitrary batch / sequence / head strides stay).
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

std::tuple<at::Tensor, at::Tensor> mqa_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                   const std::optional<at::Tensor>& k_new,
                                                   const std::optional<at::Tensor>& v_new, double scale, bool causal,
                                                   int64_t window_left, int64_t window_right, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda(), kOp, ": q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, kOp, ": q must be 4-D [B, n, Hq, D], got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, kOp, ": k_cache must be 4-D [B, Lmax, Hkv, D], got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), kOp, ": v_cache must have k_cache's shape ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  const ScalarKind kind = decode_kind(q);
  check_like_q(q, k_cache, "k_cache");
  check_like_q(q, v_cache, "v_cache");
  const int64_t B = q.size(0), n = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Lmax = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B, kOp, ": q has batch ", B, " but k_cache has batch ", k_cache.size(0));
  TORCH_CHECK(k_cache.size(3) == D, kOp, ": q has head dim ", D, " but k_cache has head dim ", k_cache.size(3));
  TORCH_CHECK(n >= 1, kOp, ": q must hold at least one new token per sequence (q.size(1) >= 1), got ", n);
  TORCH_CHECK(D >= 1 && D <= 256, kOp, ": head dim must be in [1, 256], got ", D);
  TORCH_CHECK(Hkv >= 1 && Hq >= 1 && Hq % Hkv == 0, kOp, ": the number of query heads (", Hq,
              ") must be a positive multiple of the number of KV heads (", Hkv, ")");
  TORCH_CHECK(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1, kOp,
              ": k_cache and v_cache must have a unit stride in the last (head) dim: they are written in place, "
              "so they cannot be copied to a contiguous layout");
  TORCH_CHECK(cache_seqlens.device() == q.device(), kOp, ": cache_seqlens is on ", cache_seqlens.device(),
              " but q is on ", q.device());
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, kOp, ": cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, kOp, ": cache_seqlens must be [B] = [", B,
              "], got shape ", cache_seqlens.sizes());
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), kOp, ": k_new and v_new must be given together (or both None)");
  const bool append = k_new.has_value();
  if (append) {
    for (const auto& [t, name] : {std::pair{&*k_new, "k_new"}, std::pair{&*v_new, "v_new"}}) {
      check_like_q(q, *t, name);
      TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == n && t->size(2) == Hkv && t->size(3) == D, kOp,
                  ": ", name, " must be [B, n, Hkv, D] = [", B, ", ", n, ", ", Hkv, ", ", D, "], got shape ",
                  t->sizes());
    }
    // the append writes the caches in place: one element per memory location
    at::assert_no_internal_overlap(k_cache);
    at::assert_no_internal_overlap(v_cache);
  }
  TORCH_CHECK(num_splits >= 0, kOp, ": num_splits must be >= 0 (0 = automatic), got ", num_splits);
  check_fits_int32(B, "batch");
  check_fits_int32(n, "new tokens per sequence");
  check_fits_int32(Hq, "query heads");
  check_fits_int32(Lmax + n, "Lmax + n");
  check_fits_int32(Hq / Hkv * n, "query rows per KV head (Hq / Hkv * n)");
  check_fits_int32(B * Hkv, "batch * KV heads");

  at::Tensor out = at::empty({B, n, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, n, Hq}, q.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};

  const at::Tensor qc = unit_last_stride(q);
  const at::Tensor seqlens = cache_seqlens.contiguous();
  at::Tensor kn, vn;
  if (append) {
    kn = unit_last_stride(*k_new);
    vn = unit_last_stride(*v_new);
  }

  MqaDecodeCudaParams p;
  p.q = qc.const_data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = seqlens.const_data_ptr<int32_t>();
  p.k_new = append ? kn.const_data_ptr() : nullptr;
  p.v_new = append ? vn.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.B = B;
  p.n = n;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.Lmax = Lmax;
  set_strides(p.q_stride, qc);
  set_strides(p.k_cache_stride, k_cache);
  set_strides(p.v_cache_stride, v_cache);
  if (append) {
    set_strides(p.k_new_stride, kn);
    set_strides(p.v_new_stride, vn);
  }
  set_strides(p.out_stride, out);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.window_left = window_left;
  p.window_right = window_right;
  p.num_splits = num_splits;

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(prop->major >= 8, kOp, ": needs an sm_80 or newer GPU (cp.async / ldmatrix / bf16 mma), ", prop->name,
              " is sm_", prop->major, prop->minor);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(q.device().index()).stream();
  // the split count depends on the shapes and the device only, so graph replays see fixed launches
  p.num_splits = cuda::mqa_decode_num_splits(p, kind);
  at::Tensor ws_out, ws_lse;
  if (p.num_splits > 1) {
    ws_out = at::empty({B, n, Hq, p.num_splits, D}, q.options().dtype(at::kFloat));
    ws_lse = at::empty({B, n, Hq, p.num_splits}, q.options().dtype(at::kFloat));
    p.ws_out = ws_out.mutable_data_ptr<float>();
    p.ws_lse = ws_lse.mutable_data_ptr<float>();
  }
  const cudaError_t err = cuda::mqa_decode(p, kind, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CUDA, m) { m.impl("mqa_decode", &fusekit::mqa_decode_cuda); }
