"""Loading of the compiled library fusekit._C.

The package imports without it: the reference and Triton paths keep working, and an op
that needs the C++/CUDA kernels raises ExtensionUnavailable naming what is missing.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers the C++ kernels with the dispatcher)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # built without the extension, or an ABI mismatch
    import importlib.util

    _C = None
    if importlib.util.find_spec(f"{__package__}._C") is None:
        LOAD_ERROR = ImportError("fusekit._C is not in this installation (installed from source without "
                                 "building the extension?)")
    else:
        LOAD_ERROR = exc


class ExtensionUnavailable(RuntimeError):
    """Raised when an op needs fusekit._C kernels that this installation does not have."""


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.fusekit.<op> has a kernel for dispatch_key ("CPU" or "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusekit::{op}", dispatch_key)


def missing_reason(op: str, dispatch_key: str) -> str | None:
    """None when the kernel is there, else a sentence saying why it is not."""
    if has_kernel(op, dispatch_key):
        return None
    if _C is None:
        return (f"the compiled library fusekit._C could not be imported ({LOAD_ERROR}); "
                "rebuild with `pip install --no-build-isolation .`")
    if dispatch_key == "CUDA":
        return ("fusekit._C was built without CUDA kernels (torch without CUDA or nvcc not found "
                "at build time; set FUSEKIT_CUDA=1 and rebuild)")
    return f"fusekit._C has no {dispatch_key} kernel for {op}"


def require_kernel(op: str, dispatch_key: str) -> None:
    reason = missing_reason(op, dispatch_key)
    if reason is not None:
        raise ExtensionUnavailable(f"fusekit::{op} on {dispatch_key}: {reason}")
