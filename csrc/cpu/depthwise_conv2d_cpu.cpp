// CPU launcher of the depthwise family: runs the torch-free kernels of
// kernels/depthwise_conv2d_cpu.h over at::parallel_for and registers the CPU kernels.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "../depthwise_conv2d_ops.h"
#include "../kernels/depthwise_conv2d_cpu.h"

namespace fusekit {
namespace {

using cpu::Direction;
using cpu::Plan;

// Entry points compiled per instruction set (kernels/cpu_isa.h), picked once at run time.
using cpu::Isa;
const Isa kIsa = cpu::detect_isa();

// Block: outputs held in registers (8 of AVX-512's 32 vector registers beat 16, measured; 4 for AVX2's 16).
#define FUSEKIT_DEFINE_ISA_ENTRIES(T, NAME, ISA, ATTR, BLOCK)                                                    \
  ATTR void conv_items_##NAME##_##ISA(const DepthwiseConv2dParams& p, const Plan& plan, Direction d,           \
                                      const T* src, T* dst, int64_t b, int64_t e, cpu::AccOf<T>::type* scr) {  \
    cpu::conv_items<T, BLOCK>(p, plan, d, src, dst, b, e, scr);                                                \
  }                                                                                                           \
  ATTR void backward_weight_items_##NAME##_##ISA(const DepthwiseConv2dParams& p, const Plan& plan,            \
                                                 const T* g, const T* in, int64_t b, int64_t e,               \
                                                 cpu::AccOf<T>::type* scr, cpu::AccOf<T>::type* acc) {         \
    cpu::backward_weight_items<T, BLOCK>(p, plan, g, in, b, e, scr, acc);                                      \
  }

#define FUSEKIT_DEFINE_CPU_ENTRIES(T, NAME)                                                                   \
  FUSEKIT_DEFINE_ISA_ENTRIES(T, NAME, avx512, FUSEKIT_TARGET_AVX512, 8)                                      \
  FUSEKIT_DEFINE_ISA_ENTRIES(T, NAME, avx2, FUSEKIT_TARGET_AVX2, 4)                                           \
  FUSEKIT_DEFINE_ISA_ENTRIES(T, NAME, base, , 4)                                                              \
  void run_entries(const DepthwiseConv2dParams& p, const Plan& plan, Direction d, const T* src, T* dst,       \
                   int64_t b, int64_t e, cpu::AccOf<T>::type* scratch) {                                       \
    switch (kIsa) {                                                                                           \
      case Isa::Avx512: return conv_items_##NAME##_avx512(p, plan, d, src, dst, b, e, scratch);               \
      case Isa::Avx2: return conv_items_##NAME##_avx2(p, plan, d, src, dst, b, e, scratch);                   \
      default: return conv_items_##NAME##_base(p, plan, d, src, dst, b, e, scratch);                          \
    }                                                                                                         \
  }                                                                                                           \
  void run_entries(const DepthwiseConv2dParams& p, const Plan& plan, const T* g, const T* in, int64_t b,      \
                   int64_t e, cpu::AccOf<T>::type* scratch, cpu::AccOf<T>::type* acc) {                        \
    switch (kIsa) {                                                                                           \
      case Isa::Avx512: return backward_weight_items_##NAME##_avx512(p, plan, g, in, b, e, scratch, acc);     \
      case Isa::Avx2: return backward_weight_items_##NAME##_avx2(p, plan, g, in, b, e, scratch, acc);         \
      default: return backward_weight_items_##NAME##_base(p, plan, g, in, b, e, scratch, acc);                \
    }                                                                                                         \
  }

FUSEKIT_DEFINE_CPU_ENTRIES(float, f32)
FUSEKIT_DEFINE_CPU_ENTRIES(double, f64)
FUSEKIT_DEFINE_CPU_ENTRIES(cpu::bf16_t, bf16)
FUSEKIT_DEFINE_CPU_ENTRIES(cpu::fp16_t, f16)

// The one dtype switch of the CPU launcher: calls f with a null pointer of the storage type.
template <typename F>
void dispatch_storage(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::Float32: return f(static_cast<float*>(nullptr));
    case ScalarKind::Float64: return f(static_cast<double*>(nullptr));
    case ScalarKind::BFloat16: return f(static_cast<cpu::bf16_t*>(nullptr));
    case ScalarKind::Float16: return f(static_cast<cpu::fp16_t*>(nullptr));
  }
}

// 128-byte aligned scratch (vectors of 16 doubles need 128-byte alignment).
template <typename A>
std::unique_ptr<A[], void (*)(void*)> aligned_scratch(int64_t elems) {
  size_t bytes = ((size_t(elems) * sizeof(A) + 127) / 128) * 128;
  A* ptr = static_cast<A*>(std::aligned_alloc(128, bytes == 0 ? 128 : bytes));
  TORCH_CHECK(ptr != nullptr, "fusekit: could not allocate ", bytes, " bytes of CPU scratch");
  return {ptr, std::free};
}

