"""Drop-in fused inverted-residual blocks: MobileNetV2's InvertedResidual, EfficientNet's MBConv and
EfficientNetV2's FusedMBConv, and a converter that swaps them into existing models.

Each module keeps the submodule layout of the library it replaces, so checkpoints load unchanged:

- ``layout="torchvision"``: ``InvertedResidual.conv`` (``conv.0.0.weight``...; a t = 1 block has no
  expand stage and its indices shift), ``MBConv.block`` (expand, depthwise, ``SqueezeExcitation``
  with ``fc1``/``fc2``, project) and ``FusedMBConv.block``, each with ``stochastic_depth``;
- ``layout="timm"``: ``conv_pw``/``bn1``/``conv_dw``/``bn2``/``se``/``conv_pwl``/``bn3`` (timm's
  InvertedResidual), ``conv_dw``/``bn1``/``se``/``conv_pw``/``bn2`` for t = 1 (timm's
  DepthwiseSeparableConv), ``conv_exp``/``bn1``/``conv_pwl``/``bn2`` (EdgeResidual) and
  ``conv``/``bn1`` (ConvBnAct, a t = 1 FusedMBConv), each with ``drop_path``.

``load_state_dict`` also accepts a state dict in the other layout (keys are translated on load).
The convolutions and BatchNorms are ordinary nn.Conv2d / nn.BatchNorm2d modules; only ``forward``
differs: it runs the whole block through ``fusekit.ops.inverted_residual`` (BatchNorm folded in
eval, exact training-mode BatchNorm with the expanded activations recomputed in backward, or
``mode="mobiletl"``: internal BNs frozen).

``fuse_inverted_residuals(model)`` recognizes those blocks by structure (attribute names, module
shapes and, for activations and TF-SAME convolutions, by probing their behaviour; no class names)
and replaces them in place by fusekit modules that reuse the very same submodules.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.inverted_residual import ACTIVATIONS, fused_mbconv_block, inverted_residual_block
from ..ops.inverted_residual import SqueezeExcite as SqueezeExciteSpec
from .depthwise import DepthwiseConv2d, _check_backend, _has_hooks

__all__ = ["FusedMBConv", "InvertedResidual", "MBConv", "fuse_inverted_residuals"]

logger = logging.getLogger("fusekit")

LAYOUTS = ("torchvision", "timm")
MODES = ("recompute", "mobiletl")
SE_ACTIVATIONS = ("relu", "relu6", "silu", "hardswish")
SE_GATES = ("sigmoid", "hardsigmoid")
_ACTIVATION_ALIASES = {"swish": "silu", "hard_swish": "hardswish"}


# ----------------------------------------------------------------------------------------------
# parameter-free building blocks (the eager modules of the libraries, by their documented behaviour)
# ----------------------------------------------------------------------------------------------

def _activation_module(name: str) -> nn.Module:
    if name == "identity":
        return nn.Identity()
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}[name](inplace=True)


def _gate_module(name: str) -> nn.Module:
    return nn.Sigmoid() if name == "sigmoid" else nn.Hardsigmoid()


def _drop_rows(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth: zero whole samples with probability p, scale survivors by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


class StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth(p, "row")`` (per-sample), without parameters."""

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        if mode != "row":
            raise ValueError(f"StochasticDepth: only mode 'row' (per sample) is supported, got {mode!r}")
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_rows(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


class DropPath(nn.Module):
    """timm's ``DropPath(drop_prob)`` (per-sample, scaled by 1/keep), without parameters."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_rows(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: BatchNorm2d (plain BN state dict keys) followed by ``act``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 activation: str = "identity") -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = nn.Identity()
        self.act = _activation_module(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: ``avgpool``, ``fc1``, ``activation``, ``fc2``, ``scale_activation``."""

    def __init__(self, channels: int, squeeze_channels: int, activation: str = "silu", gate: str = "sigmoid") -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = _activation_module(activation)
        self.scale_activation = _gate_module(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class SqueezeExcite(nn.Module):
    """timm's efficientnet SqueezeExcite: ``conv_reduce``, ``act1``, ``conv_expand``, ``gate``."""

    def __init__(self, channels: int, reduced_channels: int, activation: str = "silu", gate: str = "sigmoid") -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, 1, bias=True)
        self.act1 = _activation_module(activation)
        self.conv_expand = nn.Conv2d(reduced_channels, channels, 1, bias=True)
        self.gate = _gate_module(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible / timm's make_divisible: nearest multiple, never 10% below value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# ----------------------------------------------------------------------------------------------
# argument rules
# ----------------------------------------------------------------------------------------------

def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _check_common(owner: str, *, stride, kernel_size, expand_ratio, activation, layout, mode, dilation, tf_same,
                  drop_prob, norm_layer) -> str:
    if stride not in (1, 2) or isinstance(stride, bool):
        raise ValueError(f"{owner}: stride must be 1 or 2, got {stride!r}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{owner}: kernel_size must be a positive odd int (the block pads (k-1)//2 per side), "
                         f"got {kernel_size!r}")
    if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, (int, float)) or not expand_ratio > 0:
        raise ValueError(f"{owner}: expand_ratio must be a number > 0, got {expand_ratio!r}")
    _positive_int(owner, "dilation", dilation)
    if tf_same and dilation != 1:
        raise ValueError(f"{owner}: tf_same=True (TF 'SAME' padding) needs dilation 1, got dilation={dilation}")
    activation = _ACTIVATION_ALIASES.get(activation, activation)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"{owner}: layout must be one of {LAYOUTS}, got {layout!r}")
    _check_mode(mode)
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"{owner}: stochastic_depth_prob must be in [0, 1), got {drop_prob!r}")
    if layout == "timm" and norm_layer is not None:
        raise ValueError(f"{owner}: norm_layer is torchvision's argument; the timm layout builds timm's "
                         f"BatchNormAct2d from eps and momentum")
    return activation


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_se(owner: str, se_activation, se_gate) -> str:
    se_activation = _ACTIVATION_ALIASES.get(se_activation, se_activation)
    if se_activation not in SE_ACTIVATIONS:
        raise ValueError(f"{owner}: se_activation must be one of {SE_ACTIVATIONS}, got {se_activation!r}")
    if se_gate not in SE_GATES:
        raise ValueError(f"{owner}: se_gate must be one of {SE_GATES}, got {se_gate!r}")
    return se_activation


