"""Neighborhood attention (1-D / 2-D / 3-D, NATTEN semantics) in Triton: fused forward and
backward, and the unfused qk / av ops with their backwards.

Semantics (DESIGN.md 5.1, csrc/kernels/na_window.h): q [B, *spatial, Hq, D], k / v [B, *spatial,
Hkv, D]; query head h reads KV head h // (Hq / Hkv). Lower ranks are padded to three axes with
leading axes of length 1 and kernel 1. Per axis, dilation splits the positions into groups
(g = i % d) and windows are computed on in-group indices (`_window_in_group`, the rules of
na_window.h); a query's neighbourhood is the product of its per-axis windows.

Fused kernels (flash-attention style, log2-domain online softmax, fp32 accumulation):
- forward / dQ: one program = one (query tile, query head, batch). A query tile is a TM0 x TM1 x
  TM2 block of in-group indices of one dilation group, so the union of its neighbourhoods is a
  dense box of keys (per axis: the window start of its first query to the window end of its
  last, as starts and ends never decrease). The box is walked in flat blocks of BLOCK_N keys,
  each (query, key) pair masked by its own per-axis window. The dQ kernel also writes
  delta = rowsum(dO * O) and, with rpb, adds dS into grad_rpb with fp32 atomics (so grad_rpb
  is not bitwise deterministic; every other output is).
- dK / dV: one program = one (key tile, KV head, batch), the key tile again a block of one
  dilation group; it loops over the group's query heads and the box of queries whose windows
  can contain a key of the tile (per axis: the first query whose window ends after the tile's
  first key to the first query whose window starts after its last key, by binary search), so
  dK / dV sum over the group in registers: no expanded K/V, no atomics.
Tile shapes are runtime arguments (one compiled kernel serves every rank); the launcher shapes
them to the problem (`_tile_shape`), BLOCK_M / BLOCK_N / BLOCK_D are constexprs.

Unfused kernels (simple gathers, one program per block of query or key tokens, head, batch):
slot n of a query is the row-major multi-index of its per-axis window offsets, valid iff inside
the (causal) window on every axis. `_na_slot_dot_kernel` gives na_qk and grad_attn of na_av;
`_na_slot_sum_kernel` gives na_av and grad_q of na_qk (plus grad_rpb by atomics);
`_na_slot_scatter_kernel` gives grad_v of na_av and grad_k of na_qk by walking, for each key,
the queries that see it (no atomics).

Layout and numerics follow mqa.py (whose helpers this module imports): operands are read in
place when head_dim, strides and pointers are multiples of 16, else copied zero-padded to a
head dim that is a multiple of 16; BLOCK_D = next power of two >= max(D, 16). fp16 / bf16 dots
accumulate in fp32; fp32 uses tf32x3 (plain fp32 dots at large BLOCK_D: _fused_precision).
fp64 is not supported here (the cpu backend has it). The interpreter does not model bf16
arithmetic (mqa.py's kernels give the same garbage there), so bf16 is checked on a GPU only.
Row offsets are int64; in-kernel integer sizes are int32 (the launchers check them).
"""

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import CompileConfig
from .mqa import (_ALIGNED, _DTYPE_NAMES, _GRID_YZ_MAX, _INT32_MAX, _LOG2E, _block_d, _dot_precision,
                  _finish_rows, _kernel_operands, _launch, _signature, _unpadded)

_ERR = "na (triton)"

# Sizes, windows and tile shapes: no JIT specialization (one compiled kernel per dtype / BLOCK_D).
# Strides and head_dim keep theirs: 16-divisible is what gives 16-byte row loads.
_GEOMETRY_ARGS = ["L0", "L1", "L2", "K0", "K1", "K2", "S0", "S1", "S2", "DIL0", "DIL1", "DIL2",
                  "C0", "C1", "C2", "search_steps"]
_TILE_ARGS = ["T0", "T1", "T2", "NT0", "NT1", "NT2"]
_SIZE_ARGS = _GEOMETRY_ARGS + _TILE_ARGS + ["num_heads", "group", "num_slots"]