struct CpuRunner {
  static void conv(const DepthwiseConv2dParams& p, bool forward, const at::Tensor& src, const at::Tensor& dst) {
    const Direction d = forward ? Direction::Forward : Direction::BackwardInput;
    dispatch_storage(scalar_kind(src, "fusekit depthwise (CPU)"), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using A = cpu::AccOf<T>::type;
      const Plan plan = cpu::make_plan(p, d, at::get_num_threads(), sizeof(A));
      const T* s = static_cast<const T*>(src.const_data_ptr());
      T* o = static_cast<T*>(dst.mutable_data_ptr());
      at::parallel_for(0, plan.items, 1, [&](int64_t b, int64_t e) {
        auto scratch = aligned_scratch<A>(plan.scratch_elems);
        run_entries(p, plan, d, s, o, b, e, scratch.get());
      });
    });
  }

  static void backward_weight(const DepthwiseConv2dParams& p, const at::Tensor& grad_out, const at::Tensor& in) {
    dispatch_storage(scalar_kind(in, "fusekit depthwise (CPU)"), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using A = cpu::AccOf<T>::type;
      const int threads = at::get_num_threads();
      const Plan plan = cpu::make_plan(p, Direction::BackwardWeight, threads, sizeof(A));
      // one private accumulator per thread, reduced below: no atomics, deterministic per thread count
      std::vector<A> partial(size_t(threads) * plan.grad_weight_elems, A(0));
      const T* g = static_cast<const T*>(grad_out.const_data_ptr());
      const T* x = static_cast<const T*>(in.const_data_ptr());
      at::parallel_for(0, plan.items, 1, [&](int64_t b, int64_t e) {
        auto scratch = aligned_scratch<A>(plan.scratch_elems);
        A* mine = partial.data() + size_t(at::get_thread_num()) * plan.grad_weight_elems;
        run_entries(p, plan, g, x, b, e, scratch.get(), mine);
      });
      int64_t offset = 0;
      for (int s = 0; s < p.num_segments; ++s) {
        const DepthwiseSegment& seg = p.seg[s];
        if (seg.kh == 0) continue;
        const int64_t cs = seg.c_end - seg.c_begin, taps = seg.kh * seg.kw;
        A* gw = static_cast<A*>(seg.grad_weight);
        A* gb = static_cast<A*>(seg.grad_bias);
        for (int t = 0; t < threads; ++t) {
          const A* src = partial.data() + size_t(t) * plan.grad_weight_elems + offset;
          for (int64_t k = 0; k < cs * taps; ++k) gw[k] += src[k];
          if (gb != nullptr)
            for (int64_t c = 0; c < cs; ++c) gb[c] += src[cs * taps + c];
        }
        offset += cs * (taps + 1);
      }
    });
  }
};

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return depthwise_conv2d_impl<CpuRunner>(x, weight, bias, stride, padding, dilation);
}

at::Tensor depthwise_conv2d_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& weight, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  return depthwise_conv2d_backward_input_impl<CpuRunner>(grad_out, x, weight, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_backward_weight_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        at::IntArrayRef kernel_size,
                                                                        at::IntArrayRef stride,
                                                                        at::IntArrayRef padding,
                                                                        at::IntArrayRef dilation) {
  return depthwise_conv2d_backward_weight_impl<CpuRunner>(grad_out, x, kernel_size, stride, padding, dilation);
}

at::Tensor inception_dwconv2d_cpu(const at::Tensor& x, const at::Tensor& w_hw, const std::optional<at::Tensor>& b_hw,
                                  const at::Tensor& w_w, const std::optional<at::Tensor>& b_w, const at::Tensor& w_h,
                                  const std::optional<at::Tensor>& b_h) {
  return inception_dwconv2d_impl<CpuRunner>(x, w_hw, b_hw, w_w, b_w, w_h, b_h);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
inception_dwconv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_hw,
                                const at::Tensor& w_w, const at::Tensor& w_h, std::array<bool, 2> output_mask) {
  return inception_dwconv2d_backward_impl<CpuRunner>(grad_out, x, w_hw, w_w, w_h, output_mask);
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CPU, m) {
  m.impl("depthwise_conv2d", &fusekit::depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward_input", &fusekit::depthwise_conv2d_backward_input_cpu);
  m.impl("depthwise_conv2d_backward_weight", &fusekit::depthwise_conv2d_backward_weight_cpu);
  m.impl("inception_dwconv2d", &fusekit::inception_dwconv2d_cpu);
  m.impl("inception_dwconv2d_backward", &fusekit::inception_dwconv2d_backward_cpu);
}