# ----------------------------------------------------------------------------------------------
# where each role (expand conv, its BN, ...) lives in each layout
# ----------------------------------------------------------------------------------------------

def _role_paths(family: str, layout: str, has_expand: bool, has_se: bool) -> dict[str, str]:
    """role -> submodule path. family: "mobilenetv2" (torchvision InvertedResidual), "mbconv", "fused"."""
    if family == "fused":
        if layout == "torchvision":
            paths = {"expand_conv": "block.0.0", "expand_bn": "block.0.1"}
            if has_expand:
                paths.update(project_conv="block.1.0", project_bn="block.1.1")
            return paths
        if has_expand:
            return {"expand_conv": "conv_exp", "expand_bn": "bn1", "project_conv": "conv_pwl", "project_bn": "bn2"}
        return {"expand_conv": "conv", "expand_bn": "bn1"}
    paths: dict[str, str] = {}
    if layout == "timm":
        if has_expand:
            paths.update(expand_conv="conv_pw", expand_bn="bn1", dw_conv="conv_dw", dw_bn="bn2",
                         project_conv="conv_pwl", project_bn="bn3")
        else:
            paths.update(dw_conv="conv_dw", dw_bn="bn1", project_conv="conv_pw", project_bn="bn2")
        if has_se:
            paths.update(se_reduce="se.conv_reduce", se_expand="se.conv_expand")
        return paths
    seq = "conv" if family == "mobilenetv2" else "block"
    i = 0
    if has_expand:
        paths.update(expand_conv=f"{seq}.0.0", expand_bn=f"{seq}.0.1")
        i = 1
    paths.update(dw_conv=f"{seq}.{i}.0", dw_bn=f"{seq}.{i}.1")
    if family == "mobilenetv2":  # bare Conv2d and BN at the end of the Sequential
        paths.update(project_conv=f"{seq}.{i + 1}", project_bn=f"{seq}.{i + 2}")
        if has_se:
            raise ValueError("torchvision's MobileNetV2 InvertedResidual has no squeeze-excitation")
    else:
        if has_se:
            paths.update(se_reduce=f"{seq}.{i + 1}.fc1", se_expand=f"{seq}.{i + 1}.fc2")
            i += 1
        paths.update(project_conv=f"{seq}.{i + 1}.0", project_bn=f"{seq}.{i + 1}.1")
    return paths


def _translate_state_dict(state_dict, prefix: str, ours: dict[str, str], theirs: dict[str, str]) -> None:
    """Rename, in place, keys stored under the other layout's paths to this module's paths."""
    local = [k for k in state_dict if k.startswith(prefix)]
    split = {k: k[len(prefix):].rpartition(".") for k in local}
    if any(path in ours.values() for path, _, _ in split.values()):
        return  # already this layout
    role_of = {path: role for role, path in theirs.items()}
    renames = {k: prefix + ours[role_of[path]] + "." + leaf for k, (path, _, leaf) in split.items()
               if path in role_of and role_of[path] in ours}
    values = {old: state_dict.pop(old) for old in renames}
    for old, new in renames.items():
        state_dict[new] = values[old]


# ----------------------------------------------------------------------------------------------
# the modules
# ----------------------------------------------------------------------------------------------

class _FusedBlock(nn.Module):
    """Shared by the three blocks: role lookup, cross-layout loading, stochastic depth, repr."""

    _family = ""
    layout: str
    activation: str
    mode: str
    backend: str | None
    tf_same: bool
    _has_expand: bool
    _has_se: bool
    _residual: bool

    def _paths(self, layout: str | None = None) -> dict[str, str]:
        return _role_paths(self._family, layout or self.layout, self._has_expand, self._has_se)

    def _part(self, paths: dict[str, str], role: str):
        path = paths.get(role)
        return None if path is None else self.get_submodule(path)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for other in LAYOUTS:
            if other != self.layout:
                try:
                    theirs = self._paths(other)
                except ValueError:  # that layout cannot express this block
                    continue
                _translate_state_dict(state_dict, prefix, self._paths(), theirs)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _drop_module(self) -> nn.Module | None:
        module = self._modules.get("stochastic_depth", self._modules.get("drop_path"))
        if module is None or isinstance(module, nn.Identity):
            return None
        rate = getattr(module, "p", getattr(module, "drop_prob", None))
        return None if rate == 0 else module  # unknown rate: call it (it decides)

    def _finish(self, out: torch.Tensor, x: torch.Tensor, drop: nn.Module | None) -> torch.Tensor:
        return out if drop is None else drop(out) + x

    def _stochastic(self) -> nn.Module | None:
        """The stochastic-depth module when it acts on this call (training, residual, rate > 0)."""
        return self._drop_module() if self.training and self._residual else None

    def extra_repr(self) -> str:
        s = f"layout={self.layout!r}, activation={self.activation!r}, residual={self._residual}, mode={self.mode!r}"
        if self.tf_same:
            s += ", tf_same=True"
        return s if self.backend is None else f"{s}, backend={self.backend!r}"


