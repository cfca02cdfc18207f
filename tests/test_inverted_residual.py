"""Fused inverted-residual blocks (DESIGN.md 5.4): the kernels against float64 definitions, and the
blocks against eager nn blocks in eval and training (outputs, every gradient, running statistics,
memory saved for backward)."""
import copy
import random

import pytest
import torch
import torch.nn as nn

import fusekit
import fusekit.ops.inverted_residual as ir
from fusekit.ops.inverted_residual import (SqueezeExcite, fused_mbconv, fused_mbconv_block, inverted_residual,
                                           inverted_residual_block, tf_same_padding)
from fusekit.testing.checks import (assert_compiles_fullgraph, assert_matches_reference, op_gradients,
                                    poison_allocator, reference_gradients, run_opcheck)
from fusekit.testing.reference import (fused_mbconv_reference, inverted_residual_dw_sums_reference,
                                       inverted_residual_reference)
from fusekit.testing.tolerances import tolerance

from backend_matrix import backend_device_params, dtypes_for

IR = backend_device_params("inverted_residual", backends=("cpu", "triton", "reference", "cuda"))
NATIVE_IR = backend_device_params("inverted_residual", backends=("cpu", "triton", "cuda"))
FMB = backend_device_params("fused_mbconv", backends=("cpu", "triton", "reference", "cuda"))
NATIVE_FMB = backend_device_params("fused_mbconv", backends=("cpu", "triton", "cuda"))
ACTS = ("relu6", "silu", "hardswish", "relu", "identity")


