"""Depthwise large-kernel CNNs: ConvNeXt, RepLKNet and InceptionNeXt (MetaNeXt).

Each builder takes ``impl="fusekit"`` (depthwise convs are fusekit.nn.DepthwiseConv2d, the
InceptionNeXt token mixer is fusekit.nn.InceptionDWConv2d) or ``impl="eager"`` (plain
``nn.Conv2d(groups=C)`` and the plain-torch ``InceptionDWConv2d`` below). Both impls build the
same module tree with the official repositories' state-dict keys, e.g.

- ConvNeXt: ``downsample_layers.0.0`` (4x4 stem conv), ``downsample_layers.0.1`` (channels-first
  LayerNorm), ``stages.0.0.dwconv``, ``stages.0.0.pwconv1``, ``stages.0.0.gamma``, ``norm``, ``head``;
- RepLKNet: ``stem.0.conv``, ``stages.0.blocks.0.large_kernel.lkb_origin.conv``,
  ``stages.0.blocks.0.large_kernel.small_conv.bn``, ``stages.0.blocks.1.preffn_bn``,
  ``transitions.0.1.conv``, ``norm``, ``head``;
- InceptionNeXt: ``stem.0``, ``stages.1.downsample.1``, ``stages.0.blocks.0.token_mixer.dwconv_hw``,
  ``stages.0.blocks.0.mlp.fc1``, ``head.fc1``, ``head.norm``, ``head.fc2``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..nn.depthwise import DepthwiseConv2d
from ..nn.depthwise import InceptionDWConv2d as FusedInceptionDWConv2d
from ..nn.inverted_residual import DropPath  # timm's per-sample stochastic depth
from ..nn.reparam import reparameterize_large_kernel_conv

__all__ = [
    "ConvFFN", "ConvMlp", "ConvNeXt", "ConvNeXtBlock", "DropPath", "InceptionDWConv2d", "LayerNorm2d",
    "MetaNeXt", "MetaNeXtBlock", "MetaNeXtStage", "MlpHead", "RepLKBlock", "RepLKNet", "RepLKNetStage",
    "ReparamLargeKernelConv", "convnext", "inceptionnext", "replknet",
]

IMPLS = ("fusekit", "eager")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _depthwise(impl: str, backend: str | None, channels: int, kernel_size: int, stride: int = 1,
               bias: bool = True) -> nn.Conv2d:
    """A depthwise conv with "same" padding k // 2 (odd k): fusekit's module or the plain nn.Conv2d."""
    if impl == "fusekit":
        return DepthwiseConv2d(channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias,
                               backend=backend)
    return nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=channels,
                     bias=bias)


