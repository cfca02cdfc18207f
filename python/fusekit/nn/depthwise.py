"""Drop-in modules for depthwise convolution and InceptionNeXt's token mixer.

DepthwiseConv2d / DepthwiseConv1d subclass nn.Conv2d / nn.Conv1d: parameter names, shapes,
initialization, state dicts and repr are PyTorch's; only the convolution itself runs through
fusekit's ops. InceptionDWConv2d keeps InceptionNeXt's submodule layout so its checkpoints load.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..backends import BACKENDS
from ..ops.depthwise import depthwise_conv1d, depthwise_conv2d, inception_dwconv2d

__all__ = ["DepthwiseConv1d", "DepthwiseConv2d", "InceptionDWConv2d", "convert_depthwise"]

DEPTHWISE_RULE = "groups == in_channels == out_channels (depthwise, channel multiplier 1)"


def _check_backend(backend: str | None) -> str | None:
    if backend not in (None, "auto") + BACKENDS:
        raise ValueError(f"backend must be None, 'auto' or one of {BACKENDS}, got {backend!r}")
    return None if backend == "auto" else backend


def _check_channels(owner: str, channels: int) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{owner}: channels must be a positive int, got {channels!r}")


def _not_depthwise_reason(conv: nn.Module, plain: type) -> tuple[type, str] | None:
    """Why ``conv`` cannot become a fusekit depthwise module (exception type, message), or None."""
    if not isinstance(conv, plain):
        return TypeError, f"expected an nn.{plain.__name__}, got {type(conv).__name__}"
    if not isinstance(conv, _DepthwiseConvMixin):
        overridden = [m for m in ("forward", "_conv_forward") if getattr(type(conv), m) is not getattr(plain, m)]
        if overridden:
            return ValueError, (f"{type(conv).__name__} overrides {' and '.join(overridden)}; converting it "
                                f"would drop that behaviour")
    if not (conv.groups == conv.in_channels == conv.out_channels):
        return ValueError, (f"needs {DEPTHWISE_RULE}; got in_channels={conv.in_channels}, "
                            f"out_channels={conv.out_channels}, groups={conv.groups}")
    if parametrize.is_parametrized(conv) or conv._parameters.get("weight") is not conv.weight:
        # pruning and parametrizations compute `weight` on the fly; sharing the stored tensor would be wrong
        return ValueError, "its weight is not a plain registered parameter (pruned or parametrized conv)"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return ValueError, "its parameters are not initialized yet (lazy conv before its first forward)"
    return None


class _DepthwiseConvMixin:
    """Shared by DepthwiseConv2d and DepthwiseConv1d; ``_plain`` is the nn class they replace."""

    _plain: type
    _op: Callable[..., torch.Tensor]
    backend: str | None

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, backend: str | None = None) -> None:
        _check_channels(type(self).__name__, channels)
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding,  # type: ignore[call-arg]
                         dilation=dilation, groups=channels, bias=bias, padding_mode=padding_mode, device=device,
                         dtype=dtype)
        self.backend = _check_backend(backend)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        spatial = len(self.kernel_size)
        unbatched = input.dim() == spatial + 1  # nn.ConvNd accepts a missing batch dimension
        if unbatched:
            input = input.unsqueeze(0)
        padding = self.padding
        if self.padding_mode != "zeros":  # same order as nn.ConvNd: pad first, then convolve unpadded
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        out = type(self)._op(input, weight, bias, self.stride, padding, self.dilation, backend=self.backend)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        s = super().extra_repr()  # type: ignore[misc]
        return s if self.backend is None else f"{s}, backend={self.backend!r}"

    @classmethod
    def from_conv(cls, conv: nn.Module, backend: str | None = None):
        """A fusekit module computing what ``conv`` computes, sharing its parameters.

        ``conv`` must satisfy groups == in_channels == out_channels. The new module uses the very
        same Parameter objects (so device, dtype, requires_grad and optimizer state carry over) and
        the same training flag. Hooks registered on ``conv`` are not carried over.
        """
        problem = _not_depthwise_reason(conv, cls._plain)
        if problem is not None:
            exc, message = problem
            raise exc(f"{cls.__name__}.from_conv: {message}")
        if backend is None:
            backend = getattr(conv, "backend", None)
        module = cls(conv.in_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device="meta", dtype=conv.weight.dtype, backend=backend)
        module.weight = conv.weight
        module.bias = conv.bias
        module.train(conv.training)
        return module


class DepthwiseConv2d(_DepthwiseConvMixin, nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, groups=channels)`` computed by fusekit.

    Accepts what nn.Conv2d accepts for stride, padding (int, tuple, "same", "valid"), dilation
    and padding_mode ("zeros", "reflect", "replicate", "circular"). ``backend`` picks the fusekit
    backend (None follows ``fusekit.use_backend`` / auto).
    """

    _plain = nn.Conv2d
    _op = staticmethod(depthwise_conv2d)



