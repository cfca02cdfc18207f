"""Depthwise 2-D convolution (groups == channels, multiplier 1) in Triton: forward, input
gradient, weight + bias gradient, for NCHW and channels_last tensors.

Semantics are F.conv2d(x, weight, bias, stride, padding, dilation, groups=C) with the padding
given as (top, bottom, left, right). The launch functions only assert: callers validate.

Layout handling. A tensor is used in place when its innermost dimension in its layout has unit
stride (W for NCHW, C for channels_last); other strides are passed to the kernels, so channel
slices of a larger tensor need no copy. NCHW tiles are [rows, columns] of one (n, c) plane with
threads along W (coalesced; taps shift the alignment, so no wide loads); channels_last tiles are
[columns, channels] of one row and load channels in 16-byte vectors when C % 16 == 0.

Index arithmetic. Per-program bases (sample, plane, row) are int64 scalars; per-element offsets
inside a plane (NCHW) or a row (channels_last) are int32, which the launchers assert fits.

Taps are runtime loops, so a 63x63 kernel compiles to the same code as a 3x3 one.
"""

import re
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import CompileConfig

_INT32_MAX = 2**31 - 1

# Sizes, geometry and loop counts gain nothing from the JIT's divisible-by-16 specialization and
# would multiply recompilations across shapes; strides (and C in channels_last, the channel
# stride of the transposed weight) keep it, since it lets loads vectorize.
_GEOMETRY_ARGS = ["H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "PT", "PL", "DH", "DW"]
_NCHW_UNSPECIALIZED = ["C"] + _GEOMETRY_ARGS
_NHWC_UNSPECIALIZED = _GEOMETRY_ARGS


# ----------------------------------------------------------------------------------------------
# Kernels, NCHW: one program = one (n, c) plane tile of [BLOCK_H, BLOCK_W].
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_NCHW_UNSPECIALIZED)
def _dw_fwd_nchw_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W, Ho, Wo,
    x_sn, x_sc, x_sh,
    y_sn, y_sc, y_sh,
    KH, KW, SH, SW, PT, PL, DH, DW,
    HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid_nc = tl.program_id(0)
    n = (pid_nc // C).to(tl.int64)
    c = pid_nc % C
    ho = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    wo = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    x_plane = x_ptr + n * x_sn + c.to(tl.int64) * x_sc
    w_taps = w_ptr + c * (KH * KW)
    hi0 = ho * SH - PT
    wi0 = wo * SW - PL
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=ACC_DTYPE)
    for i in range(0, KH):
        hi = hi0 + i * DH
        row_ok = (hi >= 0) & (hi < H)
        row_off = hi * x_sh
        for j in range(0, KW):
            wi = wi0 + j * DW
            col_ok = (wi >= 0) & (wi < W)
            xv = tl.load(x_plane + (row_off[:, None] + wi[None, :]),
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            wv = tl.load(w_taps + (i * KW + j))
            acc += xv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(ACC_DTYPE)
    y_plane = y_ptr + n * y_sn + c.to(tl.int64) * y_sc
    out_ok = (ho < Ho)[:, None] & (wo < Wo)[None, :]
    tl.store(y_plane + (ho[:, None] * y_sh + wo[None, :]), acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=_NCHW_UNSPECIALIZED)
def _dw_bwd_input_nchw_kernel(
    go_ptr, w_ptr, gx_ptr,
    C, H, W, Ho, Wo,
    go_sn, go_sc, go_sh,
    gx_sn, gx_sc, gx_sh,
    KH, KW, SH, SW, PT, PL, DH, DW,
    ACC_FP64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # grad_x[h, w] = sum over taps (i, j) with h + PT - i*DH = ho*SH, w + PL - j*DW = wo*SW
    # of grad_out[ho, wo] * weight[i, j].
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid_nc = tl.program_id(0)
    n = (pid_nc // C).to(tl.int64)
    c = pid_nc % C
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    go_plane = go_ptr + n * go_sn + c.to(tl.int64) * go_sc
    w_taps = w_ptr + c * (KH * KW)
    h_pad = h + PT
    w_pad = w + PL
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=ACC_DTYPE)
    for i in range(0, KH):
        h_num = h_pad - i * DH
        ho = h_num // SH
        # h_num >= 0 first: the quotient of a negative h_num is never used unmasked.
        row_ok = (h_num >= 0) & (ho * SH == h_num) & (ho < Ho)
        row_off = ho * go_sh
        for j in range(0, KW):
            w_num = w_pad - j * DW
            wo = w_num // SW
            col_ok = (w_num >= 0) & (wo * SW == w_num) & (wo < Wo)
            g = tl.load(go_plane + (row_off[:, None] + wo[None, :]),
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            wv = tl.load(w_taps + (i * KW + j))
            acc += g.to(ACC_DTYPE) * wv.to(ACC_DTYPE)
    gx_plane = gx_ptr + n * gx_sn + c.to(tl.int64) * gx_sc
    in_ok = (h < H)[:, None] & (w < W)[None, :]
    tl.store(gx_plane + (h[:, None] * gx_sh + w[None, :]), acc.to(gx_ptr.dtype.element_ty), mask=in_ok)


@triton.jit(do_not_specialize=_NCHW_UNSPECIALIZED + ["TILES_PER_PROGRAM"])
def _dw_bwd_weight_nchw_kernel(
    go_ptr, x_ptr, gw_ptr, gb_ptr,
    C, H, W, Ho, Wo,
    go_sn, go_sc, go_sh,
    x_sn, x_sc, x_sh,
    KH, KW, SH, SW, PT, PL, DH, DW,
    TILES_PER_PROGRAM,
    ACC_FP64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # One program: TILES_PER_PROGRAM vertically stacked [BLOCK_H, BLOCK_W] tiles of one
    # grad_out plane. Per tap it reduces over all of them, then adds one scalar to the
    # fp32/fp64 buffer gw[c, tap] (and gb[c] once).
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid_nc = tl.program_id(0)
    n = (pid_nc // C).to(tl.int64)
    c = pid_nc % C
    ho_first = tl.program_id(1) * (BLOCK_H * TILES_PER_PROGRAM)
    wo = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    wo_ok = wo < Wo
    go_plane = go_ptr + n * go_sn + c.to(tl.int64) * go_sc
    x_plane = x_ptr + n * x_sn + c.to(tl.int64) * x_sc
    wi0 = wo * SW - PL

    bias_acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=ACC_DTYPE)
    for t in range(0, TILES_PER_PROGRAM):
        ho = ho_first + t * BLOCK_H + tl.arange(0, BLOCK_H)
        out_ok = (ho < Ho)[:, None] & wo_ok[None, :]
        g = tl.load(go_plane + (ho[:, None] * go_sh + wo[None, :]), mask=out_ok, other=0.0)
        bias_acc += g.to(ACC_DTYPE)
    tl.atomic_add(gb_ptr + c, tl.sum(bias_acc), sem="relaxed")

    gw_taps = gw_ptr + c * (KH * KW)
    for i in range(0, KH):
        for j in range(0, KW):
            wi = wi0 + j * DW
            col_ok = wo_ok & (wi >= 0) & (wi < W)
            acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=ACC_DTYPE)
            for t in range(0, TILES_PER_PROGRAM):
                ho = ho_first + t * BLOCK_H + tl.arange(0, BLOCK_H)
                hi = ho * SH - PT + i * DH
                ho_ok = ho < Ho
                g = tl.load(go_plane + (ho[:, None] * go_sh + wo[None, :]),
                            mask=ho_ok[:, None] & wo_ok[None, :], other=0.0)
                # x is read only where grad_out is: an inf in x must not meet a masked zero.
                row_ok = ho_ok & (hi >= 0) & (hi < H)
                xv = tl.load(x_plane + (hi[:, None] * x_sh + wi[None, :]),
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                acc += g.to(ACC_DTYPE) * xv.to(ACC_DTYPE)
            tl.atomic_add(gw_taps + (i * KW + j), tl.sum(acc), sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Kernels, channels_last: one program = one (n, row) x [BLOCK_W columns, BLOCK_C channels].
# The weight comes transposed to [KH*KW, C] so per-tap weight loads are contiguous.
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_NHWC_UNSPECIALIZED)
def _dw_fwd_nhwc_kernel(
    x_ptr, wt_ptr, b_ptr, y_ptr,
    C, H, W, Ho, Wo,
    x_sn, x_sh, x_sw,
    y_sn, y_sh, y_sw,
    KH, KW, SH, SW, PT, PL, DH, DW,
    HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid_row = tl.program_id(0)
    n = (pid_row // Ho).to(tl.int64)
    ho = pid_row % Ho
    wo = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    x_img = x_ptr + n * x_sn
    wi0 = wo * SW - PL
    acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC_DTYPE)
    for i in range(0, KH):
        hi = ho * SH - PT + i * DH
        row_ok = (hi >= 0) & (hi < H)
        x_row = x_img + hi.to(tl.int64) * x_sh
        for j in range(0, KW):
            wi = wi0 + j * DW
            pix_ok = row_ok & (wi >= 0) & (wi < W)
            xv = tl.load(x_row + (wi[:, None] * x_sw + cc[None, :]),
                         mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(wt_ptr + ((i * KW + j) * C + cc), mask=c_ok, other=0.0)
            acc += xv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cc, mask=c_ok, other=0.0).to(ACC_DTYPE)[None, :]
    y_row = y_ptr + n * y_sn + ho.to(tl.int64) * y_sh
    out_ok = (wo < Wo)[:, None] & c_ok[None, :]
    tl.store(y_row + (wo[:, None] * y_sw + cc[None, :]), acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=_NHWC_UNSPECIALIZED)
def _dw_bwd_input_nhwc_kernel(
    go_ptr, wt_ptr, gx_ptr,
    C, H, W, Ho, Wo,
    go_sn, go_sh, go_sw,
    gx_sn, gx_sh, gx_sw,
    KH, KW, SH, SW, PT, PL, DH, DW,
    ACC_FP64: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid_row = tl.program_id(0)
    n = (pid_row // H).to(tl.int64)
    h = pid_row % H
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    go_img = go_ptr + n * go_sn
    w_pad = w + PL
    acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC_DTYPE)
    for i in range(0, KH):
        h_num = h + PT - i * DH
        ho = h_num // SH
        row_ok = (h_num >= 0) & (ho * SH == h_num) & (ho < Ho)
        go_row = go_img + ho.to(tl.int64) * go_sh
        for j in range(0, KW):
            w_num = w_pad - j * DW
            wo = w_num // SW
            pix_ok = row_ok & (w_num >= 0) & (wo * SW == w_num) & (wo < Wo)
            g = tl.load(go_row + (wo[:, None] * go_sw + cc[None, :]),
                        mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(wt_ptr + ((i * KW + j) * C + cc), mask=c_ok, other=0.0)
            acc += g.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]
    gx_row = gx_ptr + n * gx_sn + h.to(tl.int64) * gx_sh
    in_ok = (w < W)[:, None] & c_ok[None, :]
    tl.store(gx_row + (w[:, None] * gx_sw + cc[None, :]), acc.to(gx_ptr.dtype.element_ty), mask=in_ok)


@triton.jit(do_not_specialize=_NHWC_UNSPECIALIZED + ["ROWS_PER_PROGRAM"])
def _dw_bwd_weight_nhwc_kernel(
    go_ptr, x_ptr, gwt_ptr, gb_ptr,
    C, H, W, Ho, Wo,
    go_sn, go_sh, go_sw,
    x_sn, x_sh, x_sw,
    KH, KW, SH, SW, PT, PL, DH, DW,
    ROWS_PER_PROGRAM,
    ACC_FP64: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: ROWS_PER_PROGRAM output rows x [BLOCK_W, BLOCK_C]. Per tap it reduces over
    # rows and columns, then adds a BLOCK_C vector to the buffer gwt[tap, c] (gb[c] once).
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    row_blocks = tl.cdiv(Ho, ROWS_PER_PROGRAM)
    pid0 = tl.program_id(0)
    n = (pid0 // row_blocks).to(tl.int64)
    ho_first = (pid0 % row_blocks) * ROWS_PER_PROGRAM
    wo = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    wo_ok = wo < Wo
    go_img = go_ptr + n * go_sn
    x_img = x_ptr + n * x_sn
    go_cols = wo[:, None] * go_sw + cc[None, :]
    wi0 = wo * SW - PL

    bias_acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC_DTYPE)
    for r in range(0, ROWS_PER_PROGRAM):
        ho = ho_first + r
        g = tl.load(go_img + ho.to(tl.int64) * go_sh + go_cols,
                    mask=(wo_ok & (ho < Ho))[:, None] & c_ok[None, :], other=0.0)
        bias_acc += g.to(ACC_DTYPE)
    tl.atomic_add(gb_ptr + cc, tl.sum(bias_acc, axis=0), mask=c_ok, sem="relaxed")

    for i in range(0, KH):
        for j in range(0, KW):
            wi = wi0 + j * DW
            col_ok = wo_ok & (wi >= 0) & (wi < W)
            x_cols = wi[:, None] * x_sw + cc[None, :]
            acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC_DTYPE)
            for r in range(0, ROWS_PER_PROGRAM):
                ho = ho_first + r
                hi = ho * SH - PT + i * DH
                ho_ok = ho < Ho
                g = tl.load(go_img + ho.to(tl.int64) * go_sh + go_cols,
                            mask=(wo_ok & ho_ok)[:, None] & c_ok[None, :], other=0.0)
                # x is read only where grad_out is: an inf in x must not meet a masked zero.
                x_ok = col_ok & ho_ok & (hi >= 0) & (hi < H)
                xv = tl.load(x_img + hi.to(tl.int64) * x_sh + x_cols,
                             mask=x_ok[:, None] & c_ok[None, :], other=0.0)
                acc += g.to(ACC_DTYPE) * xv.to(ACC_DTYPE)
            tl.atomic_add(gwt_ptr + ((i * KW + j) * C + cc), tl.sum(acc, axis=0), mask=c_ok, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Launch settings: a fixed menu of tiles, chosen by size. COMPILE_CONFIGS enumerates the same menu.
# ----------------------------------------------------------------------------------------------


class _Tile(NamedTuple):
    name: str
    block_0: int  # NCHW: rows (BLOCK_H); channels_last: columns (BLOCK_W)
    block_1: int  # NCHW: columns (BLOCK_W); channels_last: channels (BLOCK_C)
    num_warps: int


# Tiles are picked by the extent they tile (NCHW: plane width; channels_last: row width and C),
# so that small planes and few channels do not leave most of a tile masked off.
_NCHW_WIDE = _Tile("h16w64", 16, 64, 4)  # width > 32
_NCHW_MEDIUM = _Tile("h16w16", 16, 16, 2)  # 8 < width <= 32
_NCHW_SMALL = _Tile("h8w8", 8, 8, 1)  # width <= 8 (ConvNeXt's 7x7 stage)
_NHWC_WIDE = _Tile("w16c64", 16, 64, 4)  # C > 32, width > 8
_NHWC_NARROW = _Tile("w8c64", 8, 64, 4)  # width <= 8 and C > 32
_NHWC_FEW_CHANNELS = _Tile("w64c16", 64, 16, 4)  # C <= 32
_NCHW_TILES = (_NCHW_WIDE, _NCHW_MEDIUM, _NCHW_SMALL)
_NHWC_TILES = (_NHWC_WIDE, _NHWC_NARROW, _NHWC_FEW_CHANNELS)
_NUM_STAGES = 1  # the tap loops have no dot to pipeline for; stages would only add shared memory

# Per program of the weight-gradient kernels: more rows per program means fewer atomics.
_BWD_WEIGHT_NCHW_TILES_PER_PROGRAM = 4
_BWD_WEIGHT_NHWC_ROWS_PER_PROGRAM = 8

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _nchw_tile(width: int) -> _Tile:
    if width > 32:
        return _NCHW_WIDE
    return _NCHW_MEDIUM if width > 8 else _NCHW_SMALL


def _nhwc_tile(channels: int, width: int) -> _Tile:
    if channels <= 32:
        return _NHWC_FEW_CHANNELS
    return _NHWC_NARROW if width <= 8 else _NHWC_WIDE


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _uses_channels_last(t: torch.Tensor) -> bool:
    """The layout a kernel reads `t` in: channels_last if it is channels_last-contiguous and not
    NCHW-contiguous; for other strided tensors, whichever layout has the unit inner stride."""
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    if t.shape[3] == 1 or t.stride(3) == 1:
        return False
    return t.shape[1] == 1 or t.stride(1) == 1


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """`t` itself if its inner dimension for the layout has unit stride, else a dense copy."""
    if channels_last:
        if t.shape[1] == 1 or t.stride(1) == 1:
            return t
        return t.contiguous(memory_format=torch.channels_last)
    if t.shape[3] == 1 or t.stride(3) == 1:
        return t
    return t.contiguous()


def _memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def _output_size(size: int, k: int, s: int, pad_lo: int, pad_hi: int, d: int) -> int:
    return (size + pad_lo + pad_hi - d * (k - 1) - 1) // s + 1


def _assert_int32_offsets(t: torch.Tensor, channels_last: bool) -> None:
    # Offsets inside one plane (NCHW) or one row (channels_last) are int32.
    _, C, H, W = t.shape
    if channels_last:
        extent = (W - 1) * abs(t.stride(3)) + C
    else:
        extent = (H - 1) * abs(t.stride(2)) + W
    assert extent <= _INT32_MAX, "a plane/row of this tensor exceeds int32 offsets"


def _nchw_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _nhwc_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(2), t.stride(3)


def _transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C, 1, kh, kw] -> contiguous [kh*kw, C], so a tap's weights for a channel block are contiguous."""
    C = weight.shape[0]
    return weight.reshape(C, -1).t().contiguous()


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through torch.library.wrap_triton, so that torch.compile / export can trace the
    launch when these functions run inside a torch.library.triton_op."""
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    launcher = kernel
    if wrap_triton is not None:
        try:
            launcher = wrap_triton(kernel)
        except RuntimeError:  # interpreter objects, on torch versions that do not pass them through
            launcher = kernel
    launcher[grid](*args, **kwargs)


def _unpack(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    assert sh >= 1 and sw >= 1 and dh >= 1 and dw >= 1 and min(pt, pb, pl, pr) >= 0
    return sh, sw, pt, pb, pl, pr, dh, dw


# ----------------------------------------------------------------------------------------------
# Launch functions.
# ----------------------------------------------------------------------------------------------


def depthwise_conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """y = F.conv2d(x, weight, bias, stride, padding=(top, bottom, left, right), dilation, groups=C)."""
    assert x.dim() == 4 and weight.dim() == 4 and weight.shape[1] == 1 and weight.shape[0] == x.shape[1]
    sh, sw, pt, pb, pl, pr, dh, dw = _unpack(stride, padding, dilation)
    N, C, H, W = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    Ho = _output_size(H, kh, sh, pt, pb, dh)
    Wo = _output_size(W, kw, sw, pl, pr, dw)
    assert Ho > 0 and Wo > 0
    channels_last = _uses_channels_last(x)
    y = torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=_memory_format(channels_last))
    if y.numel() == 0:
        return y
    x = _in_layout(x, channels_last)
    _assert_int32_offsets(x, channels_last)
    _assert_int32_offsets(y, channels_last)
    has_bias = bias is not None
    acc_fp64 = x.dtype == torch.float64
    geometry = (kh, kw, sh, sw, pt, pl, dh, dw)
    if channels_last:
        wt = _transposed_weight(weight)
        tile = _nhwc_tile(C, Wo)
        grid = (N * Ho, triton.cdiv(Wo, tile.block_0), triton.cdiv(C, tile.block_1))
        _launch(_dw_fwd_nhwc_kernel, grid,
            x, wt, bias.contiguous() if has_bias else wt, y,
            C, H, W, Ho, Wo, *_nhwc_strides(x), *_nhwc_strides(y), *geometry,
            HAS_BIAS=has_bias, ACC_FP64=acc_fp64, BLOCK_W=tile.block_0, BLOCK_C=tile.block_1,
            num_warps=tile.num_warps, num_stages=_NUM_STAGES,
        )
    else:
        w = weight.reshape(C, kh * kw).contiguous()
        tile = _nchw_tile(Wo)
        grid = (N * C, triton.cdiv(Ho, tile.block_0), triton.cdiv(Wo, tile.block_1))
        _launch(_dw_fwd_nchw_kernel, grid,
            x, w, bias.contiguous() if has_bias else w, y,
            C, H, W, Ho, Wo, *_nchw_strides(x), *_nchw_strides(y), *geometry,
            HAS_BIAS=has_bias, ACC_FP64=acc_fp64, BLOCK_H=tile.block_0, BLOCK_W=tile.block_1,
            num_warps=tile.num_warps, num_stages=_NUM_STAGES,
        )
    return y


def depthwise_conv2d_backward_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """Gradient of the forward with respect to x, in grad_out's memory format."""
    N, C, H, W = (int(v) for v in input_size)
    sh, sw, pt, pb, pl, pr, dh, dw = _unpack(stride, padding, dilation)
    kh, kw = weight.shape[2], weight.shape[3]
    Ho = _output_size(H, kh, sh, pt, pb, dh)
    Wo = _output_size(W, kw, sw, pl, pr, dw)
    assert tuple(grad_out.shape) == (N, C, Ho, Wo) and weight.shape[:2] == (C, 1)
    channels_last = _uses_channels_last(grad_out)
    grad_x = torch.empty((N, C, H, W), dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=_memory_format(channels_last))
    if grad_x.numel() == 0:
        return grad_x
    grad_out = _in_layout(grad_out, channels_last)
    _assert_int32_offsets(grad_out, channels_last)
    _assert_int32_offsets(grad_x, channels_last)
    acc_fp64 = grad_out.dtype == torch.float64
    geometry = (kh, kw, sh, sw, pt, pl, dh, dw)
    if channels_last:
        tile = _nhwc_tile(C, W)
        grid = (N * H, triton.cdiv(W, tile.block_0), triton.cdiv(C, tile.block_1))
        _launch(_dw_bwd_input_nhwc_kernel, grid,
            grad_out, _transposed_weight(weight), grad_x,
            C, H, W, Ho, Wo, *_nhwc_strides(grad_out), *_nhwc_strides(grad_x), *geometry,
            ACC_FP64=acc_fp64, BLOCK_W=tile.block_0, BLOCK_C=tile.block_1,
            num_warps=tile.num_warps, num_stages=_NUM_STAGES,
        )
    else:
        tile = _nchw_tile(W)
        grid = (N * C, triton.cdiv(H, tile.block_0), triton.cdiv(W, tile.block_1))
        _launch(_dw_bwd_input_nchw_kernel, grid,
            grad_out, weight.reshape(C, kh * kw).contiguous(), grad_x,
            C, H, W, Ho, Wo, *_nchw_strides(grad_out), *_nchw_strides(grad_x), *geometry,
            ACC_FP64=acc_fp64, BLOCK_H=tile.block_0, BLOCK_W=tile.block_1,
            num_warps=tile.num_warps, num_stages=_NUM_STAGES,
        )
    return grad_x


def depthwise_conv2d_backward_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight [C, 1, kh, kw], grad_bias [C]) in x.dtype, accumulated in fp32 (fp64 for fp64)."""
    N, C, H, W = x.shape
    kh, kw = (int(v) for v in kernel_size)
    sh, sw, pt, pb, pl, pr, dh, dw = _unpack(stride, padding, dilation)
    Ho = _output_size(H, kh, sh, pt, pb, dh)
    Wo = _output_size(W, kw, sw, pl, pr, dw)
    assert tuple(grad_out.shape) == (N, C, Ho, Wo)
    channels_last = _uses_channels_last(x)
    x = _in_layout(x, channels_last)
    # grad_out is read in x's layout, so both tiles walk memory the same way.
    if _uses_channels_last(grad_out) != channels_last:
        grad_out = grad_out.contiguous(memory_format=_memory_format(channels_last))
    grad_out = _in_layout(grad_out, channels_last)
    acc_torch = _acc_torch_dtype(x.dtype)
    taps = kh * kw
    # Zero-filled: every program adds its partial sums into these with atomics.
    if channels_last:
        gw_acc = torch.zeros((taps, C), dtype=acc_torch, device=x.device)
    else:
        gw_acc = torch.zeros((C, taps), dtype=acc_torch, device=x.device)
    gb_acc = torch.zeros((C,), dtype=acc_torch, device=x.device)
    if grad_out.numel() > 0:
        _assert_int32_offsets(x, channels_last)
        _assert_int32_offsets(grad_out, channels_last)
        acc_fp64 = x.dtype == torch.float64
        geometry = (kh, kw, sh, sw, pt, pl, dh, dw)
        if channels_last:
            tile = _nhwc_tile(C, Wo)
            rows = min(Ho, _BWD_WEIGHT_NHWC_ROWS_PER_PROGRAM)
            grid = (N * triton.cdiv(Ho, rows), triton.cdiv(Wo, tile.block_0), triton.cdiv(C, tile.block_1))
            _launch(_dw_bwd_weight_nhwc_kernel, grid,
                grad_out, x, gw_acc, gb_acc,
                C, H, W, Ho, Wo, *_nhwc_strides(grad_out), *_nhwc_strides(x), *geometry, rows,
                ACC_FP64=acc_fp64, BLOCK_W=tile.block_0, BLOCK_C=tile.block_1,
                num_warps=tile.num_warps, num_stages=_NUM_STAGES,
            )
        else:
            tile = _nchw_tile(Wo)
            tiles = min(triton.cdiv(Ho, tile.block_0), _BWD_WEIGHT_NCHW_TILES_PER_PROGRAM)
            grid = (N * C, triton.cdiv(Ho, tile.block_0 * tiles), triton.cdiv(Wo, tile.block_1))
            _launch(_dw_bwd_weight_nchw_kernel, grid,
                grad_out, x, gw_acc, gb_acc,
                C, H, W, Ho, Wo, *_nchw_strides(grad_out), *_nchw_strides(x), *geometry, tiles,
                ACC_FP64=acc_fp64, BLOCK_H=tile.block_0, BLOCK_W=tile.block_1,
                num_warps=tile.num_warps, num_stages=_NUM_STAGES,
            )
    if channels_last:
        grad_weight = gw_acc.t().reshape(C, 1, kh, kw)
    else:
        grad_weight = gw_acc.reshape(C, 1, kh, kw)
    return grad_weight.to(x.dtype).contiguous(), gb_acc.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Every specialization the launch functions can produce, for compile_check.
# ----------------------------------------------------------------------------------------------


def _signature(kernel, pointer_dtypes, constexprs) -> dict:
    """Argument name -> triton type: pointers as given, constexprs, every other argument i32
    (the type the JIT gives these sizes, strides and counts below 2**31)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_dtypes:
            signature[name] = "*" + pointer_dtypes[name]
        else:
            signature[name] = "i32"
    return signature


def _stride_args(kernel) -> List[str]:
    return [name for name in kernel.arg_names if re.fullmatch(r"[a-z]+_s[nchw]", name)]


def COMPILE_CONFIGS() -> List[CompileConfig]:
    """Every (kernel, dtype, tile, bias flag) the launch functions use. Pointers are 16-byte
    aligned (torch allocations). Channels_last kernels compile twice: for any C, and for C a
    multiple of 16 (C and every stride divisible by 16, which the JIT specializes on and which
    makes the channel loads vectorize)."""
    families = [
        # direction, layout, kernel, data pointers, accumulator pointers, HAS_BIAS variants, tiles, tile constexprs
        ("fwd", "nchw", _dw_fwd_nchw_kernel, ("x_ptr", "w_ptr", "b_ptr", "y_ptr"), (), (True, False),
         _NCHW_TILES, ("BLOCK_H", "BLOCK_W")),
        ("fwd", "nhwc", _dw_fwd_nhwc_kernel, ("x_ptr", "wt_ptr", "b_ptr", "y_ptr"), (), (True, False),
         _NHWC_TILES, ("BLOCK_W", "BLOCK_C")),
        ("bwd_input", "nchw", _dw_bwd_input_nchw_kernel, ("go_ptr", "w_ptr", "gx_ptr"), (), (None,),
         _NCHW_TILES, ("BLOCK_H", "BLOCK_W")),
        ("bwd_input", "nhwc", _dw_bwd_input_nhwc_kernel, ("go_ptr", "wt_ptr", "gx_ptr"), (), (None,),
         _NHWC_TILES, ("BLOCK_W", "BLOCK_C")),
        ("bwd_weight", "nchw", _dw_bwd_weight_nchw_kernel, ("go_ptr", "x_ptr"), ("gw_ptr", "gb_ptr"), (None,),
         _NCHW_TILES, ("BLOCK_H", "BLOCK_W")),
        ("bwd_weight", "nhwc", _dw_bwd_weight_nhwc_kernel, ("go_ptr", "x_ptr"), ("gwt_ptr", "gb_ptr"), (None,),
         _NHWC_TILES, ("BLOCK_W", "BLOCK_C")),
    ]
    aligned = [["tt.divisibility", 16]]
    configs = []
    for direction, layout, kernel, data_ptrs, acc_ptrs, bias_flags, tiles, tile_names in families:
        alignments = {"": {}}
        if layout == "nhwc":
            alignments["/c16"] = {name: aligned for name in ["C"] + _stride_args(kernel)}
        for dtype, dtype_name in _DTYPE_NAMES.items():
            acc_name = "fp64" if dtype == torch.float64 else "fp32"
            pointer_dtypes = {**{p: dtype_name for p in data_ptrs}, **{p: acc_name for p in acc_ptrs}}
            for tile in tiles:
                for has_bias in bias_flags:
                    constexprs = {"ACC_FP64": dtype == torch.float64, tile_names[0]: tile.block_0,
                                  tile_names[1]: tile.block_1}
                    label = f"{direction}/{layout}/{dtype_name}/{tile.name}"
                    if has_bias is not None:
                        constexprs["HAS_BIAS"] = has_bias
                        label += "/bias" if has_bias else "/nobias"
                    for suffix, int_attrs in alignments.items():
                        configs.append(CompileConfig(
                            kernel=kernel,
                            signature=_signature(kernel, pointer_dtypes, constexprs),
                            constexprs=constexprs,
                            label=label + suffix,
                            options={"num_warps": tile.num_warps, "num_stages": _NUM_STAGES},
                            attrs={**{p: aligned for p in pointer_dtypes}, **int_attrs},
                        ))
    return configs
