"""The one tolerance table: |out - ref| <= atol + rtol * |ref|, against a float64 reference."""
from __future__ import annotations

import torch

# (atol, rtol) per dtype and direction, in the spirit of NATTEN / xformers; gradients are looser
# because they sum over many more terms.
_TABLE = {
    "forward": {
        torch.float64: (1e-10, 1e-9),
        torch.float32: (1e-4, 1e-4),
        torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (5e-2, 2e-2),
    },
    "backward": {
        torch.float64: (1e-9, 1e-8),
        torch.float32: (5e-4, 5e-4),
        torch.float16: (5e-2, 2e-2),
        torch.bfloat16: (2e-1, 5e-2),
    },
}


def tolerance(dtype: torch.dtype, kind: str = "forward") -> tuple[float, float]:
    if kind not in _TABLE:
        raise ValueError(f"kind must be 'forward' or 'backward', got {kind!r}")
    if dtype not in _TABLE[kind]:
        raise ValueError(f"no tolerance for dtype {dtype}")
    return _TABLE[kind][dtype]


def scaled_tolerance(dtype: torch.dtype, kind: str, reduction_size: int) -> tuple[float, float]:
    """Tolerance for a sum of ``reduction_size`` products: rounding error grows like sqrt(n)."""
    atol, rtol = tolerance(dtype, kind)
    grow = max(1.0, (reduction_size / 64) ** 0.5)
    return atol * grow, rtol


def max_violation(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> float:
    """max(|out - ref| - rtol * |ref|) - atol: <= 0 means within tolerance."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if out64.numel() == 0:
        return -atol
    excess = (out64 - ref64).abs() - rtol * ref64.abs()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float(excess.max()) - atol


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """max|out - ref| / max(max|ref|, floor): the norm-wise relative error whole models are judged by
    (an elementwise bound fails on elements that happen to be near zero). NaN when out is not
    finite, so that no bound passes it; 0 for empty tensors."""
    if out.shape != ref.shape:
        raise ValueError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if out.numel() == 0:
        return 0.0
    diff = (out - ref).abs()
    if not bool(torch.isfinite(diff).all()):
        return float("nan")
    return float(diff.max()) / max(float(ref.abs().max()), floor)
