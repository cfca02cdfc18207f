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


# ----------------------------------------------------------------------------------------------
# neighborhood attention (DESIGN.md 5.1): windows from the definition, then an explicit mask over
# full attention
# ----------------------------------------------------------------------------------------------

def _per_axis(value, rank: int, name: str) -> tuple:
    if isinstance(value, (int, bool)):
        return (value,) * rank
    value = tuple(value)
    if len(value) != rank:
        raise ValueError(f"{name} must have {rank} entries, got {value}")
    return value


def na_axis_windows(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> list[tuple[int, int]]:
    """Per query i of one axis: (first key, number of keys); the keys are first + n * dilation."""
    out = []
    for i in range(length):
        group, ig = i % dilation, i // dilation
        group_len = -(-(length - group) // dilation)
        if causal:
            leader = min((ig // stride) * stride + stride - 1, group_len - 1)
            start = max(leader - kernel + 1, 0)
            count = ig - start + 1
        else:
            leader = min((ig // stride) * stride + stride // 2, group_len - 1)
            start = min(max(leader - kernel // 2, 0), group_len - kernel)
            count = kernel
        out.append((start * dilation + group, count))
    return out


def na_neighbors(spatial, kernel_size, stride=1, dilation=1, is_causal=False, device=None):
    """Neighbour table of rank-R NA over tokens flattened row-major (N = prod(spatial) tokens,
    K = prod(kernel_size) slots, slot = row-major multi-index of per-axis window offsets).

    Returns (key [N, K] long token index (0 where invalid), valid [N, K] bool,
    rpb_index [N, K, R] long: (j - i) / d + k - 1 per axis)."""
    spatial = tuple(spatial)
    rank = len(spatial)
    ks = _per_axis(kernel_size, rank, "kernel_size")
    ss, ds, cs = (_per_axis(x, rank, n) for x, n in ((stride, "stride"), (dilation, "dilation"), (is_causal, "is_causal")))
    key = torch.zeros(1, 1, dtype=torch.long)
    valid = torch.ones(1, 1, dtype=torch.bool)
    rel = torch.zeros(1, 1, 0, dtype=torch.long)
    for ax in range(rank):
        length, k, d = spatial[ax], ks[ax], ds[ax]
        wins = na_axis_windows(length, k, ss[ax], d, bool(cs[ax]))
        first = torch.tensor([w[0] for w in wins]).view(length, 1)
        count = torch.tensor([w[1] for w in wins]).view(length, 1)
        slot = torch.arange(k).view(1, k)
        ax_key = first + slot * d                           # [L, k]
        ax_valid = slot < count
        ax_rel = (ax_key - torch.arange(length).view(length, 1)) // d + k - 1
        # combine: new token index = old * L + coordinate; slots multiply row-major
        n_old, k_old = key.shape
        key = (key.view(n_old, 1, k_old, 1) * length + ax_key.view(1, length, 1, k)).reshape(n_old * length, k_old * k)
        valid = (valid.view(n_old, 1, k_old, 1) & ax_valid.view(1, length, 1, k)).reshape(n_old * length, k_old * k)
        rel = torch.cat([rel.view(n_old, 1, k_old, 1, -1).expand(n_old, length, k_old, k, rel.shape[-1]),
                         ax_rel.view(1, length, 1, k, 1).expand(n_old, length, k_old, k, 1)], -1)
        rel = rel.reshape(n_old * length, k_old * k, ax + 1)
    key = torch.where(valid, key, torch.zeros_like(key))
    return key.to(device), valid.to(device), rel.to(device)


def na_mask(spatial, kernel_size, stride=1, dilation=1, is_causal=False, device=None) -> torch.Tensor:
    """[N, N] bool: True where query token i (row-major) attends key token j."""
    key, valid, _ = na_neighbors(spatial, kernel_size, stride, dilation, is_causal)
    n = key.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool)
    rows = torch.arange(n).view(n, 1).expand_as(key)
    mask[rows[valid], key[valid]] = True
    return mask.to(device)


def _na_rpb_bias(rpb, spatial, kernel_size, stride, dilation):
    """[Hq, N, N] float64 bias: rpb[h, idx] on each (query, neighbour) pair, 0 elsewhere."""
    key, valid, rel = na_neighbors(spatial, kernel_size, stride, dilation, False)
    n = key.shape[0]
    flat_rpb = rpb.double().reshape(rpb.shape[0], -1)
    sizes = rpb.shape[1:]
    flat_idx = torch.zeros_like(key)
    for ax, size in enumerate(sizes):
        flat_idx = flat_idx * size + rel[..., ax]
    gathered = flat_rpb[:, flat_idx.to(rpb.device)]            # [Hq, N, K]
    gathered = gathered * valid.to(rpb.device)
    bias = torch.zeros(rpb.shape[0], n, n, dtype=torch.float64, device=rpb.device)
    return bias.scatter_add(2, key.to(rpb.device).unsqueeze(0).expand_as(gathered), gathered)


def na_reference(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale: float | None = None,
                 rpb=None, additional_keys=None, additional_values=None):
    """Neighborhood attention in float64 as masked full attention.

    q [B, *spatial, Hq, D], k/v [B, *spatial, Hkv, D]; rpb [Hq, 2k_0-1, ...] (non-causal);
    additional_keys/values [B, n_extra, Hkv, D] are seen by every query. Returns
    (out [B, *spatial, Hq, D], lse [B, *spatial, Hq]), differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    spatial = tuple(q.shape[1:-2])
    b, hq, hkv, d = q.shape[0], q.shape[-2], k.shape[-2], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    n = 1
    for s in spatial:
        n *= s
    group = hq // hkv
    qf = q.reshape(b, n, hq, d)
    kf = k.reshape(b, n, hkv, d).repeat_interleave(group, dim=2)
    vf = v.reshape(b, n, hkv, d).repeat_interleave(group, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    if rpb is not None:
        logits = logits + _na_rpb_bias(rpb, spatial, kernel_size, stride, dilation).unsqueeze(0)
    mask = na_mask(spatial, kernel_size, stride, dilation, is_causal, q.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    values = vf
    if additional_keys is not None:
        ak = additional_keys.double().repeat_interleave(group, dim=2)
        av = additional_values.double().repeat_interleave(group, dim=2)
        logits = torch.cat([logits, torch.einsum("bihd,bjhd->bhij", qf, ak) * scale], dim=-1)
        values = torch.cat([vf, av], dim=1)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", torch.exp(logits - lse.unsqueeze(-1)), values)
    return out.reshape(q.shape), lse.transpose(1, 2).reshape(q.shape[:-1])


def na_qk_reference(q, k, kernel_size, stride=1, dilation=1, is_causal=False, scale: float = 1.0, rpb=None):
    """Unfused logits in float64: attn [B, Hq, *spatial, K] = scale * q . k_neighbour + rpb, -inf in
    slots a causal window does not reach."""
    q, k = q.double(), k.double()
    spatial = tuple(q.shape[1:-2])
    b, hq, hkv, d = q.shape[0], q.shape[-2], k.shape[-2], q.shape[-1]
    key, valid, rel = na_neighbors(spatial, kernel_size, stride, dilation, is_causal, q.device)
    n, kk = key.shape
    qf = q.reshape(b, n, hq, d)
    kf = k.reshape(b, n, hkv, d).repeat_interleave(hq // hkv, dim=2)
    kn = kf[:, key]                                            # [B, N, K, Hq, D]
    attn = torch.einsum("bihd,bikhd->bhik", qf, kn) * scale
    if rpb is not None:
        flat_idx = torch.zeros_like(key)
        for ax, size in enumerate(rpb.shape[1:]):
            flat_idx = flat_idx * size + rel[..., ax]
        attn = attn + rpb.double().reshape(hq, -1)[:, flat_idx].unsqueeze(0)
    attn = attn.masked_fill(~valid, float("-inf"))
    return attn.reshape(b, hq, *spatial, kk)


def na_av_reference(attn, v, kernel_size, stride=1, dilation=1, is_causal=False):
    """Unfused weighted sum in float64: out [B, *spatial, Hq, D] = sum over valid slots of
    attn * v_neighbour (invalid slots are ignored whatever they hold)."""
    attn, v = attn.double(), v.double()
    b, hq = attn.shape[:2]
    spatial = tuple(attn.shape[2:-1])
    hkv, d = v.shape[-2], v.shape[-1]
    key, valid, _ = na_neighbors(spatial, kernel_size, stride, dilation, is_causal, v.device)
    n, kk = key.shape
    weights = torch.where(valid, attn.reshape(b, hq, n, kk), torch.zeros((), dtype=torch.float64, device=v.device))
    vf = v.reshape(b, n, hkv, d).repeat_interleave(hq // hkv, dim=2)
    out = torch.einsum("bhik,bikhd->bihd", weights, vf[:, key])
    return out.reshape(b, *spatial, hq, d)


def na_unfused_reference(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale: float | None = None,
                         rpb=None, additional_keys=None, additional_values=None):
    """Neighborhood attention in float64 through the neighbour table (O(N * K) memory, unlike
    na_reference's O(N^2) mask): the "reference" backend of fusekit.na*d. Returns (out, lse) as
    na_reference does."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = na_qk_reference(q, k, kernel_size, stride, dilation, is_causal, scale, rpb)
    b, hq = attn.shape[:2]
    spatial = tuple(attn.shape[2:-1])
    kk = attn.shape[-1]
    if additional_keys is not None:
        group = hq // additional_keys.shape[2]
        qg = q.double().reshape(b, -1, additional_keys.shape[2], group, q.shape[-1])
        extra = torch.einsum("bihgd,bjhd->bhgij", qg, additional_keys.double()) * scale
        attn = torch.cat([attn, extra.reshape(b, hq, *spatial, -1)], dim=-1)
    lse = torch.logsumexp(attn, dim=-1)
    probs = torch.exp(attn - lse.unsqueeze(-1))
    out = na_av_reference(probs[..., :kk], v, kernel_size, stride, dilation, is_causal)
    if additional_values is not None:
        hkv = additional_values.shape[2]
        pg = probs[..., kk:].reshape(b, hkv, hq // hkv, -1, probs.shape[-1] - kk)
        extra_out = torch.einsum("bhgij,bjhd->bihgd", pg, additional_values.double())
        out = out + extra_out.reshape(out.shape)
    return out, lse.movedim(1, -1)


# ----------------------------------------------------------------------------------------------
# fused inverted-residual blocks (DESIGN.md 5.4), on BN-folded weights
# ----------------------------------------------------------------------------------------------

ACTIVATION_CODES = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4}


def activation_reference(u, activation):
    """The block activations by their definitions (name or the kernels' integer code)."""
    code = ACTIVATION_CODES[activation] if isinstance(activation, str) else int(activation)
    if code == 0:
        return u
    if code == 1:
        return u.clamp_min(0)
    if code == 2:
        return u.clamp(0, 6)
    if code == 3:
        return u * torch.sigmoid(u)
    if code == 4:
        return u * (u + 3).clamp(0, 6) / 6
    raise ValueError(f"unknown activation code {activation!r}")


def _pointwise(x64, w, b):
    """1x1 convolution [N, C, H, W] x [O, C] (+ b[O]) as an explicit channel contraction."""
    y = torch.einsum("nchw,oc->nohw", x64, w.double())
    return y if b is None else y + b.double().view(1, -1, 1, 1)


def inverted_residual_dw_reference(x, w_expand, b_expand, w_dw, b_dw, stride=1, padding=(1, 1, 1, 1), dilation=1,
                                   activation="relu6"):
    """d = dw(act(x W_e^T + b_e)) + b_dw (a1 = x without an expand stage), float64."""
    x64 = x.double()
    a1 = x64 if w_expand is None else activation_reference(_pointwise(x64, w_expand, b_expand), activation)
    return depthwise_conv2d_reference(a1, w_dw.double().unsqueeze(1), b_dw, stride, tuple(padding), dilation)


def inverted_residual_reference(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate=None, stride=1,
                                padding=(1, 1, 1, 1), dilation=1, activation="relu6", residual=False):
    """y = (act(dw(a1) + b_dw) * gate) W_p^T + b_p (+ x), the inverted_residual_forward definition, float64."""
    d = inverted_residual_dw_reference(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation)
    a2 = activation_reference(d, activation)
    if gate is not None:
        a2 = a2 * gate.double()[:, :, None, None]
    y = _pointwise(a2, w_project, b_project)
    return y + x.double() if residual else y


def inverted_residual_dw_sums_reference(x, w_expand, b_expand, w_dw, b_dw, stride=1, padding=(1, 1, 1, 1),
                                        dilation=1, activation="relu6"):
    """[N, 3, E]: sums over output pixels of d, d*d and act(d), float64."""
    d = inverted_residual_dw_reference(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation)
    return torch.stack([d.sum((2, 3)), (d * d).sum((2, 3)), activation_reference(d, activation).sum((2, 3))], 1)


def fused_mbconv_reference(x, w_expand, b_expand, w_project=None, b_project=None, stride=1, padding=(1, 1, 1, 1),
                           dilation=1, activation="silu", residual=False):
    """y = act(conv_kxk(x) + b_e) W_p^T + b_p (+ x); y = act(conv_kxk(x) + b_e) (+ x) without a project."""
    x64 = x.double()
    top, bottom, left, right = padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    xp = F.pad(x64, (left, right, top, bottom))
    kh, kw = w_expand.shape[2:]
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    u = torch.zeros(x.shape[0], w_expand.shape[0], ho, wo, dtype=torch.float64, device=x.device)
    for i in range(kh):  # explicit taps: independent of the convolution kernels used as baselines
        for j in range(kw):
            tap = xp[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
            u = u + torch.einsum("nchw,oc->nohw", tap, w_expand[:, :, i, j].double())
    if b_expand is not None:
        u = u + b_expand.double().view(1, -1, 1, 1)
    a1 = activation_reference(u, activation)
    y = a1 if w_project is None else _pointwise(a1, w_project, b_project)
    return y + x64 if residual else y
