"""Pieces every operator family shares: argument checks, autocast, and backend reasons.

Machine facts (is Triton usable on this device type, which compiled kernels exist) are fixed
once fusekit is imported; computing them at import keeps backend selection free of calls that
torch.compile cannot trace.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Sequence

import torch

from .. import _extension


def check_same_device_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in others is on ref's device and has ref's dtype (None entries are skipped)."""
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must be on "
                             "one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}: dtypes must match")


def autocast_inputs(*tensors):
    """Follow autocast like PyTorch's conv and attention ops do (run in the autocast dtype)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not first.is_floating_point():
        return tensors
    device_type = first.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
    return tensors


def _triton_reason_now(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (set before importing fusekit)"
        return None
    if device_type != "cuda":
        return f"Triton kernels do not run on {device_type} tensors"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.version.hip is not None:
        return "the Triton kernels are tuned and verified for NVIDIA GPUs only"
    return None


_TRITON_REASON = {d: _triton_reason_now(d) for d in ("cpu", "cuda")}


def triton_reason(device_type: str) -> str | None:
    """None when Triton kernels can run on this device type, else why not."""
    return _TRITON_REASON.get(device_type, f"Triton kernels do not run on {device_type} tensors")


def require_triton_device(x: torch.Tensor) -> None:
    reason = triton_reason(x.device.type)
    if reason:
        raise RuntimeError(f"fusekit Triton kernel: {reason}")


def kernel_reasons(op: str) -> dict[str, str | None]:
    """Per dispatch key ("CPU", "CUDA"): None when fusekit._C has op's kernel, else why not."""
    return {key: _extension.missing_reason(op, key) for key in ("CPU", "CUDA")}


def compiled_reasons(device_type: str, kernel_reason: str | None, dtypes: Sequence[torch.dtype],
                     what: str) -> Callable[[object], list[str]]:
    """Reasons function of a fusekit._C backend: device, dtype, and whether its kernels were built.

    The case object needs ``device_type`` and ``dtype`` attributes."""
    def reasons(case) -> list[str]:
        why = []
        if case.device_type != device_type:
            why.append(f"the {what} kernels take {device_type.upper()} tensors, got {case.device_type}")
        if case.dtype not in dtypes:
            why.append(f"dtype {case.dtype} is not supported by the {what} kernels (supported: {tuple(dtypes)})")
        if kernel_reason:
            why.append(kernel_reason)
        return why
    return reasons


def triton_reasons(dtypes: Sequence[torch.dtype]) -> Callable[[object], list[str]]:
    def reasons(case) -> list[str]:
        why = []
        reason = triton_reason(case.device_type)
        if reason:
            why.append(reason)
        if case.dtype not in dtypes:
            why.append(f"dtype {case.dtype} is not supported by the Triton kernels (supported: {tuple(dtypes)})")
        return why
    return reasons


def no_reasons(case) -> list[str]:
    return []


def machine_reason(reasons_fn: Callable[[object], list[str]], case) -> str | None:
    """Why a backend cannot run on this machine at all (judged on a typical case), or None."""
    why = reasons_fn(case)
    return "; ".join(why) if why else None


def cuda_device_reason() -> str | None:
    return None if torch.cuda.is_available() else "CUDA is not available on this machine"
