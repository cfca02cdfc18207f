"""Backend selection shared by every operator family.

Every public op takes ``backend=None`` ("auto") or one of BACKENDS. ``use_backend`` sets a
default for a block of code. Each family registers, per backend, a function returning the
reasons that backend cannot run a given case (an empty list when it can). "auto" walks a fixed
preference order per device and picks the first backend with no reasons; on a GPU it only
considers kernels whose GPU test suite passed on a real GPU (recorded in gpu_verified.json,
written by benchmarks/gpu_suite.py and committed), so an unverified kernel never wins over
PyTorch itself.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterator

BACKENDS = ("cpu", "cuda", "triton", "reference")
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
GPU_BACKENDS = ("cuda", "triton")

# a plain module-level stack (not a ContextVar) so torch.compile traces reads of it
_default_stack: list[str | None] = [None]


class BackendError(ValueError):
    """The requested backend cannot run this case; the message says why."""


def _check_name(name: str | None) -> str | None:
    if name in (None, "auto"):
        return None
    if name not in BACKENDS:
        raise BackendError(f"backend must be one of {('auto',) + BACKENDS} or None, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Use ``name`` for every fusekit op called without an explicit backend inside the block."""
    _default_stack.append(_check_name(name))
    try:
        yield
    finally:
        _default_stack.pop()


def _load_verified() -> dict[str, Any]:
    path = os.environ.get("FUSEKIT_GPU_VERIFIED")
    try:
        if path:
            with open(path) as f:
                return json.load(f)
        return json.loads(resources.files("fusekit").joinpath("gpu_verified.json").read_text())
    except (OSError, ValueError):
        return {}


_VERIFIED = _load_verified()


def gpu_verified(op: str, backend: str) -> bool:
    """True when this op/backend passed the GPU test suite on a real GPU (committed results)."""
    entry = _VERIFIED.get(op, {}).get(backend, {})
    return bool(entry.get("passed"))


@dataclass
class OpBackends:
    """The backends of one op: name -> reasons(case) and name -> machine-level availability."""

    op: str
    reasons: dict[str, Callable[[Any], list[str]]] = field(default_factory=dict)
    availability: dict[str, Callable[[], str | None]] = field(default_factory=dict)

    def select(self, case: Any, device_type: str, requested: str | None) -> str:
        requested = _check_name(requested) or _default_stack[-1]
        if requested is not None:
            why = self.reasons[requested](case)
            if why:
                raise BackendError(f"fusekit.{self.op}: backend {requested!r} cannot run this case: "
                                   + "; ".join(why))
            return requested
        order = PREFERENCE.get(device_type, ("reference",))
        for name in order:
            if name in GPU_BACKENDS and not gpu_verified(self.op, name):
                continue
            if not self.reasons[name](case):
                return name
        return "reference"


_REGISTRY: dict[str, OpBackends] = {}


def register_op(op_backends: OpBackends) -> OpBackends:
    _REGISTRY[op_backends.op] = op_backends
    return op_backends


def available_backends(op: str) -> dict[str, str | None]:
    """For each backend of ``op``: None if it can run on this machine, else why not."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; ops: {sorted(_REGISTRY)}")
    entry = _REGISTRY[op]
    return {name: entry.availability[name]() for name in BACKENDS}


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)
