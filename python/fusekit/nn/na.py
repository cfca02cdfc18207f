"""Neighborhood attention modules, drop-in for NATTEN's NeighborhoodAttention1D/2D/3D.

One class per rank serves both NATTEN module APIs:

- current NATTEN (>= 0.20): ``NeighborhoodAttention2D(embed_dim, num_heads, kernel_size, stride=1,
  dilation=1, is_causal=False, qkv_bias=True, qk_scale=None, proj_drop=0.0)`` (positional order);
- NATTEN <= 0.17, which NAT / DiNAT / MedViTV2 checkpoints use, by keyword: ``dim`` (for
  embed_dim), ``rel_pos_bias`` (or 0.14's ``bias``) for a relative positional bias table ``rpb``
  [heads, 2k-1 per axis], and ``attn_drop``; ``dilation=None`` means 1.

Parameters are named as in NATTEN (``qkv``, ``rpb``, ``proj``), so state dicts load both ways. The
fused kernel runs whenever attention dropout is inactive (eval mode or attn_drop = 0); otherwise the
unfused ops compute the weights, dropout is applied to them, and they are applied to V, as
NATTEN 0.17's unfused path did.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.na import neighborhood_attention, neighborhood_av, neighborhood_qk, resolve_conf


class _NeighborhoodAttention(nn.Module):
    rank = 0

    def __init__(self, embed_dim: int | None = None, num_heads: int | None = None, kernel_size=None, stride=1,
                 dilation=1, is_causal=False, qkv_bias: bool = True, qk_scale: float | None = None,
                 proj_drop: float = 0.0, *, dim: int | None = None, rel_pos_bias: bool | None = None,
                 bias: bool | None = None, attn_drop: float = 0.0, backend: str | None = None):
        super().__init__()
        name = type(self).__name__
        if embed_dim is not None and dim is not None and embed_dim != dim:
            raise ValueError(f"{name}: embed_dim ({embed_dim}) and its 0.17 name dim ({dim}) disagree")
        embed_dim = embed_dim if embed_dim is not None else dim
        if embed_dim is None or num_heads is None or kernel_size is None:
            raise TypeError(f"{name} needs embed_dim (or dim), num_heads and kernel_size")
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"{name}: embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if rel_pos_bias is not None and bias is not None and rel_pos_bias != bias:
            raise ValueError(f"{name}: rel_pos_bias ({rel_pos_bias}) and its 0.14 name bias ({bias}) disagree")
        use_rpb = bool(rel_pos_bias if rel_pos_bias is not None else bias if bias is not None else False)
        self.embed_dim = self.dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        # validate per-axis arguments once (lengths are checked per call)
        probe = resolve_conf(self.rank, (1 << 30,) * self.rank, kernel_size, stride,
                             1 if dilation is None else dilation, is_causal)
        self.kernel_size, self.stride, self.dilation, self.is_causal = \
            probe.kernel_size, probe.stride, probe.dilation, probe.is_causal
        if use_rpb and any(self.is_causal):
            raise ValueError(f"{name}: rel_pos_bias is only defined for non-causal neighborhood attention")
        self.backend = backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        if use_rpb:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = float(attn_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        has_table = prefix + "rpb" in state_dict
        if has_table and self.rpb is None:
            raise RuntimeError(f"{type(self).__name__}: the state dict has a relative positional bias "
                               f"'{prefix}rpb' but this module was built without one: pass rel_pos_bias=True")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank + 2 or x.shape[-1] != self.embed_dim:
            layout = "[B, " + ", ".join("XYZ"[:self.rank]) + ", C]"
            raise ValueError(f"{type(self).__name__} expects x {layout} with C = {self.embed_dim}, got shape "
                             f"{tuple(x.shape)}")
        spatial = x.shape[1:-1]
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(-3)  # [B, *spatial, heads, head_dim] views: the kernels read the strides
        args = (self.kernel_size, self.stride, self.dilation, self.is_causal)
        if self.training and self.attn_drop_rate > 0:
            attn = neighborhood_qk(q * self.scale, k, *args, rpb=self.rpb, backend=self.backend)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = neighborhood_av(attn, v, *args, backend=self.backend)
        else:
            out = neighborhood_attention(q, k, v, *args, scale=self.scale, rpb=self.rpb, backend=self.backend)
        out = out.reshape(x.shape[0], *spatial, self.embed_dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}, attn_drop={self.attn_drop_rate}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention on x [B, L, C] (NATTEN's NeighborhoodAttention1D, both APIs)."""
    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention on x [B, H, W, C] (NATTEN's NeighborhoodAttention2D, both APIs)."""
    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention on x [B, T, H, W, C] (NATTEN's NeighborhoodAttention3D, both APIs)."""
    rank = 3
