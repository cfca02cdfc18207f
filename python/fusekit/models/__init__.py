"""Reference models built from fusekit.nn, each beside the eager PyTorch twin it must match.

``build(arch, impl="fusekit" | "eager", size="full" | "test")`` returns one of the models below with
random weights. The two implementations of an arch have the same module tree and state_dict keys
(a checkpoint of one loads into the other); only the operators differ:

=================  ===========================================  ======================================
arch               fusekit                                      eager twin
=================  ===========================================  ======================================
dinat_t            NeighborhoodAttention2D (k = 7, dilation     masked dense attention with the same
                   per stage, relative positional bias)         neighbourhoods and bias (SDPA)
convnext_t         DepthwiseConv2d 7x7                          nn.Conv2d(groups=C)
replknet_31b       DepthwiseConv2d 31..13 (+ 5x5 branch)        nn.Conv2d(groups=C)
inceptionnext_t    InceptionDWConv2d                            split + three nn.Conv2d + cat
mobilenet_v2       InvertedResidual (fused block)               torchvision-structured eager blocks
gqa_decoder        MultiQueryAttention + KV-cache decode        SDPA on K/V repeated per query head
=================  ===========================================  ======================================

``size="full"`` is the published configuration (ImageNet 224 px, or a 512-wide decoder);
``size="test"`` is a small configuration of the same structure for tests. ``example_batch`` makes
a random batch (inputs, targets) and ``loss`` the training loss of one.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("fusekit", "eager")
SIZES = ("full", "test")


@dataclass(frozen=True)
class ArchSpec:
    name: str
    kind: str                 # "image": x [B, 3, H, W] -> logits [B, classes]; "lm": tokens [B, L] -> logits [B, L, vocab]
    builder: str              # "module:function"; the function takes impl=, backend= and the config's keywords
    configs: dict[str, dict[str, Any]]
    inputs: dict[str, tuple]  # per size: (3, H, W) for images, (L,) tokens for language models
    description: str
    source: str = ""
    batch: dict[str, int] = field(default_factory=lambda: {"cpu": 8, "cuda": 64})  # benchmark default

    def config(self, size: str) -> dict[str, Any]:
        if size not in self.configs:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        return dict(self.configs[size])

    @property
    def classes_key(self) -> str:
        return "vocab_size" if self.kind == "lm" else "num_classes"


ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in [
    ArchSpec(
        "dinat_t", "image", "dinat:dinat",
        {"full": dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), kernel_size=7,
                      dilations=((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1, 1, 1, 1, 1)), mlp_ratio=3.0,
                      num_classes=1000),
         "test": dict(embed_dim=16, depths=(2, 2, 1), num_heads=(1, 2, 4), kernel_size=7,
                      dilations=((1, 4), (1, 2), (1,)), mlp_ratio=2.0, num_classes=10)},
        {"full": (3, 224, 224), "test": (3, 112, 112)},
        "DiNAT-T: hierarchical neighborhood attention, k = 7, dilations per stage, relative positional bias",
        "Hassani & Shi, Dilated Neighborhood Attention Transformer (2022)", {"cpu": 2, "cuda": 64}),
    ArchSpec(
        "convnext_t", "image", "large_kernel:convnext",
        {"full": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), kernel_size=7, num_classes=1000),
         "test": dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), kernel_size=7, num_classes=10)},
        {"full": (3, 224, 224), "test": (3, 64, 64)},
        "ConvNeXt-T: 7x7 depthwise convolutions, LayerNorm, inverted MLP",
        "Liu et al., A ConvNet for the 2020s (2022)"),
    ArchSpec(
        "replknet_31b", "image", "large_kernel:replknet",
        {"full": dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024),
                      small_kernel=5, dw_ratio=1, ffn_ratio=4, num_classes=1000),
         "test": dict(large_kernel_sizes=(13, 11, 9, 7), layers=(1, 1, 1, 1), channels=(16, 32, 48, 64),
                      small_kernel=5, dw_ratio=1, ffn_ratio=2, num_classes=10)},
        {"full": (3, 224, 224), "test": (3, 64, 64)},
        "RepLKNet-31B: 31x31 ... 13x13 depthwise convolutions with a parallel 5x5 branch, BatchNorm",
        "Ding et al., Scaling Up Your Kernels to 31x31 (2022)", {"cpu": 2, "cuda": 64}),
    ArchSpec(
        "inceptionnext_t", "image", "large_kernel:inceptionnext",
        {"full": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), mlp_ratios=(4, 4, 4, 3), square_kernel_size=3,
                      band_kernel_size=11, branch_ratio=0.125, num_classes=1000),
         "test": dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), mlp_ratios=(2, 2, 2, 2), square_kernel_size=3,
                      band_kernel_size=11, branch_ratio=0.125, num_classes=10)},
        {"full": (3, 224, 224), "test": (3, 64, 64)},
        "InceptionNeXt-T: Inception depthwise token mixer (3x3, 1x11, 11x1, identity), BatchNorm, MLP",
        "Yu et al., InceptionNeXt (2023)"),
    ArchSpec(
        "mobilenet_v2", "image", "mobilenet:mobilenet_v2",
        {"full": dict(width_mult=1.0, num_classes=1000, dropout=0.0),
         "test": dict(width_mult=0.25, num_classes=10, dropout=0.0)},
        {"full": (3, 224, 224), "test": (3, 64, 64)},
        "MobileNetV2 1.0: 17 inverted-residual blocks (t = 6, ReLU6), torchvision layout",
        "Sandler et al., MobileNetV2 (2018)", {"cpu": 8, "cuda": 128}),
    ArchSpec(
        "gqa_decoder", "lm", "gqa:gqa_decoder",
        {"full": dict(vocab_size=32000, dim=512, depth=8, num_heads=8, num_kv_heads=2, max_len=2048, mlp_ratio=4),
         "test": dict(vocab_size=64, dim=32, depth=2, num_heads=4, num_kv_heads=2, max_len=64, mlp_ratio=2)},
        {"full": (512,), "test": (16,)},
        "decoder-only LM: 8 layers, 512 wide, 8 query heads sharing 2 K/V heads, KV-cache generation",
        "Ainslie et al., GQA (2023); Shazeer, Fast Transformer Decoding (2019)", {"cpu": 4, "cuda": 32}),
]}


def _check_arch(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


def build(arch: str, impl: str = "fusekit", size: str = "full", backend: str | None = None,
          **overrides: Any) -> nn.Module:
    """A randomly initialized ``arch`` model; ``impl`` picks fusekit's modules or the eager twin."""
    spec = _check_arch(arch)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    module_name, function = spec.builder.split(":")
    builder = getattr(importlib.import_module(f"{__name__}.{module_name}"), function)
    config = spec.config(size)
    config.update(overrides)
    return builder(impl=impl, backend=backend, **config)


def input_shape(arch: str, batch: int, size: str = "full") -> tuple[int, ...]:
    spec = _check_arch(arch)
    if size not in spec.inputs:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return (batch,) + tuple(spec.inputs[size])


def example_batch(arch: str, batch: int, size: str = "full", device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                  classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (inputs, targets): images ~ N(0, 1) with class targets, or token ids with next-token targets."""
    spec = _check_arch(arch)
    classes = classes or spec.config(size)[spec.classes_key]
    shape = input_shape(arch, batch, size)
    if spec.kind == "lm":
        tokens = torch.randint(0, classes, (shape[0], shape[1] + 1), generator=generator, device=device)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    return x, torch.randint(0, classes, (batch,), generator=generator, device=device)


def loss(arch: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's logits against ``targets`` (per token for language models)."""
    spec = _check_arch(arch)
    if spec.kind == "lm":
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return F.cross_entropy(logits.float(), targets)


__all__ = ["ARCHS", "ArchSpec", "IMPLS", "SIZES", "build", "example_batch", "input_shape", "loss"]
