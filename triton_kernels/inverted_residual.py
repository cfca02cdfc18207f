"""Fused inverted-residual blocks (MobileNetV2 / MBConv / Fused-MBConv) in Triton, inference
forward: inverted_residual_forward, inverted_residual_dw_sums, fused_mbconv_forward.

Semantics (DESIGN.md 5.4, BN already folded into the weights): x [N, Cin, H, W] in NCHW or
channels_last, outputs in x's layout. Activation codes 0 identity, 1 relu, 2 relu6, 3 silu,
4 hardswish, applied after the expand stage and after the depthwise stage. The launch functions
only assert what they rely on: the Python layer validates arguments.

Kernels. One program owns a tile of BLOCK_P output pixels, numbered across (n, ho, wo) so that
small feature maps (7x7, 14x14) still fill whole tiles, and one block of output channels:
- inverted_residual_forward: for each chunk of BLOCK_E expanded channels and each of the kh*kw
  taps, the x pixels that tap reads ([BLOCK_P, Cin], masked at the borders) go through the expand
  GEMM on tensor cores (+ bias, activation), are zeroed where the tap falls into padding (padding
  applies to the activated expanded tensor), scaled by the tap's depthwise weight and summed into
  d [BLOCK_P, BLOCK_E]; then bias, activation and gate give a2, and a2 @ w_project^T accumulates
  the output tile across chunks in fp32. The expand GEMM is recomputed once per tap (k*k times)
  instead of staging a halo in memory; nothing expanded leaves registers.
- inverted_residual_dw_sums: the same d per (sample, pixel range, channel block); per-channel sums
  of d, d*d and act(d) over the range go to fp32 partials [N, splits, 3, E] that torch sums
  (deterministic: no atomics).
- fused_mbconv_forward: implicit-GEMM k x k convolution (taps x Cin chunks) into a1 [BLOCK_P,
  BLOCK_E], activation, then a1 @ w_project^T accumulated across E chunks; without a project
  the program stores a1 (+ x) for its channel block.

Numerics: products run on tensor cores with fp32 accumulation; a1, d and a2 stay fp32 and a2 (a1
for the mbconv project) is rounded to x's dtype only as the project GEMM's operand. fp32 inputs use
input_precision="tf32x3" (about fp32 accuracy). float64 is not supported (the CPU kernels have it).

Activation is a runtime argument (a uniform branch per tile), so the compile menu stays small;
bias / gate / residual presence are runtime flags folded into load masks.

Layouts: the kernels take all four strides of x and y, so x is read in place whatever its
strides (NCHW, channels_last, slices); y is channels_last when x is (and is not also
NCHW-contiguous), else NCHW-contiguous. Channels_last with C % 16 == 0 is the fast case (the
JIT then sees a unit channel stride and 16-aligned pixel strides: vector loads).

Indexing: per-pixel sample bases are int64; offsets inside one sample are int32 (asserted).

Checked under TRITON_INTERPRET=1 in fp32 and fp16 only: the interpreter does not model bf16
arithmetic (its bf16 tl.dot returns garbage, as for mqa.py / na.py), so bf16 needs a GPU.
"""

import functools
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import CompileConfig
from .depthwise_conv2d import _launch, _memory_format, _output_size, _signature, _unpack
from .mqa import _ALIGNED

_INT32_MAX = 2**31 - 1
_INTERPRETER_SM_COUNT = 8  # "device size" the dw_sums split assumes under the interpreter

# Sizes, geometry and runtime flags gain nothing from the JIT's divisible-by-16 / equal-to-1
# specializations and would multiply recompilations; tensor strides keep them (vector loads).
_SIZE_ARGS = ["CIN", "E", "COUT", "H", "W", "Ho", "Wo", "NPIX", "KH", "KW", "SH", "SW", "PT", "PL", "DH", "DW",
              "ACTIVATION", "HAS_BE", "HAS_BDW", "HAS_BP", "HAS_GATE", "RESIDUAL", "TILES", "TILES_PER_PROGRAM"]