# ----------------------------------------------------------------------------------------------
# Window rules (na_window.h) in Triton; every helper works on scalars and on vectors.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _window_in_group(ig, group_len, kernel, stride, causal):
    """(start, end) of the in-group window of in-group query index ig: keys start <= j' < end."""
    base = (ig // stride) * stride
    causal_start = tl.maximum(tl.minimum(base + stride - 1, group_len - 1) - kernel + 1, 0)
    leader = tl.minimum(base + stride // 2, group_len - 1)
    start = tl.maximum(tl.minimum(leader - kernel // 2, group_len - kernel), 0)
    is_causal = causal != 0
    return tl.where(is_causal, causal_start, start), tl.where(is_causal, ig + 1, start + kernel)


@triton.jit
def _first_query_past(jg, group_len, kernel, stride, causal, search_steps, BY_START: tl.constexpr):
    """First in-group query whose window ends after key jg (BY_START: starts after jg), in
    [0, group_len]; binary search, valid as window starts and ends never decrease."""
    lo = jg * 0
    hi = lo + group_len
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        start, end = _window_in_group(mid, group_len, kernel, stride, causal)
        if BY_START:
            past = start > jg
        else:
            past = end > jg
        active = lo < hi
        hi = tl.where(active & past, mid, hi)
        lo = tl.where(active & (past == 0), mid + 1, lo)
    return lo


@triton.jit
def _group_len(length, g, dilation):
    return (length - g + dilation - 1) // dilation


@triton.jit
def _tile_coords(pid, DIL0, DIL1, DIL2, NT0, NT1, NT2):
    """(g0, g1, g2, t0, t1, t2): dilation group and tile index per axis of flat program pid."""
    t2 = pid % NT2
    pid = pid // NT2
    t1 = pid % NT1
    pid = pid // NT1
    t0 = pid % NT0
    pid = pid // NT0
    g2 = pid % DIL2
    pid = pid // DIL2
    g1 = pid % DIL1
    g0 = pid // DIL1
    return g0, g1, g2, t0, t1, t2


@triton.jit
def _tile_rows(BLOCK: tl.constexpr, T0, T1, T2):
    """Per-axis offsets (r0, r1, r2) of the rows of a T0 x T1 x T2 tile (row-major), and which of
    the BLOCK rows exist (T0 * T1 * T2 <= BLOCK)."""
    offs = tl.arange(0, BLOCK)
    r2 = offs % T2
    r1 = (offs // T2) % T1
    r0 = offs // (T1 * T2)
    return r0, r1, r2, r0 < T0


@triton.jit
def _box_split(flat, n1, n2):
    """Per-axis offsets of flat (row-major) indices into a box of sizes (., n1, n2)."""
    return flat // (n1 * n2), (flat // n2) % n1, flat % n2


@triton.jit
def _row_offsets(c0, c1, c2, s0, s1, s2):
    """int64 element offsets of spatial coordinates (c0, c1, c2)."""
    return c0.to(tl.int64) * s0 + c1.to(tl.int64) * s1 + c2.to(tl.int64) * s2


@triton.jit
def _rpb_offsets(h, rel0, rel1, rel2, K0, K1, K2):
    """Element offsets into rpb [Hq, 2K0-1, 2K1-1, 2K2-1] of in-group offsets rel = j' - i'."""
    w1 = 2 * K1 - 1
    w2 = 2 * K2 - 1
    return (((h * (2 * K0 - 1) + rel0 + K0 - 1) * w1 + rel1 + K1 - 1) * w2 + rel2 + K2 - 1)


@triton.jit
def _rpb_term(c0, c1, c2, K1, K2):
    """Linear part of the rpb offset of in-group coordinates: the offset of the pair (query i',
    key j') is _rpb_offsets(h, 0, 0, 0, ..) + term(j') - term(i'), one subtraction per pair."""
    return (c0 * (2 * K1 - 1) + c1) * (2 * K2 - 1) + c2


@triton.jit
def _rpb_gather(rpb_ptr, h, query_term, key_term, K0, K1, K2):
    """rpb values of the pairs (rows: query_term, columns: key_term) as fp32. Offsets are clamped
    into head h's table rather than masked: pairs outside a window (whose offsets may lie outside
    the table) read some entry of it and are masked by the caller; an unmasked load keeps the
    pair mask out of the load's layout (it cost hundreds of spilled registers)."""
    table = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    offset = _rpb_offsets(h, 0, 0, 0, K0, K1, K2) + key_term - query_term
    offset = tl.minimum(tl.maximum(offset, h * table), h * table + table - 1)
    return tl.load(rpb_ptr + offset).to(tl.float32)


@triton.jit
def _in_window(key_g, start, end, KEYS_FIRST: tl.constexpr):
    """Pair mask of one axis: key in-group index inside the query's window; [queries, keys]
    (KEYS_FIRST: [keys, queries])."""
    if KEYS_FIRST:
        return (key_g[:, None] >= start[None, :]) & (key_g[:, None] < end[None, :])
    else:
        return (key_g[None, :] >= start[:, None]) & (key_g[None, :] < end[:, None])


# ----------------------------------------------------------------------------------------------
# Fused forward: one program = one (query tile, query head, batch).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _key_box(t0, t1, t2, T0, T1, T2, len0, len1, len2, K0, K1, K2, S0, S1, S2, C0, C1, C2):
    """Key box of a query tile, in group coordinates: per axis from the window start of the tile's
    first query to the window end of its last. -> (lo0, lo1, lo2, n1, n2, number of keys)."""
    lo0, _ = _window_in_group(t0 * T0, len0, K0, S0, C0)
    lo1, _ = _window_in_group(t1 * T1, len1, K1, S1, C1)
    lo2, _ = _window_in_group(t2 * T2, len2, K2, S2, C2)
    _, hi0 = _window_in_group(tl.minimum(t0 * T0 + T0, len0) - 1, len0, K0, S0, C0)
    _, hi1 = _window_in_group(tl.minimum(t1 * T1 + T1, len1) - 1, len1, K1, S1, C1)
    _, hi2 = _window_in_group(tl.minimum(t2 * T2 + T2, len2) - 1, len2, K2, S2, C2)
    n1 = hi1 - lo1
    n2 = hi2 - lo2
    return lo0, lo1, lo2, n1, n2, (hi0 - lo0) * n1 * n2


@triton.jit
def _box_chunk(flat, box, lo0, lo1, lo2, n1, n2, g0, g1, g2, DIL0, DIL1, DIL2, k_base, k_s0, k_s1, k_s2,
               v_base, v_s0, v_s1, v_s2, offs_d, d_ok, q, row_ok, st0, en0, st1, en1, st2, en2, qk_scale_log2,
               rpb_ptr, h, query_term, K0, K1, K2, HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One chunk (flat indices into the key box) of a query tile: its K and V rows, which (query,
    key) pairs lie in the query's window, the log2-scaled scores (rpb added) and the keys' rpb term."""
    key_ok = flat < box
    c0, c1, c2 = _box_split(flat, n1, n2)
    kg0 = lo0 + c0
    kg1 = lo1 + c1
    kg2 = lo2 + c2
    kj0 = kg0 * DIL0 + g0
    kj1 = kg1 * DIL1 + g1
    kj2 = kg2 * DIL2 + g2
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load((k_base + _row_offsets(kj0, kj1, kj2, k_s0, k_s1, k_s2))[:, None] + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load((v_base + _row_offsets(kj0, kj1, kj2, v_s0, v_s1, v_s2))[:, None] + offs_d[None, :],
                mask=kv_mask, other=0.0)
    allowed = (row_ok[:, None] & key_ok[None, :] & _in_window(kg0, st0, en0, False)
               & _in_window(kg1, st1, en1, False) & _in_window(kg2, st2, en2, False))
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    key_term = _rpb_term(kg0, kg1, kg2, K1, K2)
    if HAS_RPB:
        s += _rpb_gather(rpb_ptr, h, query_term[:, None], key_term[None, :], K0, K1, K2) * _LOG2E
    return k, v, allowed, s, key_term


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _na_fwd_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, lse_ptr,
    q_sb, q_s0, q_s1, q_s2, q_sh,
    k_sb, k_s0, k_s1, k_s2, k_sh,
    v_sb, v_s0, v_s1, v_s2, v_sh,
    o_sb, o_s0, o_s1, o_s2, o_sh,
    L0, L1, L2, K0, K1, K2, S0, S1, S2, DIL0, DIL1, DIL2, C0, C1, C2, search_steps,
    T0, T1, T2, NT0, NT1, NT2,
    num_heads, group, head_dim, qk_scale_log2,
    HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g0, g1, g2, t0, t1, t2 = _tile_coords(tl.program_id(0), DIL0, DIL1, DIL2, NT0, NT1, NT2)
    h = tl.program_id(1)
    b = tl.program_id(2)
    len0 = _group_len(L0, g0, DIL0)
    len1 = _group_len(L1, g1, DIL1)
    len2 = _group_len(L2, g2, DIL2)
    if (t0 * T0 >= len0) | (t1 * T1 >= len1) | (t2 * T2 >= len2):
        return  # tiles are counted over the longest group
    kvh = h // group
    b64 = b.to(tl.int64)

    r0, r1, r2, row_ok = _tile_rows(BLOCK_M, T0, T1, T2)
    qg0 = t0 * T0 + r0
    qg1 = t1 * T1 + r1
    qg2 = t2 * T2 + r2
    row_ok = row_ok & (qg0 < len0) & (qg1 < len1) & (qg2 < len2)
    st0, en0 = _window_in_group(qg0, len0, K0, S0, C0)
    st1, en1 = _window_in_group(qg1, len1, K1, S1, C1)
    st2, en2 = _window_in_group(qg2, len2, K2, S2, C2)
    qi0 = qg0 * DIL0 + g0
    qi1 = qg1 * DIL1 + g1
    qi2 = qg2 * DIL2 + g2

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_rows = q_ptr + b64 * q_sb + h.to(tl.int64) * q_sh + _row_offsets(qi0, qi1, qi2, q_s0, q_s1, q_s2)
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    query_term = _rpb_term(qg0, qg1, qg2, K1, K2)

    lo0, lo1, lo2, n1, n2, box = _key_box(t0, t1, t2, T0, T1, T2, len0, len1, len2, K0, K1, K2, S0, S1, S2,
                                          C0, C1, C2)
    k_base = k_ptr + b64 * k_sb + kvh.to(tl.int64) * k_sh
    v_base = v_ptr + b64 * v_sb + kvh.to(tl.int64) * v_sh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, box, BLOCK_N):
        k, v, allowed, s, _ = _box_chunk(
            n0 + offs_n, box, lo0, lo1, lo2, n1, n2, g0, g1, g2, DIL0, DIL1, DIL2, k_base, k_s0, k_s1, k_s2,
            v_base, v_s0, v_s1, v_s2, offs_d, d_ok, q, row_ok, st0, en0, st1, en1, st2, en2, qk_scale_log2,
            rpb_ptr, h, query_term, K0, K1, K2, HAS_RPB, DOT_PRECISION)
        s = tl.where(allowed, s, float("-inf"))
        # Online softmax (as mqa._online_softmax_tile, on scores that already carry the bias).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out, lse = _finish_rows(acc, m_i, l_i)
    o_rows = out_ptr + b64 * o_sb + h.to(tl.int64) * o_sh + _row_offsets(qi0, qi1, qi2, o_s0, o_s1, o_s2)
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    # lse [B, L0, L1, L2, Hq], contiguous
    lse_at = ((b64 * L0 + qi0) * L1 + qi1) * L2 + qi2
    tl.store(lse_ptr + lse_at * num_heads + h, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward. dQ kernel: the forward's tiling; writes delta and (with rpb) adds dS into grad_rpb.
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _na_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, drpb_ptr,
    q_sb, q_s0, q_s1, q_s2, q_sh,
    k_sb, k_s0, k_s1, k_s2, k_sh,
    v_sb, v_s0, v_s1, v_s2, v_sh,
    o_sb, o_s0, o_s1, o_s2, o_sh,
    do_sb, do_s0, do_s1, do_s2, do_sh,
    dq_sb, dq_s0, dq_s1, dq_s2, dq_sh,
    L0, L1, L2, K0, K1, K2, S0, S1, S2, DIL0, DIL1, DIL2, C0, C1, C2, search_steps,
    T0, T1, T2, NT0, NT1, NT2,
    num_heads, group, head_dim, scale, qk_scale_log2,
    HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g0, g1, g2, t0, t1, t2 = _tile_coords(tl.program_id(0), DIL0, DIL1, DIL2, NT0, NT1, NT2)
    h = tl.program_id(1)
    b = tl.program_id(2)
    len0 = _group_len(L0, g0, DIL0)
    len1 = _group_len(L1, g1, DIL1)
    len2 = _group_len(L2, g2, DIL2)
    if (t0 * T0 >= len0) | (t1 * T1 >= len1) | (t2 * T2 >= len2):
        return
    kvh = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    r0, r1, r2, row_ok = _tile_rows(BLOCK_M, T0, T1, T2)
    qg0 = t0 * T0 + r0
    qg1 = t1 * T1 + r1
    qg2 = t2 * T2 + r2
    row_ok = row_ok & (qg0 < len0) & (qg1 < len1) & (qg2 < len2)
    st0, en0 = _window_in_group(qg0, len0, K0, S0, C0)
    st1, en1 = _window_in_group(qg1, len1, K1, S1, C1)
    st2, en2 = _window_in_group(qg2, len2, K2, S2, C2)
    qi0 = qg0 * DIL0 + g0
    qi1 = qg1 * DIL1 + g1
    qi2 = qg2 * DIL2 + g2

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    tile_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load((q_ptr + b64 * q_sb + h64 * q_sh + _row_offsets(qi0, qi1, qi2, q_s0, q_s1, q_s2))[:, None]
                + offs_d[None, :], mask=tile_mask, other=0.0)
    do = tl.load((do_ptr + b64 * do_sb + h64 * do_sh + _row_offsets(qi0, qi1, qi2, do_s0, do_s1, do_s2))[:, None]
                 + offs_d[None, :], mask=tile_mask, other=0.0)
    o = tl.load((out_ptr + b64 * o_sb + h64 * o_sh + _row_offsets(qi0, qi1, qi2, o_s0, o_s1, o_s2))[:, None]
                + offs_d[None, :], mask=tile_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_at = ((((b64 * L0 + qi0) * L1 + qi1) * L2 + qi2) * num_heads + h)
    tl.store(delta_ptr + lse_at, delta, mask=row_ok)
    lse_log2 = tl.load(lse_ptr + lse_at, mask=row_ok, other=0.0) * _LOG2E
    query_term = _rpb_term(qg0, qg1, qg2, K1, K2)
    drpb_rows = drpb_ptr + (_rpb_offsets(h, 0, 0, 0, K0, K1, K2) - query_term)

    lo0, lo1, lo2, n1, n2, box = _key_box(t0, t1, t2, T0, T1, T2, len0, len1, len2, K0, K1, K2, S0, S1, S2,
                                          C0, C1, C2)
    k_base = k_ptr + b64 * k_sb + kvh.to(tl.int64) * k_sh
    v_base = v_ptr + b64 * v_sb + kvh.to(tl.int64) * v_sh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, box, BLOCK_N):
        k, v, allowed, s, key_term = _box_chunk(
            n0 + offs_n, box, lo0, lo1, lo2, n1, n2, g0, g1, g2, DIL0, DIL1, DIL2, k_base, k_s0, k_s1, k_s2,
            v_base, v_s0, v_s1, v_s2, offs_d, d_ok, q, row_ok, st0, en0, st1, en1, st2, en2, qk_scale_log2,
            rpb_ptr, h, query_term, K0, K1, K2, HAS_RPB, DOT_PRECISION)
        p = tl.where(allowed, tl.exp2(s - lse_log2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_RPB:
            tl.atomic_add(drpb_rows[:, None] + key_term[None, :], ds, mask=allowed,
                          sem="relaxed")
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq_rows = dq_ptr + b64 * dq_sb + h64 * dq_sh + _row_offsets(qi0, qi1, qi2, dq_s0, dq_s1, dq_s2)
    tl.store(dq_rows[:, None] + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile_mask)


# dK/dV kernel: one program = one (key tile, KV head, batch); loops over the group's query heads
# and the box of queries whose windows can contain a key of the tile.
@triton.jit(do_not_specialize=_SIZE_ARGS)
def _na_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    q_sb, q_s0, q_s1, q_s2, q_sh,
    k_sb, k_s0, k_s1, k_s2, k_sh,
    v_sb, v_s0, v_s1, v_s2, v_sh,
    do_sb, do_s0, do_s1, do_s2, do_sh,
    dk_sb, dk_s0, dk_s1, dk_s2, dk_sh,
    dv_sb, dv_s0, dv_s1, dv_s2, dv_sh,
    L0, L1, L2, K0, K1, K2, S0, S1, S2, DIL0, DIL1, DIL2, C0, C1, C2, search_steps,
    T0, T1, T2, NT0, NT1, NT2,
    num_heads, group, head_dim, scale, qk_scale_log2,
    HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g0, g1, g2, t0, t1, t2 = _tile_coords(tl.program_id(0), DIL0, DIL1, DIL2, NT0, NT1, NT2)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    len0 = _group_len(L0, g0, DIL0)
    len1 = _group_len(L1, g1, DIL1)
    len2 = _group_len(L2, g2, DIL2)
    if (t0 * T0 >= len0) | (t1 * T1 >= len1) | (t2 * T2 >= len2):
        return
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)

    r0, r1, r2, key_ok = _tile_rows(BLOCK_N, T0, T1, T2)
    kg0 = t0 * T0 + r0
    kg1 = t1 * T1 + r1
    kg2 = t2 * T2 + r2
    key_ok = key_ok & (kg0 < len0) & (kg1 < len1) & (kg2 < len2)
    kj0 = kg0 * DIL0 + g0
    kj1 = kg1 * DIL1 + g1
    kj2 = kg2 * DIL2 + g2
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load((k_ptr + b64 * k_sb + kvh64 * k_sh + _row_offsets(kj0, kj1, kj2, k_s0, k_s1, k_s2))[:, None]
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load((v_ptr + b64 * v_sb + kvh64 * v_sh + _row_offsets(kj0, kj1, kj2, v_s0, v_s1, v_s2))[:, None]
                + offs_d[None, :], mask=kv_mask, other=0.0)

    # Query box: first query whose window ends after the tile's first key, to the first whose
    # window starts after its last key, per axis.
    lo0 = _first_query_past(t0 * T0, len0, K0, S0, C0, search_steps, False)
    lo1 = _first_query_past(t1 * T1, len1, K1, S1, C1, search_steps, False)
    lo2 = _first_query_past(t2 * T2, len2, K2, S2, C2, search_steps, False)
    hi0 = _first_query_past(tl.minimum(t0 * T0 + T0, len0) - 1, len0, K0, S0, C0, search_steps, True)
    hi1 = _first_query_past(tl.minimum(t1 * T1 + T1, len1) - 1, len1, K1, S1, C1, search_steps, True)
    hi2 = _first_query_past(tl.minimum(t2 * T2 + T2, len2) - 1, len2, K2, S2, C2, search_steps, True)
    n1 = tl.maximum(hi1 - lo1, 0)
    n2 = tl.maximum(hi2 - lo2, 0)
    box = tl.maximum(hi0 - lo0, 0) * n1 * n2

    rpb_key_term = _rpb_term(kg0, kg1, kg2, K1, K2)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for r in range(0, group):
        h = kvh * group + r
        h64 = h.to(tl.int64)
        q_base = q_ptr + b64 * q_sb + h64 * q_sh
        do_base = do_ptr + b64 * do_sb + h64 * do_sh
        for m0 in range(0, box, BLOCK_M):
            flat = m0 + offs_m
            row_ok = flat < box
            c0, c1, c2 = _box_split(flat, n1, n2)
            qg0 = lo0 + c0
            qg1 = lo1 + c1
            qg2 = lo2 + c2
            st0, en0 = _window_in_group(qg0, len0, K0, S0, C0)
            st1, en1 = _window_in_group(qg1, len1, K1, S1, C1)
            st2, en2 = _window_in_group(qg2, len2, K2, S2, C2)
            qi0 = qg0 * DIL0 + g0
            qi1 = qg1 * DIL1 + g1
            qi2 = qg2 * DIL2 + g2
            tile_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load((q_base + _row_offsets(qi0, qi1, qi2, q_s0, q_s1, q_s2))[:, None] + offs_d[None, :],
                        mask=tile_mask, other=0.0)
            do = tl.load((do_base + _row_offsets(qi0, qi1, qi2, do_s0, do_s1, do_s2))[:, None] + offs_d[None, :],
                         mask=tile_mask, other=0.0)
            lse_at = ((((b64 * L0 + qi0) * L1 + qi1) * L2 + qi2) * num_heads + h)
            lse_log2 = tl.load(lse_ptr + lse_at, mask=row_ok, other=0.0) * _LOG2E
            delta = tl.load(delta_ptr + lse_at, mask=row_ok, other=0.0)
            # Transposed scores [keys, queries], so dV and dK come out of the dots unpermuted.
            allowed_t = (key_ok[:, None] & row_ok[None, :] & _in_window(kg0, st0, en0, True)
                         & _in_window(kg1, st1, en1, True) & _in_window(kg2, st2, en2, True))
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
            if HAS_RPB:
                s_t += _rpb_gather(rpb_ptr, h, _rpb_term(qg0, qg1, qg2, K1, K2)[None, :], rpb_key_term[:, None],
                                   K0, K1, K2) * _LOG2E
            p_t = tl.where(allowed_t, tl.exp2(s_t - lse_log2[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk_rows = dk_ptr + b64 * dk_sb + kvh64 * dk_sh + _row_offsets(kj0, kj1, kj2, dk_s0, dk_s1, dk_s2)
    dv_rows = dv_ptr + b64 * dv_sb + kvh64 * dv_sh + _row_offsets(kj0, kj1, kj2, dv_s0, dv_s1, dv_s2)
    tl.store(dk_rows[:, None] + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_rows[:, None] + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Unfused ops: one program = one (block of BLOCK_T tokens, head, batch); slots are looped over.
# attn-like tensors are [B, Hq, L0, L1, L2, num_slots], contiguous.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _token_coords(tok, L1, L2):
    return tok // (L1 * L2), (tok // L2) % L1, tok % L2


@triton.jit
def _query_window(i, length, kernel, stride, dilation, causal):
    """(first key, key count, in-group start) of the window of query i, in axis coordinates."""
    g = i % dilation
    start, end = _window_in_group(i // dilation, _group_len(length, g, dilation), kernel, stride, causal)
    return start * dilation + g, end - start, start


@triton.jit
def _slot_split(n, K1, K2):
    return n // (K1 * K2), (n // K2) % K1, n % K2


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _na_slot_dot_kernel(
    x_ptr, y_ptr, rpb_ptr, attn_ptr,
    x_sb, x_s0, x_s1, x_s2, x_sh,
    y_sb, y_s0, y_s1, y_s2, y_sh,
    L0, L1, L2, K0, K1, K2, S0, S1, S2, DIL0, DIL1, DIL2, C0, C1, C2, search_steps,
    num_heads, group, num_slots, head_dim, scale, invalid_value,
    HAS_RPB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """attn[b, h, i, n] = scale * <x_i, y_slot(i, n)> (+ rpb); invalid_value in invalid slots.
    na_qk: x = q, y = k; grad_attn of na_av: x = grad_out, y = v."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < L0 * L1 * L2
    i0, i1, i2 = _token_coords(tok, L1, L2)
    first0, count0, _ = _query_window(i0, L0, K0, S0, DIL0, C0)
    first1, count1, _ = _query_window(i1, L1, K1, S1, DIL1, C1)
    first2, count2, _ = _query_window(i2, L2, K2, S2, DIL2, C2)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    x = tl.load((x_ptr + b64 * x_sb + h.to(tl.int64) * x_sh + _row_offsets(i0, i1, i2, x_s0, x_s1, x_s2))[:, None]
                + offs_d[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    y_base = y_ptr + b64 * y_sb + (h // group).to(tl.int64) * y_sh
    attn_rows = attn_ptr + ((b64 * num_heads + h) * (L0 * L1 * L2) + tok) * num_slots
    for n in range(0, num_slots):
        n0, n1, n2 = _slot_split(n, K1, K2)
        valid = tok_ok & (n0 < count0) & (n1 < count1) & (n2 < count2)
        y = tl.load((y_base + _row_offsets(first0 + n0 * DIL0, first1 + n1 * DIL1, first2 + n2 * DIL2,
                                           y_s0, y_s1, y_s2))[:, None] + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0)
        val = tl.sum(x * y.to(tl.float32), 1) * scale
        if HAS_RPB:  # non-causal: relative in-group offset of slot n is (first - i) / d + n
            val += tl.load(rpb_ptr + _rpb_offsets(h, (first0 - i0) // DIL0 + n0, (first1 - i1) // DIL1 + n1,
                                                  (first2 - i2) // DIL2 + n2, K0, K1, K2),
                           mask=valid, other=0.0).to(tl.float32)
        val = tl.where(valid, val, invalid_value)
        tl.store(attn_rows + n, val.to(attn_ptr.dtype.element_ty), mask=tok_ok)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _na_slot_sum_kernel(
    attn_ptr, y_ptr, out_ptr, drpb_ptr,
    y_sb, y_s0, y_s1, y_s2, y_sh,
    o_sb, o_s0, o_s1, o_s2, o_sh,
    L0, L1, L2, K0, K1, K2, S0, S1, S2, DIL0, DIL1, DIL2, C0, C1, C2, search_steps,
    num_heads, group, num_slots, head_dim, scale,
    HAS_RPB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_i = scale * sum over valid slots n of attn[b, h, i, n] * y_slot(i, n); with HAS_RPB
    also drpb[h, idx(i, n)] += attn[b, h, i, n] (fp32 atomics).
    na_av: attn, y = v, scale 1; grad_q of na_qk: attn = grad_attn, y = k, scale."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < L0 * L1 * L2
    i0, i1, i2 = _token_coords(tok, L1, L2)
    first0, count0, _ = _query_window(i0, L0, K0, S0, DIL0, C0)
    first1, count1, _ = _query_window(i1, L1, K1, S1, DIL1, C1)
    first2, count2, _ = _query_window(i2, L2, K2, S2, DIL2, C2)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    y_base = y_ptr + b64 * y_sb + (h // group).to(tl.int64) * y_sh
    attn_rows = attn_ptr + ((b64 * num_heads + h) * (L0 * L1 * L2) + tok) * num_slots
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for n in range(0, num_slots):
        n0, n1, n2 = _slot_split(n, K1, K2)
        valid = tok_ok & (n0 < count0) & (n1 < count1) & (n2 < count2)
        w = tl.load(attn_rows + n, mask=valid, other=0.0).to(tl.float32)
        y = tl.load((y_base + _row_offsets(first0 + n0 * DIL0, first1 + n1 * DIL1, first2 + n2 * DIL2,
                                           y_s0, y_s1, y_s2))[:, None] + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * y.to(tl.float32)
        if HAS_RPB:
            tl.atomic_add(drpb_ptr + _rpb_offsets(h, (first0 - i0) // DIL0 + n0, (first1 - i1) // DIL1 + n1,
                                                  (first2 - i2) // DIL2 + n2, K0, K1, K2),
                          w, mask=valid, sem="relaxed")
    o_rows = out_ptr + b64 * o_sb + h.to(tl.int64) * o_sh + _row_offsets(i0, i1, i2, o_s0, o_s1, o_s2)
    tl.store(o_rows[:, None] + offs_d[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _na_slot_scatter_kernel(
    attn_ptr, x_ptr, out_ptr,
    x_sb, x_s0, x_s1, x_s2, x_sh,
    o_sb, o_s0, o_s1, o_s2, o_sh,
    L0, L1, L2, K0, K1, K2, S0, S1, S2, DIL0, DIL1, DIL2, C0, C1, C2, search_steps,
    num_heads, group, num_slots, head_dim, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_j (KV head kvh = program_id(1)) = scale * sum over the group's query heads h and the
    queries i that see key j of attn[b, h, i, slot(i, j)] * x_i (x has Hq heads).
    grad_v of na_av: attn, x = grad_out, scale 1; grad_k of na_qk: attn = grad_attn, x = q."""
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < L0 * L1 * L2
    j0, j1, j2 = _token_coords(tok, L1, L2)
    g0 = j0 % DIL0
    g1 = j1 % DIL1
    g2 = j2 % DIL2
    len0 = _group_len(L0, g0, DIL0)
    len1 = _group_len(L1, g1, DIL1)
    len2 = _group_len(L2, g2, DIL2)
    jg0 = j0 // DIL0
    jg1 = j1 // DIL1
    jg2 = j2 // DIL2
    # The queries that see key j: an in-group run [first, first + count) per axis.
    qf0 = _first_query_past(jg0, len0, K0, S0, C0, search_steps, False)
    qf1 = _first_query_past(jg1, len1, K1, S1, C1, search_steps, False)
    qf2 = _first_query_past(jg2, len2, K2, S2, C2, search_steps, False)
    qc0 = _first_query_past(jg0, len0, K0, S0, C0, search_steps, True) - qf0
    qc1 = _first_query_past(jg1, len1, K1, S1, C1, search_steps, True) - qf1
    qc2 = _first_query_past(jg2, len2, K2, S2, C2, search_steps, True) - qf2
    max0 = tl.max(tl.where(tok_ok, qc0, 0), 0)
    max1 = tl.max(tl.where(tok_ok, qc1, 0), 0)
    max2 = tl.max(tl.where(tok_ok, qc2, 0), 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    num_tokens = L0 * L1 * L2
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for c0 in range(0, max0):
        qg0 = qf0 + c0
        st0, _ = _window_in_group(qg0, len0, K0, S0, C0)
        for c1 in range(0, max1):
            qg1 = qf1 + c1
            st1, _ = _window_in_group(qg1, len1, K1, S1, C1)
            for c2 in range(0, max2):
                qg2 = qf2 + c2
                st2, _ = _window_in_group(qg2, len2, K2, S2, C2)
                valid = tok_ok & (c0 < qc0) & (c1 < qc1) & (c2 < qc2)
                slot = ((jg0 - st0) * K1 + (jg1 - st1)) * K2 + (jg2 - st2)
                qi0 = qg0 * DIL0 + g0
                qi1 = qg1 * DIL1 + g1
                qi2 = qg2 * DIL2 + g2
                query = (qi0 * L1 + qi1) * L2 + qi2
                x_rows = x_ptr + b64 * x_sb + _row_offsets(qi0, qi1, qi2, x_s0, x_s1, x_s2)
                for r in range(0, group):
                    h = kvh * group + r
                    w = tl.load(attn_ptr + ((b64 * num_heads + h) * num_tokens + query) * num_slots + slot,
                                mask=valid, other=0.0).to(tl.float32)
                    x = tl.load((x_rows + h.to(tl.int64) * x_sh)[:, None] + offs_d[None, :],
                                mask=valid[:, None] & d_ok[None, :], other=0.0)
                    acc += w[:, None] * x.to(tl.float32)
    o_rows = out_ptr + b64 * o_sb + kvh.to(tl.int64) * o_sh + _row_offsets(j0, j1, j2, o_s0, o_s1, o_s2)
    tl.store(o_rows[:, None] + offs_d[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch settings.
# ----------------------------------------------------------------------------------------------


class _Tile(NamedTuple):
    block_m: int  # queries per tile (fwd / dq: the tile; dkdv: the query block of the loop)
    block_n: int  # keys per block (dkdv: the key tile)
    num_warps: int
    num_stages: int


_BLOCK_DS = (16, 32, 64, 128, 256)

# (kernel, "half" | "fp32") -> BLOCK_D -> tile, checked with compile_check for sm_80 / sm_90.
# The gathers (row loads at computed addresses, per-pair window masks) cost registers that a
# plain flash-attention tile does not, hence smaller tiles than mqa.py's, one stage in the
# backward, and (`_tile`) halved tiles with rpb, whose per-pair gather needs an address each.
_TILES = {
    ("fwd", "half"): {16: _Tile(64, 64, 8, 2), 32: _Tile(64, 64, 8, 2), 64: _Tile(64, 64, 8, 2),
                      128: _Tile(64, 32, 8, 2), 256: _Tile(32, 32, 8, 1)},
    ("fwd", "fp32"): {16: _Tile(32, 32, 4, 1), 32: _Tile(32, 32, 8, 1), 64: _Tile(32, 32, 8, 1),
                      128: _Tile(16, 32, 8, 1), 256: _Tile(16, 32, 8, 1)},
    ("bwd_dq", "half"): {16: _Tile(64, 32, 8, 1), 32: _Tile(64, 32, 8, 1), 64: _Tile(64, 32, 8, 1),
                         128: _Tile(32, 32, 8, 1), 256: _Tile(32, 16, 8, 1)},
    ("bwd_dq", "fp32"): {16: _Tile(32, 16, 4, 1), 32: _Tile(32, 16, 4, 1), 64: _Tile(32, 16, 8, 1),
                         128: _Tile(16, 16, 8, 1), 256: _Tile(16, 16, 8, 1)},
    ("bwd_dkdv", "half"): {16: _Tile(32, 64, 8, 1), 32: _Tile(32, 64, 8, 1), 64: _Tile(32, 64, 8, 1),
                           128: _Tile(32, 32, 8, 1), 256: _Tile(16, 32, 8, 1)},
    ("bwd_dkdv", "fp32"): {16: _Tile(16, 32, 4, 1), 32: _Tile(16, 32, 4, 1), 64: _Tile(16, 32, 8, 1),
                           128: _Tile(16, 16, 8, 1), 256: _Tile(16, 16, 8, 1)},
}
# Unfused gathers: tokens per program and warps (no dots; BLOCK_T * BLOCK_D / threads fp32 values).
_SLOT_BLOCK_T = {16: 64, 32: 32, 64: 16, 128: 16, 256: 8}
_SLOT_WARPS = 4


def _tile(kernel: str, dtype: torch.dtype, block_d: int, has_rpb: bool) -> _Tile:
    tile = _TILES[(kernel, "fp32" if dtype == torch.float32 else "half")][block_d]
    if has_rpb:  # halve the side that the pair gathers scale with most: keys, or dK/dV's query block
        if kernel == "bwd_dkdv" and tile.block_m > 16:
            tile = tile._replace(block_m=tile.block_m // 2)
        else:
            tile = tile._replace(block_n=max(16, tile.block_n // 2))
    return tile


def _fused_precision(kernel: str, dtype: torch.dtype, block_d: int) -> str:
    """tf32x3 for fp32 (as mqa.py), except where its split operands spill at every tile and plain
    fp32 FMA dots do not: the dQ kernel at BLOCK_D = 128, the others at 256. (The dQ kernel at
    256 spills either way, a little less with tf32x3, which it keeps.)"""
    if dtype == torch.float32 and block_d == (128 if kernel == "bwd_dq" else 256):
        return "ieee"
    return _dot_precision(dtype)


# ----------------------------------------------------------------------------------------------
# Geometry.
# ----------------------------------------------------------------------------------------------


class _Geometry(NamedTuple):
    rank: int
    lengths: Tuple[int, int, int]  # padded to three axes (leading axes of length 1, kernel 1)
    kernels: Tuple[int, int, int]
    strides: Tuple[int, int, int]
    dilations: Tuple[int, int, int]
    causal: Tuple[int, int, int]

    @property
    def tokens(self) -> int:
        return self.lengths[0] * self.lengths[1] * self.lengths[2]

    @property
    def slots(self) -> int:
        return self.kernels[0] * self.kernels[1] * self.kernels[2]

    @property
    def group_lengths(self) -> Tuple[int, ...]:
        """Longest dilation group per axis."""
        return tuple(-(-L // d) for L, d in zip(self.lengths, self.dilations))

    def args(self) -> Tuple[int, ...]:
        search_steps = max(self.lengths).bit_length() + 1
        return (*self.lengths, *self.kernels, *self.strides, *self.dilations, *self.causal, search_steps)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"{_ERR}: {message}")


def _geometry(spatial: Sequence[int], kernel_size, stride, dilation, is_causal) -> _Geometry:
    rank = len(spatial)
    _require(1 <= rank <= 3, f"rank {rank} outside 1..3 (tensors must be [B, *spatial, heads, D])")
    conf = [list(kernel_size), list(stride), list(dilation), [bool(c) for c in is_causal]]
    _require(all(len(c) == rank for c in conf),
             "kernel_size, stride, dilation and is_causal need one entry per spatial axis")
    for L, k, s, d in zip(spatial, *conf[:3]):
        _require(k >= 1 and 1 <= s <= k and d >= 1 and k * d <= L,
                 f"invalid window (length {L}, kernel {k}, stride {s}, dilation {d})")
    pad = 3 - rank
    lengths = (1,) * pad + tuple(int(x) for x in spatial)
    _require(math.prod(lengths) + 1024 < _INT32_MAX, "too many tokens for int32 indexing")
    return _Geometry(rank, lengths, (1,) * pad + tuple(int(x) for x in conf[0]),
                     (1,) * pad + tuple(int(x) for x in conf[1]), (1,) * pad + tuple(int(x) for x in conf[2]),
                     (0,) * pad + tuple(int(x) for x in conf[3]))


def _tile_shape(block: int, geo: _Geometry) -> Tuple[int, int, int]:
    """Split a tile of `block` rows over the axes as evenly as the group lengths allow (powers of
    two, the last axis first on ties): near-cubic tiles have the smallest key box."""
    shape = [1, 1, 1]
    limits = [triton.next_power_of_2(n) for n in geo.group_lengths]
    while shape[0] * shape[1] * shape[2] < block:
        growable = [a for a in (2, 1, 0) if shape[a] < limits[a]]
        if not growable:
            break
        axis = min(growable, key=lambda a: shape[a])
        shape[axis] *= 2
    return tuple(shape)


def _tile_grid(tile: Tuple[int, int, int], geo: _Geometry) -> Tuple[Tuple[int, ...], int]:
    """(tiles per axis, programs over all dilation groups) of a tile shape."""
    counts = tuple(triton.cdiv(n, t) for n, t in zip(geo.group_lengths, tile))
    programs = math.prod(counts) * math.prod(geo.dilations)
    _require(programs <= _INT32_MAX, "too many tiles")
    return counts, programs


def _row_strides(t: torch.Tensor, rank: int) -> Tuple[int, ...]:
    """(batch, axis 0, axis 1, axis 2, head) element strides; padded axes get stride 0."""
    return (t.stride(0), *((0,) * (3 - rank)), *t.stride()[1:1 + rank], t.stride(-2))


def _check_tensors(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    if dtype == torch.float64:
        raise TypeError(f"{_ERR}: float64 is not supported by the Triton kernels; use the cpu backend")
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"{_ERR}: unsupported dtype {dtype}; expected float16, bfloat16 or float32")
    for t in tensors[1:]:
        _require(t.dtype == dtype, f"dtype mismatch {t.dtype} vs {dtype}")
        _require(t.device == tensors[0].device, "tensors on different devices")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor = None) -> Tuple[int, int, int, int]:
    """(batch, q heads, kv heads, head dim) after checking shapes."""
    _require(q.dim() in (4, 5, 6), f"q must be [B, *spatial, heads, D] with 1..3 spatial axes, got {tuple(q.shape)}")
    _require(k.shape[:-2] == q.shape[:-2] and k.shape[-1] == q.shape[-1],
             f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if v is not None:
        _require(v.shape == k.shape, f"v {tuple(v.shape)} does not match k {tuple(k.shape)}")
    batch, q_heads, kv_heads, head_dim = q.shape[0], q.shape[-2], k.shape[-2], q.shape[-1]
    _require(kv_heads >= 1 and q_heads % kv_heads == 0, "q heads must be a multiple of kv heads")
    _require(1 <= head_dim <= 256, f"head dim {head_dim} outside 1..256")
    _require(batch <= _GRID_YZ_MAX and q_heads <= _GRID_YZ_MAX, "batch or heads exceed the grid")
    return batch, q_heads, kv_heads, head_dim


def _check_rpb(rpb: torch.Tensor, q: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    expected = (q.shape[-2],) + tuple(2 * k - 1 for k in geo.kernels[3 - geo.rank:])
    _require(tuple(rpb.shape) == expected, f"rpb must be {expected}, got {tuple(rpb.shape)}")
    _require(rpb.dtype == q.dtype and rpb.device == q.device, "rpb must have q's dtype and device")
    _require(not any(geo.causal), "rpb is not defined with causal axes")
    return rpb.contiguous()


def _new_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# Launch functions (argument lists of the fusekit::na_* op schemas).
# ----------------------------------------------------------------------------------------------


def na_forward(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale):
    """(out like q, contiguous; lse [B, *spatial, Hq] float32)."""
    _check_tensors(q, k, v)
    batch, q_heads, kv_heads, head_dim = _check_qkv(q, k, v)
    geo = _geometry(q.shape[1:-2], kernel_size, stride, dilation, is_causal)
    has_rpb = rpb is not None
    if has_rpb:
        rpb = _check_rpb(rpb, q, geo)
    padded_dim, (q, k, v) = _kernel_operands(head_dim, q, k, v)
    out = _new_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return _unpadded(out, head_dim), lse
    block_d = _block_d(padded_dim)
    tile = _tile("fwd", q.dtype, block_d, has_rpb)
    shape = _tile_shape(tile.block_m, geo)
    counts, programs = _tile_grid(shape, geo)
    _launch(_na_fwd_kernel, (programs, q_heads, batch),
            q, k, v, rpb if has_rpb else q, out, lse,
            *_row_strides(q, geo.rank), *_row_strides(k, geo.rank), *_row_strides(v, geo.rank),
            *_row_strides(out, geo.rank),
            *geo.args(), *shape, *counts,
            q_heads, q_heads // kv_heads, padded_dim, float(scale) * _LOG2E.value,
            HAS_RPB=has_rpb, DOT_PRECISION=_fused_precision("fwd", q.dtype, block_d), BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n, BLOCK_D=block_d, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return _unpadded(out, head_dim), lse


def na_backward(grad_out, q, k, v, out, lse, rpb, kernel_size, stride, dilation, is_causal, scale):
    """(grad_q, grad_k, grad_v, grad_rpb): contiguous, in the input dtype; grad_rpb is summed with
    fp32 atomics (not bitwise deterministic), empty when rpb is None."""
    _check_tensors(q, k, v, grad_out, out)
    batch, q_heads, kv_heads, head_dim = _check_qkv(q, k, v)
    _require(grad_out.shape == q.shape and out.shape == q.shape, "grad_out / out must have q's shape")
    _require(lse.shape == q.shape[:-1] and lse.dtype == torch.float32 and lse.device == q.device,
             "lse must be float32 [B, *spatial, Hq]")
    geo = _geometry(q.shape[1:-2], kernel_size, stride, dilation, is_causal)
    has_rpb = rpb is not None
    if has_rpb:
        rpb = _check_rpb(rpb, q, geo)
    lse = lse.contiguous()
    padded_dim, (q, k, v, grad_out, out) = _kernel_operands(head_dim, q, k, v, grad_out, out)
    grad_q, grad_k, grad_v = _new_like(q), _new_like(k), _new_like(v)
    grad_rpb = torch.zeros(rpb.shape, dtype=torch.float32, device=q.device) if has_rpb else q.new_empty(0)
    if q.numel() == 0:
        grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    else:
        delta = torch.empty_like(lse)
        block_d = _block_d(padded_dim)
        sizes = (q_heads, q_heads // kv_heads, padded_dim, float(scale), float(scale) * _LOG2E.value)

        tile = _tile("bwd_dq", q.dtype, block_d, has_rpb)  # first: it writes delta
        shape = _tile_shape(tile.block_m, geo)
        counts, programs = _tile_grid(shape, geo)
        _launch(_na_bwd_dq_kernel, (programs, q_heads, batch),
                q, k, v, rpb if has_rpb else q, out, grad_out, lse, delta, grad_q,
                grad_rpb if has_rpb else lse,
                *_row_strides(q, geo.rank), *_row_strides(k, geo.rank), *_row_strides(v, geo.rank),
                *_row_strides(out, geo.rank), *_row_strides(grad_out, geo.rank), *_row_strides(grad_q, geo.rank),
                *geo.args(), *shape, *counts, *sizes,
                HAS_RPB=has_rpb, DOT_PRECISION=_fused_precision("bwd_dq", q.dtype, block_d), BLOCK_M=tile.block_m,
                BLOCK_N=tile.block_n, BLOCK_D=block_d, num_warps=tile.num_warps, num_stages=tile.num_stages)

        tile = _tile("bwd_dkdv", q.dtype, block_d, has_rpb)
        shape = _tile_shape(tile.block_n, geo)
        counts, programs = _tile_grid(shape, geo)
        _launch(_na_bwd_dkdv_kernel, (programs, kv_heads, batch),
                q, k, v, rpb if has_rpb else q, grad_out, lse, delta, grad_k, grad_v,
                *_row_strides(q, geo.rank), *_row_strides(k, geo.rank), *_row_strides(v, geo.rank),
                *_row_strides(grad_out, geo.rank), *_row_strides(grad_k, geo.rank), *_row_strides(grad_v, geo.rank),
                *geo.args(), *shape, *counts, *sizes,
                HAS_RPB=has_rpb, DOT_PRECISION=_fused_precision("bwd_dkdv", q.dtype, block_d), BLOCK_M=tile.block_m,
                BLOCK_N=tile.block_n, BLOCK_D=block_d, num_warps=tile.num_warps, num_stages=tile.num_stages)
    if has_rpb:
        grad_rpb = grad_rpb.to(rpb.dtype)
    return (_unpadded(grad_q, head_dim), _unpadded(grad_k, head_dim), _unpadded(grad_v, head_dim), grad_rpb)


def _attn_tensor(attn: torch.Tensor, batch: int, q_heads: int, geo: _Geometry, device) -> torch.Tensor:
    """attn / grad_attn [B, Hq, *spatial, K], checked and made contiguous."""
    expected = (batch, q_heads, *geo.lengths[3 - geo.rank:], geo.slots)
    _require(tuple(attn.shape) == expected, f"attn must be {expected}, got {tuple(attn.shape)}")
    _require(attn.device == device, "attn on another device")
    _require(attn.dtype in _DTYPE_NAMES, f"unsupported attn dtype {attn.dtype}")
    return attn.contiguous()


def _slot_dot(x, y, rpb, geo, scale, invalid_value, attn_dtype):
    """attn [B, Hx, *spatial, K] = scale * <x_i, y_slot> (+ rpb), invalid_value in invalid slots."""
    batch, x_heads, y_heads, head_dim = _check_qkv(x, y)
    padded_dim, (x, y) = _kernel_operands(head_dim, x, y)
    attn = torch.empty((batch, x_heads, *x.shape[1:-2], geo.slots), dtype=attn_dtype, device=x.device)
    if attn.numel() == 0:
        return attn
    block_d = _block_d(padded_dim)
    block_t = _SLOT_BLOCK_T[block_d]
    _launch(_na_slot_dot_kernel, (triton.cdiv(geo.tokens, block_t), x_heads, batch),
            x, y, rpb if rpb is not None else x, attn,
            *_row_strides(x, geo.rank), *_row_strides(y, geo.rank), *geo.args(),
            x_heads, x_heads // y_heads, geo.slots, padded_dim, float(scale), float(invalid_value),
            HAS_RPB=rpb is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_SLOT_WARPS, num_stages=1)
    return attn


def _slot_sum(attn, y, geo, scale, out_heads, out_dtype, drpb=None):
    """[B, *spatial, out_heads, D] = scale * sum_n attn[.., n] * y_slot(n) (+ drpb atomics)."""
    batch, head_dim = y.shape[0], y.shape[-1]
    padded_dim, (y,) = _kernel_operands(head_dim, y)
    out = torch.empty((batch, *y.shape[1:-2], out_heads, padded_dim), dtype=out_dtype, device=y.device)
    if out.numel() > 0:
        block_d = _block_d(padded_dim)
        block_t = _SLOT_BLOCK_T[block_d]
        _launch(_na_slot_sum_kernel, (triton.cdiv(geo.tokens, block_t), out_heads, batch),
                attn, y, out, drpb if drpb is not None else attn,
                *_row_strides(y, geo.rank), *_row_strides(out, geo.rank), *geo.args(),
                out_heads, out_heads // y.shape[-2], geo.slots, padded_dim, float(scale),
                HAS_RPB=drpb is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_SLOT_WARPS, num_stages=1)
    return _unpadded(out, head_dim)


def _slot_scatter(attn, x, geo, scale, kv_heads, out_dtype):
    """[B, *spatial, kv_heads, D]: for each key, scale * sum over the group's heads and the queries
    that see it of attn[.., slot] * x_query."""
    batch, head_dim = x.shape[0], x.shape[-1]
    padded_dim, (x,) = _kernel_operands(head_dim, x)
    out = torch.empty((batch, *x.shape[1:-2], kv_heads, padded_dim), dtype=out_dtype, device=x.device)
    if out.numel() > 0:
        block_d = _block_d(padded_dim)
        block_t = _SLOT_BLOCK_T[block_d]
        _launch(_na_slot_scatter_kernel, (triton.cdiv(geo.tokens, block_t), kv_heads, batch),
                attn, x, out,
                *_row_strides(x, geo.rank), *_row_strides(out, geo.rank), *geo.args(),
                x.shape[-2], x.shape[-2] // kv_heads, geo.slots, padded_dim, float(scale),
                BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_SLOT_WARPS, num_stages=1)
    return _unpadded(out, head_dim)


def na_qk(q, k, rpb, kernel_size, stride, dilation, is_causal, scale):
    """attn [B, Hq, *spatial, K] in q's dtype: scale * q . k_slot + rpb, -inf in invalid slots."""
    _check_tensors(q, k)
    _check_qkv(q, k)
    geo = _geometry(q.shape[1:-2], kernel_size, stride, dilation, is_causal)
    if rpb is not None:
        rpb = _check_rpb(rpb, q, geo)
    return _slot_dot(q, k, rpb, geo, scale, float("-inf"), q.dtype)


def na_qk_backward(grad_attn, q, k, has_rpb, kernel_size, stride, dilation, is_causal, scale):
    """(grad_q, grad_k, grad_rpb); grad_rpb [Hq, 2k-1, ..] in q's dtype (fp32 atomics, not bitwise
    deterministic) or empty when not has_rpb."""
    _check_tensors(q, k)
    _, q_heads, kv_heads, _ = _check_qkv(q, k)
    geo = _geometry(q.shape[1:-2], kernel_size, stride, dilation, is_causal)
    grad_attn = _attn_tensor(grad_attn, q.shape[0], q_heads, geo, q.device)
    drpb = None
    if has_rpb:
        _require(not any(geo.causal), "rpb is not defined with causal axes")
        drpb = torch.zeros((q_heads,) + tuple(2 * x - 1 for x in geo.kernels[3 - geo.rank:]),
                           dtype=torch.float32, device=q.device)
    grad_q = _slot_sum(grad_attn, k, geo, scale, q_heads, q.dtype, drpb)
    grad_k = _slot_scatter(grad_attn, q, geo, scale, kv_heads, k.dtype)
    return grad_q, grad_k, (drpb.to(q.dtype) if has_rpb else q.new_empty(0))


def na_av(attn, v, kernel_size, stride, dilation, is_causal):
    """out [B, *spatial, Hq, D] in v's dtype = sum over valid slots of attn * v_slot."""
    _check_tensors(v)
    _require(v.dim() in (4, 5, 6), f"v must be [B, *spatial, heads, D], got {tuple(v.shape)}")
    geo = _geometry(v.shape[1:-2], kernel_size, stride, dilation, is_causal)
    _require(attn.dim() == v.dim() and attn.shape[0] == v.shape[0] and attn.shape[2:-1] == v.shape[1:-2],
             f"attn {tuple(attn.shape)} does not match v {tuple(v.shape)}")
    q_heads = attn.shape[1]
    _require(q_heads % v.shape[-2] == 0 and q_heads <= _GRID_YZ_MAX and v.shape[0] <= _GRID_YZ_MAX,
             "attn heads must be a multiple of v heads")
    _require(1 <= v.shape[-1] <= 256, f"head dim {v.shape[-1]} outside 1..256")
    attn = _attn_tensor(attn, v.shape[0], q_heads, geo, v.device)
    return _slot_sum(attn, v, geo, 1.0, q_heads, v.dtype)


def na_av_backward(grad_out, attn, v, kernel_size, stride, dilation, is_causal):
    """(grad_attn like attn, contiguous, 0 in invalid slots; grad_v like v)."""
    _check_tensors(grad_out, v)
    batch, q_heads, _, _ = _check_qkv(grad_out, v)
    geo = _geometry(v.shape[1:-2], kernel_size, stride, dilation, is_causal)
    attn = _attn_tensor(attn, batch, q_heads, geo, v.device)
    grad_attn = _slot_dot(grad_out, v, None, geo, 1.0, 0.0, attn.dtype)
    grad_v = _slot_scatter(attn, grad_out, geo, 1.0, v.shape[-2], v.dtype)
    return grad_attn, grad_v


# ----------------------------------------------------------------------------------------------
# Every specialization the launch functions can produce, for compile_check.
# ----------------------------------------------------------------------------------------------


def _aligned_int_args(kernel) -> List[str]:
    """head_dim and every tensor stride: 16-divisible after _kernel_operands (padded axes: 0)."""
    return [name for name in kernel.arg_names
            if name == "head_dim" or (name.split("_")[-1][:1] == "s" and name.split("_")[-1][1:] in
                                      ("b", "0", "1", "2", "h"))]


def _float_signature(kernel, pointer_dtypes, constexprs):
    signature = _signature(kernel, pointer_dtypes, constexprs)
    if "invalid_value" in signature:
        signature["invalid_value"] = "fp32"
    return signature


def COMPILE_CONFIGS() -> List[CompileConfig]:
    """Every (kernel, dtype, BLOCK_D, HAS_RPB, tile) the launch functions use; pointers 16-byte
    aligned, head_dim and strides 16-divisible (as _kernel_operands guarantees)."""
    configs = []

    def add(kernel, label, pointer_dtypes, constexprs, num_warps, num_stages):
        attrs = {name: _ALIGNED for name in pointer_dtypes}
        attrs.update({name: _ALIGNED for name in _aligned_int_args(kernel)})
        configs.append(CompileConfig(
            kernel=kernel, signature=_float_signature(kernel, pointer_dtypes, constexprs), constexprs=constexprs,
            label=label, options={"num_warps": num_warps, "num_stages": num_stages}, attrs=attrs))

    fused = [
        ("fwd", _na_fwd_kernel, ("q_ptr", "k_ptr", "v_ptr", "rpb_ptr", "out_ptr"), ("lse_ptr",)),
        ("bwd_dq", _na_bwd_dq_kernel, ("q_ptr", "k_ptr", "v_ptr", "rpb_ptr", "out_ptr", "do_ptr", "dq_ptr"),
         ("lse_ptr", "delta_ptr", "drpb_ptr")),
        ("bwd_dkdv", _na_bwd_dkdv_kernel, ("q_ptr", "k_ptr", "v_ptr", "rpb_ptr", "do_ptr", "dk_ptr", "dv_ptr"),
         ("lse_ptr", "delta_ptr")),
    ]
    for dtype, dtype_name in _DTYPE_NAMES.items():
        for block_d in _BLOCK_DS:
            for name, kernel, data_ptrs, fp32_ptrs in fused:
                pointer_dtypes = {**{p: dtype_name for p in data_ptrs}, **{p: "fp32" for p in fp32_ptrs}}
                for has_rpb in (False, True):
                    tile = _tile(name, dtype, block_d, has_rpb)
                    constexprs = {"HAS_RPB": has_rpb, "DOT_PRECISION": _fused_precision(name, dtype, block_d),
                                  "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_D": block_d}
                    label = f"na/{name}/{dtype_name}/d{block_d}/m{tile.block_m}n{tile.block_n}" + \
                        ("/rpb" if has_rpb else "")
                    add(kernel, label, pointer_dtypes, constexprs, tile.num_warps, tile.num_stages)
            block_t = _SLOT_BLOCK_T[block_d]
            # The unfused ops take attn in any supported dtype; the menu lists attn in the data dtype.
            for has_rpb in (False, True):
                add(_na_slot_dot_kernel, f"na/slot_dot/{dtype_name}/d{block_d}/t{block_t}" + ("/rpb" if has_rpb else ""),
                    {"x_ptr": dtype_name, "y_ptr": dtype_name, "rpb_ptr": dtype_name, "attn_ptr": dtype_name},
                    {"HAS_RPB": has_rpb, "BLOCK_T": block_t, "BLOCK_D": block_d}, _SLOT_WARPS, 1)
                add(_na_slot_sum_kernel, f"na/slot_sum/{dtype_name}/d{block_d}/t{block_t}" + ("/rpb" if has_rpb else ""),
                    {"attn_ptr": dtype_name, "y_ptr": dtype_name, "out_ptr": dtype_name,
                     "drpb_ptr": "fp32" if has_rpb else dtype_name},
                    {"HAS_RPB": has_rpb, "BLOCK_T": block_t, "BLOCK_D": block_d}, _SLOT_WARPS, 1)
            add(_na_slot_scatter_kernel, f"na/slot_scatter/{dtype_name}/d{block_d}/t{block_t}",
                {"attn_ptr": dtype_name, "x_ptr": dtype_name, "out_ptr": dtype_name},
                {"BLOCK_T": block_t, "BLOCK_D": block_d}, _SLOT_WARPS, 1)
    return configs
