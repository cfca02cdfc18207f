"""Inference-time structural re-parameterization of depthwise multi-branch blocks.

Pure weight algebra (RepLKNet / SLaK / UniRepLKNet style), done in float64 and cast back:
- BN into conv: W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps);
- a dilated k kernel with rate r equals a dense r * (k - 1) + 1 kernel with taps on a stride-r grid;
- branches that are "same"-centered add up after zero-padding each kernel to the largest size.
The merged layer is a fusekit DepthwiseConv2d. Everything here uses BN running statistics, i.e.
eval-mode semantics.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .depthwise import DepthwiseConv2d, _not_depthwise_reason

__all__ = [
    "dilated_to_dense",
    "fuse_conv_bn",
    "merge_depthwise_branches",
    "pad_kernel_to",
    "reparameterize_blocks",
    "reparameterize_depthwise_branches",
    "reparameterize_dilated_reparam_block",
    "reparameterize_large_kernel_conv",
]

IntOr2 = Union[int, Sequence[int]]
_BatchNorm = nn.modules.batchnorm._BatchNorm


def _pair(value: IntOr2, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _bn_or_none(bn: nn.Module | None, out_channels: int) -> _BatchNorm | None:
    if bn is None or isinstance(bn, nn.Identity):
        return None
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"expected a BatchNorm module, nn.Identity or None, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics (track_running_stats=False) normalizes "
                         "with batch statistics and cannot be folded into a conv")
    if bn.num_features != out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the conv has {out_channels} output channels")
    return bn


def _folded_kernel_bias(conv: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (weight, bias) of conv followed by bn in eval mode; bias is zeros when both lack one."""
    bn = _bn_or_none(bn, conv.out_channels)
    weight = conv.weight.detach().to(torch.float64)
    bias = (conv.bias.detach().to(torch.float64) if conv.bias is not None
            else weight.new_zeros(conv.out_channels))
    if bn is None:
        return weight, bias
    mean = bn.running_mean.detach().to(torch.float64)
    scale = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = bn.bias.detach().to(torch.float64) if bn.bias is not None else 0.0
    weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return weight, (bias - mean) * scale + shift


