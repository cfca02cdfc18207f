// CUDA launcher of the depthwise family: checks, allocation and the current stream around the
// torch-free kernels of depthwise_conv2d_kernels.cu, and the CUDA kernel registrations.
// Compiled by the host compiler (not nvcc), so the kernels' .cu stays free of torch headers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../depthwise_conv2d_ops.h"
#include "depthwise_conv2d_cuda.h"

namespace fusekit {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fusekit: CUDA ", what, " launch failed: ", cudaGetErrorString(err));
}

struct CudaRunner {
  static void conv(const DepthwiseConv2dParams& p, bool forward, const at::Tensor& src, const at::Tensor& dst) {
    const c10::cuda::CUDAGuard guard(src.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(src.device().index()).stream();
    const ScalarKind kind = scalar_kind(src, "fusekit depthwise (CUDA)");
    if (forward) {
      check_launch(cuda::depthwise_conv2d_forward(p, kind, src.const_data_ptr(), dst.mutable_data_ptr(), stream),
                   "depthwise forward");
    } else {
      check_launch(cuda::depthwise_conv2d_backward_input(p, kind, src.const_data_ptr(), dst.mutable_data_ptr(), stream),
                   "depthwise backward-input");
    }
  }

  static void backward_weight(const DepthwiseConv2dParams& p, const at::Tensor& grad_out, const at::Tensor& in) {
    const c10::cuda::CUDAGuard guard(in.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(in.device().index()).stream();
    check_launch(cuda::depthwise_conv2d_backward_weight(p, scalar_kind(in, "fusekit depthwise (CUDA)"),
                                                        grad_out.const_data_ptr(), in.const_data_ptr(), stream),
                 "depthwise backward-weight");
  }
};

at::Tensor depthwise_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return depthwise_conv2d_impl<CudaRunner>(x, weight, bias, stride, padding, dilation);
}

at::Tensor depthwise_conv2d_backward_input_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& weight, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  return depthwise_conv2d_backward_input_impl<CudaRunner>(grad_out, x, weight, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_backward_weight_cuda(const at::Tensor& grad_out,
                                                                         const at::Tensor& x,
                                                                         at::IntArrayRef kernel_size,
                                                                         at::IntArrayRef stride,
                                                                         at::IntArrayRef padding,
                                                                         at::IntArrayRef dilation) {
  return depthwise_conv2d_backward_weight_impl<CudaRunner>(grad_out, x, kernel_size, stride, padding, dilation);
}

at::Tensor inception_dwconv2d_cuda(const at::Tensor& x, const at::Tensor& w_hw, const std::optional<at::Tensor>& b_hw,
                                   const at::Tensor& w_w, const std::optional<at::Tensor>& b_w, const at::Tensor& w_h,
                                   const std::optional<at::Tensor>& b_h) {
  return inception_dwconv2d_impl<CudaRunner>(x, w_hw, b_hw, w_w, b_w, w_h, b_h);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
inception_dwconv2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_hw,
                                 const at::Tensor& w_w, const at::Tensor& w_h, std::array<bool, 2> output_mask) {
  return inception_dwconv2d_backward_impl<CudaRunner>(grad_out, x, w_hw, w_w, w_h, output_mask);
}

}  // namespace
}  // namespace fusekit

TORCH_LIBRARY_IMPL(fusekit, CUDA, m) {
  m.impl("depthwise_conv2d", &fusekit::depthwise_conv2d_cuda);
  m.impl("depthwise_conv2d_backward_input", &fusekit::depthwise_conv2d_backward_input_cuda);
  m.impl("depthwise_conv2d_backward_weight", &fusekit::depthwise_conv2d_backward_weight_cuda);
  m.impl("inception_dwconv2d", &fusekit::inception_dwconv2d_cuda);
  m.impl("inception_dwconv2d_backward", &fusekit::inception_dwconv2d_backward_cuda);
}
