"""Depthwise convolution: argument rules, backends, fake kernels, autograd, functional API.

Layers: torch-free kernels (csrc/kernels, csrc/cuda/*.cu, triton_kernels/depthwise_conv2d.py),
launchers that check and allocate (csrc/cpu, csrc/cuda/*.cpp, the Triton launch functions),
and this module, which validates arguments with clear errors, picks a backend and
differentiates through the backward ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from . import schemas  # noqa: F401  (defines the op schemas before fusekit._C registers kernels)
from ..backends import OpBackends, register_op
from .common import (autocast_inputs, check_same_device_dtype, compiled_reasons, cuda_device_reason, kernel_reasons,
                     machine_reason, no_reasons, require_triton_device, triton_reason, triton_reasons)

_ops = torch.ops.fusekit
IntOr2 = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int]]

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# argument rules (shared by every backend)
# ----------------------------------------------------------------------------------------------

def _pair(value: IntOr2, name: str, ndim: int = 2) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * ndim
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}") from None
    if len(out) != ndim:
        raise ValueError(f"{name} must have {ndim} values, got {value!r}")
    return out


def resolve_padding(padding: Padding, kernel_size: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """PyTorch's conv padding forms -> explicit (top, bottom, left, right)."""
    ndim = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions (stride must be 1)")
        out: list[int] = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]  # PyTorch puts the odd extra pad at the end
        return tuple(out) if ndim == 2 else (0, 0, *out)  # type: ignore[return-value]
    pads = _pair(padding, "padding", ndim)
    if any(p < 0 for p in pads):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    if ndim == 1:
        return (0, 0, pads[0], pads[0])
    return (pads[0], pads[0], pads[1], pads[1])


def output_size(size: int, k: int, s: int, d: int, pad_lo: int, pad_hi: int) -> int:
    return (size + pad_lo + pad_hi - d * (k - 1) - 1) // s + 1


