"""Multi-query / grouped-query attention: argument rules, backends, fake kernels, autograd, API.

Layers: torch-free kernels (csrc/kernels/mqa_cpu.h, csrc/kernels/mqa_decode_cuda.cuh,
csrc/cuda/mqa_decode_kernels.cu, triton_kernels/mqa.py), launchers that check and allocate
(csrc/cpu/mqa_cpu.cpp, csrc/cuda/mqa_decode_cuda.cpp, the Triton launch functions), and this
module, which validates arguments with clear errors, picks a backend and differentiates through
the backward op.

Semantics (DESIGN.md 5.2): query head h reads KV head h // (Hq / Hkv); causal masks and
windows are aligned bottom-right (query i sits at key position i + Lk - Lq); a query row that
sees no key gets output 0 and log-sum-exp -inf. K and V are never expanded to Hq heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import schemas  # noqa: F401  (defines the op schemas before fusekit._C registers kernels)
from ..backends import OpBackends, register_op
from .common import (autocast_inputs, check_same_device_dtype, compiled_reasons, cuda_device_reason, kernel_reasons,
                     machine_reason, no_reasons, require_triton_device, triton_reasons)

_ops = torch.ops.fusekit

MAX_HEAD_DIM = 256
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Window = Optional[Sequence[Optional[int]]]
CuSeqlens = Union[torch.Tensor, Sequence[torch.Tensor], None]


# ----------------------------------------------------------------------------------------------
# argument rules (shared by every backend)
# ----------------------------------------------------------------------------------------------

def resolve_window(window: Window) -> tuple[int, int]:
    """None -> unbounded; (left, right) with None or -1 meaning unbounded on that side."""
    if window is None:
        return -1, -1
    if isinstance(window, (int, bool)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right) of ints >= 0 or None (unbounded), "
                         f"got {window!r}")
    out = []
    for side, value in zip(("left", "right"), window):
        if value is None:
            value = -1
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"window {side} must be an int >= 0, or None/-1 for unbounded, got {value!r}")
        out.append(int(value))
    return out[0], out[1]


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return scale


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names=("q", "k", "v")) -> None:
    qn, kn, vn = names
    hq, hkv = q.shape[-2], k.shape[-2]
    if v.shape[-2] != hkv:
        raise ValueError(f"{vn} has {v.shape[-2]} heads but {kn} has {hkv}: K and V must have the same head count")
    if hkv < 1 or hq < 1:
        raise ValueError(f"head counts must be positive, got {qn} {hq} heads and {kn} {hkv} heads")
    if hq % hkv != 0:
        raise ValueError(f"the query head count ({hq}) must be a multiple of the KV head count ({hkv}): "
                         "Hq % Hkv == 0")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"head dims must match: {qn} has {d}, {kn} has {k.shape[-1]}, {vn} has {v.shape[-1]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be between 1 and {MAX_HEAD_DIM}, got {d}")


def _check_float(q: torch.Tensor, name: str = "q") -> None:
    if not q.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating point tensor, got {q.dtype}")


def _validate_on_host() -> bool:
    """Data-dependent checks read tensors on the host; skip them while tracing or capturing a graph."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _read_cu_seqlens_on_host(q: torch.Tensor, max_seqlen) -> bool:
    """Check cu_seqlens' contents only where reading them costs no device synchronization that the
    call does not make anyway: CPU tensors, or no max_seqlen given (it is then computed from them)."""
    return _validate_on_host() and (q.device.type == "cpu" or max_seqlen is None)


