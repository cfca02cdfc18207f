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
