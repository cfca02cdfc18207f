"""Depthwise convolution (DESIGN.md 5.3): every backend against the float64 definition."""
import pytest
import torch
import torch.nn.functional as F

import fusekit
from fusekit.ops.depthwise import depthwise_conv2d_explicit
from fusekit.testing.cases import random_depthwise_cases
from fusekit.testing.checks import (assert_compiles_fullgraph, assert_matches_reference, op_gradients,
                                    poison_allocator, reference_gradients, run_opcheck)
from fusekit.testing.reference import (depthwise_conv1d_reference, depthwise_conv2d_reference,
                                       inception_dwconv2d_reference)

from backend_matrix import backend_device_params, dtypes_for

BACKENDS = backend_device_params("depthwise_conv2d")
NATIVE_BACKENDS = backend_device_params("depthwise_conv2d", backends=("cpu", "cuda", "triton"))


def _make(case, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=g, dtype=torch.float64)
    w = torch.randn(case.c, 1, case.kh, case.kw, generator=g, dtype=torch.float64)
    b = torch.randn(case.c, generator=g, dtype=torch.float64) if case.bias else None
    x, w = x.to(device, dtype), w.to(device, dtype)
    b = b.to(device, dtype) if b is not None else None
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _case_count(backend):
    return 6 if backend == "triton" else 40


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_and_gradients_match_float64_definition_on_random_cases(backend, device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    for case in random_depthwise_cases(_case_count(backend), seed=1):
        x, w, b = _make(case, device, dtype)
        grad_out = torch.randn(case.n, case.c, *case.out_size(), dtype=torch.float64, device=device)
        poison_allocator(device)
        out, grads = op_gradients(depthwise_conv2d_explicit, [x, w, b], grad_out, case.stride, case.padding,
                                  case.dilation, backend)
        ref = depthwise_conv2d_reference(x, w, b, case.stride, case.padding, case.dilation)
        ref_grads = reference_gradients(depthwise_conv2d_reference, [x, w, b], grad_out, case.stride, case.padding,
                                        case.dilation)
        taps = case.kh * case.kw
        assert_matches_reference(out, ref, dtype, "forward", taps, what=f"output {case}")
        assert_matches_reference(grads[0], ref_grads[0], dtype, "backward", taps, what=f"grad_x {case}")
        red = case.n * out.shape[2] * out.shape[3]
        assert_matches_reference(grads[1], ref_grads[1], dtype, "backward", red, what=f"grad_weight {case}")
        if case.bias:
            assert_matches_reference(grads[2], ref_grads[2], dtype, "backward", red, what=f"grad_bias {case}")


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
def test_every_dtype_matches_reference_within_its_tolerance(backend, device):
    for dtype in dtypes_for(backend, device):
        for case in random_depthwise_cases(3 if backend == "triton" else 8, seed=2, kernels=(3, 7, 4)):
            x, w, b = _make(case, device, dtype, seed=3)
            grad_out = torch.randn(case.n, case.c, *case.out_size(), device=device)
            out, grads = op_gradients(depthwise_conv2d_explicit, [x, w, b], grad_out, case.stride, case.padding,
                                      case.dilation, backend)
            assert out.dtype == dtype
            ref = depthwise_conv2d_reference(x, w, b, case.stride, case.padding, case.dilation)
            ref_grads = reference_gradients(depthwise_conv2d_reference, [x, w, b], grad_out, case.stride,
                                            case.padding, case.dilation)
            taps = case.kh * case.kw
            red = case.n * out.shape[2] * out.shape[3]
            assert_matches_reference(out, ref, dtype, "forward", taps, what=f"output {case}")
            assert_matches_reference(grads[0], ref_grads[0], dtype, "backward", taps, what=f"grad_x {case}")
            assert_matches_reference(grads[1], ref_grads[1], dtype, "backward", red, what=f"grad_weight {case}")


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
@pytest.mark.parametrize("shape,kernel", [((1, 3, 9, 11), (31, 31)), ((2, 5, 20, 12), (51, 5)),
                                          ((1, 2, 7, 70), (5, 63)), ((1, 17, 6, 6), (13, 13))],
                         ids=["31x31-larger-than-input", "slak-51x5", "1x63-band", "13x13-tiny-map"])
def test_large_and_rectangular_kernels_with_same_padding(backend, device, shape, kernel):
    if backend == "triton" and kernel[0] * kernel[1] > 300 and device == "cpu":
        pytest.skip("interpreter: too slow for this many taps")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(shape[1], 1, *kernel, generator=g, dtype=torch.float64).to(device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    x, w = x.to(dtype), w.to(dtype)
    out = fusekit.depthwise_conv2d(x, w, None, padding="same", backend=backend)
    assert out.shape == x.shape
    assert_matches_reference(out, depthwise_conv2d_reference(x, w, None, padding="same"), dtype, "forward",
                             kernel[0] * kernel[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("padding", [0, 2, (1, 3), "same", "valid"], ids=str)
@pytest.mark.parametrize("kernel", [(3, 3), (4, 6), (2, 5)], ids=str)
def test_padding_forms_follow_pytorch_semantics(backend, device, padding, kernel):
    torch.manual_seed(5)
    x = torch.randn(2, 6, 11, 10, dtype=torch.float64, device=device)
    w = torch.randn(6, 1, *kernel, dtype=torch.float64, device=device)
    b = torch.randn(6, dtype=torch.float64, device=device)
    expected = F.conv2d(x, w, b, padding=padding, groups=6)
    out = fusekit.depthwise_conv2d(x, w, b, padding=padding, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_output_keeps_input_memory_format_and_accepts_non_contiguous_input(backend, device):
    torch.manual_seed(6)
    base = torch.randn(2, 8, 13, 9, dtype=torch.float64, device=device)
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64, device=device)
    cl = base.contiguous(memory_format=torch.channels_last)
    out_cl = fusekit.depthwise_conv2d(cl, w, padding=1, backend=backend)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    out = fusekit.depthwise_conv2d(base, w, padding=1, backend=backend)
    assert out.is_contiguous()
    strided = torch.randn(2, 8, 26, 9, dtype=torch.float64, device=device)[:, :, ::2]  # neither layout
    sliced = fusekit.depthwise_conv2d(strided, w, padding=1, backend=backend)
    torch.testing.assert_close(sliced, F.conv2d(strided, w, padding=1, groups=8), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_cl, out, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_conv1d_matches_reference_including_transposed_nlc_input(backend, device):
    torch.manual_seed(7)
    for (n, c, length, k, s, d, pad) in [(2, 5, 37, 7, 1, 1, "same"), (1, 16, 64, 31, 1, 2, "same"),
                                         (3, 3, 20, 4, 2, 1, 3), (1, 7, 9, 2, 1, 3, "valid")]:
        x = torch.randn(n, c, length, dtype=torch.float64, device=device)
        w = torch.randn(c, 1, k, dtype=torch.float64, device=device)
        b = torch.randn(c, dtype=torch.float64, device=device)
        grad_out = torch.randn_like(depthwise_conv1d_reference(x, w, b, s, pad, d))
        out, grads = op_gradients(fusekit.depthwise_conv1d, [x, w, b], grad_out, s, pad, d, backend)
        ref = depthwise_conv1d_reference(x, w, b, s, pad, d)
        ref_grads = reference_gradients(depthwise_conv1d_reference, [x, w, b], grad_out, s, pad, d)
        assert_matches_reference(out, ref, torch.float64, what="conv1d output")
        for g, r in zip(grads, ref_grads):
            assert_matches_reference(g, r, torch.float64, "backward", length * n, what="conv1d gradient")
    nlc = torch.randn(2, 50, 12, dtype=torch.float64, device=device)  # [N, L, C] as conformer blocks hold it
    w = torch.randn(12, 1, 15, dtype=torch.float64, device=device)
    out = fusekit.depthwise_conv1d(nlc.transpose(1, 2), w, padding="same", backend=backend)
    torch.testing.assert_close(out, F.conv1d(nlc.transpose(1, 2), w, padding="same", groups=12))


def test_gradcheck_float64_cpu_kernels():
    torch.manual_seed(8)
    for (shape, k, stride, pad, dil, cl) in [((2, 3, 7, 6), (3, 2), (1, 1), (1, 0, 2, 1), (1, 2), False),
                                            ((1, 17, 5, 8), (4, 3), (2, 3), (2, 1, 0, 3), (1, 1), True)]:
        x = torch.randn(*shape, dtype=torch.float64)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        w = torch.randn(shape[1], 1, *k, dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, b: depthwise_conv2d_explicit(x, w, b, stride, pad, dil, "cpu"), (x, w, b))


def _opcheck_args(device, dtype, requires_grad, channels_last):
    torch.manual_seed(9)
    x = torch.randn(2, 5, 9, 8, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 1, 3, 4, dtype=dtype, device=device)
    b = torch.randn(5, dtype=dtype, device=device)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    return x, w, b


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_passes_for_forward_and_backward_ops(backend, device, requires_grad, channels_last):
    suffix = "_triton" if backend == "triton" else ""
    dtype = torch.float64 if device == "cpu" else torch.float32
    x, w, b = _opcheck_args(device, dtype, requires_grad, channels_last)
    conf = ([2, 1], [1, 2, 0, 1], [1, 2])
    ops = torch.ops.fusekit
    run_opcheck(getattr(ops, f"depthwise_conv2d{suffix}").default, (x, w, b, *conf))
    y = getattr(ops, f"depthwise_conv2d{suffix}")(x.detach(), w.detach(), b.detach(), *conf)
    g = torch.randn_like(y)
    run_opcheck(getattr(ops, f"depthwise_conv2d_backward_input{suffix}").default, (g, x.detach(), w.detach(), *conf))
    run_opcheck(getattr(ops, f"depthwise_conv2d_backward_weight{suffix}").default, (g, x.detach(), [3, 4], *conf))


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("Inductor does not run interpreter-mode Triton kernels on CPU tensors")
    x, w, b = _opcheck_args(device, torch.float32, False, True)

    def block(x, w, b):
        return torch.relu(fusekit.depthwise_conv2d(x, w, b, padding="same", backend=backend)) * 2

    assert_compiles_fullgraph(block, x, w, b)


@pytest.mark.gpu
def test_cuda_graph_capture_replays_on_current_stream():
    torch.manual_seed(10)
    x = torch.randn(4, 32, 28, 28, device="cuda")
    w = torch.randn(32, 1, 7, 7, device="cuda")
    for backend in ("cuda", "triton"):
        if fusekit.available_backends("depthwise_conv2d")[backend] is not None:
            continue
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fusekit.depthwise_conv2d(x, w, padding=3, backend=backend)  # warm up on a side stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fusekit.depthwise_conv2d(x, w, padding=3, backend=backend)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, F.conv2d(x, w, padding=3, groups=32), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# InceptionNeXt token mixer
# ---------------------------------------------------------------------------------------------

INCEPTION_BACKENDS = backend_device_params("inception_dwconv2d", backends=("cpu", "cuda", "reference"))


@pytest.mark.parametrize("backend,device", INCEPTION_BACKENDS)
@pytest.mark.parametrize("c,gc,k,band", [(96, 12, 3, 11), (40, 10, 3, 9), (7, 1, 5, 3), (24, 8, 3, 11), (5, 0, 3, 11)],
                         ids=["tiny-C96", "atto-ratio-0.25", "odd-channels", "no-identity", "no-branches"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inception_dwconv2d_matches_split_conv_cat_with_gradients(backend, device, c, gc, k, band, channels_last):
    torch.manual_seed(11)
    x = torch.randn(2, c, 13, 10, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(gc, 1, k, k), torch.randn(gc), torch.randn(gc, 1, 1, band), torch.randn(gc),
          torch.randn(gc, 1, band, 1), torch.randn(gc)]
    ws = [t.double().to(device) for t in ws]
    grad_out = torch.randn(2, c, 13, 10, dtype=torch.float64, device=device)
    out, grads = op_gradients(fusekit.inception_dwconv2d, [x, *ws], grad_out, backend=backend)
    ref = inception_dwconv2d_reference(x, *ws)
    ref_grads = reference_gradients(inception_dwconv2d_reference, [x, *ws], grad_out)
    assert_matches_reference(out, ref, torch.float64)
    if channels_last and c > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    for g, r in zip(grads, ref_grads):
        assert_matches_reference(g, r, torch.float64, "backward", 2 * 13 * 10)


@pytest.mark.parametrize("backend,device", backend_device_params("inception_dwconv2d", backends=("cpu", "cuda")))
def test_inception_ops_pass_opcheck(backend, device):
    torch.manual_seed(12)
    x = torch.randn(2, 20, 9, 7, dtype=torch.float64, device=device, requires_grad=True)
    ws = [torch.randn(4, 1, 3, 3), torch.randn(4), torch.randn(4, 1, 1, 5), torch.randn(4),
          torch.randn(4, 1, 5, 1), None]
    ws = [t.double().to(device).requires_grad_(True) if t is not None else None for t in ws]
    run_opcheck(torch.ops.fusekit.inception_dwconv2d.default, (x, *ws))
    g = torch.randn_like(x)
    run_opcheck(torch.ops.fusekit.inception_dwconv2d_backward.default,
                (g, x.detach(), ws[0].detach(), ws[2].detach(), ws[4].detach(), [True, True]))


# ---------------------------------------------------------------------------------------------
# backend selection and errors
# ---------------------------------------------------------------------------------------------

def test_auto_picks_cpu_kernels_for_cpu_tensors_and_context_manager_overrides():
    if fusekit.available_backends("depthwise_conv2d")["cpu"] is not None:
        pytest.skip("C++ extension not built")
    from fusekit.ops.depthwise import DEPTHWISE_BACKENDS, DepthwiseCase
    case = DepthwiseCase("cpu", torch.float32)
    assert DEPTHWISE_BACKENDS.select(case, "cpu", None) == "cpu"
    with fusekit.use_backend("reference"):
        assert DEPTHWISE_BACKENDS.select(case, "cpu", None) == "reference"
        assert DEPTHWISE_BACKENDS.select(case, "cpu", "cpu") == "cpu"


def test_auto_never_prefers_unverified_gpu_kernels_over_pytorch():
    from fusekit import backends
    from fusekit.ops.depthwise import DEPTHWISE_BACKENDS, DepthwiseCase
    ops = DEPTHWISE_BACKENDS
    always_ok = backends.OpBackends(op="depthwise_conv2d", reasons={k: (lambda case: []) for k in ops.reasons},
                                    availability=ops.availability)
    saved = dict(backends._VERIFIED)
    try:
        backends._VERIFIED.clear()
        assert always_ok.select(DepthwiseCase("cuda", torch.float16), "cuda", None) == "reference"
        backends._VERIFIED["depthwise_conv2d"] = {"triton": {"passed": True}}
        assert always_ok.select(DepthwiseCase("cuda", torch.float16), "cuda", None) == "triton"
        backends._VERIFIED["depthwise_conv2d"]["cuda"] = {"passed": True}
        assert always_ok.select(DepthwiseCase("cuda", torch.float16), "cuda", None) == "cuda"
    finally:
        backends._VERIFIED.clear()
        backends._VERIFIED.update(saved)


def test_backend_that_cannot_run_says_why():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(2, 1, 3, 3)
    with pytest.raises(fusekit.BackendError, match="cuda.*CUDA tensors"):
        fusekit.depthwise_conv2d(x, w, backend="cuda")
    with pytest.raises(fusekit.BackendError, match="backend must be one of"):
        fusekit.depthwise_conv2d(x, w, backend="cudnn")
    assert set(fusekit.available_backends("depthwise_conv2d")) == set(fusekit.BACKENDS)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("make_args,error,match", [
    (lambda: (torch.randn(2, 4, 8), torch.randn(4, 1, 3, 3), {}), ValueError, "x must be a 4-D tensor"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3), {}), ValueError, r"weight must have shape \[C, 1, kh, kw\]"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(3, 1, 3, 3), {}), ValueError, "weight has 3 channels but x has 4"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3, dtype=torch.float64), {}), TypeError, "dtypes must match"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3, device="meta"), {}), ValueError, "one device"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), {"padding": -1}), ValueError, "padding must be non-negative"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), {"stride": 0}), ValueError, "stride must be >= 1"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), {"dilation": 0}), ValueError, "dilation must be >= 1"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), {"stride": 2, "padding": "same"}), ValueError, "not supported for strided"),
    (lambda: (torch.randn(1, 4, 5, 5), torch.randn(4, 1, 7, 7), {}), ValueError, "larger than the padded input"),
    (lambda: (torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), {"padding": "full"}), ValueError, "padding must be"),
    (lambda: (torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), {"bias": torch.randn(3)}), ValueError, r"bias must have shape \[C\]"),
    (lambda: (torch.randint(0, 3, (1, 4, 5, 5)), torch.randint(0, 3, (4, 1, 3, 3)), {}), TypeError, "floating point"),
], ids=["rank", "weight-shape", "channel-mismatch", "dtype-mix", "device-mix", "negative-padding", "zero-stride",
        "zero-dilation", "same-with-stride", "kernel-larger-than-input", "unknown-padding", "bias-shape", "integer-dtype"])
