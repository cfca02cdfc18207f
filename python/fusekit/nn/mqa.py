"""Multi-query / grouped-query attention modules, a KV cache, and a small GQA decoder.

``MultiQueryAttention`` keeps Llama-style parameter names (q_proj, k_proj, v_proj, o_proj), so
state dicts of GQA attention layers with separate projections load directly. ``KVCache`` holds
preallocated [B, Lmax, Hkv, D] buffers per layer and one length per sequence; decoding writes the
new tokens' K/V into it in place (fusekit.multi_query_decode) and reads each cached K/V row once
for all the query heads that share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.mqa import multi_query_attention, multi_query_decode


class KVCache:
    """K/V buffers for ``num_layers`` layers, [B, max_len, num_kv_heads, head_dim] each, and
    ``seqlens`` (int32 [B]): the tokens held per sequence. Layers read and write through
    ``layer(i)``; the model calls ``advance(n)`` once per step, after every layer has appended."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.max_len = max_len

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self.k[index], self.v[index], self.seqlens)

    def advance(self, n: int) -> None:
        self.seqlens += n

    def reset(self) -> None:
        self.seqlens.zero_()


@dataclass
class LayerCache:
    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor


class GroupedAttentionBase(nn.Module):
    """Constructor, attributes and q/k/v/o projections shared by MultiQueryAttention and its eager
    twin (fusekit.models.gqa.GroupedQueryAttention), so both have the same parameters."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int = 1, bias: bool = False,
                 causal: bool = True, window: Optional[Sequence[Optional[int]]] = None, head_dim: int | None = None,
                 scale: float | None = None, device=None, dtype=None):
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads != 0:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), "
                                 "or give head_dim")
            head_dim = embed_dim // num_heads
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.causal, self.window, self.scale = causal, window, scale
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **kw)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, embed_dim] -> q [B, L, Hq, D], k and v [B, L, Hkv, D] (views)."""
        b, length, _ = x.shape
        return (self.q_proj(x).view(b, length, self.num_heads, self.head_dim),
                self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim),
                self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, window={self.window}")


class MultiQueryAttention(GroupedAttentionBase):
    """Self-attention with ``num_heads`` query heads sharing ``num_kv_heads`` K/V heads.

    x: [B, L, embed_dim] -> [B, L, embed_dim]. Without a cache, attention over the L tokens
    (causal by default, optional sliding window (left, right)). With ``cache`` (a LayerCache),
    the L new tokens' K/V are appended to it and the queries attend over everything cached.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int = 1, bias: bool = False,
                 causal: bool = True, window: Optional[Sequence[Optional[int]]] = None, head_dim: int | None = None,
                 scale: float | None = None, backend: str | None = None, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, causal, window, head_dim, scale, device, dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = self.project(x)
        if cache is None:
            out = multi_query_attention(q, k, v, causal=self.causal, window=self.window, scale=self.scale,
                                        backend=self.backend)
        else:
            if not self.causal:
                raise ValueError("cached decoding needs a causal MultiQueryAttention (causal=True)")
            out = multi_query_decode(q, cache.k, cache.v, cache.seqlens, k.to(cache.k.dtype), v.to(cache.v.dtype),
                                     scale=self.scale, window=self.window, backend=self.backend).to(x.dtype)
        return self.o_proj(out.reshape(b, length, self.num_heads * self.head_dim))



class _DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_ratio: int, window,
                 attention_layer: Callable[..., nn.Module]):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = attention_layer(dim, num_heads, num_kv_heads, window=window)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, cache=None):
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class GQADecoder(nn.Module):
    """A small decoder-only language model with grouped-query attention (learned positions,
    pre-norm blocks). It exists to show, and test, that cached generation with
    fusekit.multi_query_decode reproduces the no-cache forward pass.

    ``attention_layer(dim, num_heads, num_kv_heads, window=window)`` builds each block's attention
    (default: MultiQueryAttention on ``backend``); any layer with MultiQueryAttention's projections,
    ``num_kv_heads``/``head_dim`` attributes and ``forward(x, cache: LayerCache | None)`` fits,
    such as an eager twin with the same state-dict keys."""

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 2, num_heads: int = 8,
                 num_kv_heads: int = 2, max_len: int = 512, mlp_ratio: int = 4,
                 window: Optional[Sequence[Optional[int]]] = None, backend: str | None = None,
                 attention_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        if attention_layer is None:
            attention_layer = partial(MultiQueryAttention, backend=backend)
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_DecoderBlock(dim, num_heads, num_kv_heads, mlp_ratio, window, attention_layer)
                                    for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        attn = self.blocks[0].attn
        p = self.head.weight
        return KVCache(len(self.blocks), batch, max_len or self.max_len, attn.num_kv_heads, attn.head_dim,
                       dtype=p.dtype, device=p.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """tokens [B, L] -> logits [B, L, vocab]. With a cache, the tokens continue the cached
        sequences (all of the same length ``start``) and the cache advances by L."""
        length = tokens.shape[1]
        if start + length > self.max_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds max_len {self.max_len}")
        x = self.tok(tokens) + self.pos(torch.arange(start, start + length, device=tokens.device))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.advance(length)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, use_cache: bool = True) -> torch.Tensor:
        """Greedy continuation of prompt [B, L0] by max_new_tokens tokens."""
        tokens = prompt
        cache = self.new_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens) if use_cache else None
        logits = self(prompt, cache)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            if step == max_new_tokens - 1:
                break
            logits = self(nxt, cache, start=tokens.shape[1] - 1) if use_cache else self(tokens)
        return tokens
