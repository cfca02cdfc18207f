"""Check helpers shared by every operator's tests, so a test file is mostly its cases.

All comparisons are against float64 references (fusekit.testing.reference) with the one
tolerance table (fusekit.testing.tolerances).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .tolerances import max_violation, scaled_tolerance


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str = "forward",
                             reduction_size: int = 1, what: str = "output") -> None:
    """|out - ref| <= atol + rtol*|ref| elementwise, tolerances scaled for a sum of reduction_size terms."""
    atol, rtol = scaled_tolerance(dtype, kind, reduction_size)
    excess = max_violation(out, ref, atol, rtol)
    if excess > 0:
        err = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
        raise AssertionError(f"{what} ({dtype}) differs from the float64 reference: max abs error "
                             f"{float(err.max()):.3e} exceeds atol {atol:.1e} + rtol {rtol:.1e} * |ref| "
                             f"by {excess:.3e}")


def poison_allocator(device: torch.device | str, nbytes: int = 1 << 24) -> None:
    """Fill memory the allocator will hand out next with NaN, so unwritten output elements show.

    Effective for the CUDA caching allocator and for small host allocations (large host
    allocations come from fresh, zeroed pages, which NaN checks cannot see).
    """
    buf = torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
    del buf


def reference_gradients(ref_fn: Callable, inputs: Sequence[torch.Tensor | None], grad_out: torch.Tensor,
                        *args, **kwargs) -> list[torch.Tensor | None]:
    """Gradients of sum(ref_fn(inputs) * grad_out) w.r.t. each tensor input, in float64."""
    leaves = [t.detach().double().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in inputs]
    out = ref_fn(*leaves, *args, **kwargs)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    grads = iter(torch.autograd.grad(out, tensors, grad_out.double(), allow_unused=True, materialize_grads=True))
    return [next(grads) if isinstance(t, torch.Tensor) else None for t in leaves]


def op_gradients(fn: Callable, inputs: Sequence[torch.Tensor | None], grad_out: torch.Tensor,
                 *args, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(output, gradients) of fn on copies of inputs that require grad."""
    leaves = [t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in inputs]
    out = fn(*leaves, *args, **kwargs)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    grads = iter(torch.autograd.grad(out, tensors, grad_out.to(out.dtype), allow_unused=True, materialize_grads=True))
    return out, [next(grads) if isinstance(t, torch.Tensor) else None for t in leaves]


def run_opcheck(op, args: tuple, kwargs: dict | None = None, test_utils=None) -> None:
    """torch.library.opcheck with every test (schema, autograd registration, fake, aot dispatch)."""
    kw = {} if test_utils is None else {"test_utils": test_utils}
    torch.library.opcheck(op, args, kwargs or {}, **kw)


def assert_compiles_fullgraph(fn: Callable, *args, atol: float = 1e-5, rtol: float = 1e-5, backward: bool = True,
                              **kwargs) -> None:
    """torch.compile(fullgraph=True) runs fn with no graph break and matches eager (and its gradients)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    eager_in = [a.detach().clone().requires_grad_(backward and a.is_floating_point()) if isinstance(a, torch.Tensor)
                else a for a in args]
    comp_in = [a.detach().clone().requires_grad_(backward and a.is_floating_point()) if isinstance(a, torch.Tensor)
               else a for a in args]
    expected = fn(*eager_in, **kwargs)
    got = compiled(*comp_in, **kwargs)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    if backward:
        g = torch.randn_like(expected)
        expected.backward(g)
        got.backward(g)
        for a, b in zip(eager_in, comp_in):
            if isinstance(a, torch.Tensor) and a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, atol=atol, rtol=rtol)


def assert_close_to_twin(actual: torch.Tensor, expected: torch.Tensor, kind: str = "forward") -> None:
    """A fusekit module against its PyTorch twin in the same dtype: the tolerance table, scaled by
    the output's magnitude (the two sum the same terms in different orders)."""
    from .tolerances import tolerance
    atol, rtol = tolerance(expected.dtype, kind)
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)
