"""Neighborhood attention (1-D/2-D/3-D): argument rules, backends, fake kernels, autograd, API.

Layers: torch-free kernels (csrc/kernels/na_window.h, na_cpu.h, na_unfused_cpu.h, na_cuda.cuh;
triton_kernels/na.py), launchers that check and allocate (csrc/cpu/na_cpu.cpp,
csrc/cpu/na_unfused_cpu.cpp, csrc/cuda/na_cuda.cpp, the Triton launch functions), and this module,
which validates arguments with clear errors, picks a backend and differentiates.

Semantics (DESIGN.md 5.1, NATTEN's): per spatial axis a kernel size k, stride s, dilation d and a
causal flag; windows slide inward at borders (every query sees exactly prod(k) keys unless causal),
dilation splits an axis into d interleaved groups, stride makes groups of s queries share the
window of their leader; multi-dimensional NA is the AND over axes. Query head h reads KV head
h // (Hq / Hkv); K and V are never expanded. Relative positional bias (NATTEN <= 0.17) adds
rpb[h, (j - i) / d + k - 1, ...] to the scaled logits. Additional KV tokens, seen by every query,
go through the multi-query attention kernels and are merged by log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from . import schemas  # noqa: F401  (defines the op schemas before fusekit._C registers kernels)
from ..backends import OpBackends, register_op
from .common import (autocast_inputs, check_same_device_dtype, compiled_reasons, cuda_device_reason, kernel_reasons,
                     machine_reason, no_reasons, require_triton_device, triton_reasons)
from .mqa import CPU_DTYPES, GPU_DTYPES, MAX_HEAD_DIM, _check_float, _check_heads, _shape, resolve_scale

_ops = torch.ops.fusekit

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


# ----------------------------------------------------------------------------------------------
# argument rules (shared by every backend)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NaConf:
    """Per-axis parameters, resolved to tuples of length rank."""

    kernel_size: tuple
    stride: tuple
    dilation: tuple
    is_causal: tuple

    def op_args(self) -> tuple:
        return (list(self.kernel_size), list(self.stride), list(self.dilation), list(self.is_causal))

    @property
    def slots(self) -> int:
        n = 1
        for k in self.kernel_size:
            n *= k
        return n


def _per_axis(value, rank: int, name: str, kind: type) -> tuple:
    values = (value,) * rank if isinstance(value, (int, bool)) else tuple(value) if isinstance(value, (tuple, list)) \
        else None
    if values is None or len(values) != rank:
        raise ValueError(f"{name} must be {'a bool' if kind is bool else 'an int'} or a tuple of {rank} "
                         f"(one per spatial axis of na{rank}d), got {value!r}")
    for v in values:
        ok = isinstance(v, bool) if kind is bool else (isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise TypeError(f"{name} entries must be {'bools' if kind is bool else 'ints'}, got {value!r}")
    return tuple(kind(v) for v in values)


def resolve_conf(rank: int, spatial: Sequence[int], kernel_size, stride, dilation, is_causal) -> NaConf:
    ks = _per_axis(kernel_size, rank, "kernel_size", int)
    ss = _per_axis(stride, rank, "stride", int)
    ds = _per_axis(dilation if dilation is not None else 1, rank, "dilation", int)
    cs = _per_axis(is_causal, rank, "is_causal", bool)
    for ax in range(rank):
        k, s, d, length = ks[ax], ss[ax], ds[ax], spatial[ax]
        if k < 2:
            raise ValueError(f"kernel_size must be >= 2 on every axis, got {ks}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1 on every axis, got {ds}")
        if not 1 <= s <= k:
            raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size on every axis, got stride {ss} "
                             f"for kernel_size {ks}")
        if k * d > length:
            raise ValueError(f"kernel_size * dilation must not exceed the input size on every axis: axis {ax} has "
                             f"kernel_size {k} * dilation {d} = {k * d} > {length}")
    return NaConf(ks, ss, ds, cs)


def _check_qkv(q, k, v, rank: int) -> None:
    layout = "[B, " + ", ".join("XYZ"[:rank]) + ", heads, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank + 3:
            raise ValueError(f"{name} must be a {rank + 3}-D tensor {layout} for na{rank}d, got shape {_shape(t)}")
    check_same_device_dtype("q", q, k=k, v=v)
    _check_float(q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k has batch and spatial shape {tuple(k.shape[:-2])} but q has {tuple(q.shape[:-2])}: "
                         "they must match")
    _check_heads(q, k, v)


def _rpb_shape(heads: int, conf: NaConf) -> tuple:
    return (heads,) + tuple(2 * k - 1 for k in conf.kernel_size)


def _check_rpb(rpb, q: torch.Tensor, conf: NaConf) -> None:
    if rpb is None:
        return
    check_same_device_dtype("q", q, rpb=rpb)
    if any(conf.is_causal):
        raise ValueError("rpb (relative positional bias) is only defined for non-causal neighborhood attention; "
                         f"got is_causal={conf.is_causal}")
    want = _rpb_shape(q.shape[-2], conf)
    if tuple(rpb.shape) != want:
        raise ValueError(f"rpb must have shape [Hq, 2k-1 per axis] = {list(want)}, got {tuple(rpb.shape)}")


def _check_extra(q, extra_k, extra_v, hkv: int, k_name="additional_keys", v_name="additional_values") -> None:
    check_same_device_dtype("q", q, **{k_name: extra_k, v_name: extra_v})
    for name, t in ((k_name, extra_k), (v_name, extra_v)):
        if t is None:
            continue
        if t.dim() != 4 or t.shape[0] != q.shape[0] or t.shape[2] != hkv or t.shape[3] != q.shape[-1]:
            raise ValueError(f"{name} must have shape [B, n_extra, Hkv, D] = [{q.shape[0]}, n_extra, {hkv}, "
                             f"{q.shape[-1]}], got {tuple(t.shape)}")
    if extra_k is not None and extra_v is not None and extra_k.shape != extra_v.shape:
        raise ValueError(f"{k_name} and {v_name} must have the same shape, got {tuple(extra_k.shape)} and "
                         f"{tuple(extra_v.shape)}")


# ----------------------------------------------------------------------------------------------
# reference backend (plain PyTorch through the neighbour table; the auto fallback)
# ----------------------------------------------------------------------------------------------

def _reference():
    from ..testing import reference
    return reference


def _reference_fused(q, k, v, conf: NaConf, scale, rpb, extra_k, extra_v):
    out, lse = _reference().na_unfused_reference(q, k, v, conf.kernel_size, conf.stride, conf.dilation,
                                                 conf.is_causal, scale, rpb, extra_k, extra_v)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.to(q.dtype), lse.detach().to(lse_dtype)


# ----------------------------------------------------------------------------------------------
# fake kernels
# ----------------------------------------------------------------------------------------------

def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _fake_forward(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale):
    return _fresh(q), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


def _fake_backward(grad_out, q, k, v, out, lse, rpb, kernel_size, stride, dilation, is_causal, scale):
    return _fresh(q), _fresh(k), _fresh(v), (_fresh(rpb) if rpb is not None else q.new_empty(0))


def _slots(kernel_size) -> int:
    n = 1
    for s in kernel_size:
        n *= s
    return n


def _fake_qk(q, k, rpb, kernel_size, stride, dilation, is_causal, scale):
    return q.new_empty((q.shape[0], q.shape[-2], *q.shape[1:-2], _slots(kernel_size)))


def _fake_qk_backward(grad_attn, q, k, has_rpb, kernel_size, stride, dilation, is_causal, scale):
    grad_rpb = q.new_empty((q.shape[-2],) + tuple(2 * s - 1 for s in kernel_size)) if has_rpb else q.new_empty(0)
    return _fresh(q), _fresh(k), grad_rpb


def _fake_av(attn, v, kernel_size, stride, dilation, is_causal):
    return v.new_empty((attn.shape[0], *attn.shape[2:-1], attn.shape[1], v.shape[-1]))


def _fake_av_backward(grad_out, attn, v, kernel_size, stride, dilation, is_causal):
    return _fresh(attn), _fresh(v)


_OPS = ("na_forward", "na_backward", "na_qk", "na_qk_backward", "na_av", "na_av_backward")
for _suffix in ("", "_triton"):
    for _name, _fake in zip(_OPS, (_fake_forward, _fake_backward, _fake_qk, _fake_qk_backward, _fake_av,
                                   _fake_av_backward)):
        torch.library.register_fake(f"fusekit::{_name}{_suffix}", _fake, lib=schemas.lib)


# ----------------------------------------------------------------------------------------------
# Triton implementations (the *_triton ops; CPU tensors run them under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _triton_impl(name: str):
    def impl(*args):
        require_triton_device(args[0])
        from ..triton_kernels import na as kernels
        return getattr(kernels, name)(*args)
    impl.__name__ = f"{name}_triton"
    return impl


for _name in _OPS:
    torch.library.register_kernel(f"fusekit::{_name}_triton", ("cpu", "cuda"), _triton_impl(_name), lib=schemas.lib)


# ----------------------------------------------------------------------------------------------
# autograd: one formula per op for the C++ and Triton kernels; lse is returned, not differentiable
# ----------------------------------------------------------------------------------------------

def _register_autograd(suffix: str) -> None:
    forward_backward = getattr(_ops, f"na_backward{suffix}")
    qk_backward = getattr(_ops, f"na_qk_backward{suffix}")
    av_backward = getattr(_ops, f"na_av_backward{suffix}")

    def forward_setup(ctx, inputs, output):
        q, k, v, rpb, *conf = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.conf = conf

    def forward_grad(ctx, grad_out, grad_lse):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_rpb = forward_backward(grad_out.contiguous(), q, k, v, out, lse, rpb, *ctx.conf)
        return grad_q, grad_k, grad_v, grad_rpb if rpb is not None else None, None, None, None, None, None

    def qk_setup(ctx, inputs, output):
        q, k, rpb, *conf = inputs
        ctx.save_for_backward(q, k)
        ctx.has_rpb = rpb is not None
        ctx.conf = conf

    def qk_grad(ctx, grad_attn):
        q, k = ctx.saved_tensors
        grad_q, grad_k, grad_rpb = qk_backward(grad_attn, q, k, ctx.has_rpb, *ctx.conf)
        return grad_q, grad_k, grad_rpb if ctx.has_rpb else None, None, None, None, None, None

    def av_setup(ctx, inputs, output):
        attn, v, *conf = inputs
        ctx.save_for_backward(attn, v)
        ctx.conf = conf

    def av_grad(ctx, grad_out):
        attn, v = ctx.saved_tensors
        grad_attn, grad_v = av_backward(grad_out, attn, v, *ctx.conf)
        return grad_attn, grad_v, None, None, None, None

    for name, grad, setup in (("na_forward", forward_grad, forward_setup), ("na_qk", qk_grad, qk_setup),
                              ("na_av", av_grad, av_setup)):
        torch.library.register_autograd(f"fusekit::{name}{suffix}", grad, setup_context=setup, lib=schemas.lib)


for _suffix in ("", "_triton"):
    _register_autograd(_suffix)


# ----------------------------------------------------------------------------------------------
# additional KV tokens: neighbourhood and extra tokens merged by log-sum-exp; the backward runs
# both backward kernels against the merged output and lse (the softmax is over their union)
# ----------------------------------------------------------------------------------------------

def _mqa_ops(backend: str):
    """The multi-query attention ops that serve the extra tokens for an NA backend (CUDA C++ has no
    MQA training kernels, so the CUDA backend uses the Triton ones)."""
    if backend == "cpu":
        return _ops.mqa_forward, _ops.mqa_backward
    return _ops.mqa_forward_triton, _ops.mqa_backward_triton


def _merge(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    acc = lse.dtype
    out = out_a.to(acc) * torch.exp(lse_a - lse).unsqueeze(-1) + out_b.to(acc) * torch.exp(lse_b - lse).unsqueeze(-1)
    return out.to(out_a.dtype), lse


class _NeighborhoodWithExtraKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, extra_k, extra_v, conf: NaConf, scale: float, backend: str):
        na_forward = _ops.na_forward_triton if backend == "triton" else _ops.na_forward
        mqa_forward, _ = _mqa_ops(backend)
        out_na, lse_na = na_forward(q, k, v, rpb, *conf.op_args(), scale)
        b, hq, d = q.shape[0], q.shape[-2], q.shape[-1]
        q_flat = q.reshape(b, -1, hq, d)
        n, n_extra = q_flat.shape[1], extra_k.shape[1]
        out_x, lse_x = mqa_forward(q_flat, extra_k, extra_v, None, None, n, n_extra, scale, False, -1, -1)
        out, lse = _merge(out_na, lse_na, out_x.view(out_na.shape), lse_x.view(lse_na.shape))
        ctx.save_for_backward(q, k, v, rpb, extra_k, extra_v, out, lse)
        ctx.conf, ctx.scale, ctx.backend = conf, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, rpb, extra_k, extra_v, out, lse = ctx.saved_tensors
        na_backward = _ops.na_backward_triton if ctx.backend == "triton" else _ops.na_backward
        _, mqa_backward = _mqa_ops(ctx.backend)
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v, grad_rpb = na_backward(grad_out, q, k, v, out, lse, rpb, *ctx.conf.op_args(),
                                                       ctx.scale)
        b, hq, d = q.shape[0], q.shape[-2], q.shape[-1]
        n, n_extra = out.numel() // (b * hq * d), extra_k.shape[1]
        flat = (b, n, hq, d)
        grad_qx, grad_ek, grad_ev = mqa_backward(grad_out.view(flat), q.reshape(flat), extra_k, extra_v,
                                                 out.view(flat), lse.view(flat[:-1]), None, None, n, n_extra,
                                                 ctx.scale, False, -1, -1)
        return (grad_q + grad_qx.view(grad_q.shape), grad_k, grad_v, grad_rpb if rpb is not None else None,
                grad_ek, grad_ev, None, None, None)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NaCase:
    device_type: str
    dtype: torch.dtype
    head_dim: int
    rank: int = 2


_FUSED_KERNELS = kernel_reasons("na_forward")
_UNFUSED_KERNELS = kernel_reasons("na_qk")
_cpu_fused = compiled_reasons("cpu", _FUSED_KERNELS["CPU"], CPU_DTYPES, "C++ CPU")
_cpu_unfused = compiled_reasons("cpu", _UNFUSED_KERNELS["CPU"], CPU_DTYPES, "C++ CPU")
_cuda_fused = compiled_reasons("cuda", _FUSED_KERNELS["CUDA"], GPU_DTYPES, "CUDA")
_triton = triton_reasons(GPU_DTYPES)


def _cuda_unfused(case: NaCase) -> list[str]:
    return ["there are no CUDA C++ kernels for the unfused na*d_qk / na*d_av ops; use 'triton'"]


def _make_backends(op: str, cpu, cuda) -> OpBackends:
    def typical(device_type):
        return NaCase(device_type, torch.float32, 32)
    return register_op(OpBackends(
        op=op,
        reasons={"cpu": cpu, "cuda": cuda, "triton": _triton, "reference": no_reasons},
        availability={
            "cpu": lambda: machine_reason(cpu, typical("cpu")),
            "cuda": lambda: cuda_device_reason() or machine_reason(cuda, typical("cuda")),
            "triton": lambda: machine_reason(_triton, typical("cuda" if torch.cuda.is_available() else "cpu")),
            "reference": lambda: None,
        }))


FUSED_BACKENDS = _make_backends("neighborhood_attention", _cpu_fused, _cuda_fused)
UNFUSED_BACKENDS = _make_backends("neighborhood_attention_unfused", _cpu_unfused, _cuda_unfused)


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------

def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: IntOrTuple,
                           stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
                           scale: float | None = None, rpb: torch.Tensor | None = None,
                           additional_keys: torch.Tensor | None = None,
                           additional_values: torch.Tensor | None = None, return_lse: bool = False,
                           backend: str | None = None):
    """Fused neighborhood attention of rank R = q.dim() - 3 (see na1d / na2d / na3d)."""
    q, k, v, rpb, additional_keys, additional_values = autocast_inputs(q, k, v, rpb, additional_keys,
                                                                        additional_values)
    rank = q.dim() - 3 if isinstance(q, torch.Tensor) else 0
    if not 1 <= rank <= 3:
        raise ValueError(f"q must be a 4-D, 5-D or 6-D tensor [B, *spatial, heads, D] (1-D to 3-D neighborhood "
                         f"attention), got shape {_shape(q)}")
    _check_qkv(q, k, v, rank)
    conf = resolve_conf(rank, q.shape[1:-2], kernel_size, stride, dilation, is_causal)
    _check_rpb(rpb, q, conf)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together (or both None)")
    _check_extra(q, additional_keys, additional_values, k.shape[-2])
    scale = resolve_scale(scale, q.shape[-1])
    chosen = FUSED_BACKENDS.select(NaCase(q.device.type, q.dtype, q.shape[-1], rank), q.device.type, backend)
    if chosen == "reference":
        out, lse = _reference_fused(q, k, v, conf, scale, rpb, additional_keys, additional_values)
    elif additional_keys is not None and additional_keys.shape[1] > 0:
        out, lse = _NeighborhoodWithExtraKV.apply(q, k, v, rpb, additional_keys, additional_values, conf, scale,
                                                  chosen)
    else:
        op = _ops.na_forward_triton if chosen == "triton" else _ops.na_forward
        out, lse = op(q, k, v, rpb, *conf.op_args(), scale)
    return (out, lse) if return_lse else out


def _rank_doc(rank: int) -> str:
    axes = ", ".join("XYZ"[:rank])
    return f"""{rank}-D neighborhood attention (NATTEN's na{rank}d, with what NATTEN dropped: CPU kernels and
    relative positional bias).

    q [B, {axes}, Hq, D], k/v [B, {axes}, Hkv, D] (heads-last; Hq % Hkv == 0: GQA/MQA without
    expanding K/V; any strides with a unit-stride head dim), D <= 256. kernel_size, stride,
    dilation and is_causal are an int/bool for every axis or a tuple of {rank}; every axis needs
    kernel_size >= 2, 1 <= stride <= kernel_size and kernel_size * dilation <= its size.
    scale defaults to D ** -0.5. rpb [Hq, 2k-1 per axis] is added to the scaled logits
    (non-causal only; differentiable). additional_keys/values [B, n_extra, Hkv, D] are seen by
    every query. Returns out like q, and with return_lse=True also lse [B, {axes}, Hq]
    (float32; float64 for float64 inputs; not differentiable)."""


def na1d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None, additional_keys=None,
         additional_values=None, return_lse=False, backend=None):
    _check_rank(q, 1, "na1d")
    return neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
                                  additional_values, return_lse, backend)


def na2d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None, additional_keys=None,
         additional_values=None, return_lse=False, backend=None):
    _check_rank(q, 2, "na2d")
    return neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
                                  additional_values, return_lse, backend)


def na3d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None, additional_keys=None,
         additional_values=None, return_lse=False, backend=None):
    _check_rank(q, 3, "na3d")
    return neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
                                  additional_values, return_lse, backend)


def _check_rank(q, rank: int, name: str) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != rank + 3:
        layout = "[B, " + ", ".join("XYZ"[:rank]) + ", heads, D]"
        raise ValueError(f"{name}: q must be a {rank + 3}-D tensor {layout}, got shape {_shape(q)}")


for _rank, _fn in ((1, na1d), (2, na2d), (3, na3d)):
    _fn.__doc__ = _rank_doc(_rank)


# ----------------------------------------------------------------------------------------------
# unfused ops: attention logits and their application, so weights can be inspected or dropped out
# ----------------------------------------------------------------------------------------------

def _unfused_backend(t: torch.Tensor, rank: int, backend: str | None) -> str:
    return UNFUSED_BACKENDS.select(NaCase(t.device.type, t.dtype, 0, rank), t.device.type, backend)


def neighborhood_qk(q, k, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale: float = 1.0,
                    additional_keys=None, backend=None) -> torch.Tensor:
    """Attention logits of rank R = q.dim() - 3 (see na1d_qk / na2d_qk / na3d_qk)."""
    q, k, rpb, additional_keys = autocast_inputs(q, k, rpb, additional_keys)
    rank = q.dim() - 3 if isinstance(q, torch.Tensor) else 0
    if not 1 <= rank <= 3:
        raise ValueError(f"q must be a 4-D, 5-D or 6-D tensor [B, *spatial, heads, D], got shape {_shape(q)}")
    _check_qkv(q, k, k, rank)
    conf = resolve_conf(rank, q.shape[1:-2], kernel_size, stride, dilation, is_causal)
    _check_rpb(rpb, q, conf)
    _check_extra(q, additional_keys, None, k.shape[-2])
    scale = float(scale)
    chosen = _unfused_backend(q, rank, backend)
    if chosen == "reference":
        attn = _reference().na_qk_reference(q, k, conf.kernel_size, conf.stride, conf.dilation, conf.is_causal, scale,
                                            rpb).to(q.dtype)
    else:
        op = _ops.na_qk_triton if chosen == "triton" else _ops.na_qk
        attn = op(q, k, rpb, *conf.op_args(), scale)
    if additional_keys is not None:
        b, hq, d = q.shape[0], q.shape[-2], q.shape[-1]
        hkv = additional_keys.shape[2]
        qg = q.reshape(b, -1, hkv, hq // hkv, d)
        extra = torch.einsum("bihgd,bjhd->bhgij", qg, additional_keys) * scale
        attn = torch.cat([attn, extra.reshape(*attn.shape[:-1], -1)], dim=-1)
    return attn


def neighborhood_av(attn, v, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None,
                    backend=None) -> torch.Tensor:
    """Apply attention weights of rank R = attn.dim() - 3 (see na1d_av / na2d_av / na3d_av)."""
    attn, v, additional_values = autocast_inputs(attn, v, additional_values)
    rank = attn.dim() - 3 if isinstance(attn, torch.Tensor) else 0
    if not 1 <= rank <= 3:
        raise ValueError(f"attn must be a 4-D, 5-D or 6-D tensor [B, heads, *spatial, slots], got shape "
                         f"{_shape(attn)}")
    if not isinstance(v, torch.Tensor) or v.dim() != rank + 3:
        raise ValueError(f"v must be a {rank + 3}-D tensor [B, *spatial, heads, D], got shape {_shape(v)}")
    check_same_device_dtype("attn", attn, v=v)
    _check_float(attn, "attn")
    b, hq = attn.shape[0], attn.shape[1]
    spatial = tuple(attn.shape[2:-1])
    if v.shape[0] != b or tuple(v.shape[1:-2]) != spatial:
        raise ValueError(f"attn is over batch {b} and spatial shape {spatial} but v has shape {tuple(v.shape)}")
    hkv = v.shape[-2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"the query head count of attn ({hq}) must be a multiple of v's head count ({hkv})")
    if not 1 <= v.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be between 1 and {MAX_HEAD_DIM}, got {v.shape[-1]}")
    conf = resolve_conf(rank, spatial, kernel_size, stride, dilation, is_causal)
    n_extra = 0 if additional_values is None else additional_values.shape[1] if additional_values.dim() == 4 else -1
    _check_extra(v, None, additional_values, hkv, v_name="additional_values")
    if attn.shape[-1] != conf.slots + n_extra:
        raise ValueError(f"attn's last dim must be prod(kernel_size) + n_extra = {conf.slots} + {n_extra}, got "
                         f"{attn.shape[-1]}")
    local = attn[..., :conf.slots] if n_extra else attn
    chosen = _unfused_backend(v, rank, backend)
    if chosen == "reference":
        out = _reference().na_av_reference(local, v, conf.kernel_size, conf.stride, conf.dilation,
                                           conf.is_causal).to(v.dtype)
    else:
        op = _ops.na_av_triton if chosen == "triton" else _ops.na_av
        out = op(local, v, *conf.op_args())
    if n_extra:
        d = v.shape[-1]
        weights = attn[..., conf.slots:].reshape(b, hkv, hq // hkv, -1, n_extra)
        extra = torch.einsum("bhgij,bjhd->bihgd", weights, additional_values)
        out = out + extra.reshape(out.shape)
    return out


def _make_unfused(rank: int):
    def qk(q, k, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=1.0, additional_keys=None,
           backend=None):
        _check_rank(q, rank, f"na{rank}d_qk")
        return neighborhood_qk(q, k, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend)

    def av(attn, v, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, backend=None):
        if not isinstance(attn, torch.Tensor) or attn.dim() != rank + 3:
            raise ValueError(f"na{rank}d_av: attn must be a {rank + 3}-D tensor [B, heads, *spatial, slots], got "
                             f"shape {_shape(attn)}")
        return neighborhood_av(attn, v, kernel_size, stride, dilation, is_causal, additional_values, backend)

    axes = ", ".join("XYZ"[:rank])
    qk.__name__, av.__name__ = f"na{rank}d_qk", f"na{rank}d_av"
    qk.__doc__ = f"""Unfused {rank}-D NA logits (NATTEN 0.17's na{rank}d_qk, heads-last inputs):
    attn [B, Hq, {axes}, prod(kernel_size) (+ n_extra)] = scale * q . k_neighbour + rpb, slot order
    row-major over the per-axis window offsets; slots beyond a causal window are -inf.
    scale defaults to 1 (NATTEN's modules scale q first). additional_keys [B, n_extra, Hkv, D]
    append n_extra logits seen by every query. Differentiable in q, k, rpb, additional_keys."""
    av.__doc__ = f"""Unfused {rank}-D NA weighted sum (NATTEN 0.17's na{rank}d_av): out [B, {axes}, Hq, D] =
    sum over the valid slots of attn * v_neighbour (+ attn[..., K:] @ additional_values).
    Differentiable in attn, v, additional_values."""
    return qk, av


na1d_qk, na1d_av = _make_unfused(1)
na2d_qk, na2d_av = _make_unfused(2)
na3d_qk, na3d_av = _make_unfused(3)