def _resolve_cu_seqlens(cu_seqlens: CuSeqlens, q: torch.Tensor, k: torch.Tensor, check_contents: bool):
    """-> (cu_q, cu_k) int32 tensors, validated, or (None, None) for dense inputs."""
    if cu_seqlens is None:
        return None, None
    if isinstance(cu_seqlens, torch.Tensor):
        cu_q = cu_k = cu_seqlens
    else:
        if len(cu_seqlens) != 2:
            raise ValueError("cu_seqlens must be a tensor [B + 1] or a pair (cu_seqlens_q, cu_seqlens_k)")
        cu_q, cu_k = cu_seqlens
    out = []
    for name, cu, t in (("cu_seqlens_q", cu_q, q), ("cu_seqlens_k", cu_k, k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D integer tensor [B + 1], got shape {_shape(cu)}")
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}: all tensors must be on one device")
        out.append(cu.to(torch.int32).contiguous())
    if out[0].numel() != out[1].numel():
        raise ValueError(f"cu_seqlens_q has {out[0].numel()} entries but cu_seqlens_k has {out[1].numel()}: "
                         "both describe the same B sequences")
    if check_contents:
        for name, cu, t in (("cu_seqlens_q", out[0], q), ("cu_seqlens_k", out[1], k)):
            host = cu.cpu()
            if int(host[0]) != 0 or bool((host[1:] < host[:-1]).any()):
                raise ValueError(f"{name} must start at 0 and be non-decreasing, got {host.tolist()}")
            if int(host[-1]) != t.shape[0]:
                raise ValueError(f"{name} ends at {int(host[-1])} but the packed tensor has {t.shape[0]} rows: "
                                 f"cu_seqlens[-1] must equal the total token count")
    return out[0], out[1]


def _resolve_max_seqlen(max_seqlen, cu_q: torch.Tensor, cu_k: torch.Tensor,
                        check_contents: bool) -> tuple[int, int]:
    if max_seqlen is None:  # reads cu_seqlens on the host (pass max_seqlen to avoid the sync)
        return int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0, \
            int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    pair = (max_seqlen, max_seqlen) if isinstance(max_seqlen, int) else tuple(max_seqlen)
    if len(pair) != 2 or any(not isinstance(m, int) or m < 0 for m in pair):
        raise ValueError(f"max_seqlen must be an int >= 0 or a pair (max_seqlen_q, max_seqlen_k), got {max_seqlen!r}")
    if check_contents:
        for name, m, cu in (("q", pair[0], cu_q), ("k", pair[1], cu_k)):
            longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
            if longest > m:
                raise ValueError(f"max_seqlen for {name} is {m} but a sequence has {longest} tokens")
    return pair


def check_attention_args(q, k, v, varlen: bool) -> None:
    rank = 3 if varlen else 4
    layout = "[T, H, D] (packed, with cu_seqlens)" if varlen else "[B, L, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {_shape(t)}")
    check_same_device_dtype("q", q, k=k, v=v)
    _check_float(q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k has batch {k.shape[0]}: batch sizes must match")
    _check_heads(q, k, v)


def check_decode_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [B, n, Hq, D] (n new tokens per sequence), got shape {_shape(q)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, Lmax, Hkv, D], got shape {_shape(t)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last (head) dim: it is written in place, "
                             "so it cannot be copied to a contiguous layout")
    check_same_device_dtype("q", q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    _check_float(q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    b, n = q.shape[0], q.shape[1]
    if k_cache.shape[0] != b:
        raise ValueError(f"q has batch {b} but k_cache has batch {k_cache.shape[0]}: batch sizes must match")
    if n < 1:
        raise ValueError("q must hold at least one new token per sequence (q.shape[1] >= 1)")
    _check_heads(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens must be a 1-D integer tensor [B] = [{b}], got shape {_shape(cache_seqlens)}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}: all tensors must be "
                         "on one device")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (or both None)")
    if k_new is not None:
        want = (b, n, k_cache.shape[2], k_cache.shape[3])
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape [B, n, Hkv, D] = {list(want)} (n = q.shape[1]), got "
                                 f"{tuple(t.shape)}")


def _check_cache_lengths(cache_seqlens: torch.Tensor, lmax: int, appended: int) -> None:
    host = cache_seqlens.cpu()
    if bool((host < 0).any()):
        raise ValueError(f"cache_seqlens must be >= 0, got {host.tolist()}")
    longest = int(host.max()) + appended if host.numel() else 0
    if longest > lmax:
        what = f"cache_seqlens + n ({longest})" if appended else f"cache_seqlens ({int(host.max())})"
        raise ValueError(f"{what} exceeds the cache length Lmax = {lmax}: the cache is too short")


# ----------------------------------------------------------------------------------------------
# reference backend (plain PyTorch; the "reference" backend and the auto fallback)
# ----------------------------------------------------------------------------------------------

def _mask(lq: int, lk: int, causal: bool, wl: int, wr: int, device, lk_valid=None):
    """[.., lq, lk] bool mask; lk_valid ([B] tensor) marks keys past each sequence's length invalid."""
    if lk_valid is None:
        i = torch.arange(lq, device=device).unsqueeze(1) + (lk - lq)
        j = torch.arange(lk, device=device).unsqueeze(0)
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    else:  # decode: query t sits at L_b - lq + t
        i = (lk_valid.view(-1, 1, 1) - lq) + torch.arange(lq, device=device).view(1, -1, 1)
        j = torch.arange(lk, device=device).view(1, 1, -1)
        allowed = j < lk_valid.view(-1, 1, 1)
    if causal:
        allowed = allowed & (j <= i)
    if wl >= 0:
        allowed = allowed & (j >= i - wl)
    if wr >= 0:
        allowed = allowed & (j <= i + wr)
    return allowed


def _grouped_attention(q, k, v, scale, allowed):
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], allowed broadcastable to [B, 1, 1, Lq, Lk];
    grouped einsums (no expansion), accumulated in fp32 (fp64 for fp64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.to(acc).reshape(b, lq, hkv, hq // hkv, d)
    logits = torch.einsum("bihgd,bjhd->bhgij", qg, k.to(acc)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhgij,bjhd->bihgd", probs, v.to(acc)).reshape(b, lq, hq, d)
    return out.to(q.dtype), lse.reshape(b, hq, lq).transpose(1, 2).contiguous()


def attention_reference_impl(q, k, v, cu_q, cu_k, scale, causal, wl, wr):
    """(out, lse) in plain PyTorch, differentiable through autograd."""
    if cu_q is None:
        allowed = _mask(q.shape[1], k.shape[1], causal, wl, wr, q.device)
        return _grouped_attention(q, k, v, scale, allowed)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        allowed = _mask(qs.shape[0], ks.shape[0], causal, wl, wr, q.device)
        out, lse = _grouped_attention(qs[None], ks[None], vs[None], scale, allowed)
        outs.append(out[0])
        lses.append(lse[0])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1], dtype=lse_dtype)
    return torch.cat(outs), torch.cat(lses)


def decode_reference_impl(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, wl, wr):
    """Append in place, then masked grouped attention over the cache; returns (out, lse float32)."""
    n = q.shape[1]
    lengths = cache_seqlens.to(torch.int64)
    if k_new is not None:
        pos = lengths.unsqueeze(1) + torch.arange(n, device=q.device)
        rows = torch.arange(q.shape[0], device=q.device).unsqueeze(1).expand_as(pos)
        k_cache.index_put_((rows, pos), k_new)
        v_cache.index_put_((rows, pos), v_new)
        lengths = lengths + n
    allowed = _mask(n, k_cache.shape[1], causal, wl, wr, q.device, lk_valid=lengths).unsqueeze(1).unsqueeze(1)
    out, lse = _grouped_attention(q, k_cache, v_cache, scale, allowed)
    return out, lse.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# fake kernels
# ----------------------------------------------------------------------------------------------

def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


def _fake_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr):
    fmt = torch.contiguous_format
    return (torch.empty_like(q, memory_format=fmt), torch.empty_like(k, memory_format=fmt),
            torch.empty_like(v, memory_format=fmt))


