"""Fused inverted-residual blocks (MobileNetV2, MBConv with squeeze-excitation, Fused-MBConv).

Layers: torch-free kernels (csrc/kernels/{inverted_residual,fused_mbconv}_cpu.h,
csrc/kernels/inverted_residual_cuda.cuh, triton_kernels/inverted_residual.py), launchers that
check and allocate (csrc/cpu, csrc/cuda, the Triton launch functions), and this module, which
validates arguments, folds BatchNorm, picks a backend and differentiates.

Inference runs one kernel per block on BN-folded weights (reads x, writes y; the expanded tensor
stays on chip); with squeeze-excitation a first kernel pools the depthwise output per sample
(inverted_residual_dw_sums), the tiny gate MLP runs in PyTorch, and the second kernel applies it.

Training (BatchNorm in training mode) keeps exact eager semantics while saving only the block
input, the project output (narrow) and per-channel statistics:
  forward: BN1 statistics from x's channel covariance (the expand is linear: mean W mu_x and
  variance w_o^T Sigma_x w_o, no expanded tensor), BN2 statistics from the dw_sums kernel, the SE
  gate from a second dw_sums pass, then the forward kernel on weights folded with those batch
  statistics produces the project output z; BN3 is an ordinary F.batch_norm on z (narrow).
  backward: the expanded path is recomputed with ATen ops in chunks of samples (so a chunk's
  expanded activations are transient, never saved): pass A differentiates the block with the
  batch statistics held as inputs; then, for each batch-normalized stage from last to first, a
  probe pass recomputes that stage's pre-BN tensor and back-propagates the statistics' gradient
  (d mean / M + 2 d var (u - mean) / M) into everything before it. Exact, like eager.
The backward runs on ATen convolutions, not on fused kernels.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import schemas  # noqa: F401  (defines the op schemas before fusekit._C registers kernels)
from ..backends import OpBackends, register_op
from .common import (autocast_inputs, check_same_device_dtype, compiled_reasons, cuda_device_reason, kernel_reasons,
                     machine_reason, no_reasons, require_triton_device, triton_reasons)
from .depthwise import _pair, out_memory_format, output_size, resolve_padding

_ops = torch.ops.fusekit

ACTIVATIONS = ("identity", "relu", "relu6", "silu", "hardswish")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
_SE_GATES = ("sigmoid", "hardsigmoid")

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Samples per recompute chunk in backward: a chunk's expanded tensor holds at most this many elements.
RECOMPUTE_CHUNK_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------------------------
# argument rules
# ----------------------------------------------------------------------------------------------

def activation_code(activation: str) -> int:
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return _ACT_CODE[activation]


def tf_same_padding(in_hw: Sequence[int], kernel_hw: Sequence[int], stride_hw: Sequence[int],
                    dilation_hw: Sequence[int] = (1, 1)) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding (top, bottom, left, right): output ceil(in / s), extra pad at the end."""
    out = []
    for size, k, s, d in zip(in_hw, kernel_hw, stride_hw, dilation_hw):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        out += [total // 2, total - total // 2]
    return tuple(out)  # type: ignore[return-value]


def _resolve_padding(padding, kernel_hw, stride, dilation, in_hw) -> tuple[int, int, int, int]:
    if padding is None:
        return ((kernel_hw[0] - 1) // 2 * dilation[0],) * 2 + ((kernel_hw[1] - 1) // 2 * dilation[1],) * 2
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f"padding must be None (symmetric (k-1)//2*dilation), 'same' (TF SAME), an int, "
                             f"a pair or (top, bottom, left, right), got {padding!r}")
        return tf_same_padding(in_hw, kernel_hw, stride, dilation)
    if isinstance(padding, int) and not isinstance(padding, bool):
        pads = (padding,) * 4
    else:
        pads = tuple(int(p) for p in padding)
        if len(pads) == 2:
            pads = (pads[0], pads[0], pads[1], pads[1])
        elif len(pads) != 4:
            raise ValueError(f"padding must have 2 or 4 values, got {padding!r}")
    if any(p < 0 for p in pads):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pads  # type: ignore[return-value]


def _out_hw(in_hw, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    return (output_size(in_hw[0], kernel_hw[0], stride[0], dilation[0], padding[0], padding[1]),
            output_size(in_hw[1], kernel_hw[1], stride[1], dilation[1], padding[2], padding[3]))


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def _check_vector(name: str, t, size: int) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != size):
        raise ValueError(f"{name} must have shape [{size}], got {_shape(t)}")


def _check_conv_geometry(x, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    if any(s < 1 for s in stride):
        raise ValueError(f"stride must be >= 1, got {stride}")
    if any(d < 1 for d in dilation):
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    ho, wo = _out_hw(x.shape[2:], kernel_hw, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel {kernel_hw[0]}x{kernel_hw[1]} with dilation {tuple(dilation)} is larger than the padded "
                         f"input {x.shape[2] + padding[0] + padding[1]}x{x.shape[3] + padding[2] + padding[3]}: "
                         f"output would be {ho}x{wo}")
    return ho, wo


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got shape {_shape(x)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have positive C, H and W, got shape {_shape(x)}")


def _check_residual(residual: bool, x, cout: int, out_hw) -> None:
    if residual and (cout != x.shape[1] or tuple(out_hw) != tuple(x.shape[2:])):
        raise ValueError(f"residual=True needs the output shape to equal the input's: x has {x.shape[1]} channels at "
                         f"{tuple(x.shape[2:])}, the block gives {cout} channels at {tuple(out_hw)} (residual needs "
                         "stride 1 and in_channels == out_channels)")


def check_inverted_residual_args(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate, stride, padding,
                                 dilation, residual) -> tuple[int, int]:
    _check_x(x)
    cin = x.shape[1]
    if not isinstance(w_dw, torch.Tensor) or w_dw.dim() != 3:
        raise ValueError(f"w_dw must be a 3-D tensor [E, kh, kw], got shape {_shape(w_dw)}")
    e = w_dw.shape[0]
    if w_expand is None:
        if b_expand is not None:
            raise ValueError("b_expand given without w_expand")
        if e != cin:
            raise ValueError(f"without an expand stage (w_expand None) w_dw must have x's {cin} channels, got {e}")
    elif w_expand.dim() != 2 or w_expand.shape != (e, cin):
        raise ValueError(f"w_expand must have shape [E, Cin] = [{e}, {cin}] (E = w_dw.shape[0]), got {_shape(w_expand)}")
    _check_vector("b_expand", b_expand, e)
    _check_vector("b_dw", b_dw, e)
    if not isinstance(w_project, torch.Tensor) or w_project.dim() != 2 or w_project.shape[1] != e:
        raise ValueError(f"w_project must have shape [Cout, E] with E = {e}, got {_shape(w_project)}")
    _check_vector("b_project", b_project, w_project.shape[0])
    if gate is not None and gate.shape != (x.shape[0], e):
        raise ValueError(f"gate must have shape [N, E] = [{x.shape[0]}, {e}], got {_shape(gate)}")
    check_same_device_dtype("x", x, w_expand=w_expand, b_expand=b_expand, w_dw=w_dw, b_dw=b_dw, w_project=w_project,
                            b_project=b_project, gate=gate)
    out_hw = _check_conv_geometry(x, w_dw.shape[1:], stride, padding, dilation)
    _check_residual(residual, x, w_project.shape[0], out_hw)
    return out_hw


def check_fused_mbconv_args(x, w_expand, b_expand, w_project, b_project, stride, padding, dilation,
                            residual) -> tuple[int, int]:
    _check_x(x)
    if not isinstance(w_expand, torch.Tensor) or w_expand.dim() != 4 or w_expand.shape[1] != x.shape[1]:
        raise ValueError(f"w_expand must have shape [E, Cin, kh, kw] with Cin = {x.shape[1]}, got {_shape(w_expand)}")
    e = w_expand.shape[0]
    _check_vector("b_expand", b_expand, e)
    if w_project is None:
        if b_project is not None:
            raise ValueError("b_project given without w_project")
        cout = e
    else:
        if w_project.dim() != 2 or w_project.shape[1] != e:
            raise ValueError(f"w_project must have shape [Cout, E] with E = {e}, got {_shape(w_project)}")
        cout = w_project.shape[0]
        _check_vector("b_project", b_project, cout)
    check_same_device_dtype("x", x, w_expand=w_expand, b_expand=b_expand, w_project=w_project, b_project=b_project)
    out_hw = _check_conv_geometry(x, w_expand.shape[2:], stride, padding, dilation)
    _check_residual(residual, x, cout, out_hw)
    return out_hw


def _sums_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# the block in ATen ops (reference backend, and the recompute in backward)
# ----------------------------------------------------------------------------------------------

def apply_activation(u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "identity":
        return u
    if activation == "relu":
        return F.relu(u)
    if activation == "relu6":
        return F.hardtanh(u, 0.0, 6.0)
    if activation == "silu":
        return F.silu(u)
    if activation == "hardswish":
        return F.hardswish(u)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _conv(x, w, b, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # float32 on CPU: torch 2.13's bf16 CPU conv2d returns wrong values for dilated kernels on width-1 inputs
        return _conv(x.float(), w.float(), None if b is None else b.float(), stride, padding, dilation,
                     groups).to(x.dtype)
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return F.conv2d(x, w, b, stride, (top, left), dilation, groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, dilation, groups)


def _pointwise(x, w, b):
    return F.conv2d(x, w[:, :, None, None], b)


def _torch_dw(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation):
    a1 = x if w_expand is None else apply_activation(_pointwise(x, w_expand, b_expand), activation)
    return _conv(a1, w_dw.unsqueeze(1), b_dw, stride, padding, dilation, groups=w_dw.shape[0])


def _torch_inverted_residual(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate, stride, padding,
                             dilation, activation, residual):
    a2 = apply_activation(_torch_dw(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation),
                          activation)
    if gate is not None:
        a2 = a2 * gate[:, :, None, None]
    y = _pointwise(a2, w_project, b_project)
    return (y + x if residual else y).contiguous(memory_format=out_memory_format(x))


def _torch_dw_sums(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation):
    d = _torch_dw(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation).to(_sums_dtype(x))
    return torch.stack([d.sum((2, 3)), (d * d).sum((2, 3)), apply_activation(d, activation).sum((2, 3))], 1)


def _torch_fused_mbconv(x, w_expand, b_expand, w_project, b_project, stride, padding, dilation, activation, residual):
    y = apply_activation(_conv(x, w_expand, b_expand, stride, padding, dilation), activation)
    if w_project is not None:
        y = _pointwise(y, w_project, b_project)
    return (y + x if residual else y).contiguous(memory_format=out_memory_format(x))


# ----------------------------------------------------------------------------------------------
# fake kernels and Triton registrations
# ----------------------------------------------------------------------------------------------

def _fake_forward(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate, stride, padding, dilation,
                  activation, residual):
    ho, wo = _out_hw(x.shape[2:], w_dw.shape[1:], stride, padding, dilation)
    return x.new_empty((x.shape[0], w_project.shape[0], ho, wo)).contiguous(memory_format=out_memory_format(x))


def _fake_dw_sums(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation):
    return x.new_empty((x.shape[0], 3, w_dw.shape[0]), dtype=_sums_dtype(x))


def _fake_fused_mbconv(x, w_expand, b_expand, w_project, b_project, stride, padding, dilation, activation, residual):
    ho, wo = _out_hw(x.shape[2:], w_expand.shape[2:], stride, padding, dilation)
    cout = w_expand.shape[0] if w_project is None else w_project.shape[0]
    return x.new_empty((x.shape[0], cout, ho, wo)).contiguous(memory_format=out_memory_format(x))


_OPS = {"inverted_residual_forward": _fake_forward, "inverted_residual_dw_sums": _fake_dw_sums,
        "fused_mbconv_forward": _fake_fused_mbconv}


def _triton_impl(name: str):
    def impl(*args):
        require_triton_device(args[0])
        from ..triton_kernels import inverted_residual as kernels
        return getattr(kernels, name)(*args)
    impl.__name__ = f"{name}_triton"
    return impl


for _name, _fake in _OPS.items():
    torch.library.register_kernel(f"fusekit::{_name}_triton", ("cpu", "cuda"), _triton_impl(_name), lib=schemas.lib)
    for _suffix in ("", "_triton"):
        torch.library.register_fake(f"fusekit::{_name}{_suffix}", _fake, lib=schemas.lib)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockCase:
    device_type: str
    dtype: torch.dtype


_triton = triton_reasons(GPU_DTYPES)


def _make_backends(op: str, kernel_op: str) -> OpBackends:
    kernels = kernel_reasons(kernel_op)
    cpu = compiled_reasons("cpu", kernels["CPU"], CPU_DTYPES, "C++ CPU")
    cuda = compiled_reasons("cuda", kernels["CUDA"], GPU_DTYPES, "CUDA")
    return register_op(OpBackends(
        op=op,
        reasons={"cpu": cpu, "cuda": cuda, "triton": _triton, "reference": no_reasons},
        availability={
            "cpu": lambda: machine_reason(cpu, BlockCase("cpu", torch.float32)),
            "cuda": lambda: cuda_device_reason() or machine_reason(cuda, BlockCase("cuda", torch.float32)),
            "triton": lambda: machine_reason(
                _triton, BlockCase("cuda" if torch.cuda.is_available() else "cpu", torch.float32)),
            "reference": lambda: None,
        }))


IR_BACKENDS = _make_backends("inverted_residual", "inverted_residual_forward")
FMB_BACKENDS = _make_backends("fused_mbconv", "fused_mbconv_forward")


def _select(backends: OpBackends, x: torch.Tensor, backend: str | None) -> str:
    return backends.select(BlockCase(x.device.type, x.dtype), x.device.type, backend)


def _ir_forward(chosen, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate, stride, padding, dilation,
                activation, residual):
    if chosen == "reference":
        return _torch_inverted_residual(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate, stride,
                                        padding, dilation, activation, residual)
    op = _ops.inverted_residual_forward_triton if chosen == "triton" else _ops.inverted_residual_forward
    return op(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate, list(stride), list(padding),
              list(dilation), _ACT_CODE[activation], residual)


def _ir_dw_sums(chosen, x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation):
    if chosen == "reference":
        return _torch_dw_sums(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation)
    op = _ops.inverted_residual_dw_sums_triton if chosen == "triton" else _ops.inverted_residual_dw_sums
    return op(x, w_expand, b_expand, w_dw, b_dw, list(stride), list(padding), list(dilation), _ACT_CODE[activation])


def _fmb_forward(chosen, x, w_expand, b_expand, w_project, b_project, stride, padding, dilation, activation,
                 residual):
    if chosen == "reference":
        return _torch_fused_mbconv(x, w_expand, b_expand, w_project, b_project, stride, padding, dilation,
                                   activation, residual)
    op = _ops.fused_mbconv_forward_triton if chosen == "triton" else _ops.fused_mbconv_forward
    return op(x, w_expand, b_expand, w_project, b_project, list(stride), list(padding), list(dilation),
              _ACT_CODE[activation], residual)


# ----------------------------------------------------------------------------------------------
# autograd: fused forward, chunked recompute backward (see the module docstring)
# ----------------------------------------------------------------------------------------------

# Tensor inputs of the block ops, in order. Stage 1 = expand (1x1, or the k x k conv of Fused-MBConv)
# + BN1 + act; stage 2 = depthwise + BN2 + act (inverted residual only); then SE or an external gate,
# then the project conv (without its BN: that one runs outside, on the narrow output).
_TENSORS = ("x", "w1", "b1", "gamma1", "beta1", "mean1", "var1", "wd", "bd", "gamma2", "beta2", "mean2", "var2",
            "w3", "b3", "se_w1", "se_b1", "se_w2", "se_b2", "gate")
_INDEX = {name: i for i, name in enumerate(_TENSORS)}
_STAGE_TENSORS = {1: ("w1", "b1", "gamma1", "beta1"), 2: ("wd", "bd", "gamma2", "beta2")}


@dataclass(frozen=True)
class _Spec:
    kind: str                      # "ir" (expand 1x1, depthwise, project) or "fmb" (k x k conv, project)
    activation: str
    stride: tuple
    padding: tuple
    dilation: tuple
    bn_mode: tuple                 # per stage 1, 2: "batch" (statistics of this batch), "fixed" (given), "none"
    eps: tuple
    se: tuple | None               # (inner activation, gate) of squeeze-excitation
    chunk: int                     # samples per recompute chunk
    backend: str


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _bn_affine(mean, var, gamma, beta, eps):
    """(scale, shift) with BN(u) = u * scale + shift, in the statistics' precision."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma.to(scale.dtype)
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(scale.dtype)
    return scale, shift


def _fold(w, b, stats, gamma, beta, eps, dtype):
    """Conv weight [O, ...] and bias folded with BN (stats = (mean, var)) into x's dtype."""
    if stats is None:
        return w, b
    scale, shift = _bn_affine(stats[0], stats[1], gamma, beta, eps)
    wf = w.to(scale.dtype) * scale.view(-1, *([1] * (w.dim() - 1)))
    bf = shift if b is None else shift + b.to(scale.dtype) * scale
    return wf.to(dtype), bf.to(dtype)


def _bn_apply(u, stats, gamma, beta, eps):
    scale, shift = _bn_affine(stats[0], stats[1], gamma, beta, eps)
    return (u.to(scale.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(u.dtype)


def _se_gate(pooled, t, se):
    """Squeeze-excitation MLP on pooled [N, E] -> gate [N, E]."""
    h = F.linear(pooled, t["se_w1"].flatten(1), t["se_b1"])
    h = apply_activation(h, se[0])
    g = F.linear(h, t["se_w2"].flatten(1), t["se_b2"])
    return torch.sigmoid(g) if se[1] == "sigmoid" else F.hardsigmoid(g)


def _stage1_conv(spec, x, t):
    if spec.kind == "ir":
        return _pointwise(x, t["w1"].flatten(1), t["b1"])
    return _conv(x, t["w1"], t["b1"], spec.stride, spec.padding, spec.dilation)


def _recompute(spec, x, t, stats, stop: str, keep: dict | None = None):
    """The block in ATen ops up to `stop`: "u1" (pre-BN1), "d" (pre-BN2) or "z" (project output).

    stats[k] = (mean, var) of a normalized stage k. keep (when given) receives u1 and d."""
    a = x
    if t["w1"] is not None:
        u1 = _stage1_conv(spec, x, t)
        if stop == "u1":
            return u1
        if keep is not None:
            keep[1] = u1
        if stats.get(1) is not None:
            u1 = _bn_apply(u1, stats[1], t["gamma1"], t["beta1"], spec.eps[0])
        a = apply_activation(u1, spec.activation)
    if spec.kind == "ir":
        d = _conv(a, t["wd"].unsqueeze(1), t["bd"], spec.stride, spec.padding, spec.dilation, groups=t["wd"].shape[0])
        if stop == "d":
            return d
        if keep is not None:
            keep[2] = d
        if stats.get(2) is not None:
            d = _bn_apply(d, stats[2], t["gamma2"], t["beta2"], spec.eps[1])
        a = apply_activation(d, spec.activation)
        if spec.se is not None:
            a = a * _se_gate(a.mean((2, 3)), t, spec.se)[:, :, None, None]
        elif t["gate"] is not None:
            a = a * t["gate"][:, :, None, None]
    return a if t["w3"] is None else _pointwise(a, t["w3"].flatten(1), t["b3"])


def _var_mean_of_chunks(spec, x, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance per channel of stage 1's conv output, one chunk at a time."""
    count, mean, m2 = 0, None, None
    for xc in x.split(spec.chunk):
        u = _stage1_conv(spec, xc, t).to(_acc(x))
        n = u.shape[0] * u.shape[2] * u.shape[3]
        var_c, mean_c = torch.var_mean(u, dim=(0, 2, 3), correction=0)
        if mean is None:
            count, mean, m2 = n, mean_c.double(), var_c.double() * n
            continue
        delta = mean_c.double() - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + var_c.double() * n + delta * delta * (count * n / total)
        count = total
    return mean.to(_acc(x)), (m2 / count).to(_acc(x))


def _expand_stats_from_covariance(x, w1, b1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of x W1^T + b1 from x's channel mean and covariance."""
    acc = _acc(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(acc)
    mean_x = rows.mean(0)
    centered = rows - mean_x
    cov = centered.t() @ centered / rows.shape[0]
    w = w1.flatten(1).to(acc)
    mean = w @ mean_x + (0 if b1 is None else b1.to(acc))
    var = ((w @ cov) * w).sum(1).clamp_min(0)
    return mean, var


def _sums_to_stats(sums: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    total = sums[:, :2].double().sum(0)
    mean = total[0] / count
    var = (total[1] / count - mean * mean).clamp_min(0)
    return mean.to(sums.dtype), var.to(sums.dtype)


def _fused_forward(spec, t):
    """Forward with the fused kernels: returns z and the batch statistics {stage: (mean, var)}."""
    x = t["x"]
    dtype = x.dtype
    stats: dict = {}
    if t["w1"] is not None and spec.bn_mode[0] != "none":
        if spec.bn_mode[0] == "batch":
            stats[1] = (_expand_stats_from_covariance(x, t["w1"], t["b1"]) if spec.kind == "ir"
                        else _var_mean_of_chunks(spec, x, t))
        else:
            stats[1] = (t["mean1"].to(_acc(x)), t["var1"].to(_acc(x)))
    w1f, b1f = (None, None) if t["w1"] is None else _fold(t["w1"], t["b1"], stats.get(1), t["gamma1"], t["beta1"],
                                                         spec.eps[0], dtype)
    if spec.kind == "fmb":
        z = _fmb_forward(spec.backend, x, w1f, b1f, t["w3"] if t["w3"] is None else t["w3"].flatten(1), t["b3"],
                         spec.stride, spec.padding, spec.dilation, spec.activation, False)
        return z, stats
    w1f = None if w1f is None else w1f.flatten(1)
    if spec.bn_mode[1] == "batch":
        sums = _ir_dw_sums(spec.backend, x, w1f, b1f, t["wd"], t["bd"], spec.stride, spec.padding, spec.dilation,
                           spec.activation)
        ho, wo = _out_hw(x.shape[2:], t["wd"].shape[1:], spec.stride, spec.padding, spec.dilation)
        stats[2] = _sums_to_stats(sums, x.shape[0] * ho * wo)
    elif spec.bn_mode[1] == "fixed":
        stats[2] = (t["mean2"].to(_acc(x)), t["var2"].to(_acc(x)))
    wdf, bdf = _fold(t["wd"], t["bd"], stats.get(2), t["gamma2"], t["beta2"], spec.eps[1], dtype)
    gate = t["gate"]
    if spec.se is not None:
        sums = _ir_dw_sums(spec.backend, x, w1f, b1f, wdf, bdf, spec.stride, spec.padding, spec.dilation,
                           spec.activation)
        ho, wo = _out_hw(x.shape[2:], t["wd"].shape[1:], spec.stride, spec.padding, spec.dilation)
        gate = _se_gate((sums[:, 2] / (ho * wo)).to(dtype), t, spec.se)
    z = _ir_forward(spec.backend, x, w1f, b1f, wdf, bdf, t["w3"].flatten(1), t["b3"], gate, spec.stride, spec.padding,
                    spec.dilation, spec.activation, False)
    return z, stats


def _stat_stages(spec: _Spec, tensors) -> tuple:
    """Stages normalized with this batch's statistics (their statistics are differentiable)."""
    present = {1: tensors[_INDEX["w1"]] is not None, 2: spec.kind == "ir"}
    return tuple(k for k in (1, 2) if spec.bn_mode[k - 1] == "batch" and present[k])


def _block_forward(spec: _Spec, tensors) -> list:
    """[z, mean1, var1, mean2, var2]: the project output and the batch statistics (empty when unused)."""
    t = dict(zip(_TENSORS, tensors))
    with torch.no_grad():
        z, stats = _fused_forward(spec, t)
    empty = z.new_empty(0, dtype=_acc(z))
    stages = _stat_stages(spec, tensors)
    return [z] + [stats[k][i] if k in stages else empty for k in (1, 2) for i in (0, 1)]


def _block_backward(spec: _Spec, tensors, stat_values, grad_z, need) -> list:
    """Gradients of every tensor input (None where not needed) by chunked recomputation."""
    stat_stages = _stat_stages(spec, tensors)
    stat_values = [stat_values[2 * (k - 1) + i] for k in stat_stages for i in (0, 1)]
    leaves = {name: (t.detach().requires_grad_(True) if t is not None and need[i] else t)
              for i, (name, t) in enumerate(zip(_TENSORS, tensors))}
    stats = {}
    for j, k in enumerate(stat_stages):
        mean = stat_values[2 * j].detach().requires_grad_(True)
        var = stat_values[2 * j + 1].detach().requires_grad_(True)
        stats[k] = (mean, var)
    for k in (1, 2):
        if k not in stats and spec.bn_mode[k - 1] == "fixed":
            stats[k] = (tensors[_INDEX[f"mean{k}"]].to(_acc(grad_z)), tensors[_INDEX[f"var{k}"]].to(_acc(grad_z)))
    x = leaves["x"].detach()
    params = [name for name in _TENSORS[1:] if leaves[name] is not None and leaves[name].requires_grad]
    grads = {name: None for name in _TENSORS}
    stat_grads = {k: [None, None] for k in stat_stages}
    grad_x = torch.zeros_like(x) if need[0] else None

    def add(name, g):
        if g is not None:
            grads[name] = g if grads[name] is None else grads[name] + g

    def differentiate(out, grad_out, start, stages, xc):
        """Back-propagates grad_out from `out` into x's chunk, the parameters and the statistics of `stages`."""
        wrt = ([xc] if need[0] else []) + [leaves[p] for p in params]
        wrt += [s for k in stages for s in stats[k]]
        got = torch.autograd.grad(out, wrt, grad_out, allow_unused=True, retain_graph=keep is not None)
        got = list(got)
        if need[0]:
            g = got.pop(0)
            if g is not None:
                grad_x[start:start + xc.shape[0]] += g
        for p in params:
            add(p, got.pop(0))
        for k in stages:
            for i in (0, 1):
                g = got.pop(0)
                if g is not None:
                    stat_grads[k][i] = g if stat_grads[k][i] is None else stat_grads[k][i] + g

    chunks = list(zip(range(0, x.shape[0], spec.chunk), x.split(spec.chunk)))
    keep = {} if len(chunks) == 1 and stat_stages else None
    t = dict(leaves)
    for start, xc in chunks:   # pass A: the block with the statistics held fixed
        xc = xc.detach().requires_grad_(need[0])
        with torch.enable_grad():
            z = _recompute(spec, xc, dict(t, x=xc), stats, "z", keep)
        differentiate(z, grad_z[start:start + xc.shape[0]], start, stat_stages, xc)
        if keep is not None:
            keep["x"] = xc
    for k in sorted(stat_stages, reverse=True):  # statistics, last stage first
        mean, var = stats[k]
        g_mean, g_var = (torch.zeros_like(mean) if g is None else g for g in stat_grads[k])
        count = None
        for start, xc in chunks:
            if keep is not None:
                u, xc = keep[k], keep["x"]
            else:
                xc = xc.detach().requires_grad_(need[0])
                with torch.enable_grad():
                    u = _recompute(spec, xc, dict(t, x=xc), stats, "u1" if k == 1 else "d")
            if count is None:
                count = x.shape[0] * u.shape[2] * u.shape[3]
            with torch.enable_grad():
                ua = u.to(mean.dtype)
                centered = ua - mean.detach().view(1, -1, 1, 1)
                probe = (ua * (g_mean / count).view(1, -1, 1, 1)).sum() + \
                    (centered * centered * (g_var / count).view(1, -1, 1, 1)).sum()
            differentiate(probe, None, start, tuple(s for s in stat_stages if s < k), xc)
    return [grad_x, *[grads[name] for name in _TENSORS[1:]]]


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------

def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _chunk(x: torch.Tensor, expanded: int) -> int:
    per_sample = max(1, expanded * x.shape[2] * x.shape[3])
    return max(1, RECOMPUTE_CHUNK_ELEMENTS // per_sample)


def _run_block(spec: _Spec, mobiletl: bool = False, **given) -> tuple:
    """(z, mean1, var1, mean2, var2): the project output and the batch statistics of stages 1 and 2."""
    tensors = [given.get(name) for name in _TENSORS]
    # which inputs need gradients, decided here: the custom ops' autograd sees a list argument as one input
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors]
    if mobiletl:
        z = torch.ops.fusekit.inverted_residual_block_mobiletl(*_pack(tensors), _spec_text(spec), need)[0]
        return (z, None, None, None, None)
    return tuple(torch.ops.fusekit.inverted_residual_block_train(*_pack(tensors), _spec_text(spec), need))


def inverted_residual(x: torch.Tensor, w_expand: torch.Tensor | None, b_expand: torch.Tensor | None,
                      w_dw: torch.Tensor, b_dw: torch.Tensor | None, w_project: torch.Tensor,
                      b_project: torch.Tensor | None, *, gate: torch.Tensor | None = None, stride=1, padding=None,
                      dilation=1, activation: str = "relu6", residual: bool = False,
                      backend: str | None = None) -> torch.Tensor:
    """Inverted residual block on BN-folded weights, one fused kernel (the expanded tensor never
    reaches memory):  a1 = act(x W_e^T + b_e) (a1 = x when w_expand is None), d = dw(a1) + b_dw,
    a2 = act(d) * gate, y = a2 W_p^T + b_p (+ x when residual).

    w_expand [E, Cin], w_dw [E, kh, kw], w_project [Cout, E], gate [N, E] (squeeze-excitation).
    padding: None (symmetric (k-1)//2 * dilation), "same" (TensorFlow SAME), an int, a pair or
    (top, bottom, left, right). Differentiable (backward recomputes the block with ATen ops).
    """
    x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate = autocast_inputs(
        x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate)
    code = activation_code(activation)  # noqa: F841  (validates the name)
    _check_x(x)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if not isinstance(w_dw, torch.Tensor) or w_dw.dim() != 3:
        raise ValueError(f"w_dw must be a 3-D tensor [E, kh, kw], got shape {_shape(w_dw)}")
    pads = _resolve_padding(padding, tuple(w_dw.shape[1:]), stride, dilation, tuple(x.shape[2:]))
    check_inverted_residual_args(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate, stride, pads, dilation,
                                 residual)
    chosen = _select(IR_BACKENDS, x, backend)
    if not _needs_grad(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate):
        return _ir_forward(chosen, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate, stride, pads,
                           dilation, activation, residual)
    spec = _Spec("ir", activation, stride, pads, dilation, ("none", "none"), (0.0, 0.0), None,
                 _chunk(x, w_dw.shape[0]), chosen)
    z = _run_block(spec, x=x, w1=w_expand, b1=b_expand, wd=w_dw, bd=b_dw, w3=w_project, b3=b_project, gate=gate)[0]
    return z + x if residual else z


def fused_mbconv(x: torch.Tensor, w_expand: torch.Tensor, b_expand: torch.Tensor | None,
                 w_project: torch.Tensor | None = None, b_project: torch.Tensor | None = None, *, stride=1,
                 padding=None, dilation=1, activation: str = "silu", residual: bool = False,
                 backend: str | None = None) -> torch.Tensor:
    """Fused-MBConv on BN-folded weights, one fused kernel: a1 = act(conv_kxk(x, w_expand) + b_e),
    y = a1 W_p^T + b_p (y = a1 when w_project is None) (+ x when residual).

    w_expand [E, Cin, kh, kw], w_project [Cout, E]; padding as in inverted_residual. Differentiable.
    """
    x, w_expand, b_expand, w_project, b_project = autocast_inputs(x, w_expand, b_expand, w_project, b_project)
    activation_code(activation)
    _check_x(x)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if not isinstance(w_expand, torch.Tensor) or w_expand.dim() != 4:
        raise ValueError(f"w_expand must be a 4-D tensor [E, Cin, kh, kw], got shape {_shape(w_expand)}")
    pads = _resolve_padding(padding, tuple(w_expand.shape[2:]), stride, dilation, tuple(x.shape[2:]))
    check_fused_mbconv_args(x, w_expand, b_expand, w_project, b_project, stride, pads, dilation, residual)
    chosen = _select(FMB_BACKENDS, x, backend)
    if not _needs_grad(x, w_expand, b_expand, w_project, b_project):
        return _fmb_forward(chosen, x, w_expand, b_expand, w_project, b_project, stride, pads, dilation, activation,
                            residual)
    spec = _Spec("fmb", activation, stride, pads, dilation, ("none", "none"), (0.0, 0.0), None,
                 _chunk(x, w_expand.shape[0]), chosen)
    z = _run_block(spec, x=x, w1=w_expand, b1=b_expand, w3=w_project, b3=b_project)[0]
    return z + x if residual else z


# ----------------------------------------------------------------------------------------------
# whole blocks from their eager submodules (what fusekit.nn's modules call)
# ----------------------------------------------------------------------------------------------

class SqueezeExcite(NamedTuple):
    """The squeeze-excitation of an MBConv block: gate = gate_fn(expand(act(reduce(mean_hw(a2)))))."""
    reduce: torch.nn.Conv2d
    expand: torch.nn.Conv2d
    activation: str = "silu"
    gate: str = "sigmoid"


def _bn_batch(bn) -> bool:
    """Whether a BatchNorm normalizes with this batch's statistics (what nn.BatchNorm2d decides)."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _bn_momentum(bn) -> float:
    """nn.BatchNorm2d's bookkeeping for one training step: counts the batch, returns the averaging factor."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def _update_running(bn, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """The running-statistic update of nn.BatchNorm2d in training (unbiased variance)."""
    factor = _bn_momentum(bn)
    if bn.running_mean is None or not bn.track_running_stats:
        return
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _check_bn(bn, channels: int, name: str) -> None:
    if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"{name} must be a BatchNorm2d module, got {type(bn).__name__}")
    if bn.num_features != channels:
        raise ValueError(f"{name} has {bn.num_features} features but its conv gives {channels} channels")


def _check_conv(conv, name: str, groups: int = 1) -> None:
    if not isinstance(conv, torch.nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != groups:
        raise ValueError(f"{name} must have groups={groups}, got groups={conv.groups}")


def _conv_geometry(conv, x_hw, tf_same: bool):
    stride, dilation = tuple(conv.stride), tuple(conv.dilation)
    kernel = tuple(conv.kernel_size)
    if tf_same:
        return stride, tf_same_padding(x_hw, kernel, stride, dilation), dilation
    if isinstance(conv.padding, str):  # nn.Conv2d's "same" (stride 1) and "valid"
        pads = resolve_padding(conv.padding, kernel, stride, dilation)
        return stride, pads, dilation
    ph, pw = conv.padding
    return stride, (ph, ph, pw, pw), dilation


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _finish_block(z, x, bn_project, residual):
    """The project BN (an ordinary batch norm on the narrow output) and the residual."""
    if bn_project is not None:
        batch = _bn_batch(bn_project)
        factor = _bn_momentum(bn_project) if batch else 0.0
        z = F.batch_norm(z, bn_project.running_mean if not batch or bn_project.track_running_stats else None,
                         bn_project.running_var if not batch or bn_project.track_running_stats else None,
                         bn_project.weight, bn_project.bias, batch, factor, bn_project.eps)
    return z + x if residual else z


def _stage_inputs(prefix: str, conv, bn, mode: str, dtype, frozen: bool) -> dict:
    weight = _cast(conv.weight, dtype)
    given = {f"w{prefix}" if prefix != "d" else "wd": weight.flatten(0, 1) if prefix == "d" else weight,
             f"b{prefix}" if prefix != "d" else "bd": _cast(conv.bias, dtype)}
    k = "1" if prefix == "1" else "2"
    if mode != "none":
        gamma = bn.weight.detach() if (frozen and bn.weight is not None) else bn.weight
        given.update({f"gamma{k}": gamma, f"beta{k}": bn.bias})
    if mode == "fixed":
        given.update({f"mean{k}": bn.running_mean, f"var{k}": bn.running_var})
    return given


def _modes(bns, mode: str) -> tuple:
    if mode not in ("recompute", "mobiletl"):
        raise ValueError(f"mode must be 'recompute' or 'mobiletl', got {mode!r}")
    out = []
    for bn in bns:
        if bn is None:
            out.append("none")
        elif mode == "mobiletl":
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError("mode='mobiletl' freezes the internal BatchNorms at their running statistics, but a "
                                 "BatchNorm has track_running_stats=False")
            out.append("fixed")   # MobileTL: internal BNs frozen (running statistics)
        else:
            out.append("batch" if _bn_batch(bn) else "fixed")
    return tuple(out)


def inverted_residual_block(x: torch.Tensor, conv_expand, bn_expand, conv_dw, bn_dw, conv_project, bn_project, *,
                            activation: str, se: SqueezeExcite | None = None, residual: bool,
                            tf_same: bool = False, mode: str = "recompute",
                            backend: str | None = None) -> torch.Tensor:
    """MobileNetV2 / MBConv block from its eager submodules, with eager semantics in eval and training.

    Eval: BN folded, one fused kernel (two with squeeze-excitation). Training: batch statistics and
    running-statistic updates as nn.BatchNorm2d; saved for backward are x, the project output and
    per-channel statistics; backward recomputes the expanded activations. mode="mobiletl" freezes
    the two internal BNs (running statistics, weight without gradient, bias trainable).
    """
    activation_code(activation)
    _check_x(x)
    cin = x.shape[1]
    if conv_expand is not None:
        _check_conv(conv_expand, "conv_expand")
        if tuple(conv_expand.kernel_size) != (1, 1) or tuple(conv_expand.stride) != (1, 1):
            raise ValueError(f"conv_expand must be a 1x1 stride-1 conv, got kernel {conv_expand.kernel_size} stride "
                             f"{conv_expand.stride}")
        if conv_expand.in_channels != cin:
            raise ValueError(f"conv_expand takes {conv_expand.in_channels} channels but x has {cin}")
    hidden = conv_expand.out_channels if conv_expand is not None else cin
    _check_conv(conv_dw, "conv_dw", groups=hidden)
    if conv_dw.in_channels != hidden or conv_dw.out_channels != hidden:
        raise ValueError(f"conv_dw must be depthwise over the {hidden} expanded channels, got "
                         f"{conv_dw.in_channels} -> {conv_dw.out_channels}")
    _check_conv(conv_project, "conv_project")
    if tuple(conv_project.kernel_size) != (1, 1) or conv_project.in_channels != hidden:
        raise ValueError(f"conv_project must be a 1x1 conv from the {hidden} expanded channels")
    for bn, conv, name in ((bn_expand, conv_expand, "bn_expand"), (bn_dw, conv_dw, "bn_dw"),
                           (bn_project, conv_project, "bn_project")):
        if conv is not None and bn is not None:
            _check_bn(bn, conv.out_channels, name)
    if se is not None:
        if se.gate not in _SE_GATES:
            raise ValueError(f"se.gate must be one of {_SE_GATES}, got {se.gate!r}")
        activation_code(se.activation)
        if se.reduce.in_channels != hidden or se.expand.out_channels != hidden:
            raise ValueError(f"squeeze-excitation must map the {hidden} expanded channels to themselves")
    stride, pads, dilation = _conv_geometry(conv_dw, tuple(x.shape[2:]), tf_same)
    ho_wo = _check_conv_geometry(x, tuple(conv_dw.kernel_size), stride, pads, dilation)
    _check_residual(residual, x, conv_project.out_channels, ho_wo)
    (x,) = autocast_inputs(x)
    dtype = x.dtype
    chosen = _select(IR_BACKENDS, x, backend)
    modes = _modes((bn_expand if conv_expand is not None else None, bn_dw), mode)
    modes = ("none" if conv_expand is None else modes[0], modes[1])
    se_spec = None if se is None else (se.activation, se.gate)
    params = [p for m in (conv_expand, bn_expand, conv_dw, bn_dw, conv_project, bn_project,
                          *(() if se is None else (se.reduce, se.expand))) if m is not None for p in m.parameters()]
    if "batch" not in modes and not (bn_project is not None and _bn_batch(bn_project)) and not _needs_grad(x, *params):
        return _folded_inference(x, conv_expand, bn_expand, conv_dw, bn_dw, conv_project, bn_project, se, stride,
                                 pads, dilation, activation, residual, chosen)
    spec = _Spec("ir", activation, stride, pads, dilation, modes,
                 (getattr(bn_expand, "eps", 0.0), getattr(bn_dw, "eps", 0.0)), se_spec, _chunk(x, hidden), chosen)
    given = {"x": x, "w3": _cast(conv_project.weight, dtype), "b3": _cast(conv_project.bias, dtype)}
    if conv_expand is not None:
        given.update(_stage_inputs("1", conv_expand, bn_expand, modes[0], dtype, mode == "mobiletl"))
    given.update(_stage_inputs("d", conv_dw, bn_dw, modes[1], dtype, mode == "mobiletl"))
    if se is not None:
        given.update(se_w1=_cast(se.reduce.weight, dtype), se_b1=_cast(se.reduce.bias, dtype),
                     se_w2=_cast(se.expand.weight, dtype), se_b2=_cast(se.expand.bias, dtype))
    z, mean1, var1, mean2, var2 = _run_block(spec, mode == "mobiletl", **given)
    ho, wo = ho_wo
    if modes[0] == "batch":
        _update_running(bn_expand, mean1, var1, x.shape[0] * x.shape[2] * x.shape[3])
    if modes[1] == "batch":
        _update_running(bn_dw, mean2, var2, x.shape[0] * ho * wo)
    return _finish_block(z, x, bn_project, residual)


def _fold_module(conv, bn, dtype, flatten: bool):
    w, b = conv.weight, conv.bias
    if bn is not None:
        stats = (bn.running_mean.to(_acc(w)), bn.running_var.to(_acc(w)))
        w, b = _fold(w, b, stats, bn.weight, bn.bias, bn.eps, dtype)
    else:
        w, b = w.to(dtype), _cast(b, dtype)
    return (w.flatten(1) if flatten else w), b


def _folded_inference(x, conv_expand, bn_expand, conv_dw, bn_dw, conv_project, bn_project, se, stride, pads, dilation,
                      activation, residual, chosen):
    dtype = x.dtype
    w1 = b1 = None
    if conv_expand is not None:
        w1, b1 = _fold_module(conv_expand, bn_expand, dtype, True)
    wd, bd = _fold_module(conv_dw, bn_dw, dtype, False)
    wd = wd.flatten(0, 1)
    w3, b3 = _fold_module(conv_project, bn_project, dtype, True)
    gate = None
    if se is not None:
        sums = _ir_dw_sums(chosen, x, w1, b1, wd, bd, stride, pads, dilation, activation)
        ho, wo = _out_hw(x.shape[2:], wd.shape[1:], stride, pads, dilation)
        t = {"se_w1": _cast(se.reduce.weight, dtype), "se_b1": _cast(se.reduce.bias, dtype),
             "se_w2": _cast(se.expand.weight, dtype), "se_b2": _cast(se.expand.bias, dtype)}
        gate = _se_gate((sums[:, 2] / (ho * wo)).to(dtype), t, (se.activation, se.gate))
    return _ir_forward(chosen, x, w1, b1, wd, bd, w3, b3, gate, stride, pads, dilation, activation, residual)


def fused_mbconv_block(x: torch.Tensor, conv_expand, bn_expand, conv_project, bn_project, *, activation: str,
                       residual: bool, tf_same: bool = False, mode: str = "recompute",
                       backend: str | None = None) -> torch.Tensor:
    """Fused-MBConv block (k x k conv -> BN -> act [-> 1x1 project -> BN]) from its eager submodules,
    eval and training as inverted_residual_block (mode="mobiletl" freezes the expand BN)."""
    activation_code(activation)
    _check_x(x)
    _check_conv(conv_expand, "conv_expand")
    if conv_expand.in_channels != x.shape[1]:
        raise ValueError(f"conv_expand takes {conv_expand.in_channels} channels but x has {x.shape[1]}")
    hidden = conv_expand.out_channels
    if bn_expand is not None:
        _check_bn(bn_expand, hidden, "bn_expand")
    if conv_project is not None:
        _check_conv(conv_project, "conv_project")
        if tuple(conv_project.kernel_size) != (1, 1) or conv_project.in_channels != hidden:
            raise ValueError(f"conv_project must be a 1x1 conv from the {hidden} expanded channels")
        if bn_project is not None:
            _check_bn(bn_project, conv_project.out_channels, "bn_project")
    elif bn_project is not None:
        raise ValueError("bn_project given without conv_project")
    stride, pads, dilation = _conv_geometry(conv_expand, tuple(x.shape[2:]), tf_same)
    ho_wo = _check_conv_geometry(x, tuple(conv_expand.kernel_size), stride, pads, dilation)
    cout = hidden if conv_project is None else conv_project.out_channels
    _check_residual(residual, x, cout, ho_wo)
    (x,) = autocast_inputs(x)
    dtype = x.dtype
    chosen = _select(FMB_BACKENDS, x, backend)
    # the single BN of a t = 1 block sits before the activation: it is stage 1's BN either way
    modes = _modes((bn_expand, None), mode)
    params = [p for m in (conv_expand, bn_expand, conv_project, bn_project) if m is not None for p in m.parameters()]
    if "batch" not in modes and not (bn_project is not None and _bn_batch(bn_project)) and not _needs_grad(x, *params):
        w1, b1 = _fold_module(conv_expand, bn_expand, dtype, False)
        w3 = b3 = None
        if conv_project is not None:
            w3, b3 = _fold_module(conv_project, bn_project, dtype, True)
        return _fmb_forward(chosen, x, w1, b1, w3, b3, stride, pads, dilation, activation, residual)
    spec = _Spec("fmb", activation, stride, pads, dilation, modes, (getattr(bn_expand, "eps", 0.0), 0.0), None,
                 _chunk(x, hidden), chosen)
    given = {"x": x}
    given.update(_stage_inputs("1", conv_expand, bn_expand, modes[0], dtype, mode == "mobiletl"))
    if conv_project is not None:
        given.update(w3=_cast(conv_project.weight, dtype), b3=_cast(conv_project.bias, dtype))
    z, mean1, var1, _, _ = _run_block(spec, mode == "mobiletl", **given)
    if modes[0] == "batch":
        _update_running(bn_expand, mean1, var1, x.shape[0] * ho_wo[0] * ho_wo[1])
    return _finish_block(z, x, bn_project, residual)


# ----------------------------------------------------------------------------------------------
# MobileTL mode: internal BNs frozen, 1-bit activation masks (Chiang et al., AAAI 2023)
# ----------------------------------------------------------------------------------------------

def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor with 8 elements per byte (little-endian bit order)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:math.prod(shape)].view(shape).bool()


def _mask_derivative(u: torch.Tensor, activation: str) -> torch.Tensor:
    """The 1-bit activation derivative: exact for relu / relu6, MobileTL's step (u > 0) for silu / hardswish."""
    if activation == "relu6":
        return (u > 0) & (u < 6)
    if activation == "identity":
        return torch.ones_like(u, dtype=torch.bool)
    return u > 0


class _MobileTL:
    """x -> project output with frozen stage BNs (scale and statistics fixed, shift trainable).

    Keeps for backward x, the depthwise and project inputs and one bit per expanded activation
    instead of the pre-activation tensors; backward is one pass with no recomputation."""

    @staticmethod
    def forward(spec: _Spec, tensors) -> list:
        """[z, a1, a2, mask1, mask2] (empty where a stage is absent)."""
        t = dict(zip(_TENSORS, tensors))
        x = t["x"]
        with torch.no_grad():
            scale1 = shift1 = None
            a = x
            masks = []
            if t["w1"] is not None:
                scale1, shift1 = _bn_affine(t["mean1"].to(_acc(x)), t["var1"].to(_acc(x)), t["gamma1"], t["beta1"],
                                            spec.eps[0])
                u1 = (_stage1_conv(spec, x, t).to(scale1.dtype) * scale1.view(1, -1, 1, 1) +
                      shift1.view(1, -1, 1, 1)).to(x.dtype)
                masks.append(pack_mask(_mask_derivative(u1, spec.activation)))
                a = apply_activation(u1, spec.activation)
                del u1
            a1 = a
            a2 = gate = None
            if spec.kind == "ir":
                scale2, shift2 = _bn_affine(t["mean2"].to(_acc(x)), t["var2"].to(_acc(x)), t["gamma2"], t["beta2"],
                                            spec.eps[1])
                d = _conv(a1, t["wd"].unsqueeze(1), t["bd"], spec.stride, spec.padding, spec.dilation,
                          groups=t["wd"].shape[0])
                u2 = (d.to(scale2.dtype) * scale2.view(1, -1, 1, 1) + shift2.view(1, -1, 1, 1)).to(x.dtype)
                del d
                masks.append(pack_mask(_mask_derivative(u2, spec.activation)))
                a2 = apply_activation(u2, spec.activation)
                del u2
                if spec.se is not None:
                    gate = _se_gate(a2.mean((2, 3)), t, spec.se)
                elif t["gate"] is not None:
                    gate = t["gate"]
                a = a2 if gate is None else a2 * gate[:, :, None, None]
            z = a if t["w3"] is None else _pointwise(a, t["w3"].flatten(1), t["b3"])
        empty = z.new_empty(0)
        mask2 = masks.pop() if spec.kind == "ir" else empty.to(torch.uint8)
        mask1 = masks.pop() if masks else empty.to(torch.uint8)
        return [z, a1 if spec.kind == "ir" else empty, empty if a2 is None else a2, mask1, mask2]

    @staticmethod
    def backward(spec: _Spec, tensors, kept, grad_z, need) -> list:
        t = dict(zip(_TENSORS, tensors))
        a1_saved, a2, mask1, mask2 = kept
        if spec.kind == "ir":
            shape1, shape2 = a1_saved.shape, a2.shape
        else:
            shape1 = grad_z.shape if t["w3"] is None else (grad_z.shape[0], t["w3"].shape[1], *grad_z.shape[2:])
        need = dict(zip(_TENSORS, need))
        grads = {name: None for name in _TENSORS}
        x = t["x"]

        def reduce(g):
            return g.sum((0, 2, 3))

        g = grad_z
        if t["w3"] is not None:   # project: z = a W3^T + b3, a = a2 * gate (inverted residual) or a1 (fused)
            a = a2 if spec.kind == "ir" else None
            if spec.kind == "ir":
                gate = None
                if spec.se is not None:
                    with torch.enable_grad():
                        se_leaves = {k: t[k].detach().requires_grad_(need[k]) for k in ("se_w1", "se_b1", "se_w2",
                                                                                         "se_b2")}
                        pooled = a2.mean((2, 3)).detach().requires_grad_(True)
                        gate_graph = _se_gate(pooled, se_leaves, spec.se)
                    gate = gate_graph.detach()
                elif t["gate"] is not None:
                    gate = t["gate"]
                a = a2 if gate is None else a2 * gate[:, :, None, None]
            else:
                # Fused-MBConv: the project input is the activated stage-1 output, rebuilt from x
                scale1, shift1 = _bn_affine(t["mean1"].to(_acc(x)), t["var1"].to(_acc(x)), t["gamma1"], t["beta1"],
                                            spec.eps[0])
                u1 = (_stage1_conv(spec, x, t).to(scale1.dtype) * scale1.view(1, -1, 1, 1) +
                      shift1.view(1, -1, 1, 1)).to(x.dtype)
                a = apply_activation(u1, spec.activation)
                del u1
            w3 = t["w3"].flatten(1)
            if need["w3"]:
                grads["w3"] = torch.einsum("nohw,nehw->oe", g, a).view_as(t["w3"]).to(t["w3"].dtype)
            if need["b3"] and t["b3"] is not None:
                grads["b3"] = reduce(g)
            g = _pointwise(g, w3.t(), None)
            if spec.kind == "ir" and gate is not None:
                g_gate = (g * a2).sum((2, 3))
                g = g * gate[:, :, None, None]
                if spec.se is not None:
                    wrt = [pooled] + [se_leaves[k] for k in ("se_w1", "se_b1", "se_w2", "se_b2") if need[k]]
                    got = list(torch.autograd.grad(gate_graph, wrt, g_gate))
                    g = g + (got.pop(0) / (a2.shape[2] * a2.shape[3]))[:, :, None, None]
                    for k in ("se_w1", "se_b1", "se_w2", "se_b2"):
                        if need[k]:
                            grads[k] = got.pop(0)
                elif need["gate"]:
                    grads["gate"] = g_gate
        if spec.kind == "ir":   # depthwise stage: BN2 frozen, activation through its mask
            g = g * unpack_mask(mask2, shape2).to(g.dtype)
            if need["beta2"] and t["beta2"] is not None:
                grads["beta2"] = reduce(g).to(t["beta2"].dtype)
            scale2, _ = _bn_affine(t["mean2"].to(_acc(x)), t["var2"].to(_acc(x)), t["gamma2"], None, spec.eps[1])
            g = (g.to(scale2.dtype) * scale2.view(1, -1, 1, 1)).to(x.dtype)
            if need["bd"] and t["bd"] is not None:
                grads["bd"] = reduce(g)
            top, bottom, left, right = spec.padding
            a1p = F.pad(a1_saved, (left, right, top, bottom))
            wd4 = t["wd"].unsqueeze(1)
            if need["wd"]:
                grads["wd"] = torch.nn.grad.conv2d_weight(a1p, wd4.shape, g, spec.stride, 0, spec.dilation,
                                                          groups=wd4.shape[0]).squeeze(1)
            g = torch.nn.grad.conv2d_input(a1p.shape, wd4, g, spec.stride, 0, spec.dilation, groups=wd4.shape[0])
            g = g[:, :, top:top + a1_saved.shape[2], left:left + a1_saved.shape[3]]
        if t["w1"] is not None:   # stage 1: BN1 frozen, activation through its mask
            g = g * unpack_mask(mask1, shape1).to(g.dtype)
            if need["beta1"] and t["beta1"] is not None:
                grads["beta1"] = reduce(g).to(t["beta1"].dtype)
            scale1, _ = _bn_affine(t["mean1"].to(_acc(x)), t["var1"].to(_acc(x)), t["gamma1"], None, spec.eps[0])
            g = (g.to(scale1.dtype) * scale1.view(1, -1, 1, 1)).to(x.dtype)
            if need["b1"] and t["b1"] is not None:
                grads["b1"] = reduce(g)
            if spec.kind == "ir":
                w1 = t["w1"].flatten(1)
                if need["w1"]:
                    grads["w1"] = torch.einsum("nehw,nchw->ec", g, x).view_as(t["w1"])
                g = _pointwise(g, w1.t(), None)
            else:
                top, bottom, left, right = spec.padding
                xp = F.pad(x, (left, right, top, bottom))
                if need["w1"]:
                    grads["w1"] = torch.nn.grad.conv2d_weight(xp, t["w1"].shape, g, spec.stride, 0, spec.dilation)
                g = torch.nn.grad.conv2d_input(xp.shape, t["w1"], g, spec.stride, 0, spec.dilation)
                g = g[:, :, top:top + x.shape[2], left:left + x.shape[3]]
        grads["x"] = g if need["x"] else None
        return [grads[name] for name in _TENSORS]


# ----------------------------------------------------------------------------------------------
# the training paths as custom ops: opaque to torch.compile (their backward differentiates
# recomputed chunks with torch.autograd.grad, which dynamo cannot trace)
# ----------------------------------------------------------------------------------------------

def _spec_text(spec: _Spec) -> str:
    """The spec as a custom-op string argument (plain str/join: torch.compile folds it to a constant)."""
    def join(values):
        return ",".join(str(v) for v in values)
    se = "-" if spec.se is None else join(spec.se)
    return "|".join([spec.kind, spec.activation, join(spec.stride), join(spec.padding), join(spec.dilation),
                     join(spec.bn_mode), join(spec.eps), se, str(spec.chunk), spec.backend])


@functools.lru_cache(maxsize=512)
def _spec_of(text: str) -> _Spec:
    kind, activation, stride, padding, dilation, bn_mode, eps, se, chunk, backend = text.split("|")

    def ints(v):
        return tuple(int(i) for i in v.split(","))
    return _Spec(kind, activation, ints(stride), ints(padding), ints(dilation), tuple(bn_mode.split(",")),
                 tuple(float(e) for e in eps.split(",")), None if se == "-" else tuple(se.split(",")), int(chunk),
                 backend)


def _z_like(spec: _Spec, t: dict) -> torch.Tensor:
    x = t["x"]
    kernel = t["wd"].shape[1:] if spec.kind == "ir" else t["w1"].shape[2:]
    ho, wo = _out_hw(x.shape[2:], kernel, spec.stride, spec.padding, spec.dilation)
    cout = t["w3"].shape[0] if t["w3"] is not None else t["w1"].shape[0]
    return x.new_empty((x.shape[0], cout, ho, wo)).contiguous(memory_format=out_memory_format(x))


def _fresh_grads(grads, tensors, need) -> list:
    """Custom ops return tensors only: zeros where a needed gradient is structurally zero, empty where unneeded."""
    out = []
    for g, t, n in zip(grads, tensors, need):
        if t is None or not n:
            out.append(torch.empty(0))
        else:
            out.append(torch.zeros_like(t) if g is None else g)
    return out


def _fake_grads(tensors, need) -> list:
    return [torch.empty(0) if t is None or not n else torch.empty_like(t) for t, n in zip(tensors, need)]


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enables autograd recording inside a custom op's kernel (the dispatcher excludes the autograd
    keys below the op), so the backward ops can differentiate their recomputed chunks."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.AutogradCPU,
                torch._C.DispatchKey.AutogradCUDA, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _pack(tensors) -> tuple:
    """Optional tensors -> (the present ones, which are present): custom-op autograd takes Tensor[] only."""
    return [t for t in tensors if t is not None], [t is not None for t in tensors]


def _unpack(present, given) -> list:
    it = iter(present)
    return [next(it) if g else None for g in given]


def _present_grads(grads, given, need) -> list:
    """Gradients of the present tensors (None where not needed)."""
    return [g if n else None for g, p, n in zip(grads, given, need) if p]


@torch.library.custom_op("fusekit::inverted_residual_block_train", mutates_args=())
def _block_train_op(present: List[torch.Tensor], given: List[bool], spec: str,
                    need: List[bool]) -> List[torch.Tensor]:
    tensors = _unpack(present, given)
    return [t.clone() if t.numel() == 0 else t for t in _block_forward(_spec_of(spec), tensors)]


@_block_train_op.register_fake
def _(present, given, spec, need):
    tensors = _unpack(present, given)
    sp = _spec_of(spec)
    t = dict(zip(_TENSORS, tensors))
    acc = _acc(t["x"])
    stages = _stat_stages(sp, tensors)
    widths = {1: t["w1"].shape[0] if t["w1"] is not None else 0, 2: t["wd"].shape[0] if t["wd"] is not None else 0}
    stats = [t["x"].new_empty((widths[k] if k in stages else 0,), dtype=acc) for k in (1, 2) for _ in (0, 1)]
    return [_z_like(sp, t)] + stats


@torch.library.custom_op("fusekit::inverted_residual_block_train_backward", mutates_args=())
def _block_train_backward_op(grad_z: torch.Tensor, present: List[torch.Tensor], given: List[bool],
                             stats: List[torch.Tensor], spec: str, need: List[bool]) -> List[torch.Tensor]:
    tensors = _unpack(present, given)
    with _autograd_inside_op():
        grads = _block_backward(_spec_of(spec), tensors, stats, grad_z, need)
    return _fresh_grads(grads, tensors, need)


@_block_train_backward_op.register_fake
def _(grad_z, present, given, stats, spec, need):
    return _fake_grads(_unpack(present, given), need)


def _block_train_setup(ctx, inputs, output):
    present, given, spec, need = inputs
    ctx.spec, ctx.need, ctx.given = spec, need, given
    ctx.save_for_backward(*present, *output[1:])


def _block_train_grad(ctx, grads):
    saved = ctx.saved_tensors
    present, stats = list(saved[:len(ctx.given) - ctx.given.count(False)]), \
        list(saved[len(ctx.given) - ctx.given.count(False):])
    out = torch.ops.fusekit.inverted_residual_block_train_backward(grads[0].contiguous(), present, ctx.given, stats,
                                                                   ctx.spec, ctx.need)
    return _present_grads(out, ctx.given, ctx.need), None, None, None


_block_train_op.register_autograd(_block_train_grad, setup_context=_block_train_setup)


@torch.library.custom_op("fusekit::inverted_residual_block_mobiletl", mutates_args=())
def _mobiletl_op(present: List[torch.Tensor], given: List[bool], spec: str, need: List[bool]) -> List[torch.Tensor]:
    tensors = _unpack(present, given)
    sp = _spec_of(spec)
    fmt = out_memory_format(tensors[0])
    z, a1, a2, mask1, mask2 = _MobileTL.forward(sp, tensors)
    if tensors[_INDEX["w1"]] is None:
        a1 = a1.new_empty(0)   # a1 is x itself: not an output (outputs must not alias inputs)
    return [z, a1.contiguous(memory_format=fmt) if a1.dim() == 4 else a1,
            a2.contiguous(memory_format=fmt) if a2.dim() == 4 else a2, mask1, mask2]


@_mobiletl_op.register_fake
def _(present, given, spec, need):
    tensors = _unpack(present, given)
    sp = _spec_of(spec)
    t = dict(zip(_TENSORS, tensors))
    x = t["x"]
    z = _z_like(sp, t)
    fmt = out_memory_format(x)
    empty = x.new_empty(0)
    if sp.kind != "ir":
        stage1 = (x.shape[0], t["w1"].shape[0], z.shape[2], z.shape[3])
        return [z, empty, empty, x.new_empty(((math.prod(stage1) + 7) // 8,), dtype=torch.uint8),
                x.new_empty((0,), dtype=torch.uint8)]
    e = t["wd"].shape[0]
    a1 = x.new_empty((x.shape[0], e, x.shape[2], x.shape[3])).contiguous(memory_format=fmt)
    a2 = x.new_empty((x.shape[0], e, z.shape[2], z.shape[3])).contiguous(memory_format=fmt)
    mask1 = x.new_empty(((a1.numel() + 7) // 8 if t["w1"] is not None else 0,), dtype=torch.uint8)
    mask2 = x.new_empty(((a2.numel() + 7) // 8,), dtype=torch.uint8)
    return [z, a1 if t["w1"] is not None else empty, a2, mask1, mask2]


@torch.library.custom_op("fusekit::inverted_residual_block_mobiletl_backward", mutates_args=())
def _mobiletl_backward_op(grad_z: torch.Tensor, present: List[torch.Tensor], given: List[bool],
                          kept: List[torch.Tensor], spec: str, need: List[bool]) -> List[torch.Tensor]:
    tensors = _unpack(present, given)
    sp = _spec_of(spec)
    a1, a2, mask1, mask2 = kept
    if sp.kind == "ir" and tensors[_INDEX["w1"]] is None:
        a1 = tensors[0]
    with _autograd_inside_op():
        grads = _MobileTL.backward(sp, tensors, (a1, a2, mask1, mask2), grad_z, need)
    return _fresh_grads(grads, tensors, need)


@_mobiletl_backward_op.register_fake
def _(grad_z, present, given, kept, spec, need):
    return _fake_grads(_unpack(present, given), need)


def _mobiletl_grad(ctx, grads):
    saved = ctx.saved_tensors
    count = len(ctx.given) - ctx.given.count(False)
    present, kept = list(saved[:count]), list(saved[count:])
    out = torch.ops.fusekit.inverted_residual_block_mobiletl_backward(grads[0].contiguous(), present, ctx.given, kept,
                                                                      ctx.spec, ctx.need)
    return _present_grads(out, ctx.given, ctx.need), None, None, None


_mobiletl_op.register_autograd(_mobiletl_grad, setup_context=_block_train_setup)