def test_bad_input_raises_clear_error_naming_the_rule(backend, make_args, error, match):
    x, w, kwargs = make_args()
    with pytest.raises(error, match=match):
        fusekit.depthwise_conv2d(x, w, backend=backend, **kwargs)


def test_direct_op_call_with_bad_arguments_raises_instead_of_crashing():
    if fusekit.available_backends("depthwise_conv2d")["cpu"] is not None:
        pytest.skip("C++ extension not built")
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.fusekit.depthwise_conv2d(x, torch.randn(3, 1, 3, 3), None, [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        torch.ops.fusekit.depthwise_conv2d(x, torch.randn(4, 1, 9, 9), None, [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.fusekit.depthwise_conv2d_backward_input(torch.randn(1, 4, 2, 2), x, torch.randn(4, 1, 3, 3),
                                                          [1, 1], [0, 0, 0, 0], [1, 1])


def test_autocast_runs_in_the_autocast_dtype_like_nn_conv2d():
    x = torch.randn(1, 8, 9, 9)
    w = torch.randn(8, 1, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusekit.depthwise_conv2d(x, w, padding=2)
        expected = F.conv2d(x, w, padding=2, groups=8)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_matches_reference(out, depthwise_conv2d_reference(x, w, None, padding=2), torch.bfloat16, "forward", 25)