# ----------------------------------------------------------------------------------------------
# Device helpers.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _activate(u, ACTIVATION):
    """0 identity, 1 relu, 2 relu6, 3 silu, 4 hardswish (u in fp32)."""
    if ACTIVATION == 1:
        u = tl.maximum(u, 0.0)
    elif ACTIVATION == 2:
        u = tl.minimum(tl.maximum(u, 0.0), 6.0)
    elif ACTIVATION == 3:
        u = u * tl.sigmoid(u)
    elif ACTIVATION == 4:
        u = u * (tl.minimum(tl.maximum(u + 3.0, 0.0), 6.0) * (1.0 / 6.0))
    return u


@triton.jit
def _pixel_rows(q, HWo, Wo, SH, SW, PT, PL):
    """Flat output pixel index -> (sample, top-left input row / column of its window)."""
    n = q // HWo
    r = q - n * HWo
    ho = r // Wo
    wo = r - ho * Wo
    return n, ho, wo, ho * SH - PT, wo * SW - PL


@triton.jit
def _depthwise_of_expanded(
    x_row, we_ptr, be_ptr, wdw_ptr, bdw_ptr,
    hi0, wi0, row_ok, ee, e_ok,
    CIN, E, H, W, x_sc, x_sh, x_sw,
    KH, KW, DH, DW, ACTIVATION, HAS_BE, HAS_BDW,
    HAS_EXPAND: tl.constexpr, SINGLE_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """d[p, e] = b_dw[e] + sum_taps a1[pixel of tap, e] * w_dw[e, tap] for the BLOCK_P pixels
    (x_row = x's pointer of each pixel's sample) and the channels ee, a1 = act(x W_e^T + b_e)
    (a1 = x without an expand stage), 0 at taps that fall into padding. fp32."""
    d = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
    KK = KH * KW
    if HAS_EXPAND:
        kk0 = tl.arange(0, BLOCK_K)
        be = tl.load(be_ptr + ee, mask=e_ok & (HAS_BE != 0), other=0.0).to(tl.float32)
    if HAS_EXPAND and SINGLE_K:
        # w_expand [E, CIN] as [BLOCK_K, BLOCK_E], loaded once: along CIN (contiguous), transposed.
        we0 = tl.trans(tl.load(we_ptr + (ee[:, None] * CIN + kk0[None, :]),
                               mask=e_ok[:, None] & (kk0 < CIN)[None, :], other=0.0))
    for i in range(0, KH):
        hi = hi0 + i * DH
        h_ok = row_ok & (hi >= 0) & (hi < H)
        for j in range(0, KW):
            wi = wi0 + j * DW
            pix_ok = h_ok & (wi >= 0) & (wi < W)
            x_pix = x_row + (hi * x_sh + wi * x_sw)
            if HAS_EXPAND:
                if SINGLE_K:
                    xk = tl.load(x_pix[:, None] + kk0[None, :] * x_sc,
                                 mask=pix_ok[:, None] & (kk0 < CIN)[None, :], other=0.0)
                    u = tl.dot(xk, we0, input_precision=DOT_PRECISION)
                else:
                    u = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
                    for k0 in range(0, CIN, BLOCK_K):
                        kk = k0 + kk0
                        k_ok = kk < CIN
                        xk = tl.load(x_pix[:, None] + kk[None, :] * x_sc,
                                     mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                        wk = tl.trans(tl.load(we_ptr + (ee[:, None] * CIN + kk[None, :]),
                                              mask=e_ok[:, None] & k_ok[None, :], other=0.0))
                        u = tl.dot(xk, wk, u, input_precision=DOT_PRECISION)
                a1 = _activate(u + be[None, :], ACTIVATION)
                # padding is applied to the activated expanded tensor: out-of-range taps add 0.
                a1 = tl.where(pix_ok[:, None], a1, 0.0)
            else:
                a1 = tl.load(x_pix[:, None] + ee[None, :] * x_sc,
                             mask=pix_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
            wd = tl.load(wdw_ptr + (ee * KK + (i * KW + j)), mask=e_ok, other=0.0).to(tl.float32)
            d += a1 * wd[None, :]
    d += tl.load(bdw_ptr + ee, mask=e_ok & (HAS_BDW != 0), other=0.0).to(tl.float32)[None, :]
    return d


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _ir_fwd_kernel(
    x_ptr, we_ptr, be_ptr, wdw_ptr, bdw_ptr, wp_ptr, bp_ptr, gate_ptr, y_ptr,
    CIN, E, COUT, H, W, Ho, Wo, NPIX,
    x_sn, x_sc, x_sh, x_sw,
    y_sn, y_sc, y_sh, y_sw,
    KH, KW, SH, SW, PT, PL, DH, DW,
    ACTIVATION, HAS_BE, HAS_BDW, HAS_BP, HAS_GATE, RESIDUAL,
    HAS_EXPAND: tl.constexpr, SINGLE_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = q < NPIX
    n, ho, wo, hi0, wi0 = _pixel_rows(q, Ho * Wo, Wo, SH, SW, PT, PL)
    n64 = n.to(tl.int64)
    x_row = x_ptr + n64 * x_sn
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        e_ok = ee < E
        d = _depthwise_of_expanded(
            x_row, we_ptr, be_ptr, wdw_ptr, bdw_ptr, hi0, wi0, row_ok, ee, e_ok,
            CIN, E, H, W, x_sc, x_sh, x_sw, KH, KW, DH, DW, ACTIVATION, HAS_BE, HAS_BDW,
            HAS_EXPAND, SINGLE_K, BLOCK_P, BLOCK_E, BLOCK_K, DOT_PRECISION)
        a2 = _activate(d, ACTIVATION)
        g = tl.load(gate_ptr + (n64[:, None] * E + ee[None, :]),
                    mask=(row_ok[:, None] & e_ok[None, :]) & (HAS_GATE != 0), other=1.0)
        a2 = a2 * g.to(tl.float32)
        # w_project [COUT, E] chunk as [BLOCK_E, BLOCK_CO]: loaded along E (contiguous), transposed.
        wp = tl.trans(tl.load(wp_ptr + (co[:, None] * E + ee[None, :]),
                              mask=co_ok[:, None] & e_ok[None, :], other=0.0))
        acc = tl.dot(a2.to(wp.dtype), wp, acc, input_precision=DOT_PRECISION)
    acc += tl.load(bp_ptr + co, mask=co_ok & (HAS_BP != 0), other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & co_ok[None, :]
    # residual: Cout == Cin and Ho, Wo == H, W, so x's pixel is the output pixel.
    res = tl.load(x_row[:, None] + ((ho * x_sh + wo * x_sw)[:, None] + co[None, :] * x_sc),
                  mask=out_ok & (RESIDUAL != 0), other=0.0)
    acc += res.to(tl.float32)
    y_off = n64[:, None] * y_sn + ((ho * y_sh + wo * y_sw)[:, None] + co[None, :] * y_sc)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _ir_dw_sums_kernel(
    x_ptr, we_ptr, be_ptr, wdw_ptr, bdw_ptr, part_ptr,
    CIN, E, H, W, Ho, Wo, TILES, TILES_PER_PROGRAM,
    x_sn, x_sc, x_sh, x_sw,
    KH, KW, SH, SW, PT, PL, DH, DW,
    ACTIVATION, HAS_BE, HAS_BDW,
    HAS_EXPAND: tl.constexpr, SINGLE_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (sample n, split s, channel block): pixel tiles [s*TPP, (s+1)*TPP) of sample n;
    # writes part[n, s, 0..2, ee] = sums of d, d*d, act(d) over them.
    splits = tl.cdiv(TILES, TILES_PER_PROGRAM)
    pid = tl.program_id(0)
    n = pid // splits
    s = pid - n * splits
    ee = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = ee < E
    HWo = Ho * Wo
    x_row = x_ptr + (n.to(tl.int64) * x_sn + tl.zeros([BLOCK_P], dtype=tl.int64))
    sum_d = tl.zeros([BLOCK_E], dtype=tl.float32)
    sum_dd = tl.zeros([BLOCK_E], dtype=tl.float32)
    sum_a = tl.zeros([BLOCK_E], dtype=tl.float32)
    for t in range(0, TILES_PER_PROGRAM):
        r = (s * TILES_PER_PROGRAM + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        row_ok = r < HWo
        _, _, _, hi0, wi0 = _pixel_rows(r, HWo, Wo, SH, SW, PT, PL)
        d = _depthwise_of_expanded(
            x_row, we_ptr, be_ptr, wdw_ptr, bdw_ptr, hi0, wi0, row_ok, ee, e_ok,
            CIN, E, H, W, x_sc, x_sh, x_sw, KH, KW, DH, DW, ACTIVATION, HAS_BE, HAS_BDW,
            HAS_EXPAND, SINGLE_K, BLOCK_P, BLOCK_E, BLOCK_K, DOT_PRECISION)
        d = tl.where(row_ok[:, None], d, 0.0)
        a = tl.where(row_ok[:, None], _activate(d, ACTIVATION), 0.0)
        sum_d += tl.sum(d, axis=0)
        sum_dd += tl.sum(d * d, axis=0)
        sum_a += tl.sum(a, axis=0)
    part = part_ptr + (pid.to(tl.int64) * 3 * E + ee)
    tl.store(part, sum_d, mask=e_ok)
    tl.store(part + E, sum_dd, mask=e_ok)
    tl.store(part + 2 * E, sum_a, mask=e_ok)


@triton.jit
def _conv_expand_tile(
    x_row, we_ptr, be_ptr, hi0, wi0, row_ok, ee, e_ok,
    CIN, H, W, x_sc, x_sh, x_sw, KH, KW, DH, DW, ACTIVATION, HAS_BE,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """a1[p, e] = act(sum_taps sum_c x[pixel of tap, c] * w[e, tap, c] + b_e[e]), fp32, with the
    weight laid out [E, KH, KW, CIN] (zero x outside the image: padding of a full convolution)."""
    u = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
    kk0 = tl.arange(0, BLOCK_K)
    w_e = we_ptr + ee[:, None] * (KH * KW * CIN)
    for i in range(0, KH):
        hi = hi0 + i * DH
        h_ok = row_ok & (hi >= 0) & (hi < H)
        for j in range(0, KW):
            wi = wi0 + j * DW
            pix_ok = h_ok & (wi >= 0) & (wi < W)
            x_pix = x_row + (hi * x_sh + wi * x_sw)
            w_tap = w_e + (i * KW + j) * CIN
            for k0 in range(0, CIN, BLOCK_K):
                kk = k0 + kk0
                k_ok = kk < CIN
                xk = tl.load(x_pix[:, None] + kk[None, :] * x_sc,
                             mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                wk = tl.trans(tl.load(w_tap + kk[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0))
                u = tl.dot(xk, wk, u, input_precision=DOT_PRECISION)
    u += tl.load(be_ptr + ee, mask=e_ok & (HAS_BE != 0), other=0.0).to(tl.float32)[None, :]
    return _activate(u, ACTIVATION)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _mbconv_fwd_kernel(
    x_ptr, we_ptr, be_ptr, wp_ptr, bp_ptr, y_ptr,
    CIN, E, COUT, H, W, Ho, Wo, NPIX,
    x_sn, x_sc, x_sh, x_sw,
    y_sn, y_sc, y_sh, y_sw,
    KH, KW, SH, SW, PT, PL, DH, DW,
    ACTIVATION, HAS_BE, HAS_BP, RESIDUAL,
    HAS_PROJECT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_CO: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Without a project, COUT == E and the program's output channels are its expanded channels.
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = q < NPIX
    n, ho, wo, hi0, wi0 = _pixel_rows(q, Ho * Wo, Wo, SH, SW, PT, PL)
    n64 = n.to(tl.int64)
    x_row = x_ptr + n64 * x_sn
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    if HAS_PROJECT:
        acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            ee = e0 + tl.arange(0, BLOCK_E)
            e_ok = ee < E
            a1 = _conv_expand_tile(x_row, we_ptr, be_ptr, hi0, wi0, row_ok, ee, e_ok,
                                   CIN, H, W, x_sc, x_sh, x_sw, KH, KW, DH, DW, ACTIVATION, HAS_BE,
                                   BLOCK_P, BLOCK_E, BLOCK_K, DOT_PRECISION)
            wp = tl.trans(tl.load(wp_ptr + (co[:, None] * E + ee[None, :]),
                                  mask=co_ok[:, None] & e_ok[None, :], other=0.0))
            acc = tl.dot(a1.to(wp.dtype), wp, acc, input_precision=DOT_PRECISION)
        acc += tl.load(bp_ptr + co, mask=co_ok & (HAS_BP != 0), other=0.0).to(tl.float32)[None, :]
    else:
        acc = _conv_expand_tile(x_row, we_ptr, be_ptr, hi0, wi0, row_ok, co, co_ok,
                                CIN, H, W, x_sc, x_sh, x_sw, KH, KW, DH, DW, ACTIVATION, HAS_BE,
                                BLOCK_P, BLOCK_CO, BLOCK_K, DOT_PRECISION)
    out_ok = row_ok[:, None] & co_ok[None, :]
    res = tl.load(x_row[:, None] + ((ho * x_sh + wo * x_sw)[:, None] + co[None, :] * x_sc),
                  mask=out_ok & (RESIDUAL != 0), other=0.0)
    acc += res.to(tl.float32)
    y_off = n64[:, None] * y_sn + ((ho * y_sh + wo * y_sw)[:, None] + co[None, :] * y_sc)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------------------------
# Launch settings: a fixed menu of tiles. COMPILE_CONFIGS enumerates the same menu.
# ----------------------------------------------------------------------------------------------


class _Tile(NamedTuple):
    block_p: int  # output pixels per tile
    block_e: int  # expanded channels per chunk
    num_warps: int
    num_stages: int


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# One Cin chunk (32, masked when Cin < 32) and two output-channel blocks keep the number of
# specializations (JIT compiles at run time, and compile_check's menu) small.
_BLOCK_KS = (32,)  # Cin chunk of the expand GEMM
_BLOCK_COS = (64, 128)  # output channels per program (more: several programs, expand recomputed)
# (dtype class, BLOCK_CO) -> tile, chosen with compile_check to stay below 255 registers without
# spilling on sm_80 and sm_90: the live fp32 tiles are d [P, E], the expand product [P, E] and the
# output accumulator [P, CO]; fp32 (tf32x3 split operands) needs 8 warps. The dw_sums kernel has
# no output accumulator and uses the smallest BLOCK_CO's tile.
_TILES = {
    ("half", 64): _Tile(64, 32, 4, 1), ("half", 128): _Tile(64, 32, 8, 1),
    ("fp32", 64): _Tile(64, 32, 8, 1), ("fp32", 128): _Tile(64, 32, 8, 1),
}
_DW_SUMS_PROGRAMS_PER_SM = 4


def _tile(dtype: torch.dtype, block_co: int = _BLOCK_COS[0]) -> _Tile:
    return _TILES[("fp32" if dtype == torch.float32 else "half", block_co)]


def _block_k(cin: int) -> int:
    return _BLOCK_KS[0]


def _block_co(cout: int) -> int:
    return min(max(_BLOCK_COS[0], triton.next_power_of_2(cout)), _BLOCK_COS[-1])


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPE_NAMES:
        raise TypeError(f"fusekit triton inverted-residual kernels support float32, float16 and bfloat16, "
                        f"not {x.dtype} (use the cpu backend for float64)")


def _assert_sample_fits_int32(t: torch.Tensor) -> None:
    # offsets inside one sample are int32
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:])) + 1
    assert extent <= _INT32_MAX, "one sample of this tensor exceeds int32 offsets"


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _geometry(x, kh, kw, stride, padding, dilation):
    sh, sw, pt, pb, pl, pr, dh, dw = _unpack(stride, padding, dilation)
    H, W = x.shape[2], x.shape[3]
    Ho = _output_size(H, kh, sh, pt, pb, dh)
    Wo = _output_size(W, kw, sw, pl, pr, dw)
    assert Ho > 0 and Wo > 0, "empty output"
    return Ho, Wo, (kh, kw, sh, sw, pt, pl, dh, dw)


def _optional(t: Optional[torch.Tensor], fallback: torch.Tensor):
    """(pointer argument, flag): a placeholder pointer that is never read when t is None."""
    return (fallback, 0) if t is None else (t.contiguous(), 1)


def _new_output(x: torch.Tensor, channels: int, Ho: int, Wo: int) -> torch.Tensor:
    """Channels_last when x is (and is not also NCHW-contiguous), else NCHW-contiguous."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((x.shape[0], channels, Ho, Wo), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(channels_last))


# ----------------------------------------------------------------------------------------------
# Launch functions (argument order of the op schemas).
# ----------------------------------------------------------------------------------------------


def inverted_residual_forward(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, gate,
                              stride, padding, dilation, activation, residual):
    """y = (act(dw(a1) + b_dw) * gate) W_p^T + b_p (+ x), a1 = act(x W_e^T + b_e) or x."""
    _check_dtype(x)
    assert x.dim() == 4 and w_dw.dim() == 3 and w_project.dim() == 2
    N, CIN, H, W = x.shape
    E, kh, kw = w_dw.shape
    COUT = w_project.shape[0]
    has_expand = w_expand is not None
    assert w_project.shape[1] == E
    assert (tuple(w_expand.shape) == (E, CIN)) if has_expand else (E == CIN)
    assert gate is None or tuple(gate.shape) == (N, E)
    Ho, Wo, geometry = _geometry(x, kh, kw, stride, padding, dilation)
    assert not residual or (COUT == CIN and Ho == H and Wo == W)
    y = _new_output(x, COUT, Ho, Wo)
    if y.numel() == 0:
        return y
    _assert_sample_fits_int32(x)
    _assert_sample_fits_int32(y)
    w_dw = w_dw.contiguous()
    w_project = w_project.contiguous()
    we = w_expand.contiguous() if has_expand else w_dw
    be, has_be = _optional(b_expand, w_dw)
    bdw, has_bdw = _optional(b_dw, w_dw)
    bp, has_bp = _optional(b_project, w_dw)
    g, has_gate = _optional(gate, w_dw)
    block_co = _block_co(COUT)
    tile = _tile(x.dtype, block_co)
    npix = N * Ho * Wo
    assert npix <= _INT32_MAX - 1024, "too many output pixels for int32 pixel indices"
    grid = (triton.cdiv(npix, tile.block_p), triton.cdiv(COUT, block_co))
    _launch(_ir_fwd_kernel, grid,
            x, we, be, w_dw, bdw, w_project, bp, g, y,
            CIN, E, COUT, H, W, Ho, Wo, npix, *_strides(x), *_strides(y), *geometry,
            int(activation), has_be, has_bdw, has_bp, has_gate, int(bool(residual)),
            HAS_EXPAND=has_expand, SINGLE_K=not has_expand or CIN <= _block_k(CIN),
            BLOCK_P=tile.block_p, BLOCK_E=tile.block_e,
            BLOCK_K=_block_k(CIN) if has_expand else 16, BLOCK_CO=block_co,
            DOT_PRECISION=_dot_precision(x.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages)
    return y


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def inverted_residual_dw_sums(x, w_expand, b_expand, w_dw, b_dw, stride, padding, dilation, activation):
    """S [N, 3, E] fp32: per-channel sums over output pixels of d, d*d and act(d)."""
    _check_dtype(x)
    assert x.dim() == 4 and w_dw.dim() == 3
    N, CIN, H, W = x.shape
    E, kh, kw = w_dw.shape
    has_expand = w_expand is not None
    assert (tuple(w_expand.shape) == (E, CIN)) if has_expand else (E == CIN)
    Ho, Wo, geometry = _geometry(x, kh, kw, stride, padding, dilation)
    if N == 0 or E == 0:
        return torch.zeros((N, 3, E), dtype=torch.float32, device=x.device)
    _assert_sample_fits_int32(x)
    w_dw = w_dw.contiguous()
    we = w_expand.contiguous() if has_expand else w_dw
    be, has_be = _optional(b_expand, w_dw)
    bdw, has_bdw = _optional(b_dw, w_dw)
    tile = _tile(x.dtype)
    e_blocks = triton.cdiv(E, tile.block_e)
    tiles = triton.cdiv(Ho * Wo, tile.block_p)
    # Split each sample's pixel tiles over enough programs to fill the device; fewer splits mean
    # fewer partials to sum afterwards.
    wanted = _DW_SUMS_PROGRAMS_PER_SM * _sm_count(x.device)
    splits = max(1, min(tiles, triton.cdiv(wanted, N * e_blocks)))
    tiles_per_program = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_program)
    partials = torch.empty((N, splits, 3, E), dtype=torch.float32, device=x.device)
    _launch(_ir_dw_sums_kernel, (N * splits, e_blocks),
            x, we, be, w_dw, bdw, partials,
            CIN, E, H, W, Ho, Wo, tiles, tiles_per_program, *_strides(x), *geometry,
            int(activation), has_be, has_bdw,
            HAS_EXPAND=has_expand, SINGLE_K=not has_expand or CIN <= _block_k(CIN),
            BLOCK_P=tile.block_p, BLOCK_E=tile.block_e,
            BLOCK_K=_block_k(CIN) if has_expand else 16,
            DOT_PRECISION=_dot_precision(x.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages)
    return partials.sum(1) if splits > 1 else partials.view(N, 3, E)


def fused_mbconv_forward(x, w_expand, b_expand, w_project, b_project, stride, padding, dilation, activation,
                         residual):
    """y = act(conv_kxk(x, w_expand) + b_e) W_p^T + b_p (+ x); without w_project y = act(...) (+ x)."""
    _check_dtype(x)
    assert x.dim() == 4 and w_expand.dim() == 4
    N, CIN, H, W = x.shape
    E, cin_w, kh, kw = w_expand.shape
    assert cin_w == CIN
    has_project = w_project is not None
    COUT = w_project.shape[0] if has_project else E
    assert not has_project or (w_project.dim() == 2 and w_project.shape[1] == E)
    Ho, Wo, geometry = _geometry(x, kh, kw, stride, padding, dilation)
    assert not residual or (COUT == CIN and Ho == H and Wo == W)
    y = _new_output(x, COUT, Ho, Wo)
    if y.numel() == 0:
        return y
    _assert_sample_fits_int32(x)
    _assert_sample_fits_int32(y)
    # [E, KH, KW, CIN]: a tap's weights are contiguous along CIN (no copy for a channels_last weight).
    we = w_expand.permute(0, 2, 3, 1).contiguous()
    be, has_be = _optional(b_expand, we)
    wp = w_project.contiguous() if has_project else we
    bp, has_bp = _optional(b_project, we)
    block_co = _block_co(COUT)
    tile = _tile(x.dtype, block_co)
    npix = N * Ho * Wo
    assert npix <= _INT32_MAX - 1024, "too many output pixels for int32 pixel indices"
    grid = (triton.cdiv(npix, tile.block_p), triton.cdiv(COUT, block_co))
    _launch(_mbconv_fwd_kernel, grid,
            x, we, be, wp, bp, y,
            CIN, E, COUT, H, W, Ho, Wo, npix, *_strides(x), *_strides(y), *geometry,
            int(activation), has_be, has_bp, int(bool(residual)),
            HAS_PROJECT=has_project, BLOCK_P=tile.block_p, BLOCK_E=tile.block_e, BLOCK_K=_block_k(CIN),
            BLOCK_CO=block_co, DOT_PRECISION=_dot_precision(x.dtype),
            num_warps=tile.num_warps, num_stages=tile.num_stages)
    return y


# ----------------------------------------------------------------------------------------------
# Every specialization the launch functions can produce, for compile_check.
# ----------------------------------------------------------------------------------------------



def COMPILE_CONFIGS() -> List[CompileConfig]:
    """Every (kernel, dtype, expand variant, BLOCK_CO) the launch functions use, labelled
    inverted_residual/{fwd,dw_sums,mbconv_fwd}/... (`compile_check --only inverted_residual/`).
    Expand variants: t1 (no expand), k32 (Cin in one chunk of 32), k32loop (Cin > 32).
    Pointers are 16-byte aligned (torch allocations); the "/c16" variants compile with the pixel
    and sample strides multiples of 16 and a unit channel stride, what channels_last tensors with
    C % 16 == 0 give the JIT."""
    data = ("x_ptr", "we_ptr", "be_ptr", "wdw_ptr", "bdw_ptr", "wp_ptr", "bp_ptr", "gate_ptr", "y_ptr")
    configs = []

    def add(kernel, label, dtype, block_co, constexprs, c16):
        pointer_dtypes = {p: _DTYPE_NAMES[dtype] for p in data if p in kernel.arg_names}
        if "part_ptr" in kernel.arg_names:
            pointer_dtypes["part_ptr"] = "fp32"
        tile = _tile(dtype, block_co)
        constexprs = dict(constexprs, BLOCK_P=tile.block_p, BLOCK_E=tile.block_e,
                          DOT_PRECISION=_dot_precision(dtype))
        if "BLOCK_CO" in kernel.arg_names:
            constexprs["BLOCK_CO"] = block_co
        attrs = {p: _ALIGNED for p in pointer_dtypes}
        if c16:
            for name in kernel.arg_names:
                if name in ("x_sn", "x_sh", "x_sw", "y_sn", "y_sh", "y_sw"):
                    attrs[name] = _ALIGNED
                elif name in ("x_sc", "y_sc"):
                    constexprs[name] = 1
        configs.append(CompileConfig(
            kernel=kernel, signature=_signature(kernel, pointer_dtypes, constexprs), constexprs=constexprs,
            label=f"{label}/{_DTYPE_NAMES[dtype]}" + ("/c16" if c16 else ""),
            options={"num_warps": tile.num_warps, "num_stages": tile.num_stages}, attrs=attrs))

    expand_variants = [("t1", False, True, 32), ("k32", True, True, 32), ("k32loop", True, False, 32)]
    for dtype in _DTYPE_NAMES:
        for c16 in (False, True):
            for name, has_expand, single_k, block_k in expand_variants:
                flags = {"HAS_EXPAND": has_expand, "SINGLE_K": single_k, "BLOCK_K": block_k}
                for block_co in _BLOCK_COS:
                    add(_ir_fwd_kernel, f"inverted_residual/fwd/{name}/co{block_co}", dtype, block_co, flags, c16)
                add(_ir_dw_sums_kernel, f"inverted_residual/dw_sums/{name}", dtype, _BLOCK_COS[0], flags, c16)
            for block_k in _BLOCK_KS:
                for block_co in _BLOCK_COS:
                    add(_mbconv_fwd_kernel, f"inverted_residual/mbconv_fwd/k{block_k}/co{block_co}", dtype, block_co,
                        {"HAS_PROJECT": True, "BLOCK_K": block_k}, c16)
                    add(_mbconv_fwd_kernel, f"inverted_residual/mbconv_fwd/noproj/k{block_k}/e{block_co}", dtype,
                        block_co,
                        {"HAS_PROJECT": False, "BLOCK_K": block_k}, c16)
    return configs
