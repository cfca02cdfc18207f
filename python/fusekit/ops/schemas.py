"""Every fusekit operator schema, in one place.

The C++ library (fusekit._C) only registers kernels for these schemas
(TORCH_LIBRARY_IMPL(fusekit, CPU|CUDA, m)); Triton kernels are registered from Python as
separate ``*_triton`` ops, so that each op has exactly one kernel per device.

Conventions: padding is explicit as (top, bottom, left, right) so PyTorch's asymmetric
"same" padding for even kernels is representable; backward ops take the forward input
``x`` (its shape and memory format define grad_x) and return fresh tensors.
"""
import torch

lib = torch.library.Library("fusekit", "DEF")

_DEPTHWISE_CONF = "int[2] stride, int[4] padding, int[2] dilation"

for _suffix in ("", "_triton"):
    lib.define(f"depthwise_conv2d{_suffix}(Tensor x, Tensor weight, Tensor? bias, {_DEPTHWISE_CONF}) -> Tensor")
    lib.define(f"depthwise_conv2d_backward_input{_suffix}(Tensor grad_out, Tensor x, Tensor weight, "
               f"{_DEPTHWISE_CONF}) -> Tensor")
    lib.define(f"depthwise_conv2d_backward_weight{_suffix}(Tensor grad_out, Tensor x, int[2] kernel_size, "
               f"{_DEPTHWISE_CONF}) -> (Tensor grad_weight, Tensor grad_bias)")

# InceptionNeXt token mixer: channels (C - 3gc | gc | gc | gc) -> identity | square | 1 x band | band x 1,
# all with "same" padding and stride 1, in one launch.
lib.define("inception_dwconv2d(Tensor x, Tensor w_hw, Tensor? b_hw, Tensor w_w, Tensor? b_w, "
           "Tensor w_h, Tensor? b_h) -> Tensor")
lib.define("inception_dwconv2d_backward(Tensor grad_out, Tensor x, Tensor w_hw, Tensor w_w, Tensor w_h, "
           "bool[2] output_mask) -> (Tensor grad_x, Tensor grad_w_hw, Tensor grad_b_hw, Tensor grad_w_w, "
           "Tensor grad_b_w, Tensor grad_w_h, Tensor grad_b_h)")