class _InvertedResidualBase(_FusedBlock):
    se_activation: str
    se_gate: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = self._paths()
        part = partial(self._part, paths)
        se = None
        if self._has_se:
            se = SqueezeExciteSpec(part("se_reduce"), part("se_expand"), self.se_activation, self.se_gate)
        drop = self._stochastic()
        out = inverted_residual_block(
            x, part("expand_conv"), part("expand_bn"), part("dw_conv"), part("dw_bn"), part("project_conv"),
            part("project_bn"), activation=self.activation, se=se, residual=self._residual and drop is None,
            tf_same=self.tf_same, mode=self.mode, backend=self.backend)
        return self._finish(out, x, drop)

    def _build(self, inp, hidden, oup, kernel_size, stride, dilation, se_channels, norm_layer, eps, momentum,
               drop_prob) -> None:
        """Create the submodules in the source library's construction order (seeded inits then agree)."""
        act = self.activation
        # TF SAME: static symmetric padding where it is symmetric (stride 1), else dynamic (conv padding 0)
        pad = (kernel_size - 1) // 2 * dilation if not self.tf_same or stride == 1 else 0
        if self.layout == "timm":
            def bn(c, a):
                return BatchNormAct2d(c, eps=eps, momentum=momentum, activation=a)

            def se_module(width):
                return (SqueezeExcite(width, se_channels, self.se_activation, self.se_gate) if self._has_se
                        else nn.Identity())
            if self._has_expand:
                self.conv_pw = nn.Conv2d(inp, hidden, 1, bias=False)
                self.bn1 = bn(hidden, act)
                self.conv_dw = nn.Conv2d(hidden, hidden, kernel_size, stride, pad, dilation, groups=hidden, bias=False)
                self.bn2 = bn(hidden, act)
                self.aa = nn.Identity()
                self.se = se_module(hidden)
                self.conv_pwl = nn.Conv2d(hidden, oup, 1, bias=False)
                self.bn3 = bn(oup, "identity")
            else:
                self.conv_dw = nn.Conv2d(inp, inp, kernel_size, stride, pad, dilation, groups=inp, bias=False)
                self.bn1 = bn(inp, act)
                self.aa = nn.Identity()
                self.se = se_module(inp)
                self.conv_pw = nn.Conv2d(inp, oup, 1, bias=False)
                self.bn2 = bn(oup, "identity")
            self.drop_path = DropPath(drop_prob) if drop_prob else nn.Identity()
            self.has_skip = self._residual
            return
        if norm_layer is None:
            norm_layer = partial(nn.BatchNorm2d, eps=eps, momentum=momentum)

        def conv_norm_act(cin, cout, k, s, groups, a):
            conv = (nn.Conv2d(cin, cout, k, s, pad, dilation, groups=groups, bias=False) if k > 1
                    else nn.Conv2d(cin, cout, 1, bias=False))
            layers = [conv, norm_layer(cout)]
            if a is not None:
                layers.append(_activation_module(a))
            return nn.Sequential(*layers)

        layers: list[nn.Module] = []
        if self._has_expand:
            layers.append(conv_norm_act(inp, hidden, 1, 1, 1, act))
        layers.append(conv_norm_act(hidden, hidden, kernel_size, stride, hidden, act))
        if self._family == "mobilenetv2":
            layers += [nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), norm_layer(oup)]
            self.conv = nn.Sequential(*layers)
            if drop_prob:
                self.stochastic_depth = StochasticDepth(drop_prob, "row")
        else:
            layers.append(SqueezeExcitation(hidden, se_channels, self.se_activation, self.se_gate))
            layers.append(conv_norm_act(hidden, oup, 1, 1, 1, None))
            self.block = nn.Sequential(*layers)
            self.stochastic_depth = StochasticDepth(drop_prob, "row")
        self.use_res_connect = self._residual
        self.out_channels = oup
        self._is_cn = stride > 1


class InvertedResidual(_InvertedResidualBase):
    """MobileNetV2's inverted residual block (1x1 expand -> BN -> act -> kxk depthwise -> BN -> act ->
    1x1 project -> BN (+ x)), computed by fusekit's fused op.

    Constructor as torchvision's ``InvertedResidual(inp, oup, stride, expand_ratio, norm_layer)``;
    hidden width ``int(round(inp * expand_ratio))`` (or ``expanded_channels``); no expand stage when
    expand_ratio == 1. ``layout="timm"`` names the submodules as timm's InvertedResidual
    (DepthwiseSeparableConv for t = 1), BN eps/momentum from ``eps``/``momentum``. ``tf_same`` pads
    the depthwise conv TF-"SAME" (timm's tf_* models). ``stochastic_depth_prob`` > 0 adds
    per-sample stochastic depth on the residual branch in training.
    """

    _family = "mobilenetv2"

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float, norm_layer: Callable | None = None, *,
                 kernel_size: int = 3, activation: str = "relu6", layout: str = "torchvision",
                 mode: str = "recompute", backend: str | None = None, dilation: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, tf_same: bool = False, stochastic_depth_prob: float = 0.0,
                 expanded_channels: int | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _positive_int(owner, "inp", inp)
        _positive_int(owner, "oup", oup)
        self.activation = _check_common(owner, stride=stride, kernel_size=kernel_size, expand_ratio=expand_ratio,
                                        activation=activation, layout=layout, mode=mode, dilation=dilation,
                                        tf_same=tf_same, drop_prob=stochastic_depth_prob, norm_layer=norm_layer)
        hidden = int(round(inp * expand_ratio)) if expanded_channels is None else \
            _positive_int(owner, "expanded_channels", expanded_channels)
        self.layout, self.mode, self.backend, self.tf_same = layout, mode, _check_backend(backend), bool(tf_same)
        self._has_expand = expand_ratio != 1 or hidden != inp
        if not self._has_expand:
            hidden = inp
        self._has_se = False
        self.se_activation, self.se_gate = "silu", "sigmoid"
        self._residual = stride == 1 and inp == oup
        self._build(inp, hidden, oup, kernel_size, stride, dilation, 0, norm_layer, eps, momentum,
                    stochastic_depth_prob)