class DepthwiseConv1d(_DepthwiseConvMixin, nn.Conv1d):
    """``nn.Conv1d(channels, channels, kernel_size, groups=channels)`` on [N, C, L], computed by fusekit."""

    _plain = nn.Conv1d
    _op = staticmethod(depthwise_conv1d)



_FUSEKIT_CLASS_FOR = {nn.Conv2d: DepthwiseConv2d, nn.Conv1d: DepthwiseConv1d}


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _check_min_kernel_size(min_kernel_size: int) -> None:
    if isinstance(min_kernel_size, bool) or not isinstance(min_kernel_size, int) or min_kernel_size < 1:
        raise ValueError(f"min_kernel_size must be a positive int, got {min_kernel_size!r}")


def _conversion_problem(conv: nn.Conv2d | nn.Conv1d, min_kernel_size: int) -> str | None:
    """Why the converters leave the nn.Conv2d / nn.Conv1d ``conv`` unchanged, or None when it is eligible."""
    plain = nn.Conv2d if isinstance(conv, nn.Conv2d) else nn.Conv1d
    problem = _not_depthwise_reason(conv, plain)
    if problem is not None:
        return problem[1]
    if _has_hooks(conv):
        return "it has hooks (the replacement would not run them)"
    if type(conv) is not plain:  # a subclass may change behaviour outside forward; only the exact class is known
        return f"{type(conv).__name__} is a subclass of nn.{plain.__name__}, not nn.{plain.__name__} itself"
    if max(conv.kernel_size) < min_kernel_size:
        return f"kernel_size {tuple(conv.kernel_size)} is below min_kernel_size={min_kernel_size}"
    return None


def convert_depthwise(model: nn.Module, min_kernel_size: int = 1, backend: str | None = None) -> list[str]:
    """Swap, in place, every eligible depthwise nn.Conv2d / nn.Conv1d of ``model`` for fusekit's.

    Eligible: exactly nn.Conv2d or nn.Conv1d (subclasses may change forward and are left alone)
    with groups == in_channels == out_channels, a plain weight parameter, no module hooks, and
    max(kernel_size) >= min_kernel_size. Parameters are shared, so state_dict keys and values do
    not change. A conv reachable under several names is replaced by one module everywhere.
    Returns the names (as in ``named_modules``) of the replaced modules.
    """
    _check_min_kernel_size(min_kernel_size)
    backend = _check_backend(backend)

    def eligible(module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv2d, nn.Conv1d)) and _conversion_problem(module, min_kernel_size) is None

    if eligible(model):
        raise ValueError("convert_depthwise swaps submodules in place; the model itself is a depthwise "
                         f"conv: use {_FUSEKIT_CLASS_FOR[type(model)].__name__}.from_conv(model) instead")
    targets = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
               if name and eligible(module)]
    replacement: dict[int, nn.Module] = {}
    for name, module in targets:
        new = replacement.get(id(module))
        if new is None:
            new = replacement[id(module)] = _FUSEKIT_CLASS_FOR[type(module)].from_conv(module, backend=backend)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
    return [name for name, _ in targets]