@pytest.fixture(autouse=True)
def _gpu_verification_tags(request, record_property):
    """Tell benchmarks/gpu_suite.py which (op, GPU backend) a test on CUDA tensors speaks for."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec else {}
    if params.get("device") == "cuda" and params.get("backend") in ("cuda", "triton"):
        record_property("fusekit_op", "fused_mbconv" if "fused_mbconv" in request.node.name else "inverted_residual")
        record_property("fusekit_backend", params["backend"])


def _interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def _randn(shape, gen, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def _ir_case(rng: random.Random, small: bool):
    """A random inverted-residual configuration: shapes, kernel, stride, padding, activation, options."""
    cin = rng.choice([3, 5, 8, 13, 16] if small else [3, 5, 8, 13, 16, 24, 37])
    t = rng.choice([1, 2, 4, 6])
    e = cin * t
    k = rng.choice([3, 5] if small else [1, 3, 5, 7])
    s = rng.choice([1, 2])
    d = rng.choice([1, 1, 2])
    h, w = rng.randint(1, 7 if small else 12), rng.randint(1, 7 if small else 12)
    pad_mode = rng.choice(["sym", "same", "asym"])
    if pad_mode == "sym":
        pads = ((k - 1) // 2 * d,) * 4
    elif pad_mode == "same":
        pads = tf_same_padding((h, w), (k, k), (s, s), (d, d))
    else:
        pads = tuple(rng.randint(0, k - 1) for _ in range(4))
    ho = (h + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1
    wo = (w + pads[2] + pads[3] - d * (k - 1) - 1) // s + 1
    if ho < 1 or wo < 1:
        pads = (d * (k - 1),) * 4
        ho = (h + 2 * pads[0] - d * (k - 1) - 1) // s + 1
        wo = (w + 2 * pads[2] - d * (k - 1) - 1) // s + 1
    cout = rng.choice([cin, cin + 3, 7])
    residual = cout == cin and (ho, wo) == (h, w) and rng.random() < 0.7
    return dict(n=rng.randint(1, 3), cin=cin, e=e, cout=cout, k=k, stride=(s, s), dilation=(d, d), padding=pads,
                h=h, w=w, expand=t != 1, act=rng.choice(ACTS), gate=rng.random() < 0.4, residual=residual,
                biases=rng.random() < 0.8, channels_last=rng.random() < 0.6)


def _ir_tensors(case, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn((case["n"], case["cin"], case["h"], case["w"]), g, device, dtype)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    e, cin, cout, k = case["e"], case["cin"], case["cout"], case["k"]
    bias = case["biases"]
    w1 = _randn((e, cin), g, device, dtype, cin ** -0.5) if case["expand"] else None
    b1 = _randn((e,), g, device, dtype) if case["expand"] and bias else None
    wd = _randn((e, k, k), g, device, dtype, 1 / k)
    bd = _randn((e,), g, device, dtype) if bias else None
    w3 = _randn((cout, e), g, device, dtype, e ** -0.5)
    b3 = _randn((cout,), g, device, dtype) if bias else None
    gate = torch.rand((case["n"], e), generator=g, dtype=torch.float64).to(device, dtype) if case["gate"] else None
    return x, w1, b1, wd, bd, w3, b3, gate


def _conf(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], activation=case["act"])


# ----------------------------------------------------------------------------------------------
# kernels against their float64 definitions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", IR)
def test_inverted_residual_forward_matches_definition_on_random_blocks(backend, device):
    rng = random.Random(7)
    count = 6 if _interpreted(backend) else 24
    for dtype in dtypes_for(backend, device):
        for i in range(count):
            case = _ir_case(rng, small=_interpreted(backend))
            x, w1, b1, wd, bd, w3, b3, gate = _ir_tensors(case, device, dtype, i)
            poison_allocator(device)
            y = inverted_residual(x, w1, b1, wd, bd, w3, b3, gate=gate, residual=case["residual"], backend=backend,
                                  **_conf(case))
            ref = inverted_residual_reference(x, w1, b1, wd, bd, w3, b3, gate, case["stride"], case["padding"],
                                              case["dilation"], case["act"], case["residual"])
            assert y.dtype == dtype and y.shape == ref.shape
            assert y.is_contiguous(memory_format=ir.out_memory_format(x))
            assert_matches_reference(y, ref, dtype, "forward", case["e"] * case["k"] ** 2 // 4, what=f"y {case}")


@pytest.mark.parametrize("backend,device", IR)
def test_dw_sums_are_per_sample_channel_sums_of_d_d2_and_act(backend, device):
    rng = random.Random(11)
    count = 4 if _interpreted(backend) else 16
    for dtype in dtypes_for(backend, device):
        for i in range(count):
            case = _ir_case(rng, small=_interpreted(backend))
            x, w1, b1, wd, bd, _, _, _ = _ir_tensors(case, device, dtype, i)
            sums = ir._ir_dw_sums(backend, x, w1, b1, wd, bd, case["stride"], case["padding"], case["dilation"],
                                  case["act"])
            ref = inverted_residual_dw_sums_reference(x, w1, b1, wd, bd, case["stride"], case["padding"],
                                                      case["dilation"], case["act"])
            assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert sums.shape == (case["n"], 3, case["e"])
            pixels = ref.shape[0] and max(1, case["h"] * case["w"])
            assert_matches_reference(sums, ref, dtype, "forward", pixels * case["k"] ** 2, what=f"sums {case}")


def _fmb_case(rng: random.Random, small: bool):
    cin = rng.choice([3, 5, 8, 13] if small else [3, 5, 8, 13, 24])
    t = rng.choice([1, 2, 4])
    k = rng.choice([1, 3] if small else [1, 3, 5])
    s = rng.choice([1, 2])
    d = rng.choice([1, 2]) if k > 1 else 1
    h, w = rng.randint(max(1, d * (k - 1) // 2), 7 if small else 11), rng.randint(1, 7 if small else 11)
    pads = tf_same_padding((h, w), (k, k), (s, s), (d, d)) if rng.random() < 0.5 else ((k - 1) // 2 * d,) * 4
    project = t != 1
    e = cin * t
    cout = rng.choice([cin, 6]) if project else e
    ho = (h + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1
    wo = (w + pads[2] + pads[3] - d * (k - 1) - 1) // s + 1
    residual = cout == cin and (ho, wo) == (h, w) and rng.random() < 0.7
    return dict(n=rng.randint(1, 3), cin=cin, e=e, cout=cout, k=k, stride=(s, s), dilation=(d, d), padding=pads, h=h,
                w=w, project=project, act=rng.choice(ACTS), residual=residual, biases=rng.random() < 0.8,
                channels_last=rng.random() < 0.6)


def _fmb_tensors(case, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn((case["n"], case["cin"], case["h"], case["w"]), g, device, dtype)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    e, k = case["e"], case["k"]
    w1 = _randn((e, case["cin"], k, k), g, device, dtype, (case["cin"] * k * k) ** -0.5)
    b1 = _randn((e,), g, device, dtype) if case["biases"] else None
    w3 = _randn((case["cout"], e), g, device, dtype, e ** -0.5) if case["project"] else None
    b3 = _randn((case["cout"],), g, device, dtype) if case["project"] and case["biases"] else None
    return x, w1, b1, w3, b3


@pytest.mark.parametrize("backend,device", FMB)
def test_fused_mbconv_forward_matches_definition_on_random_blocks(backend, device):
    rng = random.Random(5)
    count = 5 if _interpreted(backend) else 20
    for dtype in dtypes_for(backend, device):
        for i in range(count):
            case = _fmb_case(rng, small=_interpreted(backend))
            x, w1, b1, w3, b3 = _fmb_tensors(case, device, dtype, i)
            poison_allocator(device)
            y = fused_mbconv(x, w1, b1, w3, b3, residual=case["residual"], backend=backend, **_conf(case))
            ref = fused_mbconv_reference(x, w1, b1, w3, b3, case["stride"], case["padding"], case["dilation"],
                                         case["act"], case["residual"])
            assert y.dtype == dtype and y.shape == ref.shape
            assert y.is_contiguous(memory_format=ir.out_memory_format(x))
            assert_matches_reference(y, ref, dtype, "forward", case["cin"] * case["k"] ** 2 + case["e"],
                                     what=f"y {case}")


@pytest.mark.parametrize("backend,device", IR)
def test_inverted_residual_reads_non_contiguous_inputs(backend, device):
    g = torch.Generator().manual_seed(3)
    base = _randn((2, 10, 9, 8), g, device, torch.float32)
    x = base[:, 1:9:2, :, 1:]                       # strided channels and columns
    w1, wd, w3 = _randn((12, 4), g, device, torch.float32), _randn((12, 3, 3), g, device, torch.float32), \
        _randn((4, 12), g, device, torch.float32)
    y = inverted_residual(x, w1, None, wd, None, w3, None, residual=True, backend=backend)
    ref = inverted_residual_reference(x, w1, None, wd, None, w3, None, None, 1, (1, 1, 1, 1), 1, "relu6", True)
    assert_matches_reference(y, ref, torch.float32, "forward", 12 * 9)


# ----------------------------------------------------------------------------------------------
# gradients of the functional ops (recompute backward)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", IR)
def test_inverted_residual_gradients_match_definition(backend, device):
    rng = random.Random(13)
    for i in range(3 if _interpreted(backend) else 8):
        case = _ir_case(rng, small=True)
        dtype = torch.float32
        inputs = list(_ir_tensors(case, device, dtype, i))
        kw = dict(residual=case["residual"], **_conf(case))
        out = inverted_residual_reference(*inputs[:7], inputs[7], case["stride"], case["padding"], case["dilation"],
                                          case["act"], case["residual"])
        grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)).to(device)
        _, grads = op_gradients(lambda x, w1, b1, wd, bd, w3, b3, gate: inverted_residual(
            x, w1, b1, wd, bd, w3, b3, gate=gate, backend=backend, **kw), inputs, grad_out)
        ref = reference_gradients(lambda x, w1, b1, wd, bd, w3, b3, gate: inverted_residual_reference(
            x, w1, b1, wd, bd, w3, b3, gate, case["stride"], case["padding"], case["dilation"], case["act"],
            case["residual"]), inputs, grad_out)
        for name, got, want in zip(("x", "w_expand", "b_expand", "w_dw", "b_dw", "w_project", "b_project", "gate"),
                                   grads, ref):
            if want is not None:
                assert_matches_reference(got, want, dtype, "backward", case["e"] * 16, what=f"grad {name} {case}")


def test_gradcheck_float64_inverted_residual_and_fused_mbconv_on_cpu():
    backend = "cpu" if fusekit.available_backends("inverted_residual")["cpu"] is None else "reference"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g).requires_grad_()
    w1 = torch.randn(6, 3, dtype=torch.float64, generator=g).requires_grad_()
    b1 = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    wd = torch.randn(6, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    w3 = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    gate = torch.rand(2, 6, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: inverted_residual(*a[:4], None, a[4], None, gate=a[5], stride=2,
                                                                 activation="hardswish", backend=backend),
                                    (x, w1, b1, wd, w3, gate))
    wf = torch.randn(6, 3, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    fmb_backend = "cpu" if fusekit.available_backends("fused_mbconv")["cpu"] is None else "reference"
    assert torch.autograd.gradcheck(lambda x, w, p: fused_mbconv(x, w, None, p, None, stride=2, padding="same",
                                                                 backend=fmb_backend), (x, wf, w3))


# ----------------------------------------------------------------------------------------------
# blocks against eager nn blocks
# ----------------------------------------------------------------------------------------------

_ACT_MODULES = {"relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "relu": nn.ReLU}


class _EagerSE(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _EagerBlock(nn.Module):
    """torchvision-structured InvertedResidual / MBConv, built from plain nn modules."""

    def __init__(self, cin, cout, stride, t, k=3, act="relu6", se=False, eps=1e-5, momentum=0.1):
        super().__init__()
        hidden = cin * t
        act_module = _ACT_MODULES[act]
        layers = []
        if t != 1:
            layers.append(nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden, eps, momentum),
                                        act_module()))
        layers.append(nn.Sequential(nn.Conv2d(hidden, hidden, k, stride, (k - 1) // 2, groups=hidden, bias=False),
                                    nn.BatchNorm2d(hidden, eps, momentum), act_module()))
        if se:
            layers.append(_EagerSE(hidden, max(1, cin // 4)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout, eps, momentum)]
        self.conv = nn.Sequential(*layers)
        self.residual, self.t, self.se, self.act = stride == 1 and cin == cout, t, se, act
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y

    def fused(self, x, mode="recompute", backend=None):
        c, i = self.conv, 0
        conv_expand = bn_expand = None
        if self.t != 1:
            conv_expand, bn_expand, i = c[0][0], c[0][1], 1
        conv_dw, bn_dw = c[i][0], c[i][1]
        i += 1
        se = None
        if self.se:
            se, i = SqueezeExcite(c[i].fc1, c[i].fc2, "silu", "sigmoid"), i + 1
        return inverted_residual_block(x, conv_expand, bn_expand, conv_dw, bn_dw, c[i], c[i + 1], activation=self.act,
                                       se=se, residual=self.residual, mode=mode, backend=backend)


BLOCK_CASES = [  # cin, cout, stride, t, k, act, se, h, w
    (8, 8, 1, 6, 3, "relu6", False, 9, 11),
    (5, 7, 2, 4, 3, "relu6", False, 10, 7),
    (6, 6, 1, 1, 3, "relu6", False, 7, 7),
    (13, 13, 1, 6, 5, "silu", True, 8, 9),
    (8, 12, 2, 6, 5, "silu", True, 11, 11),
    (6, 6, 1, 4, 3, "hardswish", False, 5, 6),
]
_BLOCK_IDS = [f"c{a}-{b}_s{c}_t{d}_k{e}_{f}{'_se' if g else ''}_{h}x{i}" for a, b, c, d, e, f, g, h, i in BLOCK_CASES]


def _block_backends():
    return [pytest.param(b, id=b) for b in ("cpu", "reference")
            if fusekit.available_backends("inverted_residual")[b] is None]


def _bn_buffers(module):
    return {n: b for n, b in module.named_buffers()}


@pytest.mark.parametrize("backend", _block_backends())
@pytest.mark.parametrize("cfg", BLOCK_CASES, ids=_BLOCK_IDS)
def test_training_block_matches_eager_outputs_gradients_and_running_stats(cfg, backend):
    cin, cout, stride, t, k, act, se, h, w = cfg
    torch.manual_seed(0)
    eager = _EagerBlock(cin, cout, stride, t, k, act, se)
    fused = copy.deepcopy(eager)
    for step in range(2):
        x = torch.randn(3, cin, h, w).contiguous(memory_format=torch.channels_last)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = eager(x1), fused.fused(x2, backend=backend)
        grad = torch.randn_like(y1)
        g1 = torch.autograd.grad(y1, [x1, *eager.parameters()], grad)
        g2 = torch.autograd.grad(y2, [x2, *fused.parameters()], grad)
        torch.testing.assert_close(y2, y1, atol=2e-4, rtol=2e-4)
        names = ["x"] + [n for n, _ in eager.named_parameters()]
        for name, a, b in zip(names, g1, g2):
            scale = max(1.0, a.abs().max().item())
            torch.testing.assert_close(b, a, atol=5e-4 * scale, rtol=5e-4, msg=lambda m: f"grad {name}: {m}")
        for (name, a), b in zip(_bn_buffers(eager).items(), _bn_buffers(fused).values()):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"buffer {name}: {m}")
    eager.eval(), fused.eval()
    x = torch.randn(2, cin, h, w).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused.fused(x, backend=backend), eager(x), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", _block_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_training_block_in_half_precision_tracks_eager(dtype, backend):
    torch.manual_seed(1)
    eager = _EagerBlock(8, 8, 1, 6, 3, "silu", True).to(dtype)
    fused = copy.deepcopy(eager)
    x = torch.randn(2, 8, 8, 8).to(dtype).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = eager(x1), fused.fused(x2, backend=backend)
    grad = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x1, *eager.parameters()], grad)
    g2 = torch.autograd.grad(y2, [x2, *fused.parameters()], grad)
    atol, rtol = tolerance(dtype, "backward")
    torch.testing.assert_close(y2.float(), y1.float(), atol=4 * atol, rtol=4 * rtol)
    for a, b in zip(g1, g2):
        scale = max(1.0, a.abs().max().item())
        torch.testing.assert_close(b.float(), a.float(), atol=4 * atol * scale, rtol=4 * rtol)


def test_training_block_with_cumulative_momentum_and_eps_1e3_counts_batches_like_eager():
    torch.manual_seed(2)
    eager = _EagerBlock(6, 6, 1, 4, 3, "silu", True, eps=1e-3, momentum=None)
    fused = copy.deepcopy(eager)
    for _ in range(3):
        x = torch.randn(2, 6, 6, 6)
        eager(x).sum().backward()
        fused.fused(x).sum().backward()
    for (name, a), b in zip(_bn_buffers(eager).items(), _bn_buffers(fused).values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"buffer {name}: {m}")


def test_training_block_recomputes_in_sample_chunks_with_the_same_gradients(monkeypatch):
    torch.manual_seed(3)
    eager = _EagerBlock(8, 12, 2, 4, 5, "silu", True).double()
    fused = copy.deepcopy(eager)
    monkeypatch.setattr(ir, "RECOMPUTE_CHUNK_ELEMENTS", 700)   # one or two samples per chunk
    x = torch.randn(5, 8, 9, 11, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = eager(x1), fused.fused(x2, backend="reference")
    grad = torch.randn_like(y1)
    for a, b in zip(torch.autograd.grad(y1, [x1, *eager.parameters()], grad),
                    torch.autograd.grad(y2, [x2, *fused.parameters()], grad)):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


def _saved_bytes(fn, x):
    """Bytes of the distinct storages autograd saves for backward while running fn(x), parameters excluded."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return sum(storages.values()), out