def _fake_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, wl, wr, num_splits):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=torch.float32)


for _suffix in ("", "_triton"):
    torch.library.register_fake(f"fusekit::mqa_forward{_suffix}", _fake_forward, lib=schemas.lib)
    torch.library.register_fake(f"fusekit::mqa_backward{_suffix}", _fake_backward, lib=schemas.lib)
    torch.library.register_fake(f"fusekit::mqa_decode{_suffix}", _fake_decode, lib=schemas.lib)


# ----------------------------------------------------------------------------------------------
# Triton implementations (the *_triton ops; CPU tensors run them under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _triton_module():
    from ..triton_kernels import mqa as kernels
    return kernels


def _triton_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr):
    require_triton_device(q)
    return _triton_module().mqa_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr)


def _triton_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr):
    require_triton_device(q)
    return _triton_module().mqa_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr)


def _triton_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, wl, wr, num_splits):
    require_triton_device(q)
    return _triton_module().mqa_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, wl, wr,
                                       num_splits)


for _name, _fn in (("mqa_forward_triton", _triton_forward), ("mqa_backward_triton", _triton_backward),
                   ("mqa_decode_triton", _triton_decode)):
    torch.library.register_kernel(f"fusekit::{_name}", ("cpu", "cuda"), _fn, lib=schemas.lib)


