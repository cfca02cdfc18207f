"""Fused inverted-residual benchmarks (fusekit.ops.inverted_residual): block shapes, baselines, bytes and FLOPs.

Two ops, because the block computes different functions in the two settings and the harness checks
each item against one float64 reference:
- ``inverted_residual``: inference (mode fwd), BatchNorm in eval mode (running statistics).
- ``inverted_residual_train``: a training step (mode fwd_bwd), BatchNorm in training mode (batch
  statistics), gradients of the input and of every parameter. Each row also reports the activation
  memory autograd saves for backward (see ``saved_for_backward``).

Shapes (DESIGN.md 6; references/fused_inverted_residual.md 1.2), at 224 px input so each block sees
its stage's spatial size; one representative block per stage: the first (strided or channel-changing)
block, and a repeat (residual) block where the stage has repeats:
- MobileNetV2 (torchvision ``InvertedResidual``): ReLU6, k 3, BN eps 1e-5, stages at 112/112/56/28/14/14/7.
- EfficientNet-B0 (torchvision ``MBConv``): SiLU, k 3/5, squeeze-excitation (fc1 -> SiLU -> fc2 -> sigmoid,
  max(1, block input channels // 4) squeeze channels), BN eps 1e-5.
- EfficientNetV2-S Fused-MBConv (torchvision ``FusedMBConv``) stages 1-3 at its 300 px training size
  (150/150/75 px): k 3, SiLU, BN eps 1e-3; the t = 1 stage has no project conv.

Providers, all on channels_last tensors (the layout users run: ``model.to(memory_format=channels_last)``,
which also makes the 4-D conv weights channels_last), each on its own instance of the block built as
torchvision builds it (``nn.Sequential`` of Conv2d / BatchNorm2d / in-place activation modules):
- fusekit: ``inverted_residual_block`` / ``fused_mbconv_block`` on that block's submodules.
- eager: the block module; eager_amp: the same under ``torch.autocast`` (bf16 on the CPU, fp16 on CUDA),
  checked against the reference with that dtype's tolerance; compile / compile_max_autotune:
  ``torch.compile(block)`` (default mode / mode="max-autotune"; compilation happens in the untimed
  correctness call); eager_checkpoint (training): ``torch.utils.checkpoint.checkpoint(block, x,
  use_reentrant=False)``.

The float64 reference is the block written from its definition with fusekit.testing.reference's pieces
(explicit-tap convolutions, activations) and BatchNorm by its formula; it is always checked on every
channel (a block's output channel depends on every input channel, so the harness' channel subsets do
not apply), with the tolerance table scaled by the block's reduction sizes (``block_tolerance``).

The quick suite runs copies of a few cases (``quick.*``) without the torch.compile baselines: their
first compilation alone takes longer than the whole quick suite on a small CPU.

Work counted: forward FLOPs = 2 * (expand + depthwise + project multiply-adds) (the k x k expand conv for
Fused-MBConv; the tiny squeeze-excitation MLP and BN are left out); bytes = read x and the weights, write
y: what one fused pass must move. fwd_bwd: 3x the forward FLOPs (data and weight gradients) and, added to
the forward bytes, read dy and x, write dx and the weight gradients.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from . import harness
from .harness import BenchOp, Case, QuickItem

QUICK_BATCH = {"cpu": 8, "cuda": 64}
# cases of the quick suite per op (MobileNetV2's classic 56 px residual block, an EfficientNet-B0 MBConv + SE)
QUICK_CASES = {"inverted_residual": ("mbv2.s2.1", "effb0.s4.1"), "inverted_residual_train": ("mbv2.s3.1",)}
# Activation memory autograd keeps for a fusekit block, as a share of eager's (the target).
SAVED_TARGET = 0.25
# Providers whose saved-for-backward memory is measured (torch.compile's saved tensors live inside its
# compiled autograd function, out of reach of saved_tensors_hooks).
MEMORY_PROVIDERS = ("eager", "eager_checkpoint")
AMP_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}
AMP_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}
BASELINE_LAYOUT = "channels_last"
# Activations whose derivative jumps, and how many standard deviations the training inputs keep the
# batch-normalized pre-activations from their kinks (see make_inputs).
KINKED_ACTIVATIONS = ("relu", "relu6", "hardswish")
KINK_MARGIN = 3.5


def _fusekit_ir():
    return importlib.import_module("fusekit.ops.inverted_residual")


def _references():
    from fusekit.testing import reference
    return reference


# ----------------------------------------------------------------------------------------------
# the eager block, as torchvision builds it
# ----------------------------------------------------------------------------------------------

_ACT_MODULES = {"relu6": nn.ReLU6, "silu": nn.SiLU, "relu": nn.ReLU, "hardswish": nn.Hardswish}


def _conv_norm_act(cin: int, cout: int, k: int, stride: int, act: str | None, eps: float, groups: int = 1):
    """torchvision's Conv2dNormActivation: Conv2d (no bias, padding (k-1)//2), BN, in-place activation."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(_ACT_MODULES[act](inplace=True))
    return nn.Sequential(*layers)