@pytest.mark.parametrize("cfg", [(24, 24, 1, 6, "relu6", False), (16, 24, 2, 6, "relu6", False),
                                 (16, 16, 1, 6, "silu", True)], ids=["s1_t6", "s2_t6", "se"])
def test_training_block_saves_at_most_a_quarter_of_eagers_activation_memory(cfg):
    cin, cout, stride, t, act, se = cfg
    torch.manual_seed(4)
    eager = _EagerBlock(cin, cout, stride, t, 3, act, se)
    fused = copy.deepcopy(eager)
    x = torch.randn(4, cin, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    eager_bytes, _ = _saved_bytes(eager, x)
    fused_bytes, _ = _saved_bytes(fused.fused, x)
    assert fused_bytes <= 0.25 * eager_bytes, (fused_bytes, eager_bytes)


def test_mobiletl_mode_freezes_internal_bns_and_matches_eager_for_relu6():
    torch.manual_seed(5)
    eager = _EagerBlock(8, 8, 1, 6, 3, "relu6", False).double()
    for m in eager.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    fused = copy.deepcopy(eager)
    for i in (0, 1):                       # the eager twin: internal BNs in eval, their weights frozen
        eager.conv[i][1].eval()
        eager.conv[i][1].weight.requires_grad_(False)
    before = {n: b.clone() for n, b in _bn_buffers(fused).items()}
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = eager(x1), fused.fused(x2, mode="mobiletl")
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(x2.grad, x1.grad)
    for (name, p1), p2 in zip(eager.named_parameters(), fused.parameters()):
        if p1.requires_grad:
            torch.testing.assert_close(p2.grad, p1.grad, msg=lambda m: f"grad {name}: {m}")
        else:
            assert p2.grad is None, f"{name} is frozen in MobileTL mode but got a gradient"
    after = _bn_buffers(fused)
    for name in ("conv.0.1.running_mean", "conv.0.1.running_var", "conv.1.1.running_mean", "conv.1.1.running_var"):
        torch.testing.assert_close(after[name], before[name])
    assert not torch.equal(after["conv.3.running_mean"], before["conv.3.running_mean"])


def test_mobiletl_mode_saves_one_bit_per_expanded_activation_mask():
    x = torch.randn(2, 8, 8, 8).requires_grad_()
    block = _EagerBlock(8, 8, 1, 6, 3, "relu6", False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block.fused(x, mode="mobiletl")
    masks = [t for t in saved if isinstance(t, torch.Tensor) and t.dtype == torch.uint8]
    assert len(masks) == 2 and all(m.numel() == 2 * 48 * 8 * 8 // 8 for m in masks)


def test_pack_mask_round_trips():
    mask = torch.rand(3, 5, 7) > 0.5
    assert torch.equal(ir.unpack_mask(ir.pack_mask(mask), mask.shape), mask)


class _EagerFusedMBConv(nn.Module):
    def __init__(self, cin, cout, stride, t, k=3):
        super().__init__()
        hidden = cin * t
        layers = [nn.Conv2d(cin, hidden, k, stride, (k - 1) // 2, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()]
        if t != 1:
            layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual, self.t = stride == 1 and cin == cout, t

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y

    def fused(self, x, backend=None, mode="recompute"):
        b = self.block
        project = (b[3], b[4]) if self.t != 1 else (None, None)
        return fused_mbconv_block(x, b[0], b[1], *project, activation="silu", residual=self.residual,
                                  mode=mode, backend=backend)


def _fmb_block_backends():
    return [pytest.param(b, id=b) for b in ("cpu", "reference") if fusekit.available_backends("fused_mbconv")[b] is None]


@pytest.mark.parametrize("backend", _fmb_block_backends())
@pytest.mark.parametrize("cfg", [(8, 8, 1, 1), (8, 16, 2, 4), (5, 7, 1, 4)], ids=["t1_res", "t4_s2", "t4_odd"])
def test_fused_mbconv_training_block_matches_eager(cfg, backend):
    cin, cout, stride, t = cfg
    torch.manual_seed(6)
    eager = _EagerFusedMBConv(cin, cout, stride, t)
    fused = copy.deepcopy(eager)
    x = torch.randn(3, cin, 9, 10).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = eager(x1), fused.fused(x2, backend=backend)
    grad = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x1, *eager.parameters()], grad)
    g2 = torch.autograd.grad(y2, [x2, *fused.parameters()], grad)
    torch.testing.assert_close(y2, y1, atol=2e-4, rtol=2e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=5e-4 * max(1.0, a.abs().max().item()), rtol=5e-4)
    for a, b in zip(eager.buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    eager.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused.fused(x, backend=backend), eager(x), atol=2e-4, rtol=2e-4)


# ----------------------------------------------------------------------------------------------
# op registration: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------

def _opcheck_args(device, dtype):
    g = torch.Generator().manual_seed(9)
    x = _randn((2, 5, 6, 7), g, device, dtype).contiguous(memory_format=torch.channels_last)
    w1, b1 = _randn((10, 5), g, device, dtype), _randn((10,), g, device, dtype)
    wd, w3 = _randn((10, 3, 3), g, device, dtype), _randn((5, 10), g, device, dtype)
    gate = torch.rand((2, 10), generator=g).to(device, dtype)
    conf = ([2, 2], [1, 1, 1, 1], [1, 1], 3)
    return x, w1, b1, wd, w3, gate, conf


@pytest.mark.parametrize("backend,device", NATIVE_IR)
def test_inverted_residual_ops_pass_opcheck(backend, device):
    suffix = "_triton" if backend == "triton" else ""
    x, w1, b1, wd, w3, gate, conf = _opcheck_args(device, torch.float32)
    run_opcheck(getattr(torch.ops.fusekit, f"inverted_residual_forward{suffix}").default,
                (x, w1, b1, wd, None, w3, None, gate, *conf, False))
    run_opcheck(getattr(torch.ops.fusekit, f"inverted_residual_dw_sums{suffix}").default,
                (x, w1, b1, wd, None, *conf))


@pytest.mark.parametrize("backend,device", NATIVE_FMB)
def test_fused_mbconv_op_passes_opcheck(backend, device):
    suffix = "_triton" if backend == "triton" else ""
    g = torch.Generator().manual_seed(10)
    x = _randn((2, 4, 6, 5), g, device, torch.float32)
    w1, w3 = _randn((8, 4, 3, 3), g, device, torch.float32), _randn((4, 8), g, device, torch.float32)
    run_opcheck(getattr(torch.ops.fusekit, f"fused_mbconv_forward{suffix}").default,
                (x, w1, None, w3, None, [1, 1], [1, 1, 1, 1], [1, 1], 3, True))


def _training_op_args(mobiletl: bool):
    """(present tensors, which are present, spec, need) of a training-mode SE block's custom op."""
    block = _EagerBlock(6, 6, 1, 4, 3, "silu", True)
    c = block.conv
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    captured = {}
    real = ir._run_block

    def capture(spec, mobile=False, **given):
        tensors = [given.get(name) for name in ir._TENSORS]
        captured["args"] = (*ir._pack(tensors), ir._spec_text(spec),
                            [t is not None and t.requires_grad for t in tensors])
        return real(spec, mobile, **given)
    ir._run_block = capture
    try:
        inverted_residual_block(x, c[0][0], c[0][1], c[1][0], c[1][1], c[3], c[4], activation="silu",
                                se=SqueezeExcite(c[2].fc1, c[2].fc2), residual=True,
                                mode="mobiletl" if mobiletl else "recompute", backend="reference")
    finally:
        ir._run_block = real
    return captured["args"]


@pytest.mark.parametrize("mobiletl", [False, True], ids=["recompute", "mobiletl"])
def test_training_block_custom_ops_pass_opcheck(mobiletl):
    op = torch.ops.fusekit.inverted_residual_block_mobiletl if mobiletl else \
        torch.ops.fusekit.inverted_residual_block_train
    run_opcheck(op.default, _training_op_args(mobiletl))


def test_inverted_residual_compiles_fullgraph_with_gradients():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 7, 7, generator=g)
    w1, wd, w3 = torch.randn(12, 6, generator=g), torch.randn(12, 3, 3, generator=g), torch.randn(6, 12, generator=g)
    assert_compiles_fullgraph(lambda x, w1, wd, w3: inverted_residual(x, w1, None, wd, None, w3, None, residual=True),
                              x, w1, wd, w3, atol=1e-4, rtol=1e-4)


def test_training_block_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(12)
    block = _EagerBlock(6, 6, 1, 4, 3, "silu", True)
    twin = copy.deepcopy(block)
    x = torch.randn(2, 6, 7, 7)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: twin.fused(x), fullgraph=True)
    y1, y2 = block.fused(x.clone().requires_grad_()), compiled(x.clone().requires_grad_())
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    y1.sum().backward()
    y2.sum().backward()
    for a, b in zip(block.parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)
    for a, b in zip(block.buffers(), twin.buffers()):
        torch.testing.assert_close(b, a)


# ----------------------------------------------------------------------------------------------
# clear errors
# ----------------------------------------------------------------------------------------------

def _good():
    return dict(x=torch.randn(2, 4, 6, 6), w1=torch.randn(8, 4), b1=None, wd=torch.randn(8, 3, 3), bd=None,
                w3=torch.randn(4, 8), b3=None)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(4, 6, 6)), "x must be a 4-D tensor"),
    (dict(x=torch.randint(0, 3, (2, 4, 6, 6))), "floating point"),
    (dict(w1=torch.randn(8, 5)), r"w_expand must have shape \[E, Cin\]"),
    (dict(w1=None), "without an expand stage"),
    (dict(wd=torch.randn(8, 1, 3, 3)), r"w_dw must be a 3-D tensor \[E, kh, kw\]"),
    (dict(w3=torch.randn(4, 7)), r"w_project must have shape \[Cout, E\]"),
    (dict(b3=torch.randn(5)), r"b_project must have shape \[4\]"),
    (dict(wd=torch.randn(8, 9, 9), padding=0), "larger than the padded input"),
    (dict(w1=torch.randn(8, 4, dtype=torch.float64)), "dtypes must match"),
])
def test_inverted_residual_rejects_bad_arguments_with_clear_errors(change, match):
    args = {**_good(), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        inverted_residual(args["x"], args["w1"], args["b1"], args["wd"], args["bd"], args["w3"], args["b3"],
                          padding=args.get("padding"))


def test_inverted_residual_rejects_residual_when_shapes_change_and_unknown_activation():
    a = _good()
    with pytest.raises(ValueError, match="residual=True needs the output shape"):
        inverted_residual(a["x"], a["w1"], None, a["wd"], None, a["w3"], None, stride=2, residual=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        inverted_residual(a["x"], a["w1"], None, a["wd"], None, a["w3"], None, activation="gelu")
    with pytest.raises(ValueError, match=r"gate must have shape \[N, E\]"):
        inverted_residual(a["x"], a["w1"], None, a["wd"], None, a["w3"], None, gate=torch.rand(2, 4))


def test_blocks_reject_mismatched_modules_and_modes():
    block = _EagerBlock(8, 8, 1, 6)
    c = block.conv
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="conv_expand takes 8 channels but x has 4"):
        inverted_residual_block(torch.randn(1, 4, 5, 5), c[0][0], c[0][1], c[1][0], c[1][1], c[2], c[3],
                                activation="relu6", residual=False)
    with pytest.raises(ValueError, match="bn_dw has 8 features but its conv gives 48 channels"):
        inverted_residual_block(x, c[0][0], c[0][1], c[1][0], c[3], c[2], c[3], activation="relu6", residual=False)
    with pytest.raises(ValueError, match="mode must be 'recompute' or 'mobiletl'"):
        inverted_residual_block(x, c[0][0], c[0][1], c[1][0], c[1][1], c[2], c[3], activation="relu6",
                                residual=True, mode="checkpoint")
    with pytest.raises(ValueError, match="conv_dw must have groups=48"):
        inverted_residual_block(x, c[0][0], c[0][1], nn.Conv2d(48, 48, 3, padding=1), c[1][1], c[2], c[3],
                                activation="relu6", residual=True)


def test_tf_same_padding_puts_the_extra_pad_at_the_end():
    assert tf_same_padding((8, 7), (3, 3), (2, 2)) == (0, 1, 1, 1)
    assert tf_same_padding((5, 5), (5, 5), (1, 1)) == (2, 2, 2, 2)
    assert tf_same_padding((4, 4), (3, 3), (2, 2), (2, 2)) == (1, 2, 1, 2)