# ----------------------------------------------------------------------------------------------
# autograd: one formula for the C++ and Triton ops; lse is returned but not differentiable
# ----------------------------------------------------------------------------------------------

def _make_autograd(suffix: str):
    backward_op = getattr(_ops, f"mqa_backward{suffix}")

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.conf = (max_q, max_k, scale, causal, wl, wr)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        grad_q, grad_k, grad_v = backward_op(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.conf)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None

    return setup_context, backward


for _suffix in ("", "_triton"):
    _setup, _backward = _make_autograd(_suffix)
    torch.library.register_autograd(f"fusekit::mqa_forward{_suffix}", _backward, setup_context=_setup,
                                    lib=schemas.lib)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionCase:
    device_type: str
    dtype: torch.dtype
    head_dim: int
    decode: bool = False


_TRAIN_KERNELS = kernel_reasons("mqa_forward")
_DECODE_KERNELS = kernel_reasons("mqa_decode")
_cpu_train = compiled_reasons("cpu", _TRAIN_KERNELS["CPU"], CPU_DTYPES, "C++ CPU")
_cpu_decode = compiled_reasons("cpu", _DECODE_KERNELS["CPU"], CPU_DTYPES, "C++ CPU")
_cuda_decode = compiled_reasons("cuda", _DECODE_KERNELS["CUDA"], GPU_DTYPES, "CUDA")
_triton = triton_reasons(GPU_DTYPES)


def _cpu_reasons(case: AttentionCase) -> list[str]:
    return (_cpu_decode if case.decode else _cpu_train)(case)


def _cuda_reasons(case: AttentionCase) -> list[str]:
    if not case.decode:
        return ["there are no CUDA C++ training/prefill kernels (CUDA C++ covers decoding); use 'triton'"]
    return _cuda_decode(case)


def _typical(device_type: str, decode: bool) -> AttentionCase:
    return AttentionCase(device_type, torch.float32, 64, decode)


def _make_backends(op: str, decode: bool) -> OpBackends:
    def availability(reasons_fn, device_type):
        return lambda: machine_reason(reasons_fn, _typical(device_type, decode))
    return register_op(OpBackends(
        op=op,
        reasons={"cpu": _cpu_reasons, "cuda": _cuda_reasons, "triton": _triton, "reference": no_reasons},
        availability={
            "cpu": availability(_cpu_reasons, "cpu"),
            "cuda": lambda: cuda_device_reason() or machine_reason(_cuda_reasons, _typical("cuda", decode)),
            "triton": availability(_triton, "cuda" if torch.cuda.is_available() else "cpu"),
            "reference": lambda: None,
        }))


ATTENTION_BACKENDS = _make_backends("multi_query_attention", decode=False)
DECODE_BACKENDS = _make_backends("multi_query_decode", decode=True)


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------