class MBConv(_InvertedResidualBase):
    """EfficientNet's MBConv: 1x1 expand -> BN -> SiLU -> kxk depthwise -> BN -> SiLU ->
    squeeze-excitation -> 1x1 project -> BN (+ stochastic_depth(.) + x), computed by fusekit.

    Hidden width ``_make_divisible(in_channels * expand_ratio, 8)`` as torchvision and timm (or
    ``expanded_channels``); no expand stage when it equals in_channels. SE width: torchvision layout
    ``max(1, in_channels // 4)``, timm layout ``round(in_channels * se_ratio)``; ``se_channels``
    overrides; ``se_ratio=0`` (timm layout only) means no SE. ``eps``/``momentum`` set the BNs (1e-3
    for tf_* and torchvision B5+ / V2 models), ``tf_same=True`` for timm's tf_* models.
    """

    _family = "mbconv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 expand_ratio: float = 6, norm_layer: Callable | None = None, *, se_ratio: float = 0.25,
                 se_channels: int | None = None, activation: str = "silu", se_activation: str | None = None,
                 se_gate: str = "sigmoid", stochastic_depth_prob: float = 0.0, dilation: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, tf_same: bool = False, expanded_channels: int | None = None,
                 layout: str = "torchvision", mode: str = "recompute", backend: str | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _positive_int(owner, "in_channels", in_channels)
        _positive_int(owner, "out_channels", out_channels)
        self.activation = _check_common(owner, stride=stride, kernel_size=kernel_size, expand_ratio=expand_ratio,
                                        activation=activation, layout=layout, mode=mode, dilation=dilation,
                                        tf_same=tf_same, drop_prob=stochastic_depth_prob, norm_layer=norm_layer)
        self.se_activation = _check_se(owner, self.activation if se_activation is None else se_activation, se_gate)
        self.se_gate = se_gate
        hidden = _make_divisible(in_channels * expand_ratio) if expanded_channels is None else \
            _positive_int(owner, "expanded_channels", expanded_channels)
        if expand_ratio == 1 and expanded_channels is None:
            hidden = in_channels
        if se_channels is None:
            if not se_ratio:
                se_channels = 0
            elif layout == "torchvision":
                se_channels = max(1, math.floor(in_channels * se_ratio))
            else:
                se_channels = max(1, round(in_channels * se_ratio))
        elif isinstance(se_channels, bool) or not isinstance(se_channels, int) or se_channels < 0:
            raise ValueError(f"{owner}: se_channels must be a non-negative int (0: no SE), got {se_channels!r}")
        if se_channels == 0 and layout == "torchvision":
            raise ValueError(f"{owner}: torchvision's MBConv always has squeeze-excitation (se_channels >= 1); "
                             f"use layout='timm' for a block without SE")
        self.layout, self.mode, self.backend, self.tf_same = layout, mode, _check_backend(backend), bool(tf_same)
        self._has_expand = hidden != in_channels
        self._has_se = se_channels > 0
        self._residual = stride == 1 and in_channels == out_channels
        self._build(in_channels, hidden, out_channels, kernel_size, stride, dilation, se_channels, norm_layer,
                    eps, momentum, stochastic_depth_prob)


