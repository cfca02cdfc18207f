"""A decoder-only GQA language model (fusekit.nn.GQADecoder) and its eager twin.

impl="fusekit": GQADecoder with fusekit.nn.MultiQueryAttention (fused grouped attention, in-place
KV-cache decoding). impl="eager": the same GQADecoder whose attention layers are
``GroupedQueryAttention`` below, written the way a PyTorch user would: K/V repeated per query head and
F.scaled_dot_product_attention. Both have the same state-dict keys (``blocks.0.attn.q_proj.weight``...).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.mqa import GQADecoder, GroupedAttentionBase, LayerCache

__all__ = ["GroupedQueryAttention", "gqa_decoder"]


def _window_sides(window: Optional[Sequence[Optional[int]]]) -> tuple[int, int]:
    """(left, right) with -1 = unbounded; window None or (None | int >= 0, None | int >= 0)."""
    if window is None:
        return -1, -1
    if isinstance(window, (int, bool)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right) of ints >= 0 or None, got {window!r}")
    sides = tuple(-1 if side is None else side for side in window)
    if any(isinstance(side, bool) or not isinstance(side, int) or side < -1 for side in sides):
        raise ValueError(f"window sides must be ints >= 0, or None/-1 for unbounded, got {window!r}")
    return sides


def _allowed_keys(query_pos: torch.Tensor, num_keys: int, causal: bool, left: int, right: int,
                  valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean SDPA mask (True = attend) of query positions [..., Lq, 1] over keys 0..num_keys-1;
    None when every key is allowed."""
    j = torch.arange(num_keys, device=query_pos.device)
    rules = [j < valid] if valid is not None else []
    if causal:
        rules.append(j <= query_pos)
    if left >= 0:
        rules.append(j >= query_pos - left)
    if right >= 0:
        rules.append(j <= query_pos + right)
    if not rules:
        return None
    allowed = rules[0]
    for rule in rules[1:]:
        allowed = allowed & rule
    return allowed


class GroupedQueryAttention(GroupedAttentionBase):
    """Grouped-query self-attention in plain PyTorch, the eager twin of fusekit.nn.MultiQueryAttention
    (same constructor, attributes and parameters).

    x: [B, L, embed_dim]. Each K/V head is repeated for the num_heads // num_kv_heads query heads that
    share it, then F.scaled_dot_product_attention; causal and window (left, right) masks are aligned
    bottom-right (query i sits at key position i + Lk - Lq). With ``cache`` (LayerCache: k/v
    [B, Lmax, Hkv, D], seqlens [B]) the L new tokens' K/V are written in place at rows
    seqlens[b] .. seqlens[b] + L - 1, and the queries attend causally over the seqlens[b] + L cached
    rows; the caller advances seqlens.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int = 1, bias: bool = False,
                 causal: bool = True, window: Optional[Sequence[Optional[int]]] = None, head_dim: int | None = None,
                 scale: float | None = None, device=None, dtype=None):
        _window_sides(window)
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, causal, window, head_dim, scale, device, dtype)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = self.project(x)
        left, right = _window_sides(self.window)
        positions = torch.arange(length, device=x.device)
        if cache is None:
            mask = None
            if left >= 0 or right >= 0:
                mask = _allowed_keys(positions.unsqueeze(1), length, self.causal, left, right)
            out = self._attend(q, k, v, mask, is_causal=self.causal and mask is None)
        else:
            if not self.causal:
                raise ValueError("cached decoding needs a causal GroupedQueryAttention (causal=True)")
            start = cache.seqlens.to(torch.long)
            rows = torch.arange(b, device=x.device).unsqueeze(1)
            slots = start.unsqueeze(1) + positions                     # [B, L]: where the new tokens go
            cache.k[rows, slots] = k.to(cache.k.dtype)
            cache.v[rows, slots] = v.to(cache.v.dtype)
            query_pos = slots.view(b, 1, length, 1)                    # [B, 1 (heads), L, 1]
            valid = (start + length).view(b, 1, 1, 1)
            mask = _allowed_keys(query_pos, cache.k.shape[1], True, left, right, valid)
            out = self._attend(q.to(cache.k.dtype), cache.k, cache.v, mask, is_causal=False).to(x.dtype)
        return self.o_proj(out.reshape(b, length, self.num_heads * self.head_dim))

    def _attend(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> [B, Lq, Hq, D]."""
        group = self.num_heads // self.num_kv_heads
        q = q.transpose(1, 2)
        k = k.transpose(1, 2).repeat_interleave(group, dim=1)
        v = v.transpose(1, 2).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)
        return out.transpose(1, 2)


def gqa_decoder(impl: str = "fusekit", backend: str | None = None, vocab_size: int = 32000, dim: int = 512,
                depth: int = 8, num_heads: int = 8, num_kv_heads: int = 2, max_len: int = 2048, mlp_ratio: int = 4,
                window: Optional[Sequence[Optional[int]]] = None) -> GQADecoder:
    """GQADecoder with fusekit.nn.MultiQueryAttention (impl="fusekit", on ``backend``) or with the
    eager GroupedQueryAttention (impl="eager"); identical state dicts."""
    if impl == "fusekit":
        attention_layer = None
    elif impl == "eager":
        attention_layer = GroupedQueryAttention
    else:
        raise ValueError(f"impl must be 'fusekit' or 'eager', got {impl!r}")
    return GQADecoder(vocab_size=vocab_size, dim=dim, depth=depth, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      max_len=max_len, mlp_ratio=mlp_ratio, window=window, backend=backend,
                      attention_layer=attention_layer)