def _drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rates rising linearly over all blocks, split per stage."""
    rates = torch.linspace(0, rate, sum(depths)).tolist()
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[start:start + depth] for start, depth in zip(starts, depths)]


def _trunc_normal_init(module: nn.Module) -> None:
    # ConvNeXt / InceptionNeXt initialization: truncated normal (std 0.02) weights, zero biases
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


# ----------------------------------------------------------------------------------------------
# ConvNeXt
# ----------------------------------------------------------------------------------------------

class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of [N, C, H, W] (ConvNeXt's ``data_format="channels_first"``).

    Parameters ``weight`` / ``bias`` as in ConvNeXt. Reduces over dim 1 directly, so the output
    keeps the input's memory format (NCHW or channels_last).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ConvNeXtBlock(nn.Module):
    """dwconv k x k -> LayerNorm (channels last) -> Linear 4C -> GELU -> Linear C -> gamma -> + x."""

    def __init__(self, dim: int, kernel_size: int = 7, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-6, impl: str = "eager", backend: str | None = None) -> None:
        super().__init__()
        self.dwconv = _depthwise(impl, backend, dim, kernel_size)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(torch.full((dim,), layer_scale_init_value))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # [N, H, W, C]
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt (Liu et al. 2022) with the official module names and initialization."""

    def __init__(self, depths: Sequence[int], dims: Sequence[int], kernel_size: int = 7, num_classes: int = 1000,
                 in_chans: int = 3, drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6,
                 impl: str = "eager", backend: str | None = None) -> None:
        super().__init__()
        _check_impl(impl)
        if len(depths) != len(dims):
            raise ValueError(f"depths and dims must have the same length, got {len(depths)} and {len(dims)}")
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        rates = _drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList(
            nn.Sequential(*[ConvNeXtBlock(dim, kernel_size, rate, layer_scale_init_value, impl, backend)
                            for rate in stage_rates])
            for dim, stage_rates in zip(dims, rates))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(_trunc_normal_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x.mean((-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def convnext(impl: str = "fusekit", backend: str | None = None, *, depths: Sequence[int], dims: Sequence[int],
             kernel_size: int = 7, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
             layer_scale_init_value: float = 1e-6) -> ConvNeXt:
    """ConvNeXt; ConvNeXt-T is depths (3, 3, 9, 3), dims (96, 192, 384, 768)."""
    return ConvNeXt(depths, dims, kernel_size, num_classes, in_chans, drop_path_rate, layer_scale_init_value,
                    impl=impl, backend=backend)


# ----------------------------------------------------------------------------------------------
# RepLKNet
# ----------------------------------------------------------------------------------------------

def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
             relu: bool = False, impl: str = "eager", backend: str | None = None) -> nn.Sequential:
    """RepLKNet's conv_bn / conv_bn_relu: Sequential(conv (no bias), bn[, nonlinear]); padding k // 2."""
    if groups == in_channels == out_channels:
        conv = _depthwise(impl, backend, in_channels, kernel_size, stride, bias=False)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
    block = nn.Sequential()
    block.add_module("conv", conv)
    block.add_module("bn", nn.BatchNorm2d(out_channels))
    if relu:
        block.add_module("nonlinear", nn.ReLU())
    return block


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain nn.Conv2d with ``conv``'s configuration, sharing its parameters."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                      device="meta", dtype=conv.weight.dtype)
    plain.weight, plain.bias = conv.weight, conv.bias
    plain.train(conv.training)
    return plain


class ReparamLargeKernelConv(nn.Module):
    """Depthwise K x K conv-BN (``lkb_origin``) plus a parallel s x s conv-BN (``small_conv``).

    ``reparameterize()`` merges both branches (BN folded, running statistics) into one conv
    ``lkb_reparam`` for inference; it stays a fusekit conv when the branches were fusekit convs
    and becomes a plain nn.Conv2d otherwise.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: int | None, impl: str = "eager",
                 backend: str | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.lkb_origin = _conv_bn(channels, channels, kernel_size, groups=channels, impl=impl, backend=backend)
        if small_kernel is not None:
            if small_kernel > kernel_size:
                raise ValueError(f"small_kernel {small_kernel} must not exceed kernel_size {kernel_size}")
            self.small_conv = _conv_bn(channels, channels, small_kernel, groups=channels, impl=impl, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the branches into ``lkb_reparam`` (eval-mode semantics: BN running statistics)."""
        conv = self.lkb_origin.conv
        fusekit = isinstance(conv, DepthwiseConv2d)
        merged = reparameterize_large_kernel_conv(self, backend=conv.backend if fusekit else None)
        if not fusekit:
            self.lkb_reparam = _plain_conv(merged)


class RepLKBlock(nn.Module):
    """prelkb_bn -> pw1 (1x1 conv-BN-ReLU) -> large_kernel -> ReLU -> pw2 (1x1 conv-BN) -> + x."""

    def __init__(self, in_channels: int, dw_channels: int, block_lk_size: int, small_kernel: int | None,
                 drop_path: float = 0.0, impl: str = "eager", backend: str | None = None) -> None:
        super().__init__()
        self.pw1 = _conv_bn(in_channels, dw_channels, 1, relu=True)
        self.pw2 = _conv_bn(dw_channels, in_channels, 1)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, block_lk_size, small_kernel, impl, backend)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_channels)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x)))))
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """preffn_bn -> pw1 (1x1 conv-BN) -> GELU -> pw2 (1x1 conv-BN) -> + x."""

    def __init__(self, in_channels: int, internal_channels: int, out_channels: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.drop_path = _drop_path(drop_path)
        self.preffn_bn = nn.BatchNorm2d(in_channels)
        self.pw1 = _conv_bn(in_channels, internal_channels, 1)
        self.pw2 = _conv_bn(internal_channels, out_channels, 1)
        self.nonlinear = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKNetStage(nn.Module):
    """``blocks`` alternates RepLKBlock and ConvFFN, one pair per block; ``norm`` is the identity
    (RepLKNet's intermediate-feature norm is off for classification)."""

    def __init__(self, channels: int, drop_path_rates: Sequence[float], stage_lk_size: int,
                 small_kernel: int | None, dw_ratio: float = 1, ffn_ratio: float = 4, impl: str = "eager",
                 backend: str | None = None) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for rate in drop_path_rates:
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel, rate, impl,
                                     backend))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, rate))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class RepLKNet(nn.Module):
    """RepLKNet (Ding et al. 2022) for classification, with the official module names."""

    def __init__(self, large_kernel_sizes: Sequence[int], layers: Sequence[int], channels: Sequence[int],
                 small_kernel: int | None, dw_ratio: float = 1, ffn_ratio: float = 4, num_classes: int = 1000,
                 in_chans: int = 3, drop_path_rate: float = 0.0, impl: str = "eager",
                 backend: str | None = None) -> None:
        super().__init__()
        _check_impl(impl)
        if not len(large_kernel_sizes) == len(layers) == len(channels):
            raise ValueError("large_kernel_sizes, layers and channels must have the same length, got "
                             f"{len(large_kernel_sizes)}, {len(layers)} and {len(channels)}")
        width = channels[0]
        self.stem = nn.ModuleList([
            _conv_bn(in_chans, width, 3, stride=2, relu=True),
            _conv_bn(width, width, 3, groups=width, relu=True, impl=impl, backend=backend),
            _conv_bn(width, width, 1, relu=True),
            _conv_bn(width, width, 3, stride=2, groups=width, relu=True, impl=impl, backend=backend),
        ])
        rates = _drop_path_rates(drop_path_rate, layers)
        self.stages = nn.ModuleList(
            RepLKNetStage(channels[i], rates[i], large_kernel_sizes[i], small_kernel, dw_ratio, ffn_ratio, impl,
                          backend)
            for i in range(len(layers)))
        self.transitions = nn.ModuleList(
            nn.Sequential(_conv_bn(channels[i], channels[i + 1], 1, relu=True),
                          _conv_bn(channels[i + 1], channels[i + 1], 3, stride=2, groups=channels[i + 1], relu=True,
                                   impl=impl, backend=backend))
            for i in range(len(layers) - 1))
        self.norm = nn.BatchNorm2d(channels[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.stem:
            x = layer(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.norm(self.forward_features(x)))
        return self.head(torch.flatten(x, 1))

    def reparameterize(self) -> list[str]:
        """Merge every ReparamLargeKernelConv's branches for inference (call in eval mode, after
        training: BN running statistics are folded in). Returns the merged modules' names."""
        merged = []
        for name, module in self.named_modules():
            if isinstance(module, ReparamLargeKernelConv) and not hasattr(module, "lkb_reparam"):
                module.reparameterize()
                merged.append(name)
        return merged


def replknet(impl: str = "fusekit", backend: str | None = None, *, large_kernel_sizes: Sequence[int],
             layers: Sequence[int], channels: Sequence[int], small_kernel: int | None, dw_ratio: float = 1,
             ffn_ratio: float = 4, num_classes: int = 1000, in_chans: int = 3,
             drop_path_rate: float = 0.0) -> RepLKNet:
    """RepLKNet; RepLKNet-31B is kernels (31, 29, 27, 13), layers (2, 2, 18, 2), channels (128 .. 1024)."""
    return RepLKNet(large_kernel_sizes, layers, channels, small_kernel, dw_ratio, ffn_ratio, num_classes, in_chans,
                    drop_path_rate, impl=impl, backend=backend)


# ----------------------------------------------------------------------------------------------
# InceptionNeXt (MetaNeXt)
# ----------------------------------------------------------------------------------------------

class InceptionDWConv2d(nn.Module):
    """InceptionNeXt's token mixer in plain PyTorch (the eager twin of fusekit.nn.InceptionDWConv2d).

    ``gc = int(in_channels * branch_ratio)``; the channels split ``(C - 3gc, gc, gc, gc)`` into an
    identity, a square depthwise conv, a 1 x band and a band x 1 depthwise conv, concatenated back.
    """

    def __init__(self, in_channels: int, square_kernel_size: int = 3, band_kernel_size: int = 11,
                 branch_ratio: float = 0.125) -> None:
        super().__init__()
        gc = int(in_channels * branch_ratio)
        if gc < 1 or 3 * gc > in_channels:
            raise ValueError(f"InceptionDWConv2d: int(in_channels * branch_ratio) = {gc} branch channels; "
                             f"needs 1 <= gc and 3 * gc <= in_channels = {in_channels}")
        self.dwconv_hw = nn.Conv2d(gc, gc, square_kernel_size, padding=square_kernel_size // 2, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, kernel_size=(1, band_kernel_size), padding=(0, band_kernel_size // 2),
                                  groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, kernel_size=(band_kernel_size, 1), padding=(band_kernel_size // 2, 0),
                                  groups=gc)
        self.split_indexes = (in_channels - 3 * gc, gc, gc, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_indexes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


class ConvMlp(nn.Module):
    """1x1-conv MLP: fc1 -> act -> fc2 (``norm`` and ``drop`` are identities, as in MetaNeXt)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1)
        self.norm = nn.Identity()
        self.act = nn.GELU()
        self.drop = nn.Identity()
        self.fc2 = nn.Conv2d(hidden_features, out_features or in_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


class MlpHead(nn.Module):
    """Global average pool -> fc1 (mlp_ratio x dim) -> GELU -> LayerNorm -> fc2 (classes)."""

    def __init__(self, dim: int, num_classes: int = 1000, mlp_ratio: float = 3) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x.mean((2, 3))))))


class MetaNeXtBlock(nn.Module):
    """token_mixer -> BatchNorm -> ConvMlp -> gamma -> + x."""

    def __init__(self, dim: int, token_mixer: nn.Module, mlp_ratio: float = 4, ls_init_value: float = 1e-6,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.token_mixer = token_mixer
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(mlp_ratio * dim))
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value)) if ls_init_value else None
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.token_mixer(x)))
        if self.gamma is not None:
            y = y * self.gamma.reshape(1, -1, 1, 1)
        return self.drop_path(y) + x


class MetaNeXtStage(nn.Module):
    """``downsample`` (BatchNorm + 2x2 stride-2 conv, or identity for the first stage), then ``blocks``."""

    def __init__(self, in_chs: int, out_chs: int, downsample: bool, drop_path_rates: Sequence[float],
                 mlp_ratio: float, ls_init_value: float, mixer_args: tuple[int, int, float], impl: str,
                 backend: str | None) -> None:
        super().__init__()
        self.downsample = (nn.Sequential(nn.BatchNorm2d(in_chs), nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2))
                           if downsample else nn.Identity())

        def mixer() -> nn.Module:
            if impl == "fusekit":
                return FusedInceptionDWConv2d(out_chs, *mixer_args, backend=backend)
            return InceptionDWConv2d(out_chs, *mixer_args)

        self.blocks = nn.Sequential(*[MetaNeXtBlock(out_chs, mixer(), mlp_ratio, ls_init_value, rate)
                                      for rate in drop_path_rates])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class MetaNeXt(nn.Module):
    """InceptionNeXt's MetaNeXt: stem (4x4 stride-4 conv + BatchNorm), stages, MlpHead."""

    def __init__(self, depths: Sequence[int], dims: Sequence[int], mlp_ratios: Sequence[float],
                 square_kernel_size: int = 3, band_kernel_size: int = 11, branch_ratio: float = 0.125,
                 num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                 ls_init_value: float = 1e-6, impl: str = "eager", backend: str | None = None) -> None:
        super().__init__()
        _check_impl(impl)
        if not len(depths) == len(dims) == len(mlp_ratios):
            raise ValueError("depths, dims and mlp_ratios must have the same length, got "
                             f"{len(depths)}, {len(dims)} and {len(mlp_ratios)}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), nn.BatchNorm2d(dims[0]))
        rates = _drop_path_rates(drop_path_rate, depths)
        mixer_args = (square_kernel_size, band_kernel_size, branch_ratio)
        self.stages = nn.Sequential(*[
            MetaNeXtStage(dims[max(i - 1, 0)], dims[i], i > 0, rates[i], mlp_ratios[i], ls_init_value, mixer_args,
                          impl, backend)
            for i in range(len(depths))])
        self.head = MlpHead(dims[-1], num_classes)
        self.apply(_trunc_normal_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def inceptionnext(impl: str = "fusekit", backend: str | None = None, *, depths: Sequence[int],
                  dims: Sequence[int], mlp_ratios: Sequence[float], square_kernel_size: int = 3,
                  band_kernel_size: int = 11, branch_ratio: float = 0.125, num_classes: int = 1000,
                  in_chans: int = 3, drop_path_rate: float = 0.0, ls_init_value: float = 1e-6) -> MetaNeXt:
    """InceptionNeXt; InceptionNeXt-T is depths (3, 3, 9, 3), dims (96 .. 768), mlp_ratios (4, 4, 4, 3)."""
    return MetaNeXt(depths, dims, mlp_ratios, square_kernel_size, band_kernel_size, branch_ratio, num_classes,
                    in_chans, drop_path_rate, ls_init_value, impl=impl, backend=backend)
