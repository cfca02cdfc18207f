"""MobileNetV2 with torchvision's module tree and state-dict keys, built from fusekit's fused
InvertedResidual blocks (impl="fusekit") or from the eager torchvision-structured blocks below.

Keys: ``features.0`` stem (``features.0.0`` conv, ``features.0.1`` BN, ReLU6), ``features.1`` ..
``features.17`` inverted residuals (``features.N.conv.*``), ``features.18`` 1x1 head conv-BN-ReLU6,
``classifier.1`` Linear (after ``classifier.0`` Dropout). A torchvision checkpoint loads into either.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.inverted_residual import InvertedResidual as FusedInvertedResidual
from ..nn.inverted_residual import _make_divisible

__all__ = ["Conv2dNormActivation", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper's Table 2
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))


class Conv2dNormActivation(nn.Sequential):
    """torchvision's conv -> norm -> activation Sequential (``0`` conv, ``1`` norm, ``2`` activation);
    "same"-style padding ``(k - 1) // 2 * dilation``; the conv has a bias only without a norm layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1,
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
                 activation_layer: Callable[..., nn.Module] | None = nn.ReLU, dilation: int = 1,
                 inplace: bool | None = True, bias: bool | None = None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                             dilation=dilation, groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer() if inplace is None else activation_layer(inplace=inplace))
        super().__init__(*layers)
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block in plain PyTorch: ``conv`` = [1x1 expand conv-BN-ReLU6 (t != 1)],
    3x3 depthwise conv-BN-ReLU6, 1x1 project conv, BN; plus x when stride 1 and inp == oup."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6))
        layers += [Conv2dNormActivation(hidden, hidden, 3, stride, groups=hidden, norm_layer=norm_layer,
                                        activation_layer=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), norm_layer(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2: stem, 17 inverted residuals, 1x1 head, global pool, dropout + Linear.

    ``block(inp, oup, stride, expand_ratio)`` builds each inverted residual (default: the eager
    InvertedResidual above); initialization is torchvision's (Kaiming-normal fan-out convs, unit BN,
    N(0, 0.01) classifier)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: Sequence[Sequence[int]] | None = None, round_nearest: int = 8,
                 block: Callable[..., nn.Module] | None = None, dropout: float = 0.2, in_chans: int = 3) -> None:
        super().__init__()
        block = block or InvertedResidual
        setting = inverted_residual_setting or INVERTED_RESIDUAL_SETTING
        if any(len(row) != 4 for row in setting):
            raise ValueError(f"inverted_residual_setting must hold (t, c, n, s) rows, got {setting}")
        relu6_cna = partial(Conv2dNormActivation, activation_layer=nn.ReLU6)
        cin = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [relu6_cna(in_chans, cin, stride=2)]
        for t, c, n, s in setting:
            cout = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(block(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(relu6_cna(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(impl: str = "fusekit", backend: str | None = None, width_mult: float = 1.0,
                 num_classes: int = 1000, round_nearest: int = 8, dropout: float = 0.2,
                 in_chans: int = 3) -> MobileNetV2:
    """MobileNetV2 whose inverted residuals are fusekit.nn.InvertedResidual (impl="fusekit", on
    ``backend``) or the eager torchvision-structured blocks (impl="eager"); identical state dicts."""
    if impl == "fusekit":
        block = partial(FusedInvertedResidual, backend=backend)
    elif impl == "eager":
        block = InvertedResidual
    else:
        raise ValueError(f"impl must be 'fusekit' or 'eager', got {impl!r}")
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, round_nearest=round_nearest, block=block,
                       dropout=dropout, in_chans=in_chans)