class FusedMBConv(_FusedBlock):
    """EfficientNetV2's Fused-MBConv: kxk conv (stride) -> BN -> SiLU -> 1x1 project -> BN (+ x), or
    for expand_ratio 1 just kxk conv -> BN -> SiLU (+ x), computed by fusekit's fused op.

    torchvision layout ``block.0`` / ``block.1`` + ``stochastic_depth``; timm layout EdgeResidual
    (``conv_exp``, ``bn1``, ``conv_pwl``, ``bn2``) or, for t = 1, ConvBnAct (``conv``, ``bn1``), with
    ``drop_path``. Hidden width ``_make_divisible(in_channels * expand_ratio, 8)``.
    """

    _family = "fused"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 expand_ratio: float = 4, norm_layer: Callable | None = None, *, activation: str = "silu",
                 stochastic_depth_prob: float = 0.0, dilation: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, tf_same: bool = False, expanded_channels: int | None = None,
                 layout: str = "torchvision", mode: str = "recompute", backend: str | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _positive_int(owner, "in_channels", in_channels)
        _positive_int(owner, "out_channels", out_channels)
        self.activation = _check_common(owner, stride=stride, kernel_size=kernel_size, expand_ratio=expand_ratio,
                                        activation=activation, layout=layout, mode=mode, dilation=dilation,
                                        tf_same=tf_same, drop_prob=stochastic_depth_prob, norm_layer=norm_layer)
        hidden = _make_divisible(in_channels * expand_ratio) if expanded_channels is None else \
            _positive_int(owner, "expanded_channels", expanded_channels)
        if expand_ratio == 1 and expanded_channels is None:
            hidden = in_channels
        self._has_expand = hidden != in_channels
        if not self._has_expand and out_channels != in_channels:
            # without a project the kxk conv itself produces the output channels
            hidden = out_channels
        self.layout, self.mode, self.backend, self.tf_same = layout, mode, _check_backend(backend), bool(tf_same)
        self._has_se = False
        self._residual = stride == 1 and in_channels == out_channels
        pad = (kernel_size - 1) // 2 * dilation if not tf_same or stride == 1 else 0
        width = hidden if self._has_expand else out_channels
        conv = partial(nn.Conv2d, in_channels, width, kernel_size, stride, pad, dilation, bias=False)
        if layout == "timm":
            if self._has_expand:
                self.conv_exp = conv()
                self.bn1 = BatchNormAct2d(width, eps=eps, momentum=momentum, activation=self.activation)
                self.aa = nn.Identity()
                self.se = nn.Identity()
                self.conv_pwl = nn.Conv2d(hidden, out_channels, 1, bias=False)
                self.bn2 = BatchNormAct2d(out_channels, eps=eps, momentum=momentum)
            else:
                self.conv = conv()
                self.bn1 = BatchNormAct2d(width, eps=eps, momentum=momentum, activation=self.activation)
                self.aa = nn.Identity()
            self.drop_path = DropPath(stochastic_depth_prob) if stochastic_depth_prob else nn.Identity()
            self.has_skip = self._residual
            return
        if norm_layer is None:
            norm_layer = partial(nn.BatchNorm2d, eps=eps, momentum=momentum)
        layers: list[nn.Module] = [nn.Sequential(conv(), norm_layer(width), _activation_module(self.activation))]
        if self._has_expand:
            layers.append(nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), norm_layer(out_channels)))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.use_res_connect = self._residual
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = self._paths()
        drop = self._stochastic()
        out = fused_mbconv_block(
            x, self._part(paths, "expand_conv"), self._part(paths, "expand_bn"), self._part(paths, "project_conv"),
            self._part(paths, "project_bn"), activation=self.activation, residual=self._residual and drop is None,
            tf_same=self.tf_same, mode=self.mode, backend=self.backend)
        return self._finish(out, x, drop)


# ----------------------------------------------------------------------------------------------
# the converter: recognize blocks by structure, reuse their submodules
# ----------------------------------------------------------------------------------------------

class _Unsupported(Exception):
    """A block of a known family that fusekit cannot express (the message says why)."""