def _check_odd(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        # InceptionNeXt pads k // 2, which keeps the size only for odd k
        raise ValueError(f"{name} must be a positive odd int (padding k // 2 keeps the size only for odd k), "
                         f"got {value!r}")


class InceptionDWConv2d(nn.Module):
    """InceptionNeXt's token mixer, computed by one fused fusekit op.

    ``gc = int(in_channels * branch_ratio)``; channels split ``(C - 3gc, gc, gc, gc)`` into
    identity, a square depthwise conv (``dwconv_hw``), a ``1 x band`` one (``dwconv_w``) and a
    ``band x 1`` one (``dwconv_h``), concatenated in that order. Submodules are plain nn.Conv2d
    built as InceptionNeXt builds them, so its checkpoints load unchanged.
    """

    def __init__(self, in_channels: int, square_kernel_size: int = 3, band_kernel_size: int = 11,
                 branch_ratio: float = 0.125, backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_channels(type(self).__name__, in_channels)
        _check_odd("square_kernel_size", square_kernel_size)
        _check_odd("band_kernel_size", band_kernel_size)
        gc = int(in_channels * branch_ratio)
        if gc < 1 or 3 * gc > in_channels:
            raise ValueError(f"InceptionDWConv2d: int(in_channels * branch_ratio) = {gc} branch channels; "
                             f"needs 1 <= gc and 3 * gc <= in_channels = {in_channels}")
        factory = {"device": device, "dtype": dtype}
        # construction order as in InceptionNeXt, so a seeded init gives the same weights
        self.dwconv_hw = nn.Conv2d(gc, gc, square_kernel_size, padding=square_kernel_size // 2, groups=gc,
                                   **factory)
        self.dwconv_w = nn.Conv2d(gc, gc, kernel_size=(1, band_kernel_size), padding=(0, band_kernel_size // 2),
                                  groups=gc, **factory)
        self.dwconv_h = nn.Conv2d(gc, gc, kernel_size=(band_kernel_size, 1), padding=(band_kernel_size // 2, 0),
                                  groups=gc, **factory)
        self.split_indexes = (in_channels - 3 * gc, gc, gc, gc)
        self.backend = _check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inception_dwconv2d(x, self.dwconv_hw.weight, self.dwconv_hw.bias, self.dwconv_w.weight,
                                  self.dwconv_w.bias, self.dwconv_h.weight, self.dwconv_h.bias,
                                  backend=self.backend)

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> "InceptionDWConv2d":
        """Wrap an existing InceptionDWConv2d-shaped module (InceptionNeXt's or timm's), sharing its convs."""
        missing = [a for a in ("dwconv_hw", "dwconv_w", "dwconv_h", "split_indexes") if not hasattr(module, a)]
        if missing:
            raise TypeError(f"InceptionDWConv2d.from_module: {type(module).__name__} has no {', '.join(missing)}")
        hw, w, h = module.dwconv_hw, module.dwconv_w, module.dwconv_h
        ks, band = hw.kernel_size[0], w.kernel_size[1]
        expected = ((hw, (ks, ks), (ks // 2, ks // 2)), (w, (1, band), (0, band // 2)),
                    (h, (band, 1), (band // 2, 0)))
        gc = hw.in_channels
        for conv, kernel, padding in expected:
            ok = (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels == gc
                  and tuple(conv.kernel_size) == kernel and tuple(conv.padding) == padding
                  and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
                  and kernel[0] % 2 == 1 and kernel[1] % 2 == 1)
            if not ok:
                raise ValueError(f"InceptionDWConv2d.from_module: {conv} is not an odd depthwise nn.Conv2d with "
                                 f"{gc} channels, kernel {kernel}, padding {padding}, stride 1, dilation 1")
        channels = sum(module.split_indexes)
        if tuple(module.split_indexes) != (channels - 3 * gc, gc, gc, gc):
            raise ValueError(f"InceptionDWConv2d.from_module: split_indexes {module.split_indexes} do not match "
                             f"the branch channels gc = {gc}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dwconv_hw, new.dwconv_w, new.dwconv_h = hw, w, h
        new.split_indexes = (channels - 3 * gc, gc, gc, gc)
        new.backend = _check_backend(backend)
        new.train(module.training)
        return new
