"""Float64 references written from the definitions in DESIGN.md, shared by tests and benchmarks.

Depthwise convolution is computed by an explicit sum over kernel taps (not by F.conv2d), so the
reference is independent of the PyTorch convolution kernels that serve as baselines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _resolve(x_ndim: int, weight, stride, padding, dilation):
    from ..ops.depthwise import _pair, resolve_padding
    nd = x_ndim - 2
    stride = _pair(stride, "stride", nd)
    dilation = _pair(dilation, "dilation", nd)
    if not isinstance(padding, str) and len(tuple(padding) if not isinstance(padding, int) else ()) == 4:
        pads = tuple(padding)
    else:
        pads = resolve_padding(padding, tuple(weight.shape[2:]), stride, dilation)
    return stride, pads, dilation


def depthwise_conv2d_reference(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """y[n,c,ho,wo] = b[c] + sum_ij x[n,c,ho*sh-top+i*dh, wo*sw-left+j*dw] w[c,0,i,j], in float64.

    padding: int, (ph, pw), "same", "valid", or explicit (top, bottom, left, right).
    """
    stride, (top, bottom, left, right), (dh, dw) = _resolve(4, weight, stride, padding, dilation)
    sh, sw = stride
    x64, w64 = x.double(), weight.double()  # differentiable: tests take reference gradients
    n, c, h, w = x64.shape
    kh, kw = w64.shape[2:]
    xp = F.pad(x64, (left, right, top, bottom))
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    y = torch.zeros(n, c, ho, wo, dtype=torch.float64, device=x.device)
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
            y = y + tap * w64[:, 0, i, j].view(1, c, 1, 1)
    if bias is not None:
        y = y + bias.double().view(1, c, 1, 1)
    return y


def depthwise_conv1d_reference(x, weight, bias=None, stride=1, padding=0, dilation=1):
    s = stride if isinstance(stride, int) else stride[0]
    d = dilation if isinstance(dilation, int) else dilation[0]
    if isinstance(padding, str):
        pad = padding
    else:
        p = padding if isinstance(padding, int) else padding[0]
        pad = (0, 0, p, p)
    if pad == "same":
        total = d * (weight.shape[2] - 1)
        pad = (0, 0, total // 2, total - total // 2)
    elif pad == "valid":
        pad = (0, 0, 0, 0)
    return depthwise_conv2d_reference(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, s), pad, (1, d)).squeeze(2)


def inception_dwconv2d_reference(x, w_hw, b_hw, w_w, b_w, w_h, b_h):
    """cat(identity, k x k, 1 x band, band x 1 depthwise convs with 'same' padding), float64."""
    gc = w_hw.shape[0]
    c = x.shape[1]
    x_id, x_hw, x_w, x_h = torch.split(x.double(), (c - 3 * gc, gc, gc, gc), dim=1)
    return torch.cat((x_id,
                      depthwise_conv2d_reference(x_hw, w_hw, b_hw, padding="same"),
                      depthwise_conv2d_reference(x_w, w_w, b_w, padding="same"),
                      depthwise_conv2d_reference(x_h, w_h, b_h, padding="same")), dim=1)


# ----------------------------------------------------------------------------------------------
# multi-query / grouped-query attention (DESIGN.md 5.2): explicit mask over full attention
# ----------------------------------------------------------------------------------------------

def attention_mask(lq: int, lk: int, causal: bool, window_left: int = -1, window_right: int = -1,
                   device=None) -> torch.Tensor:
    """[lq, lk] bool, True where query i may see key j. Causal and windows are aligned bottom-right:
    query i sits at key position i + lk - lq; a negative window side is unbounded."""
    i = torch.arange(lq, device=device).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk, device=device).unsqueeze(0)
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window_left >= 0:
        allowed &= j >= i - window_left
    if window_right >= 0:
        allowed &= j <= i + window_right
    return allowed


def _mqa_dense_reference(q, k, v, scale, mask):
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] in float64 -> out [B, Lq, Hq, D], lse [B, Lq, Hq]."""
    hq, hkv = q.shape[2], k.shape[2]
    group = hq // hkv
    # query head h reads KV head h // group (flash-attention's convention)
    kx = k.repeat_interleave(group, dim=2)
    vx = v.repeat_interleave(group, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q, kx) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hq, Lq]; -inf where a row sees no key
    probs = torch.exp(logits - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = probs.masked_fill(~mask, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", probs, vx)
    return out, lse.transpose(1, 2)


def mqa_reference(q, k, v, causal: bool = False, window_left: int = -1, window_right: int = -1,
                  scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None):
    """Softmax attention with Hq/Hkv query heads per KV head, in float64.

    Dense q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; or packed q [Tq, Hq, D], k/v [Tk, Hkv, D] with
    cu_seqlens_q/k [B + 1]. Returns (out like q, lse = q.shape[:-1]); a row that sees no key has
    out 0 and lse -inf.
    """
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens_q is None:
        mask = attention_mask(q.shape[1], k.shape[1], causal, window_left, window_right, q.device)
        return _mqa_dense_reference(q, k, v, scale, mask)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        mask = attention_mask(qs.shape[0], ks.shape[0], causal, window_left, window_right, q.device)
        out, lse = _mqa_dense_reference(qs[None], ks[None], vs[None], scale, mask)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses)


def mqa_decode_reference(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, scale: float | None = None,
                         causal: bool = True, window_left: int = -1, window_right: int = -1):
    """Decoding as full attention over each sequence's cached tokens (plus the appended ones).

    Returns (out [B, n, Hq, D], lse [B, n, Hq], k_cache_after, v_cache_after), all float64; the caches
    after are copies with k_new/v_new written at cache_seqlens[b].
    """
    k_after, v_after = k_cache.double().clone(), v_cache.double().clone()
    n = q.shape[1]
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        if k_new is not None:
            k_after[b, length:length + n] = k_new[b].double()
            v_after[b, length:length + n] = v_new[b].double()
            length += n
        mask = attention_mask(n, length, causal, window_left, window_right, q.device)
        out, lse = _mqa_dense_reference(q[b:b + 1].double(), k_after[b:b + 1, :length], v_after[b:b + 1, :length],
                                        q.shape[-1] ** -0.5 if scale is None else scale, mask)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), k_after, v_after