_PROBE_VALUES = (-9.0, -6.0, -4.0, -3.0, -2.5, -1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 2.5, 3.0, 4.0, 6.0, 7.0, 9.0)
_FUNCTIONS = {"identity": lambda u: u, "relu": F.relu, "relu6": lambda u: u.clamp(0, 6), "silu": F.silu,
              "hardswish": F.hardswish, "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


def _probe_function(module: nn.Module | None, names, what: str) -> str:
    """Which of ``names`` the parameter-free elementwise ``module`` computes, found by evaluating it."""
    if module is None or isinstance(module, nn.Identity):
        if "identity" in names:
            return "identity"
        raise _Unsupported(f"{what} is missing")
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        raise _Unsupported(f"{what} {type(module).__name__} has parameters or buffers")
    probe = torch.tensor(_PROBE_VALUES).view(1, -1, 1, 1)
    try:
        with torch.no_grad():
            out = module(probe.clone())
    except Exception as error:  # noqa: BLE001  (any failure means: not an activation we know)
        raise _Unsupported(f"{what} {type(module).__name__} failed on a probe: {error}") from None
    for name in names:
        if isinstance(out, torch.Tensor) and out.shape == probe.shape and \
                torch.allclose(out, _FUNCTIONS[name](probe), atol=1e-5, rtol=1e-5):
            return name
    raise _Unsupported(f"{what} {type(module).__name__} is none of {tuple(names)}")


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return {name: child for name, child in module._modules.items() if child is not None}


def _conv(module, what: str, *, kernel1: bool = False, depthwise: bool = False, full: bool = False) -> bool:
    """Checks a conv; returns whether it pads TF "SAME" dynamically (timm's Conv2dSame)."""
    if not isinstance(module, nn.Conv2d):
        raise _Unsupported(f"{what} is {type(module).__name__}, not an nn.Conv2d")
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise _Unsupported(f"{what} is not initialized yet (lazy)")
    if kernel1 and (module.kernel_size != (1, 1) or module.stride != (1, 1) or module.groups != 1):
        raise _Unsupported(f"{what} must be a 1x1 stride-1 conv with groups 1, got kernel {module.kernel_size}, "
                           f"stride {module.stride}, groups {module.groups}")
    if depthwise and not (module.groups == module.in_channels == module.out_channels):
        raise _Unsupported(f"{what} must be depthwise (groups == channels; timm group_size 1), got groups "
                           f"{module.groups} for {module.in_channels} -> {module.out_channels} channels")
    if full and module.groups != 1:
        raise _Unsupported(f"{what} must have groups 1, got {module.groups}")
    if not kernel1:
        if any(k % 2 == 0 for k in module.kernel_size) or module.stride[0] != module.stride[1] or \
                module.stride[0] not in (1, 2):
            raise _Unsupported(f"{what}: needs an odd kernel and stride 1 or 2, got kernel {module.kernel_size}, "
                               f"stride {module.stride}")
    plain = type(module).forward is nn.Conv2d.forward and type(module)._conv_forward is nn.Conv2d._conv_forward
    if plain or isinstance(module, DepthwiseConv2d):  # fusekit's depthwise conv computes nn.Conv2d's result
        if module.padding_mode != "zeros":
            raise _Unsupported(f"{what}: padding_mode {module.padding_mode!r}; needs zero padding")
        if kernel1 and module.padding not in ((0, 0), "same", "valid"):
            raise _Unsupported(f"{what}: a 1x1 conv must not pad, got padding {module.padding}")
        return False
    return _probe_tf_same(module, what)


def _probe_tf_same(conv: nn.Conv2d, what: str) -> bool:
    """A conv with its own forward is accepted only if it computes a TF-"SAME" padded convolution."""
    from ..ops.inverted_residual import tf_same_padding
    if conv.dilation != (1, 1):
        raise _Unsupported(f"{what}: TF-SAME padding with dilation {conv.dilation} is not supported")
    kh, kw = conv.kernel_size
    w = conv.weight
    generator = torch.Generator().manual_seed(0)
    for h, wd in ((2 * kh + 2, 2 * kw + 1), (2 * kh + 1, 2 * kw + 2)):  # even and odd sizes
        x = torch.randn(1, conv.in_channels, h, wd, generator=generator).to(w.device, w.dtype)
        try:
            with torch.no_grad():
                out = conv(x)
                top, bottom, left, right = tf_same_padding((h, wd), conv.kernel_size, conv.stride)
                expected = F.conv2d(F.pad(x, (left, right, top, bottom)), w, conv.bias, conv.stride, 0, 1,
                                    conv.groups)
        except Exception as error:  # noqa: BLE001
            raise _Unsupported(f"{what} {type(conv).__name__} failed on a probe: {error}") from None
        if out.shape != expected.shape or not torch.allclose(out, expected, atol=1e-4, rtol=1e-3):
            raise _Unsupported(f"{what} {type(conv).__name__} overrides forward and does not compute a TF-SAME "
                               f"(or plain) padded convolution")
    return True


def _bn(module, what: str, channels: int) -> str:
    """Checks a BatchNorm2d (timm's BatchNormAct2d included); returns its fused activation's name."""
    if not isinstance(module, nn.BatchNorm2d):
        raise _Unsupported(f"{what} is {type(module).__name__}, not an nn.BatchNorm2d")
    if module.weight is None or not module.track_running_stats or module.num_features != channels:
        raise _Unsupported(f"{what} must be affine with running statistics over {channels} channels")
    extra = set(_children(module)) - {"act", "drop"}
    if extra:
        raise _Unsupported(f"{what} has unknown submodules {sorted(extra)}")
    if "drop" in _children(module) and not isinstance(module.drop, nn.Identity):
        raise _Unsupported(f"{what} has a dropout")
    if "act" not in _children(module):
        return "identity"
    return _probe_function(module.act, ACTIVATIONS, f"{what}.act")


def _se(module, reduce_name: str, expand_name: str, act_name: str, gate_name: str, channels: int, what: str):
    allowed = {reduce_name, expand_name, act_name, gate_name} | ({"avgpool"} if reduce_name == "fc1" else set())
    names = set(_children(module))
    if names - allowed or {reduce_name, expand_name} - names:
        raise _Unsupported(f"{what}: unknown squeeze-excitation structure {sorted(names)}")
    if reduce_name == "fc1":
        pool = module.avgpool
        if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
            raise _Unsupported(f"{what}.avgpool must be a global average pool")
    reduce, expand = getattr(module, reduce_name), getattr(module, expand_name)
    for conv, cin, part in ((reduce, channels, reduce_name), (expand, reduce.out_channels, expand_name)):
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1
                and conv.bias is not None and conv.in_channels == cin and type(conv).forward is nn.Conv2d.forward):
            raise _Unsupported(f"{what}.{part} must be a plain 1x1 nn.Conv2d with bias from {cin} channels")
    if expand.out_channels != channels:
        raise _Unsupported(f"{what}.{expand_name} must give {channels} channels")
    activation = _probe_function(getattr(module, act_name, None), SE_ACTIVATIONS, f"{what}.{act_name}")
    gate = _probe_function(getattr(module, gate_name, None), SE_GATES, f"{what}.{gate_name}")
    return activation, gate


def _conv_norm_act(seq, what: str, has_act: bool):
    """torchvision's Conv2dNormActivation: Sequential(conv, bn[, act])."""
    if not isinstance(seq, nn.Sequential) or len(seq) != (3 if has_act else 2):
        raise _Unsupported(f"{what} must be Sequential(Conv2d, BatchNorm2d{', activation' if has_act else ''})")
    activation = _probe_function(seq[2], ACTIVATIONS, f"{what}.2") if has_act else "identity"
    return seq[0], seq[1], activation


def _is_se(module) -> bool:
    return hasattr(module, "fc1") and hasattr(module, "fc2")


