"""Neighborhood attention (DESIGN.md 5.1): every backend against the float64 definition (an explicit
mask over full attention built from NATTEN's window rules)."""
import pytest
import torch

import fusekit
from fusekit.ops.na import neighborhood_attention, neighborhood_av, neighborhood_qk
from fusekit.testing.cases import NeighborhoodCase, random_neighborhood_cases
from fusekit.testing.checks import (assert_compiles_fullgraph, assert_matches_reference, op_gradients,
                                    poison_allocator, reference_gradients, run_opcheck)
from fusekit.testing.reference import (mqa_reference, na_av_reference, na_axis_windows, na_neighbors, na_qk_reference,
                                       na_reference)

from backend_matrix import backend_device_params, dtypes_for

FUSED = backend_device_params("neighborhood_attention", backends=("cpu", "triton", "reference", "cuda"))
NATIVE_FUSED = backend_device_params("neighborhood_attention", backends=("cpu", "triton", "cuda"))
UNFUSED = backend_device_params("neighborhood_attention_unfused", backends=("cpu", "triton", "reference"))
NATIVE_UNFUSED = backend_device_params("neighborhood_attention_unfused", backends=("cpu", "triton"))


@pytest.fixture(autouse=True)
def _gpu_verification_tags(request, record_property):
    """Tell benchmarks/gpu_suite.py which (op, GPU backend) a test on CUDA tensors speaks for."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec else {}
    if params.get("device") == "cuda" and params.get("backend") in ("cuda", "triton"):
        op = "neighborhood_attention_unfused" if "unfused" in request.node.name else "neighborhood_attention"
        record_property("fusekit_op", op)
        record_property("fusekit_backend", params["backend"])


def _cases(backend: str, full: int, seed: int, **kw) -> list:
    """Random cases per backend: fewer and smaller where each case is slow (Triton's interpreter
    on CPU tensors, float64 PyTorch)."""
    interpreted = backend == "triton" and not torch.cuda.is_available()
    count = max(3, full // {"triton": 6, "reference": 3}.get(backend, 1))
    return random_neighborhood_cases(count, seed, max_tokens=72 if interpreted else 300, **kw)


def _randn(shape, gen, device, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def _make(case: NeighborhoodCase, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = _randn((case.batch, *case.spatial, case.hq, case.d), g, device, dtype)
    k = _randn((case.batch, *case.spatial, case.hkv, case.d), g, device, dtype)
    v = _randn((case.batch, *case.spatial, case.hkv, case.d), g, device, dtype)
    rpb = _randn((case.hq, *(2 * x - 1 for x in case.kernel_size)), g, device, dtype) if case.rpb else None
    return q, k, v, rpb


def _fused(q, k, v, rpb, case, backend, **kw):
    return neighborhood_attention(q, k, v, **case.conf(), rpb=rpb, backend=backend, **kw)


def _ref(q, k, v, rpb, case, **kw):
    return na_reference(q, k, v, **case.conf(), rpb=rpb, **kw)


def _reductions(case):
    """(forward, backward) reduction sizes that scale the tolerances."""
    fwd = max(case.d, case.slots)
    return fwd, fwd * (case.hq // case.hkv) * max(1, case.slots // 8)


def _check_fused_case(case, backend, device, dtype, seed=0):
    q, k, v, rpb = _make(case, device, dtype, seed)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    poison_allocator(device)
    inputs = [q, k, v, rpb]
    out, grads = op_gradients(lambda *t: _fused(*t, case, backend), inputs, grad_out)
    _, lse = _fused(q, k, v, rpb, case, backend, return_lse=True)
    ref, ref_lse = _ref(q, k, v, rpb, case)
    ref_grads = reference_gradients(lambda *t: _ref(*t, case)[0], inputs, grad_out)
    fwd, bwd = _reductions(case)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == q.shape[:-1] and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches_reference(out, ref, dtype, "forward", fwd, what=f"output {case}")
    assert_matches_reference(lse, ref_lse, dtype, "forward", fwd, what=f"lse {case}")
    for name, got, want in zip(("grad_q", "grad_k", "grad_v", "grad_rpb"), grads, ref_grads):
        if want is None:
            continue
        red = bwd * (case.batch * 64 if name == "grad_rpb" else 1)  # grad_rpb sums over every query
        assert got.dtype == dtype
        assert_matches_reference(got, want, dtype, "backward", red, what=f"{name} {case}")


# ----------------------------------------------------------------------------------------------
# the definition itself
# ----------------------------------------------------------------------------------------------

def test_window_rules_reproduce_the_design_examples():
    assert na_axis_windows(10, 3, 1, 1, False)[0] == (0, 3) and na_axis_windows(10, 3, 1, 1, False)[9] == (7, 3)
    assert na_axis_windows(10, 4, 1, 1, False)[0] == (0, 4) and na_axis_windows(10, 4, 1, 1, False)[5] == (3, 4)
    w = na_axis_windows(10, 3, 1, 2, False)  # keys first, first + 2, first + 4
    assert w[1] == (1, 3) and w[9] == (5, 3)
    causal = na_axis_windows(10, 3, 1, 1, True)
    assert causal[0] == (0, 1) and causal[1] == (0, 2) and causal[5] == (3, 3)


def test_every_non_causal_query_sees_exactly_prod_kernel_keys_of_its_dilation_group():
    key, valid, rel = na_neighbors((11, 9), (4, 3), (2, 1), (2, 3), False)
    assert bool(valid.all())
    coords_q = torch.stack(torch.meshgrid(torch.arange(11), torch.arange(9), indexing="ij"), -1).reshape(-1, 1, 2)
    coords_k = torch.stack([key // 9, key % 9], -1)
    assert bool(((coords_k - coords_q) % torch.tensor([2, 3]) == 0).all())
    assert all(len(set(row.tolist())) == 12 for row in key)
    assert int(rel.min()) >= 0 and bool((rel <= torch.tensor([6, 4])).all())


# ----------------------------------------------------------------------------------------------
# fused op: parity with the definition, gradients included
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_forward_and_gradients_match_float64_definition_on_random_cases(backend, device):
    dtype = torch.float64 if device == "cpu" and backend != "triton" else torch.float32
    for case in _cases(backend, 36, seed=1):
        _check_fused_case(case, backend, device, dtype)


@pytest.mark.parametrize("backend,device", NATIVE_FUSED)
def test_fused_every_dtype_matches_reference_within_its_tolerance(backend, device):
    for dtype in dtypes_for(backend, device):
        for case in _cases(backend, 8, seed=2, head_dims=(16, 32, 64)):
            _check_fused_case(case, backend, device, dtype)


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_head_dims_up_to_256_match_reference(backend, device):
    dims = (40, 256) if backend == "triton" else (1, 3, 64, 100, 128, 256)
    for d in dims:
        case = NeighborhoodCase(batch=1, spatial=(6, 7), kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1),
                                is_causal=(False, False), hq=4, hkv=2, d=d, rpb=True)
        _check_fused_case(case, backend, device, torch.float32)


@pytest.mark.parametrize("backend,device", FUSED)
def test_kernel_equal_to_input_is_full_self_attention(backend, device):
    g = torch.Generator().manual_seed(4)
    q = _randn((2, 5, 6, 4, 16), g, device, torch.float32)
    k = _randn((2, 5, 6, 2, 16), g, device, torch.float32)
    v = _randn((2, 5, 6, 2, 16), g, device, torch.float32)
    out = fusekit.na2d(q, k, v, (5, 6), backend=backend)
    full, _ = mqa_reference(q.reshape(2, 30, 4, 16), k.reshape(2, 30, 2, 16), v.reshape(2, 30, 2, 16))
    assert_matches_reference(out.reshape(2, 30, 4, 16), full, torch.float32, "forward", 30)


@pytest.mark.parametrize("backend,device", FUSED)
def test_stride_equal_to_kernel_is_blocked_window_attention(backend, device):
    g = torch.Generator().manual_seed(5)
    q, k, v = (_randn((1, 8, 9, 2, 8), g, device, torch.float32) for _ in range(3))
    out = fusekit.na2d(q, k, v, (4, 3), stride=(4, 3), backend=backend)
    # Swin-style windows: 2 x 3 blocks of 4 x 3 tokens, each attending only within itself
    blocks = lambda t: t.reshape(1, 2, 4, 3, 3, 2, 8).permute(0, 1, 3, 2, 4, 5, 6).reshape(6, 12, 2, 8)
    ref, _ = mqa_reference(blocks(q), blocks(k), blocks(v))
    assert_matches_reference(blocks(out), ref, torch.float32, "forward", 12)


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_reads_strided_qkv_views_of_one_projection(backend, device):
    g = torch.Generator().manual_seed(6)
    qkv = _randn((2, 7, 9, 3, 4, 16), g, device, torch.float32)
    q, k, v = qkv.unbind(3)  # non-contiguous views, unit stride in D
    case = NeighborhoodCase(2, (7, 9), (3, 5), (1, 2), (2, 1), (False, True), 4, 4, 16, False)
    out = _fused(q, k, v, None, case, backend)
    ref, _ = _ref(q, k, v, None, case)
    assert_matches_reference(out, ref, torch.float32, "forward", 16)
    transposed = _randn((2, 9, 7, 4, 16), g, device, torch.float32).transpose(1, 2)  # spatial axes swapped
    out = _fused(transposed, k, v, None, case, backend)
    assert_matches_reference(out, _ref(transposed, k, v, None, case)[0], torch.float32, "forward", 16)


@pytest.mark.parametrize("backend,device", FUSED)
def test_additional_kv_tokens_are_seen_by_every_query_with_gradients(backend, device):
    dtype = torch.float64 if device == "cpu" and backend != "triton" else torch.float32
    g = torch.Generator().manual_seed(7)
    case = NeighborhoodCase(2, (6, 5), (3, 3), (1, 1), (1, 1), (False, False), 4, 2, 16, True)
    q, k, v, rpb = _make(case, device, dtype, 7)
    ek, ev = _randn((2, 3, 2, 16), g, device, dtype), _randn((2, 3, 2, 16), g, device, dtype)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    inputs = [q, k, v, rpb, ek, ev]
    fn = lambda q, k, v, rpb, ek, ev: _fused(q, k, v, rpb, case, backend, additional_keys=ek, additional_values=ev)
    ref_fn = lambda q, k, v, rpb, ek, ev: _ref(q, k, v, rpb, case, additional_keys=ek, additional_values=ev)[0]
    out, grads = op_gradients(fn, inputs, grad_out)
    assert_matches_reference(out, ref_fn(*inputs), dtype, "forward", 16)
    _, lse = _fused(q, k, v, rpb, case, backend, additional_keys=ek, additional_values=ev, return_lse=True)
    assert_matches_reference(lse, _ref(q, k, v, rpb, case, additional_keys=ek, additional_values=ev)[1], dtype,
                             "forward", 16)
    for name, got, want in zip(("q", "k", "v", "rpb", "additional_keys", "additional_values"), grads,
                               reference_gradients(ref_fn, inputs, grad_out)):
        assert_matches_reference(got, want, dtype, "backward", 2048, what=f"grad {name}")


# ----------------------------------------------------------------------------------------------
# unfused ops
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", UNFUSED)
def test_unfused_qk_and_av_and_their_gradients_match_float64_definition(backend, device):
    dtype = torch.float64 if device == "cpu" and backend != "triton" else torch.float32
    for case in _cases(backend, 24, seed=8):
        q, k, v, rpb = _make(case, device, dtype)
        conf = case.conf()
        g = torch.Generator().manual_seed(1)
        grad_attn = torch.randn((case.batch, case.hq, *case.spatial, case.slots), generator=g, dtype=torch.float64)
        grad_attn = grad_attn.to(device)
        attn, grads = op_gradients(lambda q, k, rpb: neighborhood_qk(q, k, **conf, rpb=rpb, scale=0.3,
                                                                     backend=backend), [q, k, rpb], grad_attn)
        ref_fn = lambda q, k, rpb: na_qk_reference(q, k, **conf, scale=0.3, rpb=rpb)
        ref = ref_fn(q, k, rpb)
        invalid = torch.isinf(ref)
        assert torch.equal(torch.isinf(attn.cpu()) & (attn.cpu() < 0), invalid.cpu()), f"-inf slots differ {case}"
        assert_matches_reference(attn.masked_fill(invalid, 0), ref.masked_fill(invalid, 0), dtype, "forward", case.d,
                                 what=f"attn {case}")
        ref_grads = reference_gradients(lambda q, k, rpb: ref_fn(q, k, rpb).masked_fill(invalid, 0), [q, k, rpb],
                                        grad_attn.masked_fill(invalid, 0))
        fwd, bwd = _reductions(case)
        for name, got, want in zip(("grad_q", "grad_k", "grad_rpb"), grads, ref_grads):
            if want is not None:
                red = bwd * (case.batch * 64 if name == "grad_rpb" else 1)
                assert_matches_reference(got, want, dtype, "backward", red, what=f"qk {name} {case}")

        weights = torch.softmax(ref, -1).to(device, dtype)
        grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
        out, (grad_w, grad_v) = op_gradients(lambda w, v: neighborhood_av(w, v, **conf, backend=backend),
                                             [weights, v], grad_out)
        assert_matches_reference(out, na_av_reference(weights, v, **conf), dtype, "forward", fwd, what=f"av {case}")
        ref_gw, ref_gv = reference_gradients(lambda w, v: na_av_reference(w, v, **conf), [weights, v], grad_out)
        assert bool((grad_w.cpu()[invalid.cpu()] == 0).all()), f"grad_attn of invalid slots must be 0 {case}"
        assert_matches_reference(grad_w, ref_gw, dtype, "backward", case.d, what=f"av grad_attn {case}")
        assert_matches_reference(grad_v, ref_gv, dtype, "backward", bwd, what=f"av grad_v {case}")


@pytest.mark.parametrize("backend,device", NATIVE_UNFUSED)
def test_unfused_every_dtype_matches_reference(backend, device):
    for dtype in dtypes_for(backend, device):
        for case in _cases(backend, 6, seed=9, head_dims=(16, 32)):
            q, k, v, rpb = _make(case, device, dtype)
            attn = neighborhood_qk(q, k, **case.conf(), rpb=rpb, scale=case.d ** -0.5, backend=backend)
            assert attn.dtype == dtype
            out = neighborhood_av(attn.softmax(-1), v, **case.conf(), backend=backend)
            assert out.dtype == dtype
            ref, _ = _ref(q, k, v, rpb, case)
            assert_matches_reference(out, ref, dtype, "forward", 4 * max(case.d, case.slots), what=f"{case} {dtype}")


@pytest.mark.parametrize("backend,device", UNFUSED)
def test_unfused_softmax_with_extra_tokens_equals_fused_attention(backend, device):
    g = torch.Generator().manual_seed(10)
    case = NeighborhoodCase(1, (5, 6, 7), (2, 3, 4), (1, 1, 2), (1, 2, 1), (True, False, False), 4, 1, 8, False)
    q, k, v, _ = _make(case, device, torch.float32, 10)
    ek, ev = _randn((1, 2, 1, 8), g, device, torch.float32), _randn((1, 2, 1, 8), g, device, torch.float32)
    attn = fusekit.na3d_qk(q, k, **case.conf(), scale=8 ** -0.5, additional_keys=ek, backend=backend)
    assert attn.shape == (1, 4, 5, 6, 7, 24 + 2)
    out = fusekit.na3d_av(attn.softmax(-1), v, **case.conf(), additional_values=ev, backend=backend)
    ref, _ = _ref(q, k, v, None, case, additional_keys=ek, additional_values=ev)
    assert_matches_reference(out, ref, torch.float32, "forward", 32)


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ----------------------------------------------------------------------------------------------

GRADCHECK_BACKENDS = backend_device_params("neighborhood_attention", backends=("cpu",))


@pytest.mark.parametrize("backend,device", GRADCHECK_BACKENDS)
def test_fused_gradcheck_in_float64(backend, device):
    case = NeighborhoodCase(1, (4, 5), (2, 3), (1, 2), (2, 1), (False, False), 2, 1, 3, True)
    q, k, v, rpb = (t.requires_grad_() for t in _make(case, "cpu", torch.float64))
    assert torch.autograd.gradcheck(lambda *t: _fused(*t, case, backend), (q, k, v, rpb))
    causal = NeighborhoodCase(1, (9,), (4,), (2,), (2,), (True,), 2, 2, 3, False)
    q, k, v, _ = (t.requires_grad_() if t is not None else t for t in _make(causal, "cpu", torch.float64))
    assert torch.autograd.gradcheck(lambda *t: _fused(*t, None, causal, backend), (q, k, v))


@pytest.mark.parametrize("backend,device", backend_device_params("neighborhood_attention_unfused", backends=("cpu",)))
def test_unfused_gradcheck_in_float64(backend, device):
    case = NeighborhoodCase(1, (3, 4, 4), (2, 2, 3), (1, 1, 1), (1, 2, 1), (False, True, False), 2, 1, 3, False)
    q, k, v, _ = (t.requires_grad_() if t is not None else t for t in _make(case, "cpu", torch.float64))
    assert torch.autograd.gradcheck(lambda q, k: neighborhood_qk(q, k, **case.conf(), backend=backend)
                                    .masked_fill(torch.isinf(na_qk_reference(q.detach(), k.detach(), **case.conf())),
                                                 0), (q, k))
    w = torch.rand(1, 2, 3, 4, 4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, v: neighborhood_av(w, v, **case.conf(), backend=backend), (w, v))
    rcase = NeighborhoodCase(1, (6,), (3,), (1,), (2,), (False,), 2, 2, 3, True)
    q, k, _, rpb = (t.requires_grad_() for t in _make(rcase, "cpu", torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, r: neighborhood_qk(q, k, **rcase.conf(), rpb=r, backend=backend),
                                    (q, k, rpb))


_OPCHECK_BACKENDS = backend_device_params("neighborhood_attention", backends=("cpu", "triton"))


@pytest.mark.parametrize("backend,device", _OPCHECK_BACKENDS)
def test_opcheck_passes_for_every_na_op(backend, device):
    suffix = "_triton" if backend == "triton" else ""
    ops = torch.ops.fusekit
    case = NeighborhoodCase(1, (5, 4), (3, 2), (2, 1), (1, 2), (False, False), 2, 1, 8, True)
    q, k, v, rpb = (t.requires_grad_() for t in _make(case, device, torch.float32))
    conf = ([3, 2], [2, 1], [1, 2], [False, False])
    run_opcheck(getattr(ops, f"na_forward{suffix}"), (q, k, v, rpb, *conf, 0.3))
    run_opcheck(getattr(ops, f"na_forward{suffix}"), (q, k, v, None, *conf, 0.3))
    unfused_missing = fusekit.available_backends("neighborhood_attention_unfused")[backend]
    if unfused_missing is None:
        attn = getattr(ops, f"na_qk{suffix}")(q, k, rpb, *conf, 0.3).detach().requires_grad_()
        run_opcheck(getattr(ops, f"na_qk{suffix}"), (q, k, rpb, *conf, 0.3))
        run_opcheck(getattr(ops, f"na_av{suffix}"), (attn, v, *conf))


@pytest.mark.parametrize("backend,device", backend_device_params("neighborhood_attention", backends=("cpu",)))
def test_compiles_with_fullgraph_and_matches_eager(backend, device):
    case = NeighborhoodCase(1, (6, 7), (3, 3), (1, 1), (2, 1), (False, False), 4, 2, 16, True)
    q, k, v, rpb = _make(case, "cpu", torch.float32)
    assert_compiles_fullgraph(lambda q, k, v, r: fusekit.na2d(q, k, v, 3, dilation=(2, 1), rpb=r, backend=backend),
                              q, k, v, rpb)
    ek, ev = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    assert_compiles_fullgraph(lambda q, k, v, ek, ev: fusekit.na2d(q, k, v, 3, additional_keys=ek,
                                                                   additional_values=ev, backend=backend),
                              q, k, v, ek, ev)
    if fusekit.available_backends("neighborhood_attention_unfused")["cpu"] is None:
        assert_compiles_fullgraph(lambda q, k, v: fusekit.na2d_av(fusekit.na2d_qk(q, k, 3, backend="cpu").softmax(-1),
                                                                  v, 3, backend="cpu"), q, k, v)


# ----------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument and the rule
# ----------------------------------------------------------------------------------------------

def _bad_calls():
    q, k, v = torch.randn(1, 8, 8, 4, 16), torch.randn(1, 8, 8, 2, 16), torch.randn(1, 8, 8, 2, 16)
    rpb = torch.randn(4, 5, 5)
    return [
        ("kernel_size \\* dilation must not exceed", lambda: fusekit.na2d(q, k, v, 3, dilation=3)),
        ("kernel_size \\* dilation must not exceed", lambda: fusekit.na2d(q, k, v, (9, 3))),
        ("1 <= stride <= kernel_size", lambda: fusekit.na2d(q, k, v, 3, stride=4)),
        ("kernel_size must be >= 2", lambda: fusekit.na2d(q, k, v, 1)),
        ("only defined for non-causal", lambda: fusekit.na2d(q, k, v, 3, is_causal=(True, False), rpb=rpb)),
        ("rpb must have shape", lambda: fusekit.na2d(q, k, v, 3, rpb=torch.randn(4, 3, 3))),
        ("multiple of the KV head count", lambda: fusekit.na2d(q, torch.randn(1, 8, 8, 3, 16),
                                                               torch.randn(1, 8, 8, 3, 16), 3)),
        ("must be a 5-D tensor", lambda: fusekit.na2d(q[0], k[0], v[0], 3)),
        ("must be a 4-D, 5-D or 6-D", lambda: fusekit.ops.na.neighborhood_attention(torch.randn(2, 3), k, v, 3)),
        ("tuple of 2", lambda: fusekit.na2d(q, k, v, (3, 3, 3))),
        ("dtypes must match", lambda: fusekit.na2d(q, k.double(), v, 3)),
        ("floating point", lambda: fusekit.na2d(q.int(), k.int(), v.int(), 3)),
        ("head dim must be between", lambda: fusekit.na2d(torch.randn(1, 8, 8, 1, 300), torch.randn(1, 8, 8, 1, 300),
                                                          torch.randn(1, 8, 8, 1, 300), 3)),
        ("head dims must match", lambda: fusekit.na2d(torch.randn(1, 8, 8, 4, 8), k, v, 3)),
        ("must be given together", lambda: fusekit.na2d(q, k, v, 3, additional_keys=torch.randn(1, 2, 2, 16))),
        ("additional_keys must have shape", lambda: fusekit.na2d(q, k, v, 3, additional_keys=torch.randn(1, 2, 4, 16),
                                                                 additional_values=torch.randn(1, 2, 4, 16))),
        ("batch and spatial shape", lambda: fusekit.na2d(q, k[:, :7], v[:, :7], 3)),
        ("last dim must be prod\\(kernel_size\\)", lambda: fusekit.na2d_av(torch.randn(1, 4, 8, 8, 8), v, 3)),
        ("backend 'cuda' cannot run", lambda: fusekit.na2d(q, k, v, 3, backend="cuda")),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_a_clear_error_naming_the_rule(index):
    pattern, call = _bad_calls()[index]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert info.match(pattern)