class _SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with EfficientNet's SiLU: x * sigmoid(fc2(silu(fc1(mean_hw(x)))))."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class EagerBlock(nn.Module):
    """One MobileNetV2 / MBConv / Fused-MBConv block with torchvision's module structure.

    ``stages`` names the (conv, bn) pair of each stage ("expand", "dw", "project") and ``se`` the
    squeeze-excitation module, for binding tensors and for the fusekit call."""

    def __init__(self, d: Mapping[str, Any]):
        super().__init__()
        cin, e, cout, k, s, act, eps = d["cin"], d["E"], d["cout"], d["k"], d["stride"], d["act"], d["eps"]
        self.residual = d["residual"]
        self.stages: dict[str, tuple[nn.Conv2d, nn.BatchNorm2d]] = {}
        self.se = None
        layers: list[nn.Module] = []
        if d["kind"] == "ir":
            if e != cin:
                layers.append(_conv_norm_act(cin, e, 1, 1, act, eps))
                self.stages["expand"] = (layers[-1][0], layers[-1][1])
            layers.append(_conv_norm_act(e, e, k, s, act, eps, groups=e))
            self.stages["dw"] = (layers[-1][0], layers[-1][1])
            if d["se"]:
                self.se = _SqueezeExcitation(e, d["se"])
                layers.append(self.se)
            layers.append(_conv_norm_act(e, cout, 1, 1, None, eps))
            self.stages["project"] = (layers[-1][0], layers[-1][1])
        else:  # Fused-MBConv: k x k conv expand (+ 1x1 project when expanded)
            layers.append(_conv_norm_act(cin, e, k, s, act, eps))
            self.stages["expand"] = (layers[-1][0], layers[-1][1])
            if e != cout or d["project"]:
                layers.append(_conv_norm_act(e, cout, 1, 1, None, eps))
                self.stages["project"] = (layers[-1][0], layers[-1][1])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y

    def slots(self) -> dict[str, tuple[nn.Module, str, str]]:
        """Input name -> (module, "_parameters" or "_buffers", attribute)."""
        out = {}
        for stage, (conv, bn) in self.stages.items():
            out[f"{stage}_w"] = (conv, "_parameters", "weight")
            out[f"{stage}_bn_w"] = (bn, "_parameters", "weight")
            out[f"{stage}_bn_b"] = (bn, "_parameters", "bias")
            out[f"{stage}_bn_mean"] = (bn, "_buffers", "running_mean")
            out[f"{stage}_bn_var"] = (bn, "_buffers", "running_var")
        if self.se is not None:
            for i, fc in ((1, self.se.fc1), (2, self.se.fc2)):
                out[f"se_w{i}"] = (fc, "_parameters", "weight")
                out[f"se_b{i}"] = (fc, "_parameters", "bias")
        return out


class _Bound:
    """A block instance whose parameters and buffers are the tensors of the latest call.

    The harness passes the same tensors to every timed call of a provider; they are bound (placed
    into the modules' parameter and buffer slots, so gradients reach them) only when they change."""

    def __init__(self, case: Case, training: bool):
        self.case, self.training = case, training
        self.block: EagerBlock | None = None
        self.slots: dict = {}
        self.bound: tuple = ()

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> EagerBlock:
        if self.block is None:
            x = inputs["x"]
            self.block = EagerBlock(self.case.dims).to(device=x.device, dtype=x.dtype).train(self.training)
            self.slots = self.block.slots()
        current = tuple(inputs[name] for name in self.slots)
        if len(current) != len(self.bound) or any(a is not b for a, b in zip(current, self.bound)):
            for name, (module, kind, attr) in self.slots.items():
                getattr(module, kind)[attr] = inputs[name]
            self.bound = current
        return self.block