def _check_same_device_dtype(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    check_same_device_dtype("x", x, **others)


def check_depthwise_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         stride: tuple[int, int], padding: tuple[int, int, int, int],
                         dilation: tuple[int, int]) -> None:
    """Raise a clear error for anything the kernels do not define."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got shape {tuple(getattr(x, 'shape', ()))}")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"weight must have shape [C, 1, kh, kw] (channel multiplier 1), got {tuple(weight.shape)}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[0]} channels but x has {x.shape[1]}: weight must be [C, 1, kh, kw] with C = x.shape[1]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != x.shape[1]):
        raise ValueError(f"bias must have shape [C] = [{x.shape[1]}], got {tuple(bias.shape)}")
    _check_same_device_dtype(x, weight=weight, bias=bias)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
    if any(s < 1 for s in stride):
        raise ValueError(f"stride must be >= 1, got {stride}")
    if any(d < 1 for d in dilation):
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if any(p < 0 for p in padding):
        raise ValueError(f"padding must be non-negative, got {padding}")
    kh, kw = weight.shape[2], weight.shape[3]
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel size must be positive, got {kh}x{kw}")
    if min(x.shape) < 1 and x.numel() == 0 and (x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1):
        raise ValueError(f"x must have positive C, H and W, got shape {tuple(x.shape)}")
    ho = output_size(x.shape[2], kh, stride[0], dilation[0], padding[0], padding[1])
    wo = output_size(x.shape[3], kw, stride[1], dilation[1], padding[2], padding[3])
    if ho < 1 or wo < 1:
        raise ValueError(
            f"kernel {kh}x{kw} with dilation {dilation} is larger than the padded input "
            f"{x.shape[2] + padding[0] + padding[1]}x{x.shape[3] + padding[2] + padding[3]}: output would be {ho}x{wo}")


def out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Output layout rule shared by every backend and the fake kernels."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# reference backend (plain PyTorch, used for "reference" and as the auto fallback)
# ----------------------------------------------------------------------------------------------

def _torch_conv(x, weight, bias, stride, padding, dilation):
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups=x.shape[1])
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups=x.shape[1])


# ----------------------------------------------------------------------------------------------
# fake kernels (shapes, dtypes and strides of the real kernels; no data)
# ----------------------------------------------------------------------------------------------

def _fake_forward(x, weight, bias, stride, padding, dilation):
    ho = output_size(x.shape[2], weight.shape[2], stride[0], dilation[0], padding[0], padding[1])
    wo = output_size(x.shape[3], weight.shape[3], stride[1], dilation[1], padding[2], padding[3])
    return x.new_empty((x.shape[0], x.shape[1], ho, wo)).contiguous(memory_format=out_memory_format(x))


def _fake_backward_input(grad_out, x, weight, stride, padding, dilation):
    return torch.empty_like(x, memory_format=out_memory_format(x))


def _fake_backward_weight(grad_out, x, kernel_size, stride, padding, dilation):
    c = x.shape[1]
    return x.new_empty((c, 1, kernel_size[0], kernel_size[1])), x.new_empty((c,))


# ----------------------------------------------------------------------------------------------
# Triton implementations (registered as the *_triton ops for CUDA, and for CPU tensors under
# TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _triton_module():
    from ..triton_kernels import depthwise_conv2d as kernels
    return kernels


def _triton_forward(x, weight, bias, stride, padding, dilation):
    _require_triton_device(x)
    return _triton_module().depthwise_conv2d_forward(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation))


def _triton_backward_input(grad_out, x, weight, stride, padding, dilation):
    _require_triton_device(x)
    grad_out = grad_out.contiguous(memory_format=out_memory_format(x))
    return _triton_module().depthwise_conv2d_backward_input(
        grad_out, weight, tuple(x.shape), tuple(stride), tuple(padding), tuple(dilation))


def _triton_backward_weight(grad_out, x, kernel_size, stride, padding, dilation):
    _require_triton_device(x)
    grad_out = grad_out.contiguous(memory_format=out_memory_format(x))
    return _triton_module().depthwise_conv2d_backward_weight(
        grad_out, x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))


_require_triton_device = require_triton_device


for _name, _fn in (("depthwise_conv2d_triton", _triton_forward),
                   ("depthwise_conv2d_backward_input_triton", _triton_backward_input),
                   ("depthwise_conv2d_backward_weight_triton", _triton_backward_weight)):
    torch.library.register_kernel(f"fusekit::{_name}", ("cpu", "cuda"), _fn, lib=schemas.lib)

for _suffix in ("", "_triton"):
    torch.library.register_fake(f"fusekit::depthwise_conv2d{_suffix}", _fake_forward, lib=schemas.lib)
    torch.library.register_fake(f"fusekit::depthwise_conv2d_backward_input{_suffix}", _fake_backward_input, lib=schemas.lib)
    torch.library.register_fake(f"fusekit::depthwise_conv2d_backward_weight{_suffix}", _fake_backward_weight, lib=schemas.lib)


# ----------------------------------------------------------------------------------------------
# autograd: one formula, parameterized by the backward ops of the same backend
# ----------------------------------------------------------------------------------------------

def _make_autograd(suffix: str):
    backward_input = getattr(_ops, f"depthwise_conv2d_backward_input{suffix}")
    backward_weight = getattr(_ops, f"depthwise_conv2d_backward_weight{suffix}")

    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = backward_input(grad_out, x, weight, stride, padding, dilation)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = backward_weight(grad_out, x, list(weight.shape[2:]), stride, padding, dilation)
            if not ctx.needs_input_grad[1]:
                grad_w = None
            if not (ctx.has_bias and ctx.needs_input_grad[2]):
                grad_b = None
        return grad_x, grad_w, grad_b, None, None, None

    return setup_context, backward


for _suffix in ("", "_triton"):
    _setup, _backward = _make_autograd(_suffix)
    torch.library.register_autograd(f"fusekit::depthwise_conv2d{_suffix}", _backward,
                                    setup_context=_setup, lib=schemas.lib)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DepthwiseCase:
    device_type: str
    dtype: torch.dtype


_KERNEL_REASON = kernel_reasons("depthwise_conv2d")
_cpu_reasons = compiled_reasons("cpu", _KERNEL_REASON["CPU"], CPU_DTYPES, "C++ CPU")
_cuda_reasons = compiled_reasons("cuda", _KERNEL_REASON["CUDA"], GPU_DTYPES, "CUDA")
_triton_reasons = triton_reasons(GPU_DTYPES)
_reference_reasons = no_reasons


def _machine_reason(reasons_fn, device_type: str) -> str | None:
    return machine_reason(reasons_fn, DepthwiseCase(device_type, torch.float32))


_cuda_device_reason = cuda_device_reason


def _make_backends(op: str) -> OpBackends:
    return register_op(OpBackends(
        op=op,
        reasons={"cpu": _cpu_reasons, "cuda": _cuda_reasons, "triton": _triton_reasons,
                 "reference": _reference_reasons},
        availability={
            "cpu": lambda: _machine_reason(_cpu_reasons, "cpu"),
            "cuda": lambda: _cuda_device_reason() or _machine_reason(_cuda_reasons, "cuda"),
            "triton": lambda: (_machine_reason(_triton_reasons, "cuda") if torch.cuda.is_available()
                               else _machine_reason(_triton_reasons, "cpu")),
            "reference": lambda: None,
        }))


DEPTHWISE_BACKENDS = _make_backends("depthwise_conv2d")


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------

_autocast = autocast_inputs


def depthwise_conv2d_explicit(x, weight, bias, stride, padding, dilation, backend: str | None = None):
    """depthwise_conv2d with stride/padding/dilation already normalized (padding as 4 ints)."""
    check_depthwise_args(x, weight, bias, stride, padding, dilation)
    chosen = DEPTHWISE_BACKENDS.select(DepthwiseCase(x.device.type, x.dtype), x.device.type, backend)
    if chosen == "reference":
        return _torch_conv(x, weight, bias, stride, padding, dilation)
    op = _ops.depthwise_conv2d_triton if chosen == "triton" else _ops.depthwise_conv2d
    return op(x, weight, bias, list(stride), list(padding), list(dilation))


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: IntOr2 = 1, padding: Padding = 0, dilation: IntOr2 = 1,
                     backend: str | None = None) -> torch.Tensor:
    """Equal to ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``.

    x: [N, C, H, W] (NCHW or channels_last; the output keeps the layout), weight: [C, 1, kh, kw],
    bias: [C] or None. padding: int, (ph, pw), "same" or "valid" (PyTorch semantics, including the
    asymmetric "same" of even kernels). backend: None/"auto", "cpu", "cuda", "triton", "reference".
    """
    x, weight, bias = _autocast(x, weight, bias)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must have shape [C, 1, kh, kw], got {tuple(getattr(weight, 'shape', ()))}")
    stride2 = _pair(stride, "stride")
    dilation2 = _pair(dilation, "dilation")
    pads = resolve_padding(padding, tuple(weight.shape[2:]), stride2, dilation2)
    return depthwise_conv2d_explicit(x, weight, bias, stride2, pads, dilation2, backend)


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: IntOr2 = 1, padding: Padding = 0, dilation: IntOr2 = 1,
                     backend: str | None = None) -> torch.Tensor:
    """Equal to ``F.conv1d(x, weight, bias, stride, padding, dilation, groups=C)`` on [N, C, L].

    Runs as the 2-D op on [N, C, 1, L]; an input that is a transposed [N, L, C] tensor maps to
    channels_last and needs no copy.
    """
    x, weight, bias = _autocast(x, weight, bias)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor [N, C, L], got shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[1] != 1:
        raise ValueError(f"weight must have shape [C, 1, k] (channel multiplier 1), got {tuple(getattr(weight, 'shape', ()))}")
    (s,) = _pair(stride, "stride", 1)
    (d,) = _pair(dilation, "dilation", 1)
    pads = resolve_padding(padding, (weight.shape[2],), (s,), (d,))
    y = depthwise_conv2d_explicit(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, s), pads, (1, d), backend)
    return y.squeeze(2)


# ----------------------------------------------------------------------------------------------
# InceptionNeXt token mixer
# ----------------------------------------------------------------------------------------------

def _inception_geometry(x, w_hw, w_w, w_h):
    gc = w_hw.shape[0]
    ks = w_hw.shape[2:]
    band = w_w.shape[3]
    return gc, ks, band


def check_inception_args(x, w_hw, b_hw, w_w, b_w, w_h, b_h) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got shape {tuple(getattr(x, 'shape', ()))}")
    gc = w_hw.shape[0]
    if gc < 0 or 3 * gc > x.shape[1]:
        raise ValueError(f"3 * branch channels ({3 * gc}) exceed the {x.shape[1]} channels of x")
    if w_hw.dim() != 4 or w_hw.shape[1] != 1 or w_hw.shape[2] != w_hw.shape[3] or w_hw.shape[2] % 2 == 0:
        raise ValueError(f"w_hw must be [gc, 1, k, k] with odd k, got {tuple(w_hw.shape)}")
    if w_w.dim() != 4 or w_w.shape[:3] != (gc, 1, 1) or w_w.shape[3] % 2 == 0:
        raise ValueError(f"w_w must be [gc, 1, 1, band] with odd band and gc = {gc}, got {tuple(w_w.shape)}")
    if w_h.dim() != 4 or tuple(w_h.shape) != (gc, 1, w_w.shape[3], 1):
        raise ValueError(f"w_h must be [gc, 1, band, 1] = [{gc}, 1, {w_w.shape[3]}, 1], got {tuple(w_h.shape)}")
    for name, b in (("b_hw", b_hw), ("b_w", b_w), ("b_h", b_h)):
        if b is not None and tuple(b.shape) != (gc,):
            raise ValueError(f"{name} must have shape [gc] = [{gc}], got {tuple(b.shape)}")
    _check_same_device_dtype(x, w_hw=w_hw, b_hw=b_hw, w_w=w_w, b_w=b_w, w_h=w_h, b_h=b_h)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")


def inception_dwconv2d_reference_impl(x, w_hw, b_hw, w_w, b_w, w_h, b_h):
    """The four-module PyTorch formulation (split + three convs + cat)."""
    gc = w_hw.shape[0]
    fmt = out_memory_format(x)
    if gc == 0:  # every channel is identity
        return x.clone(memory_format=fmt)
    x_id, x_hw, x_w, x_h = torch.split(x, (x.shape[1] - 3 * gc, gc, gc, gc), dim=1)
    k, band = w_hw.shape[2], w_w.shape[3]
    out = torch.cat((x_id,
                     F.conv2d(x_hw, w_hw, b_hw, padding=k // 2, groups=gc),
                     F.conv2d(x_w, w_w, b_w, padding=(0, band // 2), groups=gc),
                     F.conv2d(x_h, w_h, b_h, padding=(band // 2, 0), groups=gc)), dim=1)
    return out.contiguous(memory_format=fmt)


def _fake_inception(x, w_hw, b_hw, w_w, b_w, w_h, b_h):
    return torch.empty_like(x, memory_format=out_memory_format(x))


def _fake_inception_backward(grad_out, x, w_hw, w_w, w_h, output_mask):
    def grads(w):
        if not output_mask[1]:
            return x.new_empty((0,)), x.new_empty((0,))
        return torch.empty_like(w, memory_format=torch.contiguous_format), x.new_empty((w.shape[0],))
    gx = torch.empty_like(x, memory_format=out_memory_format(x)) if output_mask[0] else x.new_empty((0,))
    return (gx, *grads(w_hw), *grads(w_w), *grads(w_h))


torch.library.register_fake("fusekit::inception_dwconv2d", _fake_inception, lib=schemas.lib)
torch.library.register_fake("fusekit::inception_dwconv2d_backward", _fake_inception_backward, lib=schemas.lib)


def _inception_setup(ctx, inputs, output):
    x, w_hw, b_hw, w_w, b_w, w_h, b_h = inputs
    ctx.save_for_backward(x, w_hw, w_w, w_h)
    ctx.has_bias = (b_hw is not None, b_w is not None, b_h is not None)


def _inception_backward(ctx, grad_out):
    x, w_hw, w_w, w_h = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_x = need[0]
    want_w = any(need[1:])
    gx, gw_hw, gb_hw, gw_w, gb_w, gw_h, gb_h = _ops.inception_dwconv2d_backward(
        grad_out, x, w_hw, w_w, w_h, [want_x, want_w])
    weights = [gw_hw, gb_hw, gw_w, gb_w, gw_h, gb_h]
    has = [True, ctx.has_bias[0], True, ctx.has_bias[1], True, ctx.has_bias[2]]
    out = [gx if want_x else None]
    out += [g if (want_w and need[i + 1] and has[i]) else None for i, g in enumerate(weights)]
    return tuple(out)


torch.library.register_autograd("fusekit::inception_dwconv2d", _inception_backward,
                                setup_context=_inception_setup, lib=schemas.lib)


def _inception_reasons_for(depthwise_reasons):
    def reasons(case: DepthwiseCase) -> list[str]:
        return depthwise_reasons(case)
    return reasons


def _triton_inception_reasons(case: DepthwiseCase) -> list[str]:
    return ["the fused InceptionDWConv2d has no Triton kernel (use 'cuda' or 'cpu')"]


INCEPTION_BACKENDS = register_op(OpBackends(
    op="inception_dwconv2d",
    reasons={"cpu": _cpu_reasons, "cuda": _cuda_reasons, "triton": _triton_inception_reasons,
             "reference": _reference_reasons},
    availability={
        "cpu": DEPTHWISE_BACKENDS.availability["cpu"],
        "cuda": DEPTHWISE_BACKENDS.availability["cuda"],
        "triton": lambda: "the fused InceptionDWConv2d has no Triton kernel",
        "reference": lambda: None,
    }))


def inception_dwconv2d(x: torch.Tensor, w_hw: torch.Tensor, b_hw: torch.Tensor | None,
                       w_w: torch.Tensor, b_w: torch.Tensor | None,
                       w_h: torch.Tensor, b_h: torch.Tensor | None,
                       backend: str | None = None) -> torch.Tensor:
    """InceptionNeXt's InceptionDWConv2d in one launch that reads x once.

    gc = w_hw.shape[0]; channels split (C - 3gc, gc, gc, gc) into identity, a k x k depthwise
    (w_hw), a 1 x band (w_w) and a band x 1 (w_h) depthwise conv, each with "same" padding;
    the result equals torch.cat of the four in that order.
    """
    x, w_hw, b_hw, w_w, b_w, w_h, b_h = _autocast(x, w_hw, b_hw, w_w, b_w, w_h, b_h)
    check_inception_args(x, w_hw, b_hw, w_w, b_w, w_h, b_h)
    chosen = INCEPTION_BACKENDS.select(DepthwiseCase(x.device.type, x.dtype), x.device.type, backend)
    if chosen == "reference":
        return inception_dwconv2d_reference_impl(x, w_hw, b_hw, w_w, b_w, w_h, b_h)
    return _ops.inception_dwconv2d(x, w_hw, b_hw, w_w, b_w, w_h, b_h)
