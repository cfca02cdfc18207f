"""DiNAT (Hassani & Shi, 2022): a hierarchical transformer of (dilated) neighborhood attention.

The module tree and state-dict names follow the official SHI-Labs DiNAT model: ``patch_embed``
(two stride-2 3x3 convs + LayerNorm, channels-last tokens [B, H, W, C] afterwards), ``levels.i``
with ``blocks.j`` (``norm1``, ``attn``, ``norm2``, ``mlp.fc1`` / ``mlp.fc2``, optional ``gamma1`` /
``gamma2`` layer scales) and a ``downsample`` (stride-2 3x3 conv + LayerNorm) on all but the last
level, then ``norm``, global average pooling and ``head``. Level i layer j attends a
``kernel_size`` x ``kernel_size`` neighbourhood dilated by ``dilations[i][j]``.

``impl="fusekit"`` uses :class:`fusekit.nn.NeighborhoodAttention2D`; ``impl="eager"`` uses this
file's :class:`NeighborhoodAttention2D`, NATTEN 0.17's module written in plain PyTorch as dense
attention masked to each query's neighbourhood (what one runs without a neighborhood-attention
kernel). Both have the parameters ``qkv``, ``rpb`` and ``proj``, so checkpoints load both ways.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.inverted_residual import DropPath  # timm's per-sample stochastic depth

__all__ = ["ConvDownsampler", "ConvTokenizer", "DiNAT", "NATransformerLayer", "NeighborhoodAttention2D", "dinat",
           "neighborhood_mask_and_rpb_index"]


def _axis_mask_and_rpb_index(length: int, kernel_size: int, dilation: int,
                             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of NA: (mask [L, L] bool, query i attends key j; rpb index [L, L] long, (j - i) / d + k - 1
    clamped into the table where j is not a neighbour). Static-shape torch ops only, so it traces."""
    i = torch.arange(length, device=device)
    group = i % dilation                       # dilated NA runs plain NA within each residue class
    group_len = (length - group + dilation - 1) // dilation
    start = (i // dilation - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, group_len - kernel_size)   # windows near the end shift inwards
    first = start * dilation + group
    offset = i.view(1, length) - first.view(length, 1)
    mask = (offset >= 0) & (offset <= (kernel_size - 1) * dilation) & (offset % dilation == 0)
    rel = torch.div(i.view(1, length) - i.view(length, 1), dilation, rounding_mode="floor") + kernel_size - 1
    return mask, rel.clamp(0, 2 * kernel_size - 2)


def neighborhood_mask_and_rpb_index(height: int, width: int, kernel_size: int, dilation: int,
                                    device: torch.device | None = None):
    """2-D NA over H x W tokens (row-major): mask [H*W, H*W] bool and per-axis rpb indices, broadcastable
    row [H, 1, H, 1] and column [1, W, 1, W] index tensors into the [heads, 2k-1, 2k-1] table."""
    mask_h, rel_h = _axis_mask_and_rpb_index(height, kernel_size, dilation, device)
    mask_w, rel_w = _axis_mask_and_rpb_index(width, kernel_size, dilation, device)
    mask = (mask_h.view(height, 1, height, 1) & mask_w.view(1, width, 1, width)).reshape(height * width,
                                                                                         height * width)
    return mask, rel_h.view(height, 1, height, 1), rel_w.view(1, width, 1, width)


class NeighborhoodAttention2D(nn.Module):
    """NATTEN 0.17's NeighborhoodAttention2D in plain PyTorch: x [B, H, W, C] -> [B, H, W, C].

    Dense scaled-dot-product attention over all H*W tokens with an additive float mask: the relative
    positional bias ``rpb`` on each query's k x k (dilated) neighbours and -inf elsewhere. ``bias`` is
    NATTEN 0.14's name for ``rel_pos_bias``; without either there is no bias table."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int | None = 1, bias: bool | None = None,
                 qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rel_pos_bias: bool | None = None):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"NeighborhoodAttention2D: dim ({dim}) must be a positive multiple of num_heads "
                             f"({num_heads})")
        if rel_pos_bias is not None and bias is not None and rel_pos_bias != bias:
            raise ValueError(f"NeighborhoodAttention2D: rel_pos_bias ({rel_pos_bias}) and its 0.14 name bias "
                             f"({bias}) disagree")
        dilation = 1 if dilation is None else int(dilation)
        if int(kernel_size) < 2 or dilation < 1:
            raise ValueError(f"NeighborhoodAttention2D: kernel_size must be >= 2 and dilation >= 1, got "
                             f"kernel_size {kernel_size}, dilation {dilation}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = int(kernel_size)
        self.dilation = dilation
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias if rel_pos_bias is not None else bool(bias):
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * self.kernel_size - 1, 2 * self.kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = float(attn_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_bias(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[heads or 1, H*W, H*W] additive mask: rpb on neighbours, -inf elsewhere. Built from the static
        shape in each forward (cheap next to the dense attention), so torch.compile and export trace it."""
        mask, rel_h, rel_w = neighborhood_mask_and_rpb_index(height, width, self.kernel_size, self.dilation, device)
        n = height * width
        if self.rpb is None:
            bias = torch.zeros(1, n, n, device=device, dtype=dtype)
        else:
            bias = self.rpb[:, rel_h, rel_w].reshape(self.num_heads, n, n).to(dtype)
        return bias.masked_fill(~mask, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.num_heads * self.head_dim:
            raise ValueError(f"NeighborhoodAttention2D expects x [B, H, W, C] with C = {self.num_heads * self.head_dim}"
                             f", got shape {tuple(x.shape)}")
        batch, height, width, dim = x.shape
        window = self.kernel_size * self.dilation
        if window > height or window > width:
            raise ValueError(f"NeighborhoodAttention2D: kernel_size * dilation must not exceed the input size on "
                             f"every axis: kernel_size {self.kernel_size} * dilation {self.dilation} = {window} > "
                             f"{min(height, width)} (input {height}x{width})")
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # [B, heads, N, head_dim]
        bias = self.attention_bias(height, width, x.device, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0),
                                             dropout_p=self.attn_drop_rate if self.training else 0.0,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, height, width, dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}")


class ConvTokenizer(nn.Module):
    """x [B, C_in, H, W] -> tokens [B, H/4, W/4, embed_dim]: two stride-2 3x3 convs, then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """tokens [B, H, W, C] -> [B, H/2, W/2, 2C]: stride-2 3x3 conv (no bias), then LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NATransformerLayer(nn.Module):
    """Pre-norm transformer block: x + NA(norm1(x)), then x + MLP(norm2(x)), optionally layer-scaled."""

    def __init__(self, attn: nn.Module, dim: int, kernel_size: int, dilation: int, mlp_ratio: float,
                 drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None, where: str = ""):
        super().__init__()
        self.kernel_size, self.dilation, self.where = kernel_size, dilation, where
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        window = self.kernel_size * self.dilation
        if window > height or window > width:
            raise ValueError(f"DiNAT {self.where}: kernel_size * dilation must not exceed the level's feature map "
                             f"size, but kernel_size {self.kernel_size} * dilation {self.dilation} = {window} > "
                             f"{min(height, width)} (feature map {height}x{width}); use a larger input or smaller "
                             f"dilations")
        attn = self.attn(self.norm1(x))
        mlp_in = x + self.drop_path(self.gamma1 * attn if self.layer_scale else attn)
        mlp = self.mlp(self.norm2(mlp_in))
        return mlp_in + self.drop_path(self.gamma2 * mlp if self.layer_scale else mlp)


class BasicLayer(nn.Module):
    """One level: its NA blocks, then (all but the last level) a 2x downsampler."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DiNAT(nn.Module):
    """x [B, in_chans, H, W] -> logits [B, num_classes]. ``attention(dim, heads, kernel_size, dilation, attn_drop,
    proj_drop)`` makes each block's neighborhood attention module."""

    def __init__(self, attention, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], kernel_size: int,
                 dilations: Sequence[Sequence[int]], mlp_ratio: float, num_classes: int, in_chans: int = 3,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 layer_scale: float | None = None):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        dilations = tuple(tuple(int(d) for d in level) for level in dilations)
        if len(num_heads) != len(depths) or len(dilations) != len(depths):
            raise ValueError(f"DiNAT: depths {depths}, num_heads {num_heads} and dilations {dilations} must have one "
                             f"entry per level")
        for i, (depth, level) in enumerate(zip(depths, dilations)):
            if len(level) != depth:
                raise ValueError(f"DiNAT: level {i} has depth {depth} but {len(level)} dilations {level}")
        self.num_levels = len(depths)
        self.num_features = int(embed_dim * 2 ** (self.num_levels - 1))
        self.patch_embed = ConvTokenizer(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        levels = []
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2 ** i)
            blocks = []
            for j in range(depth):
                dilation = dilations[i][j]
                blocks.append(NATransformerLayer(
                    attention(dim, num_heads[i], kernel_size, dilation, attn_drop_rate, drop_rate), dim, kernel_size,
                    dilation, mlp_ratio, drop=drop_rate, drop_path=drop_paths[sum(depths[:i]) + j],
                    layer_scale=layer_scale, where=f"level {i} layer {j}"))
            downsample = ConvDownsampler(dim) if i < self.num_levels - 1 else None
            levels.append(BasicLayer(blocks, downsample))
        self.levels = nn.ModuleList(levels)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        return self.norm(x).mean(dim=(1, 2))  # global average pool over the final H x W tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def dinat(impl: str = "fusekit", backend: str | None = None, *, embed_dim: int, depths: Sequence[int],
          num_heads: Sequence[int], kernel_size: int, dilations: Sequence[Sequence[int]], mlp_ratio: float,
          num_classes: int, in_chans: int = 3, drop_path_rate: float = 0.0, layer_scale: float | None = None,
          qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0) -> DiNAT:
    """A DiNAT model; ``impl="fusekit"`` runs fusekit's neighborhood attention kernels (``backend`` picks
    them), ``impl="eager"`` the plain-PyTorch masked-SDPA twin (``backend`` is unused)."""
    if impl == "fusekit":
        from .. import nn as fnn

        def attention(dim, heads, kernel, dilation, attn_drop, proj_drop):
            return fnn.NeighborhoodAttention2D(dim=dim, num_heads=heads, kernel_size=kernel, dilation=dilation,
                                               rel_pos_bias=True, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                               proj_drop=proj_drop, backend=backend)
    elif impl == "eager":
        def attention(dim, heads, kernel, dilation, attn_drop, proj_drop):
            return NeighborhoodAttention2D(dim, heads, kernel, dilation, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                           proj_drop=proj_drop, rel_pos_bias=True)
    else:
        raise ValueError(f"impl must be 'fusekit' or 'eager', got {impl!r}")
    return DiNAT(attention, embed_dim, depths, num_heads, kernel_size, dilations, mlp_ratio, num_classes,
                 in_chans=in_chans, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                 layer_scale=layer_scale)