def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` (same class and configuration, any groups) with ``bn`` folded in.

    The result always has a bias and equals ``bn(conv(x))`` with bn in eval mode.
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"fuse_conv_bn expects an nn.Conv1d/2d/3d, got {type(conv).__name__}")
    if conv._parameters.get("weight") is not conv.weight:
        raise ValueError("fuse_conv_bn: the conv's weight is not a plain registered parameter (pruned or parametrized)")
    weight, bias = _folded_kernel_bias(conv, bn)
    fused = copy.deepcopy(conv)
    dtype = conv.weight.dtype
    fused.weight = nn.Parameter(weight.to(dtype), requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)
    return fused


def _centered_pads(size: int, target: int) -> tuple[int, int]:
    # the offset that keeps the tap aligned with each output the way padding="same" aligns it
    before = (target - 1) // 2 - (size - 1) // 2
    return before, target - size - before


def pad_kernel_to(weight: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``weight`` to kh x kw, centered as padding="same" centers kernels.

    A "same"-padded convolution with the result equals one with ``weight`` (for odd size
    differences the extra zero row/column goes where PyTorch's "same" puts its extra pad).
    """
    h, w = weight.shape[-2], weight.shape[-1]
    if kh < h or kw < w:
        raise ValueError(f"pad_kernel_to: target {kh}x{kw} is smaller than the kernel {h}x{w}")
    top, bottom = _centered_pads(h, kh)
    left, right = _centered_pads(w, kw)
    return F.pad(weight, (left, right, top, bottom))


def dilated_to_dense(weight: torch.Tensor, dilation: IntOr2) -> torch.Tensor:
    """The dense kernel equal to ``weight`` (last two dims kh x kw) applied with ``dilation``.

    Result size r_h * (kh - 1) + 1 by r_w * (kw - 1) + 1, the taps on a stride-r grid, zeros elsewhere.
    """
    dh, dw = _pair(dilation, "dilation")
    kh, kw = weight.shape[-2], weight.shape[-1]
    dense = weight.new_zeros(*weight.shape[:-2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    dense[..., ::dh, ::dw] = weight
    return dense


def merge_depthwise_branches(
        branches: Iterable[tuple[torch.Tensor, torch.Tensor | None, IntOr2]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge "same"-centered depthwise branches into one dense kernel and bias.

    Each branch is (weight [C, 1, kh, kw], bias [C] or None, dilation int or pair). The result
    kernel is as large as the largest equivalent dense kernel per axis; summing every branch's
    same-padded output equals one same-padded conv with the result. Computed in float64 and
    returned in the dtype of the first weight; the bias is None when every branch has none.
    """
    branches = list(branches)
    if not branches:
        raise ValueError("merge_depthwise_branches needs at least one branch")
    dense, biases = [], []
    channels = branches[0][0].shape[0]
    for i, branch in enumerate(branches):
        if len(branch) != 3:
            raise ValueError(f"branch {i}: expected (weight, bias, dilation), got {len(branch)} items")
        weight, bias, dilation = branch
        if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != channels:
            raise ValueError(f"branch {i}: weight must be [C, 1, kh, kw] with C = {channels}, "
                             f"got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (channels,):
            raise ValueError(f"branch {i}: bias must be [C] = [{channels}], got {tuple(bias.shape)}")
        dense.append(dilated_to_dense(weight.detach().to(torch.float64), dilation))
        if bias is not None:
            biases.append(bias.detach().to(torch.float64))
    kh = max(w.shape[2] for w in dense)
    kw = max(w.shape[3] for w in dense)
    merged = sum(pad_kernel_to(w, kh, kw) for w in dense)
    dtype = branches[0][0].dtype
    merged_bias = sum(biases).to(dtype) if biases else None
    return merged.to(dtype), merged_bias


def _centered_padding_reason(conv: nn.Conv2d) -> str | None:
    if conv.padding == "same":
        return None
    for k, d, p in zip(conv.kernel_size, conv.dilation, (0, 0) if conv.padding == "valid" else conv.padding):
        extent = d * (k - 1)
        if extent % 2 or p != extent // 2:
            return (f"padding {conv.padding} is not centered for kernel {tuple(conv.kernel_size)} with dilation "
                    f"{tuple(conv.dilation)} (needs dilation * (kernel - 1) / 2 per axis, or padding='same')")
    return None


def reparameterize_depthwise_branches(branches: Sequence[tuple[nn.Conv2d, nn.Module | None]],
                                      backend: str | None = None) -> DepthwiseConv2d:
    """One DepthwiseConv2d equal (in eval mode) to the sum of ``bn(conv(x))`` over the branches.

    Each branch is (conv, bn) with bn a BatchNorm, nn.Identity or None. Every conv must be a
    depthwise nn.Conv2d (groups == in_channels == out_channels) with the same channels, stride,
    padding_mode, dtype and device, and "same"-centered padding (padding = dilation * (k - 1) / 2
    per axis, or padding="same"); kernel sizes and dilations may differ.
    """
    branches = list(branches)
    if not branches:
        raise ValueError("reparameterize_depthwise_branches needs at least one branch")
    first = branches[0][0]
    weights = []
    for i, (conv, bn) in enumerate(branches):
        problem = _not_depthwise_reason(conv, nn.Conv2d)
        if problem is not None:
            exc, message = problem
            raise exc(f"branch {i}: {message}")
        for attr in ("in_channels", "stride", "padding_mode"):
            if getattr(conv, attr) != getattr(first, attr):
                raise ValueError(f"branch {i}: {attr} {getattr(conv, attr)} differs from branch 0's "
                                 f"{getattr(first, attr)}; every branch must share it")
        if (conv.weight.dtype, conv.weight.device) != (first.weight.dtype, first.weight.device):
            raise ValueError(f"branch {i}: weight is {conv.weight.dtype} on {conv.weight.device}, branch 0's is "
                             f"{first.weight.dtype} on {first.weight.device}")
        reason = _centered_padding_reason(conv)
        if reason is not None:
            raise ValueError(f"branch {i}: {reason}")
        weight, bias = _folded_kernel_bias(conv, bn)
        weights.append((weight, bias, conv.dilation))
    weight, bias = merge_depthwise_branches(weights)
    kh, kw = weight.shape[2], weight.shape[3]
    # odd kernels: explicit symmetric padding (also valid with stride > 1); even: PyTorch's "same"
    padding = ((kh - 1) // 2, (kw - 1) // 2) if kh % 2 and kw % 2 else "same"
    merged = DepthwiseConv2d(first.in_channels, (kh, kw), stride=first.stride, padding=padding,
                             padding_mode=first.padding_mode, device="meta", dtype=first.weight.dtype,
                             backend=backend)
    merged.weight = nn.Parameter(weight.to(first.weight.dtype))
    merged.bias = nn.Parameter(bias.to(first.weight.dtype))
    return merged


def _conv_and_bn(branch: nn.Module, name: str) -> tuple[nn.Conv2d, nn.Module | None]:
    conv = getattr(branch, "conv", None)
    if conv is None:
        raise TypeError(f"branch {name!r} ({type(branch).__name__}) has no `conv` submodule")
    return conv, getattr(branch, "bn", None)


_LARGE_KERNEL_BRANCHES = ("lkb_origin", "LoRA1", "LoRA2", "small_conv")


def reparameterize_large_kernel_conv(block: nn.Module, backend: str | None = None) -> DepthwiseConv2d:
    """Merge a RepLKNet / SLaK ``ReparamLargeKernelConv`` in place; returns the merged conv.

    Branches are whichever of ``lkb_origin`` (K x K), ``LoRA1`` / ``LoRA2`` (SLaK's decomposed
    K x s and s x K) and ``small_conv`` (s x s) the block has, each a module with ``conv`` and an
    optional ``bn``. Afterwards the block holds ``lkb_reparam`` (which both codebases' forward
    use when present) and the branches are deleted. Only depthwise blocks are supported.
    """
    if hasattr(block, "lkb_reparam"):
        raise ValueError("block is already re-parameterized (it has lkb_reparam)")
    names = [n for n in _LARGE_KERNEL_BRANCHES if getattr(block, n, None) is not None]
    if not names:
        raise TypeError(f"{type(block).__name__} has none of the branches {_LARGE_KERNEL_BRANCHES}")
    merged = reparameterize_depthwise_branches([_conv_and_bn(getattr(block, n), n) for n in names], backend)
    merged.train(block.training)
    for n in names:
        delattr(block, n)
    block.lkb_reparam = merged
    return merged


def reparameterize_dilated_reparam_block(block: nn.Module, backend: str | None = None) -> DepthwiseConv2d:
    """Merge a UniRepLKNet ``DilatedReparamBlock`` in place; returns the merged conv.

    Branches: ``lk_origin`` + ``origin_bn`` and, for each (k, r) in zip(block.kernel_sizes,
    block.dilates), ``dil_conv_k{k}_{r}`` + ``dil_bn_k{k}_{r}``. Afterwards ``lk_origin`` is
    the merged conv and the BN / branch modules are deleted (the block's forward then runs
    ``lk_origin`` alone). The post-block BN of UniRepLKNetBlock is not folded here.
    """
    if getattr(block, "origin_bn", None) is None:
        raise ValueError(f"{type(block).__name__} has no origin_bn: already re-parameterized "
                         "or not a DilatedReparamBlock")
    pairs = [("lk_origin", "origin_bn")]
    pairs += [(f"dil_conv_k{k}_{r}", f"dil_bn_k{k}_{r}") for k, r in zip(block.kernel_sizes, block.dilates)]
    missing = [n for pair in pairs for n in pair if not hasattr(block, n)]
    if missing:
        raise TypeError(f"{type(block).__name__} lacks {', '.join(missing)}")
    merged = reparameterize_depthwise_branches([(getattr(block, c), getattr(block, b)) for c, b in pairs], backend)
    merged.train(block.training)
    for conv_name, bn_name in pairs:
        delattr(block, bn_name)
        if conv_name != "lk_origin":
            delattr(block, conv_name)
    block.lk_origin = merged
    return merged


def reparameterize_blocks(model: nn.Module, backend: str | None = None) -> list[str]:
    """Re-parameterize, in place, every recognized multi-branch block in ``model``.

    Recognized by attributes: RepLKNet / SLaK ReparamLargeKernelConv (branches named as in
    ``reparameterize_large_kernel_conv``, no ``lkb_reparam`` yet) and UniRepLKNet
    DilatedReparamBlock (``lk_origin``, ``origin_bn``, ``kernel_sizes``, ``dilates``).
    Returns the names of the blocks it merged.
    """
    done = []
    for name, module in list(model.named_modules()):
        if all(hasattr(module, a) for a in ("lk_origin", "origin_bn", "kernel_sizes", "dilates")):
            reparameterize_dilated_reparam_block(module, backend)
        elif not hasattr(module, "lkb_reparam") and any(
                isinstance(getattr(module, n, None), nn.Module) and hasattr(getattr(module, n), "conv")
                for n in _LARGE_KERNEL_BRANCHES):
            reparameterize_large_kernel_conv(module, backend)
        else:
            continue
        done.append(name)
    return done