def _spec_torchvision(module) -> dict | None:
    children = _children(module)
    if set(children) == {"conv"} and isinstance(module.conv, nn.Sequential) and hasattr(module, "use_res_connect"):
        seq = list(module.conv)
        if len(seq) not in (3, 4):
            raise _Unsupported("conv must hold [expand], depthwise, project conv, project BN")
        parts, acts = {}, []
        if len(seq) == 4:
            parts["expand_conv"], parts["expand_bn"], a = _conv_norm_act(seq[0], "conv.0", True)
            acts.append(a)
        parts["dw_conv"], parts["dw_bn"], a = _conv_norm_act(seq[-3], f"conv.{len(seq) - 3}", True)
        acts.append(a)
        parts["project_conv"], parts["project_bn"] = seq[-2], seq[-1]
        return dict(cls=InvertedResidual, family="mobilenetv2", layout="torchvision", parts=parts, acts=acts,
                    residual=bool(module.use_res_connect), drop_children=())
    if set(children) == {"block", "stochastic_depth"} and isinstance(module.block, nn.Sequential) and \
            hasattr(module, "use_res_connect"):
        seq = list(module.block)
        se_at = [i for i, m in enumerate(seq) if _is_se(m)]
        parts, acts = {}, []
        if se_at:  # MBConv: [expand], depthwise, SE, project
            if se_at != [len(seq) - 2] or len(seq) not in (3, 4):
                raise _Unsupported("block must hold [expand], depthwise, squeeze-excitation, project")
            i = 0
            if len(seq) == 4:
                parts["expand_conv"], parts["expand_bn"], a = _conv_norm_act(seq[0], "block.0", True)
                acts.append(a)
                i = 1
            parts["dw_conv"], parts["dw_bn"], a = _conv_norm_act(seq[i], f"block.{i}", True)
            acts.append(a)
            parts["se"] = (seq[i + 1], "fc1", "fc2", "activation", "scale_activation")
            parts["project_conv"], parts["project_bn"], _ = _conv_norm_act(seq[i + 2], f"block.{i + 2}", False)
            return dict(cls=MBConv, family="mbconv", layout="torchvision", parts=parts, acts=acts,
                        residual=bool(module.use_res_connect))
        if len(seq) not in (1, 2):
            raise _Unsupported("block must hold a kxk conv and an optional 1x1 project (FusedMBConv)")
        parts["expand_conv"], parts["expand_bn"], a = _conv_norm_act(seq[0], "block.0", True)
        acts.append(a)
        if len(seq) == 2:
            parts["project_conv"], parts["project_bn"], _ = _conv_norm_act(seq[1], "block.1", False)
        return dict(cls=FusedMBConv, family="fused", layout="torchvision", parts=parts, acts=acts,
                    residual=bool(module.use_res_connect))
    return None


_TIMM_IR = {"conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3"}
_TIMM_DS = {"conv_dw", "bn1", "conv_pw", "bn2"}
_TIMM_EDGE = {"conv_exp", "bn1", "conv_pwl", "bn2"}
_TIMM_CONV_BN_ACT = {"conv", "bn1"}
_TIMM_OPTIONAL = {"aa", "se", "drop_path"}


def _spec_timm(module) -> dict | None:
    names = set(_children(module))
    if not hasattr(module, "has_skip"):
        return None
    for required, family in ((_TIMM_IR, "ir"), (_TIMM_EDGE, "edge"), (_TIMM_DS, "ds"), (_TIMM_CONV_BN_ACT, "cba")):
        if required <= names:
            break
    else:
        return None
    if family == "cba" and not isinstance(module.conv, nn.Conv2d):
        return None
    unknown = names - required - _TIMM_OPTIONAL
    if unknown:
        raise _Unsupported(f"has submodules fusekit does not compute: {sorted(unknown)}")
    if "aa" in names and not isinstance(module.aa, nn.Identity):
        raise _Unsupported("anti-aliasing (aa) is not supported")
    se = module._modules.get("se")
    has_se = se is not None and not isinstance(se, nn.Identity)
    if has_se and family in ("edge", "cba"):
        raise _Unsupported("squeeze-excitation in a Fused-MBConv (EdgeResidual) is not supported")
    parts: dict = {}
    if family == "ir":
        parts.update(expand_conv=module.conv_pw, expand_bn=module.bn1, dw_conv=module.conv_dw, dw_bn=module.bn2,
                     project_conv=module.conv_pwl, project_bn=module.bn3)
    elif family == "ds":
        parts.update(dw_conv=module.conv_dw, dw_bn=module.bn1, project_conv=module.conv_pw, project_bn=module.bn2)
    elif family == "edge":
        parts.update(expand_conv=module.conv_exp, expand_bn=module.bn1, project_conv=module.conv_pwl,
                     project_bn=module.bn2)
    else:
        parts.update(expand_conv=module.conv, expand_bn=module.bn1)
    if has_se:
        parts["se"] = (se, "conv_reduce", "conv_expand", "act1", "gate")
    cls = FusedMBConv if family in ("edge", "cba") else MBConv if has_se else InvertedResidual
    return dict(cls=cls, family="fused" if cls is FusedMBConv else cls._family, layout="timm", parts=parts,
                acts=None, residual=bool(module.has_skip))