def multi_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                          window: Window = None, scale: float | None = None, cu_seqlens: CuSeqlens = None,
                          max_seqlen: int | Sequence[int] | None = None, return_lse: bool = False,
                          backend: str | None = None):
    """Softmax attention where Hq / Hkv query heads share each K/V head (MQA: Hkv = 1; GQA).

    q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] (heads-last, flash-attention layout; any strides with a
    unit-stride head dim are read without copies), Hq % Hkv == 0, D <= 256. causal and window
    (left, right) are aligned bottom-right when Lq != Lk: query i sees keys
    j <= i + Lk - Lq (causal) and i + Lk - Lq - left <= j <= i + Lk - Lq + right (window; None or
    -1 = unbounded). scale defaults to D ** -0.5.

    Packed variable-length batches: q [Tq, Hq, D], k/v [Tk, Hkv, D] and cu_seqlens, an int tensor
    [B + 1] of sequence starts shared by q and k, or a pair (cu_seqlens_q, cu_seqlens_k);
    max_seqlen (int or pair) bounds the sequence lengths. Without it, cu_seqlens is read on the
    host (one device synchronization on a GPU) to compute it and to check its contents; with it,
    GPU calls read nothing on the host (CPU calls still check the contents).

    Returns out (like q), and with return_lse=True also lse = log-sum-exp of the scaled logits,
    float32 (float64 for float64 inputs), shaped q.shape[:-1]; lse is not differentiable.
    A query row that sees no key gets out 0 and lse -inf.
    """
    q, k, v = autocast_inputs(q, k, v)
    varlen = cu_seqlens is not None
    check_attention_args(q, k, v, varlen)
    wl, wr = resolve_window(window)
    scale = resolve_scale(scale, q.shape[-1])
    check_contents = varlen and _read_cu_seqlens_on_host(q, max_seqlen)
    cu_q, cu_k = _resolve_cu_seqlens(cu_seqlens, q, k, check_contents)
    if varlen:
        max_q, max_k = _resolve_max_seqlen(max_seqlen, cu_q, cu_k, check_contents)
    else:
        max_q, max_k = q.shape[1], k.shape[1]
    chosen = ATTENTION_BACKENDS.select(AttentionCase(q.device.type, q.dtype, q.shape[-1]), q.device.type, backend)
    if chosen == "reference":
        out, lse = attention_reference_impl(q, k, v, cu_q, cu_k, scale, bool(causal), wl, wr)
        lse = lse.detach()  # as with the kernels' ops: lse is an output, not a differentiable one
    else:
        op = _ops.mqa_forward_triton if chosen == "triton" else _ops.mqa_forward
        out, lse = op(q, k, v, cu_q, cu_k, max_q, max_k, scale, bool(causal), wl, wr)
    return (out, lse) if return_lse else out


def multi_query_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                       k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                       scale: float | None = None, window: Window = None, causal: bool = True,
                       num_splits: int = 0, return_lse: bool = False, check_lengths: bool = True,
                       backend: str | None = None):
    """Decode n new tokens per sequence against a KV cache (inference only, not differentiable).

    q [B, n, Hq, D]; k_cache/v_cache [B, Lmax, Hkv, D] hold cache_seqlens[b] valid tokens
    (cache_seqlens: int tensor [B] on q's device). With k_new/v_new [B, n, Hkv, D] these are
    first written into the caches in place at positions cache_seqlens[b] .. + n - 1 (the caller
    then advances cache_seqlens by n); the queries then attend over cache_seqlens[b] + n keys,
    otherwise over cache_seqlens[b]. Query t sits at the last n key positions (causal and window
    aligned bottom-right, as in multi_query_attention). num_splits splits the cached sequence
    (0 = chosen from the shapes, so launches are fixed for a cache size and CUDA graphs capture).

    Outside torch.compile and CUDA-graph capture, and unless check_lengths=False, cache_seqlens is
    checked against Lmax on the host (one synchronization on a GPU); otherwise the kernels clamp
    to the cache (they never read or write past it).
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k_new, v_new)):
        raise RuntimeError("multi_query_decode is inference-only and not differentiable; use "
                           "multi_query_attention for training (or wrap decoding in torch.no_grad())")
    if isinstance(q, torch.Tensor) and isinstance(k_cache, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        q, k_new, v_new = (t.to(k_cache.dtype) if t is not None else None for t in (q, k_new, v_new))
    check_decode_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    wl, wr = resolve_window(window)
    scale = resolve_scale(scale, q.shape[-1])
    appended = q.shape[1] if k_new is not None else 0
    if check_lengths and _validate_on_host():
        _check_cache_lengths(cache_seqlens, k_cache.shape[1], appended)
    seqlens = cache_seqlens.to(torch.int32)
    chosen = DECODE_BACKENDS.select(AttentionCase(q.device.type, q.dtype, q.shape[-1], decode=True),
                                    q.device.type, backend)
    if chosen == "reference":
        out, lse = decode_reference_impl(q, k_cache, v_cache, seqlens, k_new, v_new, scale, bool(causal), wl, wr)
    else:
        op = _ops.mqa_decode_triton if chosen == "triton" else _ops.mqa_decode
        out, lse = op(q, k_cache, v_cache, seqlens, k_new, v_new, scale, bool(causal), wl, wr, num_splits)
    return (out, lse) if return_lse else out
