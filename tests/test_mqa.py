"""Multi-query / grouped-query attention (DESIGN.md 5.2): every backend against the float64 definition."""
import pytest
import torch
import torch.nn.functional as F

import fusekit
from fusekit.ops.mqa import multi_query_attention, multi_query_decode
from fusekit.testing.cases import AttentionCase, random_attention_cases
from fusekit.testing.checks import (assert_compiles_fullgraph, assert_matches_reference, op_gradients,
                                    poison_allocator, reference_gradients, run_opcheck)
from fusekit.testing.reference import mqa_decode_reference, mqa_reference

from backend_matrix import backend_device_params, dtypes_for

BACKENDS = backend_device_params("multi_query_attention", backends=("cpu", "triton", "reference", "cuda"))
NATIVE_BACKENDS = backend_device_params("multi_query_attention", backends=("cpu", "triton"))
DECODE_BACKENDS = backend_device_params("multi_query_decode")
NATIVE_DECODE_BACKENDS = backend_device_params("multi_query_decode", backends=("cpu", "cuda", "triton"))


@pytest.fixture(autouse=True)
def _gpu_verification_tags(request, record_property):
    """Tell benchmarks/gpu_suite.py which (op, GPU backend) a test on CUDA tensors speaks for."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec else {}
    if params.get("device") == "cuda" and params.get("backend") in ("cuda", "triton"):
        op = "multi_query_decode" if "decode" in request.node.name else "multi_query_attention"
        record_property("fusekit_op", op)
        record_property("fusekit_backend", params["backend"])


def _case_count(backend: str, full: int) -> int:
    return max(2, full // 6) if backend == "triton" else full


def _randn(shape, gen, device, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def _make(case: AttentionCase, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = _randn((case.batch, case.lq, case.hq, case.d), g, device, dtype)
    k = _randn((case.batch, case.lk, case.hkv, case.d), g, device, dtype)
    v = _randn((case.batch, case.lk, case.hkv, case.d), g, device, dtype)
    return q, k, v


def _attention(q, k, v, case, backend, **kw):
    return multi_query_attention(q, k, v, causal=case.causal, window=case.window, backend=backend, **kw)


def _ref(q, k, v, case, **kw):
    return mqa_reference(q, k, v, case.causal, case.window[0], case.window[1], **kw)


def _assert_lse(lse, ref_lse, dtype, reduction, what):
    """Finite entries within tolerance; -inf exactly where the reference row sees no key."""
    empty = torch.isinf(ref_lse.cpu())
    assert torch.equal(torch.isinf(lse.cpu()) & (lse.cpu() < 0), empty), f"{what}: -inf rows differ from the reference"
    assert_matches_reference(lse.cpu().masked_fill(empty, 0), ref_lse.cpu().masked_fill(empty, 0), dtype, "forward",
                             reduction, what=what)


def _head_group_reduction(case):
    return max(case.d, case.lk)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_and_gradients_match_float64_definition_on_random_cases(backend, device):
    dtype = torch.float64 if device == "cpu" and backend != "triton" else torch.float32
    for case in random_attention_cases(_case_count(backend, 30), seed=1):
        q, k, v = _make(case, device, dtype)
        grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
        poison_allocator(device)
        out, grads = op_gradients(_attention, [q, k, v], grad_out, case, backend)
        _, lse = _attention(q, k, v, case, backend, return_lse=True)
        ref, ref_lse = _ref(q, k, v, case)
        ref_grads = reference_gradients(lambda *t: _ref(*t, case)[0], [q, k, v], grad_out)
        red = _head_group_reduction(case)
        assert_matches_reference(out, ref, dtype, "forward", red, what=f"output {case}")
        _assert_lse(lse, ref_lse, dtype, case.d, f"lse {case}")
        for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
            assert_matches_reference(got, want, dtype, "backward", red * case.hq // case.hkv, what=f"{name} {case}")


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
def test_every_dtype_matches_reference_within_its_tolerance(backend, device):
    for dtype in dtypes_for(backend, device):
        for case in random_attention_cases(_case_count(backend, 8), seed=2, head_dims=(16, 64, 128)):
            q, k, v = _make(case, device, dtype)
            grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
            out, grads = op_gradients(_attention, [q, k, v], grad_out, case, backend)
            ref = _ref(q, k, v, case)[0]
            ref_grads = reference_gradients(lambda *t: _ref(*t, case)[0], [q, k, v], grad_out)
            red = _head_group_reduction(case)
            assert out.dtype == dtype
            assert_matches_reference(out, ref, dtype, "forward", red, what=f"output {case} {dtype}")
            for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
                assert got.dtype == dtype
                assert_matches_reference(got, want, dtype, "backward", red * case.hq // case.hkv,
                                         what=f"{name} {case} {dtype}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_head_dims_up_to_256_match_reference(backend, device):
    dims = (40, 256) if backend == "triton" else (1, 2, 7, 96, 100, 128, 200, 256)
    for d in dims:
        case = AttentionCase(batch=1, lq=9, lk=13, hq=4, hkv=2, d=d, causal=True, window=(-1, -1))
        q, k, v = _make(case, device, torch.float32)
        grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
        out, grads = op_gradients(_attention, [q, k, v], grad_out, case, backend)
        ref_grads = reference_gradients(lambda *t: _ref(*t, case)[0], [q, k, v], grad_out)
        assert_matches_reference(out, _ref(q, k, v, case)[0], torch.float32, "forward", d, what=f"output D={d}")
        for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
            assert_matches_reference(got, want, torch.float32, "backward", 4 * d, what=f"{name} D={d}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_packed_variable_length_batch_equals_each_sequence_alone(backend, device):
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [5, 0, 17, 1, 9], [7, 3, 17, 0, 4]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    for causal, window in ((False, None), (True, None), (True, (4, None)), (False, (2, 3))):
        q = _randn((sum(lens_q), 6, 24), g, device, torch.float32)
        k = _randn((sum(lens_k), 2, 24), g, device, torch.float32)
        v = _randn((sum(lens_k), 2, 24), g, device, torch.float32)
        grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
        wl, wr = fusekit.ops.mqa.resolve_window(window)

        def fn(q, k, v):
            return multi_query_attention(q, k, v, causal=causal, window=window, cu_seqlens=(cu_q, cu_k),
                                         max_seqlen=(max(lens_q), max(lens_k)), backend=backend)

        def ref_fn(q, k, v):
            return mqa_reference(q, k, v, causal, wl, wr, None, cu_q, cu_k)[0]

        out, grads = op_gradients(fn, [q, k, v], grad_out)
        ref_grads = reference_gradients(ref_fn, [q, k, v], grad_out)
        assert_matches_reference(out, ref_fn(q, k, v), torch.float32, "forward", 24, what=f"varlen causal={causal}")
        for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
            assert_matches_reference(got, want, torch.float32, "backward", 3 * 24, what=f"varlen {name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_q_k_v_from_a_packed_qkv_projection_are_read_correctly(backend, device):
    g = torch.Generator().manual_seed(4)
    hq, hkv, d = 8, 2, 32
    qkv = _randn((2, 11, hq + 2 * hkv, d), g, device, torch.float32)
    q, k, v = qkv.split([hq, hkv, hkv], dim=2)
    assert not q.is_contiguous() and not k.is_contiguous()
    case = AttentionCase(2, 11, 11, hq, hkv, d, True, (-1, -1))
    out = _attention(q, k, v, case, backend)
    assert_matches_reference(out, _ref(q, k, v, case)[0], torch.float32, "forward", d, what="strided q/k/v")
    qt = _randn((2, hq, 11, d), g, device, torch.float32).transpose(1, 2)  # SDPA layout viewed heads-last
    out = _attention(qt, k, v, case, backend)
    assert_matches_reference(out, _ref(qt, k, v, case)[0], torch.float32, "forward", d, what="transposed q")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rows_that_see_no_key_give_zero_output_and_minus_infinity_lse(backend, device):
    q, k, v = _make(AttentionCase(1, 6, 2, 2, 1, 16, True, (-1, -1)), device, torch.float32)
    out, lse = multi_query_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    # Lq = 6 > Lk = 2, bottom-right aligned: query i sees keys j <= i - 4, so rows 0..3 see nothing
    assert torch.all(out[:, :4] == 0)
    assert torch.all(torch.isneginf(lse[:, :4])) and torch.all(torch.isfinite(lse[:, 4:]))
    q.requires_grad_(True)
    grad_q, = torch.autograd.grad(multi_query_attention(q, k, v, causal=True, backend=backend).sum(), q)
    assert torch.all(grad_q[:, :4] == 0) and torch.isfinite(grad_q).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_equals_sdpa_with_enable_gqa(backend, device):
    q, k, v = _make(AttentionCase(2, 33, 33, 8, 2, 64, True, (-1, -1)), device, torch.float32)
    for causal in (False, True):
        out = multi_query_attention(q, k, v, causal=causal, backend=backend)
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out, sdpa, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
def test_key_and_value_gradients_accumulate_per_kv_head_with_many_query_heads(backend, device):
    # MQA with 16 query heads per KV head: dK/dV sum over all 16 heads' contributions
    case = AttentionCase(1, 12, 20, 16, 1, 16, False, (-1, -1))
    q, k, v = _make(case, device, torch.float32)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    _, grads = op_gradients(_attention, [q, k, v], grad_out, case, backend)
    ref_grads = reference_gradients(lambda *t: _ref(*t, case)[0], [q, k, v], grad_out)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    for name, got, want in zip(("grad_k", "grad_v"), grads[1:], ref_grads[1:]):
        assert_matches_reference(got, want, torch.float32, "backward", 16 * 20, what=name)


def test_gradcheck_float64_on_cpu_kernels():
    if fusekit.available_backends("multi_query_attention")["cpu"] is not None:
        pytest.skip("cpu backend unavailable")
    g = torch.Generator().manual_seed(5)
    for causal, window in ((False, None), (True, (2, None)), (False, (1, 1))):
        q = torch.randn(2, 4, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, 6, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
        v = torch.randn(2, 6, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda q, k, v: multi_query_attention(q, k, v, causal=causal, window=window, backend="cpu"), (q, k, v))


def _opcheck_inputs(device, requires_grad):
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 5, 4, 8, generator=g).to(device).requires_grad_(requires_grad)
    k = torch.randn(2, 7, 2, 8, generator=g).to(device).requires_grad_(requires_grad)
    v = torch.randn(2, 7, 2, 8, generator=g).to(device).requires_grad_(requires_grad)
    return q, k, v


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_passes_for_forward_and_backward_ops(backend, device, requires_grad):
    suffix = "_triton" if backend == "triton" else ""
    q, k, v = _opcheck_inputs(device, requires_grad)
    conf = (None, None, 5, 7, 0.3, True, 3, -1)
    run_opcheck(getattr(torch.ops.fusekit, f"mqa_forward{suffix}").default, (q, k, v, *conf))
    out, lse = getattr(torch.ops.fusekit, f"mqa_forward{suffix}")(q.detach(), k.detach(), v.detach(), *conf)
    run_opcheck(getattr(torch.ops.fusekit, f"mqa_backward{suffix}").default,
                (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, *conf))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    run_opcheck(getattr(torch.ops.fusekit, f"mqa_forward{suffix}").default,
                (q[0], k[0, :5], v[0, :5], cu, cu, 3, 3, 0.3, False, -1, -1))


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
def test_compiles_fullgraph_with_no_graph_break(backend, device):
    q, k, v = _opcheck_inputs(device, False)

    def fn(q, k, v):
        return multi_query_attention(q, k, v, causal=True, window=(3, None), backend=backend) * 2

    assert_compiles_fullgraph(fn, q, k, v)


def test_lse_is_returned_but_not_differentiable():
    q, k, v = _opcheck_inputs("cpu", True)
    out, lse = multi_query_attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# decoding against a KV cache
# ----------------------------------------------------------------------------------------------

def _decode_inputs(device, dtype, b=3, n=1, hq=8, hkv=2, d=32, lmax=50, seqlens=(0, 17, 44), seed=7):
    g = torch.Generator().manual_seed(seed)
    q = _randn((b, n, hq, d), g, device, dtype)
    k_cache = _randn((b, lmax, hkv, d), g, device, dtype)
    v_cache = _randn((b, lmax, hkv, d), g, device, dtype)
    k_new = _randn((b, n, hkv, d), g, device, dtype)
    v_new = _randn((b, n, hkv, d), g, device, dtype)
    return q, k_cache, v_cache, torch.tensor(seqlens, dtype=torch.int32, device=device), k_new, v_new


@pytest.mark.parametrize("backend,device", DECODE_BACKENDS)
@pytest.mark.parametrize("n,append", [(1, False), (1, True), (4, True), (3, False)])
def test_decode_equals_full_attention_over_the_cached_sequence(backend, device, n, append):
    q, kc, vc, seqlens, kn, vn = _decode_inputs(device, torch.float32, n=n, seqlens=(3, 17, 44))
    kn, vn = (kn, vn) if append else (None, None)
    ref_out, ref_lse, k_after, v_after = mqa_decode_reference(q, kc, vc, seqlens, kn, vn)
    splits = (0, 1, 3) if backend != "reference" else (0,)
    for num_splits in splits:
        kc_run, vc_run = kc.clone(), vc.clone()
        poison_allocator(device)
        out, lse = multi_query_decode(q, kc_run, vc_run, seqlens, kn, vn, num_splits=num_splits, return_lse=True,
                                      backend=backend)
        assert_matches_reference(out, ref_out, torch.float32, "forward", 64, what=f"decode splits={num_splits}")
        _assert_lse(lse, ref_lse, torch.float32, 32, f"decode lse splits={num_splits}")
        torch.testing.assert_close(kc_run.double(), k_after, atol=0, rtol=0)
        torch.testing.assert_close(vc_run.double(), v_after, atol=0, rtol=0)
    # the appended sequence through the training op gives the same answer (one sequence at a time)
    lengths = (seqlens + (n if append else 0)).tolist()
    for b, length in enumerate(lengths):
        full = multi_query_attention(q[b:b + 1], k_after[b:b + 1, :length].float(), v_after[b:b + 1, :length].float(),
                                     causal=True, backend="reference")
        torch.testing.assert_close(out[b:b + 1], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", NATIVE_DECODE_BACKENDS)
def test_decode_every_dtype_window_and_head_layout_matches_reference(backend, device):
    for dtype in dtypes_for(backend, device):
        for hq, hkv, d, window in ((16, 1, 64, None), (8, 8, 24, (5, None)), (12, 4, 128, (9, 0)),
                                   (32, 2, 100, None)):
            q, kc, vc, seqlens, kn, vn = _decode_inputs(device, dtype, n=2, hq=hq, hkv=hkv, d=d, seed=hq + d)
            ref_out, _, k_after, _ = mqa_decode_reference(q, kc, vc, seqlens, kn, vn, window_left=-1 if window is None
                                                          else window[0])
            out = multi_query_decode(q, kc, vc, seqlens, kn, vn, window=window, backend=backend)
            assert out.dtype == dtype
            assert_matches_reference(out, ref_out, dtype, "forward", 64, what=f"decode {dtype} {hq}/{hkv} d{d}")
            torch.testing.assert_close(kc.double(), k_after, atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", NATIVE_DECODE_BACKENDS)
def test_decode_op_passes_opcheck(backend, device):
    suffix = "_triton" if backend == "triton" else ""
    q, kc, vc, seqlens, kn, vn = _decode_inputs(device, torch.float32, n=2, seqlens=(0, 5, 40))
    run_opcheck(getattr(torch.ops.fusekit, f"mqa_decode{suffix}").default,
                (q, kc, vc, seqlens, kn, vn, 0.2, True, -1, -1, 0))
    run_opcheck(getattr(torch.ops.fusekit, f"mqa_decode{suffix}").default,
                (q, kc, vc, seqlens, None, None, 0.2, True, 4, -1, 2))


@pytest.mark.parametrize("backend,device", NATIVE_DECODE_BACKENDS)
def test_decode_compiles_fullgraph_and_mutates_the_cache(backend, device):
    q, kc, vc, seqlens, kn, vn = _decode_inputs(device, torch.float32)
    ref_out, _, k_after, v_after = mqa_decode_reference(q, kc, vc, seqlens, kn, vn)
    torch._dynamo.reset()
    step = torch.compile(lambda q, kc, vc, s, kn, vn: multi_query_decode(q, kc, vc, s, kn, vn, backend=backend),
                         fullgraph=True)
    out = step(q, kc, vc, seqlens, kn, vn)
    assert_matches_reference(out, ref_out, torch.float32, "forward", 64, what="compiled decode")
    torch.testing.assert_close(kc.double(), k_after, atol=0, rtol=0)
    torch.testing.assert_close(vc.double(), v_after, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

def test_bad_attention_arguments_raise_clear_errors():
    q, k, v = _opcheck_inputs("cpu", False)
    with pytest.raises(ValueError, match="multiple of the KV head count"):
        multi_query_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="4-D tensor"):
        multi_query_attention(q[0], k, v)
    with pytest.raises(TypeError, match="dtype"):
        multi_query_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="same shape"):
        multi_query_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="head dims must match"):
        multi_query_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="between 1 and 256"):
        multi_query_attention(torch.randn(1, 2, 2, 300), torch.randn(1, 2, 1, 300), torch.randn(1, 2, 1, 300))
    with pytest.raises(ValueError, match="window"):
        multi_query_attention(q, k, v, window=3)
    with pytest.raises(ValueError, match="batch"):
        multi_query_attention(q, k[:1], v[:1])
    with pytest.raises(TypeError, match="floating point"):
        multi_query_attention(q.int(), k.int(), v.int())
    with pytest.raises(fusekit.BackendError, match="no CUDA C.. training"):
        multi_query_attention(q, k, v, backend="cuda")
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="total token count"):
        multi_query_attention(q[0], k[0], v[0], cu_seqlens=cu)
    with pytest.raises(ValueError, match="non-decreasing"):
        multi_query_attention(q[0], k[0], v[0], cu_seqlens=(torch.tensor([0, 4, 2, 5], dtype=torch.int32),) * 2)
    with pytest.raises(ValueError, match="max_seqlen"):
        multi_query_attention(q[0, :5], k[0, :5], v[0, :5], cu_seqlens=torch.tensor([0, 1, 5]), max_seqlen=3)


def test_bad_decode_arguments_raise_clear_errors():
    q, kc, vc, seqlens, kn, vn = _decode_inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match="too short"):
        multi_query_decode(q, kc, vc, torch.tensor([0, 17, 50], dtype=torch.int32), kn, vn)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        multi_query_decode(q, kc, vc, torch.tensor([0, 17, 51], dtype=torch.int32))
    with pytest.raises(ValueError, match=">= 0"):
        multi_query_decode(q, kc, vc, torch.tensor([0, -1, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of the KV head count"):
        multi_query_decode(q[:, :, :3], kc, vc, seqlens)
    with pytest.raises(TypeError, match="dtype"):
        multi_query_decode(q.double(), kc, vc, seqlens)
    with pytest.raises(ValueError, match="together"):
        multi_query_decode(q, kc, vc, seqlens, kn, None)
    with pytest.raises(ValueError, match=r"k_new must have shape \[B, n, Hkv, D\]"):
        multi_query_decode(q, kc, vc, seqlens, kn[:, :, :1], vn[:, :, :1])
    with pytest.raises(ValueError, match="cache_seqlens must be a 1-D"):
        multi_query_decode(q, kc, vc, seqlens[:2])
    with pytest.raises(TypeError, match="cache_seqlens must be int"):
        multi_query_decode(q, kc, vc, seqlens.float())
    with pytest.raises(ValueError, match="unit stride"):
        multi_query_decode(q, kc.transpose(2, 3), vc.transpose(2, 3), seqlens)
    with pytest.raises(RuntimeError, match="inference-only"):
        multi_query_decode(q.requires_grad_(True), kc, vc, seqlens)