def _fused_spec(module: nn.Module) -> dict | None:
    """How to fuse ``module``: a spec dict, None when it is no inverted-residual block, _Unsupported
    when it is one that fusekit cannot express."""
    if isinstance(module, _FusedBlock):
        return None
    spec = _spec_torchvision(module) or _spec_timm(module)
    if spec is None:
        return None
    parts = spec["parts"]
    fused = spec["family"] == "fused"
    # BN activations: torchvision keeps them beside the BN (spec["acts"]), timm inside it (.act)
    expand_conv, dw_conv = parts.get("expand_conv"), parts.get("dw_conv")
    tf_same = False
    if fused:
        tf_same = _conv(expand_conv, "the kxk conv", full=True)
        hidden = expand_conv.out_channels
        cin = expand_conv.in_channels
    else:
        if expand_conv is not None:
            _conv(expand_conv, "the expand conv", kernel1=True)
        tf_same = _conv(dw_conv, "the depthwise conv", depthwise=True)
        hidden = dw_conv.out_channels
        cin = dw_conv.in_channels if expand_conv is None else expand_conv.in_channels
        if expand_conv is not None and expand_conv.out_channels != hidden:
            raise _Unsupported("the expand conv and the depthwise conv disagree on the hidden width")
    acts = []
    if expand_conv is not None:
        acts.append(_bn(parts["expand_bn"], "the expand BN", expand_conv.out_channels))
    if dw_conv is not None:
        acts.append(_bn(parts["dw_bn"], "the depthwise BN", hidden))
    cout = hidden
    if parts.get("project_conv") is not None:
        project = parts["project_conv"]
        _conv(project, "the project conv", kernel1=True)
        if project.in_channels != hidden:
            raise _Unsupported("the project conv does not read the hidden width")
        cout = project.out_channels
        if _bn(parts["project_bn"], "the project BN", cout) != "identity":
            raise _Unsupported("the project BN applies an activation (timm pw_act); fusekit's project is linear")
    if spec["acts"] is not None:  # torchvision: the BN children carry no activation, the Sequential does
        if any(a != "identity" for a in acts):
            raise _Unsupported("a BN carries an activation and is followed by another")
        acts = spec["acts"]
    if len(set(acts)) != 1:
        raise _Unsupported(f"the expand and depthwise stages use different activations {acts}")
    activation = acts[0]
    se = parts.get("se")
    se_activation, se_gate = "silu", "sigmoid"
    if se is not None:
        se_activation, se_gate = _se(se[0], *se[1:], hidden, "the squeeze-excitation")
    stride = (expand_conv if fused else dw_conv).stride[0]
    if spec["residual"] and not (stride == 1 and cin == cout):
        raise _Unsupported(f"a residual needs stride 1 and in == out channels, got stride {stride}, {cin} -> {cout}")
    spec.update(activation=activation, se_activation=se_activation, se_gate=se_gate, tf_same=tf_same,
                has_expand=(expand_conv is not None and parts.get("project_conv") is not None) if fused
                else expand_conv is not None, has_se=se is not None)
    return spec


def _wrap(module: nn.Module, spec: dict, mode: str, backend: str | None) -> _FusedBlock:
    """A fusekit block that owns ``module``'s very submodules (shared parameters and buffers)."""
    cls = spec["cls"]
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in vars(module).items():  # use_res_connect, out_channels, _is_cn, has_skip, ...
        if key not in vars(new):
            setattr(new, key, value)
    for name, child in module._modules.items():
        new.add_module(name, child)
    new.training = module.training
    new.layout, new.activation, new.tf_same = spec["layout"], spec["activation"], spec["tf_same"]
    new.se_activation, new.se_gate = spec["se_activation"], spec["se_gate"]
    new.mode, new.backend = mode, backend
    new._has_expand, new._has_se, new._residual = spec["has_expand"], spec["has_se"], spec["residual"]
    new._paths()  # the layout must name every part where the module has it
    return new


def fuse_inverted_residuals(model: nn.Module, *, mode: str = "recompute", backend: str | None = None) -> nn.Module:
    """Replace, in place, every inverted-residual block of ``model`` by the fusekit module of the same
    layout, and return the model.

    Recognized by structure (no class names): torchvision's InvertedResidual (``conv`` Sequential +
    ``use_res_connect``), MBConv and FusedMBConv (``block`` + ``stochastic_depth``); timm's
    InvertedResidual (``conv_pw``/``bn1``/``conv_dw``/``bn2``/``conv_pwl``/``bn3``, optional ``se``),
    DepthwiseSeparableConv without pw_act, EdgeResidual and ConvBnAct (``has_skip``). Activations,
    SE gates and TF-SAME convs are identified by evaluating them. The new module reuses the block's
    submodules, so parameters, buffers, state_dict keys, devices and train/eval flags are unchanged.

    Blocks that cannot be expressed (unknown activation, SE gate other than sigmoid/hard-sigmoid,
    group_size != 1, TF-SAME with dilation, extra submodules, hooks...) are left as
    they are. The summary is stored on the returned model: ``fusekit_fused`` (names replaced) and
    ``fusekit_skipped`` ({name: reason}); skipped blocks are also logged on the "fusekit" logger.
    When ``model`` itself is a block, the returned model is its replacement.
    """
    _check_mode(mode)
    backend = _check_backend(backend)
    fused: list[str] = []
    skipped: dict[str, str] = {}
    replacement: dict[int, nn.Module] = {}
    root = model
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in replacement:
            new = replacement[id(module)]
        else:
            try:
                spec = _fused_spec(module)
            except _Unsupported as why:
                skipped[name] = str(why)
                logger.info("fuse_inverted_residuals: left %s (%s) unchanged: %s", name or "<model>",
                            type(module).__name__, why)
                continue
            if spec is None:
                continue
            hooked = [sub or "the block" for sub, m in module.named_modules() if _has_hooks(m)]
            if hooked:
                skipped[name] = f"hooks on {', '.join(hooked)} would not run inside the fused kernel"
                continue
            new = replacement[id(module)] = _wrap(module, spec, mode, backend)
        if name:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
        else:
            root = new
        fused.append(name)
    root.fusekit_fused = fused
    root.fusekit_skipped = skipped
    return root