def _fusekit_call(block: EagerBlock, x: torch.Tensor, d: Mapping[str, Any], backend: str | None) -> torch.Tensor:
    ir = _fusekit_ir()
    stages = block.stages
    none = (None, None)
    if d["kind"] == "fmb":
        return ir.fused_mbconv_block(x, *stages["expand"], *stages.get("project", none), activation=d["act"],
                                     residual=d["residual"], backend=backend)
    se = None if block.se is None else ir.SqueezeExcite(block.se.fc1, block.se.fc2, "silu", "sigmoid")
    return ir.inverted_residual_block(x, *stages.get("expand", none), *stages["dw"], *stages["project"],
                                      activation=d["act"], se=se, residual=d["residual"], backend=backend)


# ----------------------------------------------------------------------------------------------
# float64 reference, from the definitions
# ----------------------------------------------------------------------------------------------

def reference_block(d: Mapping[str, Any], t: Mapping[str, torch.Tensor], training: bool) -> torch.Tensor:
    """The block in float64: explicit-tap convolutions, BN by its formula (batch statistics with the biased
    variance when training, running statistics otherwise), squeeze-excitation, residual."""
    R = _references()
    x = t["x"].double()
    act = d["act"]
    k, s, p = d["k"], d["stride"], (d["k"] - 1) // 2

    def bn(u, stage):
        if training:
            var, mean = torch.var_mean(u, dim=(0, 2, 3), correction=0)
        else:
            mean, var = t[f"{stage}_bn_mean"].double(), t[f"{stage}_bn_var"].double()
        scale = t[f"{stage}_bn_w"].double() / torch.sqrt(var + d["eps"])
        return (u - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + t[f"{stage}_bn_b"].double().view(1, -1, 1, 1)

    def conv(a, w, stride=1, pad=0):   # full convolution as explicit taps (identity activation, no bias)
        return R.fused_mbconv_reference(a, w.double(), None, stride=stride, padding=(pad,) * 4, activation="identity")

    if d["kind"] == "ir":
        a = x
        if "expand_w" in t:
            a = R.activation_reference(bn(conv(x, t["expand_w"]), "expand"), act)
        a = R.activation_reference(bn(R.depthwise_conv2d_reference(a, t["dw_w"].double(), None, s, p), "dw"), act)
        if d["se"]:
            pooled = a.mean((2, 3))
            h = R.activation_reference(pooled @ t["se_w1"].double().flatten(1).t() + t["se_b1"].double(), "silu")
            gate = torch.sigmoid(h @ t["se_w2"].double().flatten(1).t() + t["se_b2"].double())
            a = a * gate[:, :, None, None]
        y = bn(conv(a, t["project_w"]), "project")
    else:
        y = R.activation_reference(bn(conv(x, t["expand_w"], s, p), "expand"), act)
        if "project_w" in t:
            y = bn(conv(y, t["project_w"]), "project")
    return y + x if d["residual"] else y


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------

def _case_dims(kind, cin, e, cout, k, stride, H, act, eps, se=0, project=True):
    return {"kind": kind, "cin": cin, "E": e, "cout": cout, "k": k, "stride": stride, "H": H, "W": H, "act": act,
            "eps": eps, "se": se, "project": project, "residual": stride == 1 and cin == cout}


def block_cases(op: str) -> list[Case]:
    out = []

    def add(name, dims, source, tags=()):
        out.append(Case(op, name, dims, source, frozenset(tags)))

    # MobileNetV2 (t, c, n, s) after the 112 px stem: (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
    # (6,160,3,2) (6,320,1,1)
    mbv2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    cin, size = 32, 112
    for stage, (t, c, n, s) in enumerate(mbv2, 1):
        add(f"mbv2.s{stage}.0", _case_dims("ir", cin, cin * t, c, 3, s, size, "relu6", 1e-5),
            f"MobileNetV2 stage {stage} first block ({size} px in)")
        size = (size - 1) // s + 1
        if n > 1:
            add(f"mbv2.s{stage}.1", _case_dims("ir", c, c * t, c, 3, 1, size, "relu6", 1e-5),
                f"MobileNetV2 stage {stage} repeat block ({size} px, residual)")
        cin = c
    # EfficientNet-B0 (expand, k, s, in, out, layers) after the 112 px stem; SE squeeze = max(1, in // 4)
    b0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
    size = 112
    for stage, (t, k, s, cin, cout, n) in enumerate(b0, 1):
        add(f"effb0.s{stage}.0", _case_dims("ir", cin, cin * t, cout, k, s, size, "silu", 1e-5, se=max(1, cin // 4)),
            f"EfficientNet-B0 stage {stage} first block, MBConv k{k} + SE ({size} px in)")
        size = (size - 1) // s + 1
        if n > 1:
            add(f"effb0.s{stage}.1", _case_dims("ir", cout, cout * t, cout, k, 1, size, "silu", 1e-5,
                                                se=max(1, cout // 4)),
                f"EfficientNet-B0 stage {stage} repeat block, MBConv k{k} + SE ({size} px, residual)")
    # EfficientNetV2-S Fused-MBConv stages 1-3 at its 300 px training size (stem 3x3 s2 -> 24 ch at 150 px)
    add("effv2s.s1.0", _case_dims("fmb", 24, 24, 24, 3, 1, 150, "silu", 1e-3, project=False),
        "EfficientNetV2-S stage 1 Fused-MBConv t=1 (conv3x3-BN-SiLU, residual; 150 px)")
    add("effv2s.s2.0", _case_dims("fmb", 24, 96, 48, 3, 2, 150, "silu", 1e-3),
        "EfficientNetV2-S stage 2 first Fused-MBConv t=4 (150 px in)")
    add("effv2s.s2.1", _case_dims("fmb", 48, 192, 48, 3, 1, 75, "silu", 1e-3),
        "EfficientNetV2-S stage 2 repeat Fused-MBConv t=4 (75 px, residual)")
    add("effv2s.s3.0", _case_dims("fmb", 48, 192, 64, 3, 2, 75, "silu", 1e-3),
        "EfficientNetV2-S stage 3 first Fused-MBConv t=4 (75 px in)")
    # the quick suite's copies (run only when named): without the torch.compile baselines, whose first
    # compilation alone takes longer than the whole quick suite on a small CPU
    by_name = {c.name: c for c in out}
    for name in QUICK_CASES[op]:
        source = by_name[name].source + "; quick suite: no torch.compile baselines"
        add(f"quick.{name}", by_name[name].dims, source, ("test", "quick"))
    # test shapes: odd sizes, every block kind
    add("tiny.ir", _case_dims("ir", 5, 13, 5, 3, 1, 9, "relu6", 1e-5), "test shape: residual, t=2.6", ("test",))
    add("tiny.ir.se.s2", _case_dims("ir", 6, 14, 7, 5, 2, 11, "silu", 1e-5, se=2),
        "test shape: k5 s2 SE", ("test",))
    add("tiny.fmb", _case_dims("fmb", 5, 12, 7, 3, 2, 9, "silu", 1e-3), "test shape: Fused-MBConv s2", ("test",))
    return out


# ----------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------

class InvertedResidualBench(BenchOp):
    name = "inverted_residual"
    description = ("fusekit.ops.inverted_residual.inverted_residual_block / fused_mbconv_block on an eval-mode "
                   "block (BN folded) == the torchvision block in eval mode")
    data_inputs = ("x",)
    param_inputs = ("expand_w", "expand_bn_w", "expand_bn_b", "dw_w", "dw_bn_w", "dw_bn_b", "se_w1", "se_b1",
                    "se_w2", "se_b2", "project_w", "project_bn_w", "project_bn_b")
    backend_op = "inverted_residual"
    layouts = (BASELINE_LAYOUT,)
    modes = ("fwd",)
    training = False

    def __init__(self):
        self._reference_cache: tuple | None = None

    def cases(self) -> list[Case]:
        return block_cases(self.name)

    def quick_items(self) -> list[QuickItem]:
        return [QuickItem(f"quick.{name}", QUICK_BATCH, self.modes) for name in QUICK_CASES[self.name]]

    def baselines(self) -> dict[str, str]:
        amp = ", ".join(f"{AMP_NAME[dt]} on {dev}" for dev, dt in AMP_DTYPE.items())
        return {"eager": "the eval-mode block as torchvision builds it (Conv2d, BatchNorm2d, in-place activations)",
                "eager_amp": f"the same under torch.autocast ({amp}); checked with that dtype's tolerance",
                "compile": "torch.compile(block) (default mode; compile time not timed)",
                "compile_max_autotune": "torch.compile(block, mode='max-autotune') (compile time not timed)"}

    def default_baselines(self, device: str) -> list[str]:
        return [f"{name}_{BASELINE_LAYOUT}" for name in self.baselines()]

    # --------------------------------------------------------------------------------------------

    def _geometry(self, case: Case) -> tuple[int, int]:
        d = case.dims
        return (d["H"] - 1) // d["stride"] + 1, (d["W"] - 1) // d["stride"] + 1

    def shape(self, case: Case, batch: int) -> str:
        d = case.dims
        kind = "fmb " if d["kind"] == "fmb" else ""
        return (f"{batch}x{d['cin']}x{d['H']}x{d['W']} {kind}{d['cin']}>{d['E']}>{d['cout']} k{d['k']}"
                + (f" s{d['stride']}" if d["stride"] > 1 else "") + f" {d['act']}"
                + (f" se{d['se']}" if d["se"] else "") + (" res" if d["residual"] else ""))

    def output_shape(self, case: Case, batch: int) -> tuple:
        return (batch, case.dims["cout"], *self._geometry(case))

    def _param_shapes(self, case: Case) -> dict[str, tuple]:
        d = case.dims
        cin, e, cout, k = d["cin"], d["E"], d["cout"], d["k"]
        shapes: dict[str, tuple] = {}

        def stage(name, conv_shape, channels):
            shapes[f"{name}_w"] = conv_shape
            for suffix in ("bn_w", "bn_b", "bn_mean", "bn_var"):
                shapes[f"{name}_{suffix}"] = (channels,)
        if d["kind"] == "ir":
            if e != cin:
                stage("expand", (e, cin, 1, 1), e)
            stage("dw", (e, 1, k, k), e)
            if d["se"]:
                shapes.update(se_w1=(d["se"], e, 1, 1), se_b1=(d["se"],), se_w2=(e, d["se"], 1, 1), se_b2=(e,))
            stage("project", (cout, e, 1, 1), cout)
        else:
            stage("expand", (e, cin, k, k), e)
            if e != cout or d["project"]:
                stage("project", (cout, e, 1, 1), cout)
        return shapes

    def make_inputs(self, case, batch, dtype, device, gen):
        d = case.dims

        def randn(shape):
            return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

        def uniform(shape, lo, hi):
            return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
        out = {"x": randn((batch, d["cin"], d["H"], d["W"]))}
        kinked = self.training and d["act"] in KINKED_ACTIVATIONS
        activated = ("expand_bn_w", "expand_bn_b") + (("dw_bn_w", "dw_bn_b") if d["kind"] == "ir" else ())
        scale = {}
        for name, shape in self._param_shapes(case).items():
            if len(shape) == 4:   # conv weights: fan-in scaled, channels_last as after model.to(channels_last)
                t = (randn(shape) / math.sqrt(math.prod(shape[1:]))).contiguous(memory_format=torch.channels_last)
            elif kinked and name in activated:
                # training with a kinked activation: the batch-normalized pre-activation of each channel is
                # gamma * (standardized) + beta with beta = +-KINK_MARGIN * gamma (linear or dead channels), so
                # the kink sits KINK_MARGIN standard deviations out. A pre-activation within rounding of a kink
                # flips its derivative in one fp32 implementation and not in another: legitimate, but the
                # elementwise gradient check would report it. Standard-normal BN outputs would put ~5 such flips
                # into a batch-64 MobileNetV2 block; KINK_MARGIN cuts that ~500x. gamma stays small so the
                # activations' mean (hence the cancellation in the weight gradients) stays moderate. The expand
                # stage of a depthwise block keeps every channel alive: a dead one would feed the depthwise BN a
                # constant channel (variance 0, gradients amplified by 1 / sqrt(eps)).
                if name.endswith("bn_w"):
                    t = scale[name[:-1]] = uniform(shape, 0.25, 0.35)
                else:
                    sign = 1.0 if name == "expand_bn_b" and d["kind"] == "ir" else torch.sign(randn(shape))
                    t = KINK_MARGIN * scale[name[:-1]] * sign
            elif name.endswith("bn_w") or name.endswith("bn_var"):
                t = uniform(shape, 0.5, 1.5)
            else:                 # BN shift and running mean, SE biases
                t = 0.1 * randn(shape)
            out[name] = t
        return {k: v.to(dtype) for k, v in out.items()}

    def reference(self, case, inputs):
        if any(t.requires_grad for t in inputs.values()):
            return reference_block(case.dims, inputs, self.training)
        # inference: the eager_amp providers run as a second harness pass on identical inputs
        key = (case.name, self.training, tuple((k, tuple(v.shape), float(v.sum())) for k, v in inputs.items()))
        if self._reference_cache is None or self._reference_cache[0] != key:
            self._reference_cache = (key, reference_block(case.dims, inputs, self.training))
        return self._reference_cache[1]

    def reference_name(self) -> str:
        bn = "batch statistics" if self.training else "running statistics"
        return (f"fusekit.bench.inverted_residual.reference_block (float64: explicit-tap convolutions from "
                f"fusekit.testing.reference, BN with {bn})")

    # every channel is checked: outputs depend on every input channel
    def subset_units(self, case: Case) -> int:
        return 1

    def macs_per_unit(self, case: Case, batch: int) -> float:
        return 0.0

    def select_units(self, case, count, gen):
        return None

    def slice_inputs(self, case, inputs, sel):
        return dict(inputs)

    def slice_result(self, case, name, t, sel):
        return t

    # --------------------------------------------------------------------------------------------
    # providers
    # --------------------------------------------------------------------------------------------

    def fusekit_backends(self) -> dict[str, str | None]:
        _fusekit_ir()   # registers the op's backends
        return super().fusekit_backends()

    def fusekit_fn(self, case, backend):
        bound = _Bound(case, self.training)
        chosen = None if backend == "auto" else backend

        def fused(**inputs):
            return _fusekit_call(bound(inputs), inputs["x"], case.dims, chosen)
        return fused

    def baseline_fn(self, case, name):
        bound = _Bound(case, self.training)
        state: dict[str, Any] = {}

        def eager(**inputs):
            return bound(inputs)(inputs["x"])

        def eager_amp(**inputs):
            block = bound(inputs)
            x = inputs["x"]
            with torch.autocast(x.device.type, dtype=AMP_DTYPE[x.device.type]):
                return block(x)

        def checkpointed(**inputs):
            return torch.utils.checkpoint.checkpoint(bound(inputs), inputs["x"], use_reentrant=False)

        def compiled(**inputs):
            block = bound(inputs)
            if "fn" not in state:
                state["fn"] = torch.compile(block, mode="max-autotune" if name == "compile_max_autotune" else None)
            return state["fn"](inputs["x"])
        fns = {"eager": eager, "eager_amp": eager_amp, "eager_checkpoint": checkpointed, "compile": compiled,
               "compile_max_autotune": compiled}
        return fns[name]

    # --------------------------------------------------------------------------------------------
    # work
    # --------------------------------------------------------------------------------------------

    def macs(self, case: Case, batch: int) -> int:
        d = case.dims
        ho, wo = self._geometry(case)
        cin, e, cout, k = d["cin"], d["E"], d["cout"], d["k"]
        if d["kind"] == "ir":
            expand = batch * d["H"] * d["W"] * e * cin if e != cin else 0    # the expand runs before the stride
            return expand + batch * ho * wo * e * (k * k + cout)
        project = batch * ho * wo * cout * e if (e != cout or d["project"]) else 0
        return batch * ho * wo * e * cin * k * k + project

    def work(self, case: Case, batch: int, mode: str, itemsize: int) -> tuple[int, int]:
        d = case.dims
        ho, wo = self._geometry(case)
        x = batch * d["cin"] * d["H"] * d["W"]
        y = batch * d["cout"] * ho * wo
        weights = sum(math.prod(s) for n, s in self._param_shapes(case).items()
                      if not n.endswith(("bn_mean", "bn_var")))
        fwd_bytes, fwd_flops = (x + weights + y) * itemsize, 2 * self.macs(case, batch)
        if mode == "fwd":
            return fwd_bytes, fwd_flops
        return fwd_bytes + (y + x + x + weights) * itemsize, 3 * fwd_flops

    # --------------------------------------------------------------------------------------------
    # one work item: the harness pass, eager_amp as a second pass (its own dtype's tolerance)
    # --------------------------------------------------------------------------------------------

    def run_item(self, item: harness.WorkItem, rs: harness.RunSettings, env, ceilings) -> list[dict]:
        rs = _settings_for(item, rs)
        amp_keys = [k for k in rs.baselines if harness.split_baseline_key(k)[0] == "eager_amp"]
        main = dataclasses.replace(rs, baselines=[k for k in rs.baselines if k not in amp_keys])
        rows = harness.run_item(item, main, env, ceilings)
        if amp_keys:
            amp_dtype = AMP_DTYPE[rs.timer.device]
            amp = dataclasses.replace(rs, backends=[], baselines=amp_keys,
                                      tolerance=block_tolerance(item.case, item.batch, amp_dtype))
            amp_rows = harness.run_item(item, amp, env, ceilings)
            for r in amp_rows:
                note = f"autocast {AMP_NAME[amp_dtype]}, checked with its tolerance"
                r["note"] = f"{r['note']}; {note}" if r["note"] else note
            rows += amp_rows
        for mode in item.modes:
            harness.add_speedups([r for r in rows if r["mode"] == mode], rs.baselines)
        return rows


def block_tolerance(case: Case, batch: int, dtype: torch.dtype | None = None):
    """The tolerance table scaled by the block's reduction sizes. Forward outputs sum over the expanded
    channels (or the k x k x Cin conv taps): fusekit.testing.tolerances.scaled_tolerance (sqrt growth).
    Gradients sum over every pixel of the batch (M = N * H * W terms) and cancel: training-mode BN
    subtracts batch means, whose fp32 rounding (relative 1e-7 of a channel's gradient) comes back
    multiplied by the sum of M activations; that error grows like M, so atol grows like M / 64, the
    worst-case fp32 bound (still ~1e-4 of the gradients' typical size, which grows like sqrt(M)).
    ``dtype`` overrides the item's dtype (autocast rows)."""
    from fusekit.testing.tolerances import scaled_tolerance, tolerance
    d = case.dims
    forward = max(d["E"], d["cin"] * d["k"] ** 2 if d["kind"] == "fmb" else d["k"] ** 2)
    pixels = batch * d["H"] * d["W"]

    def block(item_dtype, kind):
        if kind == "forward":
            return scaled_tolerance(dtype or item_dtype, kind, forward)
        atol, rtol = tolerance(dtype or item_dtype, kind)
        return atol * max(1.0, pixels / 64), rtol
    return block


def _settings_for(item: harness.WorkItem, rs: harness.RunSettings) -> harness.RunSettings:
    torch._dynamo.reset()   # a fresh cache per item: no recompile limits, no guard chains from earlier cases
    rs = dataclasses.replace(rs, tolerance=block_tolerance(item.case, item.batch))
    if "quick" in item.case.tags:
        return dataclasses.replace(rs, baselines=[k for k in rs.baselines if not k.startswith("compile")])
    return rs


class InvertedResidualTrainBench(InvertedResidualBench):
    name = "inverted_residual_train"
    description = ("training step of fusekit.ops.inverted_residual.inverted_residual_block / fused_mbconv_block "
                   "(BN in training mode; exact gradients by recompute) == the torchvision block in train mode; "
                   "rows report the activation memory saved for backward")
    modes = ("fwd_bwd",)
    training = True

    def baselines(self) -> dict[str, str]:
        return {"eager": "the train-mode block as torchvision builds it (Conv2d, BatchNorm2d, in-place activations)",
                "eager_checkpoint": "torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)",
                "compile": "torch.compile(block) (default mode; compile time not timed)"}

    def run_item(self, item, rs, env, ceilings) -> list[dict]:
        rs = _settings_for(item, rs)
        providers = harness.providers_for(self, item.case, rs)
        rows = harness.run_item(item, rs, env, ceilings, providers)
        annotate_saved_memory(self, item, rs, providers, rows)
        return rows


# ----------------------------------------------------------------------------------------------
# activation memory saved for backward
# ----------------------------------------------------------------------------------------------

def saved_for_backward(fn, inputs: Mapping[str, torch.Tensor], exclude: Sequence[torch.Tensor]):
    """(output, bytes): run ``fn(**inputs)`` recording what autograd saves for backward, counted as the
    bytes of the distinct storages behind the saved tensors, leaving out the storages of ``exclude``
    (parameters and buffers). What a checkpoint or a custom autograd.Function saves is what is seen."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(**inputs)
    return y, sum(storages.values())


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def annotate_saved_memory(op: InvertedResidualBench, item: harness.WorkItem, rs: harness.RunSettings,
                          providers: Sequence[harness.Provider], rows: list[dict]) -> None:
    """Adds saved_bytes and saved_vs_eager to the fwd_bwd rows of the eager, checkpointed and fusekit
    providers (same inputs as the harness pass), and compares fusekit's gradients with eager's directly
    (|fusekit - eager| <= 2 * (atol + rtol * |eager|), the tolerance table's bound for two results each
    within it of the float64 reference)."""
    device, dtype = rs.timer.device, harness.DTYPES[item.dtype]
    gen = harness.make_generator(device, harness.item_seed(item, rs.seed))
    base = op.make_inputs(item.case, item.batch, dtype, device, gen)
    gy = torch.randn(op.output_shape(item.case, item.batch), generator=gen, device=device,
                     dtype=torch.float32).to(dtype)
    names = harness.grad_names(op, "fwd_bwd", base)
    measured: dict[str, tuple[int, dict]] = {}
    for provider in providers:
        if not (provider.name.startswith("fusekit:") or provider.name in MEMORY_PROVIDERS):
            continue
        row = next((r for r in rows if r["provider"] == provider.name and r["layout"] == provider.layout
                    and r["mode"] == "fwd_bwd"), None)
        if row is None or not row["correct"]:
            continue
        inputs = {k: (op.to_layout(v, provider.layout) if k in op.data_inputs else v).detach()
                  .requires_grad_(k in names) for k, v in base.items()}
        params = [v for k, v in inputs.items() if k not in op.data_inputs]
        y, nbytes = saved_for_backward(provider.fn, inputs, params)
        grads = torch.autograd.grad(y, [inputs[k] for k in names], op.to_layout(gy, provider.layout))
        measured[provider.key] = (nbytes, dict(zip(names, grads)))
        row["saved_bytes"] = nbytes
        del y
    eager = measured.get(f"eager_{BASELINE_LAYOUT}")
    atol, rtol = rs.tolerance(dtype, "backward")
    for row in rows:
        key = f"{row['provider']}_{row['layout']}"
        if key not in measured:
            continue
        nbytes, grads = measured[key]
        x_bytes = item.batch * item.case.dims["cin"] * item.case.dims["H"] * item.case.dims["W"] * dtype.itemsize
        note = f"saved for backward {_mib(nbytes)} = {nbytes / x_bytes:.1f}x the block input"
        if eager is not None and eager[0]:
            row["saved_vs_eager"] = nbytes / eager[0]
            note += f", {100 * nbytes / eager[0]:.0f}% of eager"
            if row["provider"].startswith("fusekit:"):
                worst, bad = 0.0, []
                for name, g in grads.items():
                    ref = eager[1][name]
                    diff = (g.double() - ref.double()).abs()
                    worst = max(worst, float(diff.max()))
                    if not bool((diff <= 2 * (atol + rtol * ref.double().abs())).all()):
                        bad.append(name)
                if row["saved_vs_eager"] > SAVED_TARGET:
                    note += f" (above the {100 * SAVED_TARGET:.0f}% target)"
                note += f"; gradients vs eager: max |diff| {worst:.1e}"
                row["grad_vs_eager_max_abs"] = worst
                if bad:
                    row["correct"] = False
                    note = f"FAILED gradients differ from eager's beyond 2x the tolerance in {', '.join(bad)}; {note}"
        row["note"] = note if not row["note"] else f"{note}; {row['note']}"


OPS = (InvertedResidualBench(), InvertedResidualTrainBench())
