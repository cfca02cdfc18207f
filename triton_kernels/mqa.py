"""Multi-query / grouped-query attention in Triton: forward, backward, and KV-cache decoding.

Semantics (DESIGN.md 5.2): q [B, Lq, Hq, D] (or packed [Tq, Hq, D] with cu_seqlens), k/v with
Hkv = Hq / group heads; query head h reads KV head h // group; key j is allowed for query i iff
rel = j - (i + Lk - Lq) lies in [-window_left, window_right] (causal: window_right = 0; a
negative side is unbounded). A row with no allowed key gets out 0 and lse -inf. The launch
functions assert what they rely on; the Python layer validates arguments (cu_seqlens values
are trusted: they are never read on the host).

Kernels:
- forward: one program per (query tile, query head, sequence), flash-attention style online
  softmax in the log2 domain; only the key tiles inside the causal / window band are visited.
- backward: the dQ kernel (per query tile and head) also writes delta = rowsum(dO * O), which
  the dK/dV kernel (per key tile and KV head) then reads while it loops over the group's query
  heads and the query tiles that see its keys: dK/dV are summed over the group in registers,
  with no expanded buffer and no atomics.
- decode: the query rows (new tokens x query heads) that share a KV head are packed into the M
  dimension of one tile (16 or 64 rows; more rows take several tiles), so each K/V tile of the
  cache is read once for all of them; the cache is split along its length into num_splits
  chunks, each writing fp32 partial out and lse that a combine kernel merges by log-sum-exp.
  New K/V rows are appended by a small kernel first.

Layouts: q/k/v/grad_out/out are read in place (any strides, e.g. head slices of a packed
projection) when head_dim, their strides and pointers are multiples of 16; otherwise the
launchers copy them zero-padded to a head dim that is a multiple of 16 (zero columns change no
score) and cut the outputs back. So the attention kernels always load 16-byte vectors. The decode
kernel reads the caches in place either way and has a smaller-tile menu for unaligned caches.

Numerics: fp16 / bf16 products run on tensor cores with fp32 accumulation (P and dS are rounded
to the input dtype before their products, as in flash-attention). fp32 inputs use
input_precision="tf32x3" (three TF32 products per dot, about fp32 accuracy) rather than plain
TF32, whose 10-bit mantissa would miss 1e-4 tolerances. fp64 is not supported here.
tf32x3 keeps split copies of the operands in registers: with fp32 at BLOCK_D = 256 the backward
kernels and the decode kernel do not fit the register file and spill (compile_check lists them).

Indexing: per-program bases (batch, sequence start, head, tile start) are int64 scalars; offsets
inside a tile are int32 (the launchers assert row and head strides times 256 fit).

Head dims 1..256: BLOCK_D = the next power of two >= max(D, 16), masked to D. Fastest: D = 64
and 128 in fp16 / bf16 (full tiles, BLOCK_M = 128); D = 16, 32 and 256 also run unmasked; other
D compute with their padding (D = 96 as 128) and, if not a multiple of 16, pay a padded copy.
"""

import functools
import math
import re
from typing import Dict, List, NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from . import CompileConfig

# Scores run in the log2 domain (exp2 is the native instruction); lse is stored as a natural log.
_LOG2E = tl.constexpr(math.log2(math.e))
# Window sides are clamped to the largest |j - query position| a launch can meet (the sum of the
# maximal lengths) so that band arithmetic stays in int32; lengths must keep that sum below this.
_MAX_REACH = 2**30
_INT32_MAX = 2**31 - 1
_GRID_YZ_MAX = 65535  # CUDA limit of grid dimensions 1 and 2
_INTERPRETER_SM_COUNT = 8  # "device size" that num_splits=0 assumes under the interpreter

# Sizes, lengths, windows and lse strides gain nothing from the JIT's divisible-by-16 /
# equal-to-1 specializations and would multiply recompilations; tensor strides and head_dim keep
# them, since D % 16 == 0 with 16-aligned strides is what lets the row loads use 16-byte vectors.
# (A stride or head_dim equal to 1, as with D = 1, still makes the JIT specialize on it.)
_SIZE_ARGS = ["seqlen_q", "seqlen_k", "is_varlen", "group", "window_left", "window_right", "lse_sb", "lse_sl"]
_DECODE_SIZE_ARGS = ["n_query", "cache_len", "appended", "group", "num_q_heads", "num_splits",
                     "m_chunks", "split_len", "window_left", "window_right"]


# ----------------------------------------------------------------------------------------------
# Shared device helpers.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sequence_span(cu_seqlens_ptr, b, dense_len, is_varlen):
    """(first row, length) of sequence b: from cu_seqlens when packed, else (0, dense_len)."""
    first = b * 0
    length = dense_len + b * 0
    if is_varlen != 0:
        first = tl.load(cu_seqlens_ptr + b)
        length = tl.load(cu_seqlens_ptr + b + 1) - first
    return first, length


@triton.jit
def _band_mask(key_idx, key_len, query_pos, window_left, window_right):
    """[rows, keys] allowed-mask for query positions (rows, already shifted by Lk - Lq) and keys."""
    rel = key_idx[None, :] - query_pos[:, None]
    return (key_idx < key_len)[None, :] & (rel >= -window_left) & (rel <= window_right)


@triton.jit
def _online_softmax_tile(acc, m_i, l_i, q, k, v, allowed, qk_scale_log2, DOT_PRECISION: tl.constexpr):
    """One key tile of the flash-attention recurrence in the log2 domain. Rows that have met no
    allowed key yet keep m = -inf; exponents then use 0 as the shift, so nothing turns NaN."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = tl.where(allowed, s * qk_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _finish_rows(acc, m_i, l_i):
    """(out, natural-log lse) of the recurrence; rows with no allowed key give (0, -inf)."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / _LOG2E, float("-inf"))
    return out, lse


# ----------------------------------------------------------------------------------------------
# Forward: one program = one (query tile, query head, sequence).
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _mqa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    q_sb, q_sl, q_sh,
    k_sb, k_sl, k_sh,
    v_sb, v_sl, v_sh,
    o_sb, o_sl, o_sh,
    lse_sb, lse_sl,  # lse is [.., Hq] with unit head stride
    seqlen_q, seqlen_k, is_varlen, group, head_dim,
    qk_scale_log2, window_left, window_right,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Longest (most keys under a causal band) tiles first: they start before the short ones.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_first, q_len = _sequence_span(cu_q_ptr, b, seqlen_q, is_varlen)
    k_first, k_len = _sequence_span(cu_k_ptr, b, seqlen_k, is_varlen)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kvh = h // group
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    rows = m0 + offs_m
    row_ok = rows < q_len
    shift = k_len - q_len  # bottom-right alignment: query i sits at key position i + shift

    q_tile = (q_ptr + b64 * q_sb + (q_first + m0).to(tl.int64) * q_sl + h.to(tl.int64) * q_sh
              + (offs_m[:, None] * q_sl + offs_d[None, :]))
    q = tl.load(q_tile, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_rows = k_ptr + b64 * k_sb + k_first.to(tl.int64) * k_sl + kvh.to(tl.int64) * k_sh
    v_rows = v_ptr + b64 * v_sb + k_first.to(tl.int64) * v_sl + kvh.to(tl.int64) * v_sh
    k_offs = offs_n[:, None] * k_sl + offs_d[None, :]
    v_offs = offs_n[:, None] * v_sl + offs_d[None, :]

    # Keys any row of this tile may see: the band of its first and last rows, within [0, k_len).
    last_row = tl.minimum(m0 + BLOCK_M, q_len) - 1
    key_lo = tl.maximum(m0 + shift - window_left, 0)
    key_hi = tl.minimum(last_row + shift + window_right + 1, k_len)
    query_pos = rows + shift

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key_start = (key_lo // BLOCK_N) * BLOCK_N
    k_tile_base = k_rows + key_start.to(tl.int64) * k_sl
    v_tile_base = v_rows + key_start.to(tl.int64) * v_sl
    for n0 in range(key_start, key_hi, BLOCK_N):
        keys = n0 + offs_n
        kv_mask = (keys < k_len)[:, None] & d_ok[None, :]
        k = tl.load(k_tile_base + k_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_tile_base + v_offs, mask=kv_mask, other=0.0)
        allowed = _band_mask(keys, k_len, query_pos, window_left, window_right)
        acc, m_i, l_i = _online_softmax_tile(acc, m_i, l_i, q, k, v, allowed, qk_scale_log2, DOT_PRECISION)
        k_tile_base += BLOCK_N * k_sl
        v_tile_base += BLOCK_N * v_sl

    out, lse = _finish_rows(acc, m_i, l_i)
    o_tile = (out_ptr + b64 * o_sb + (q_first + m0).to(tl.int64) * o_sl + h.to(tl.int64) * o_sh
              + (offs_m[:, None] * o_sl + offs_d[None, :]))
    tl.store(o_tile, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse_rows = lse_ptr + b64 * lse_sb + (q_first + m0).to(tl.int64) * lse_sl + h
    tl.store(lse_rows + offs_m * lse_sl, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward. dQ kernel: one program = one (query tile, query head, sequence); it also writes
# delta = rowsum(dO * O) for its rows, which the dK/dV kernel launched after it reads.
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _mqa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
    q_sb, q_sl, q_sh,
    k_sb, k_sl, k_sh,
    v_sb, v_sl, v_sh,
    o_sb, o_sl, o_sh,
    do_sb, do_sl, do_sh,
    dq_sb, dq_sl, dq_sh,
    lse_sb, lse_sl,  # lse and delta: [.., Hq] with unit head stride
    seqlen_q, seqlen_k, is_varlen, group, head_dim,
    scale, qk_scale_log2, window_left, window_right,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_first, q_len = _sequence_span(cu_q_ptr, b, seqlen_q, is_varlen)
    k_first, k_len = _sequence_span(cu_k_ptr, b, seqlen_k, is_varlen)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kvh = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row0 = (q_first + m0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    rows = m0 + offs_m
    row_ok = rows < q_len
    tile_mask = row_ok[:, None] & d_ok[None, :]
    shift = k_len - q_len

    q = tl.load(q_ptr + b64 * q_sb + row0 * q_sl + h64 * q_sh + (offs_m[:, None] * q_sl + offs_d[None, :]),
                mask=tile_mask, other=0.0)
    do = tl.load(do_ptr + b64 * do_sb + row0 * do_sl + h64 * do_sh + (offs_m[:, None] * do_sl + offs_d[None, :]),
                 mask=tile_mask, other=0.0)
    o = tl.load(out_ptr + b64 * o_sb + row0 * o_sl + h64 * o_sh + (offs_m[:, None] * o_sl + offs_d[None, :]),
                mask=tile_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_rows = b64 * lse_sb + row0 * lse_sl + h64 + offs_m * lse_sl
    tl.store(delta_ptr + lse_rows, delta, mask=row_ok)
    lse_log2 = tl.load(lse_ptr + lse_rows, mask=row_ok, other=0.0) * _LOG2E

    k_rows = k_ptr + b64 * k_sb + k_first.to(tl.int64) * k_sl + kvh.to(tl.int64) * k_sh
    v_rows = v_ptr + b64 * v_sb + k_first.to(tl.int64) * v_sl + kvh.to(tl.int64) * v_sh
    k_offs = offs_n[:, None] * k_sl + offs_d[None, :]
    v_offs = offs_n[:, None] * v_sl + offs_d[None, :]
    last_row = tl.minimum(m0 + BLOCK_M, q_len) - 1
    key_lo = tl.maximum(m0 + shift - window_left, 0)
    key_hi = tl.minimum(last_row + shift + window_right + 1, k_len)
    query_pos = rows + shift

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key_start = (key_lo // BLOCK_N) * BLOCK_N
    k_tile_base = k_rows + key_start.to(tl.int64) * k_sl
    v_tile_base = v_rows + key_start.to(tl.int64) * v_sl
    for n0 in range(key_start, key_hi, BLOCK_N):
        keys = n0 + offs_n
        kv_mask = (keys < k_len)[:, None] & d_ok[None, :]
        k = tl.load(k_tile_base + k_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_tile_base + v_offs, mask=kv_mask, other=0.0)
        k_tile_base += BLOCK_N * k_sl
        v_tile_base += BLOCK_N * v_sl
        allowed = _band_mask(keys, k_len, query_pos, window_left, window_right) & row_ok[:, None]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # Rows with lse = -inf have no allowed key: the where() keeps their inf out.
        p = tl.where(allowed, tl.exp2(s * qk_scale_log2 - lse_log2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq_tile = dq_ptr + b64 * dq_sb + row0 * dq_sl + h64 * dq_sh + (offs_m[:, None] * dq_sl + offs_d[None, :])
    tl.store(dq_tile, (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile_mask)


# dK/dV kernel: one program = one (key tile, KV head, sequence); the group's query heads and the
# query tiles that can see the key tile are looped over, so dK/dV accumulate in registers.
@triton.jit(do_not_specialize=_SIZE_ARGS)
def _mqa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
    q_sb, q_sl, q_sh,
    k_sb, k_sl, k_sh,
    v_sb, v_sl, v_sh,
    do_sb, do_sl, do_sh,
    dk_sb, dk_sl, dk_sh,
    dv_sb, dv_sl, dv_sh,
    lse_sb, lse_sl,  # lse and delta: [.., Hq] with unit head stride
    seqlen_q, seqlen_k, is_varlen, group, head_dim,
    scale, qk_scale_log2, window_left, window_right,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_first, q_len = _sequence_span(cu_q_ptr, b, seqlen_q, is_varlen)
    k_first, k_len = _sequence_span(cu_k_ptr, b, seqlen_k, is_varlen)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    key0 = (k_first + n0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    keys = n0 + offs_n
    key_ok = keys < k_len
    kv_mask = key_ok[:, None] & d_ok[None, :]
    shift = k_len - q_len

    k = tl.load(k_ptr + b64 * k_sb + key0 * k_sl + kvh64 * k_sh + (offs_n[:, None] * k_sl + offs_d[None, :]),
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b64 * v_sb + key0 * v_sl + kvh64 * v_sh + (offs_n[:, None] * v_sl + offs_d[None, :]),
                mask=kv_mask, other=0.0)

    # Query rows that may see some key of this tile: i + shift in [key - window_right, key + window_left].
    last_key = tl.minimum(n0 + BLOCK_N, k_len) - 1
    row_lo = tl.maximum(n0 - shift - window_right, 0)
    row_hi = tl.minimum(last_key - shift + window_left + 1, q_len)
    m_start = (row_lo // BLOCK_M) * BLOCK_M
    q_offs = offs_m[:, None] * q_sl + offs_d[None, :]
    do_offs = offs_m[:, None] * do_sl + offs_d[None, :]

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for r in range(0, group):
        h64 = (kvh * group + r).to(tl.int64)
        q_rows = q_ptr + b64 * q_sb + q_first.to(tl.int64) * q_sl + h64 * q_sh
        do_rows = do_ptr + b64 * do_sb + q_first.to(tl.int64) * do_sl + h64 * do_sh
        lse_rows = b64 * lse_sb + q_first.to(tl.int64) * lse_sl + h64
        q_tile_base = q_rows + m_start.to(tl.int64) * q_sl
        do_tile_base = do_rows + m_start.to(tl.int64) * do_sl
        lse_at = lse_rows + m_start.to(tl.int64) * lse_sl + offs_m * lse_sl
        for m0 in range(m_start, row_hi, BLOCK_M):
            rows = m0 + offs_m
            row_ok = rows < q_len
            tile_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_tile_base + q_offs, mask=tile_mask, other=0.0)
            do = tl.load(do_tile_base + do_offs, mask=tile_mask, other=0.0)
            lse_log2 = tl.load(lse_ptr + lse_at, mask=row_ok, other=0.0) * _LOG2E
            delta = tl.load(delta_ptr + lse_at, mask=row_ok, other=0.0)
            q_tile_base += BLOCK_M * q_sl
            do_tile_base += BLOCK_M * do_sl
            lse_at += BLOCK_M * lse_sl
            # Transposed scores [keys, rows], so dV and dK come out of the dots unpermuted.
            rel_t = keys[:, None] - (rows + shift)[None, :]
            allowed_t = (key_ok[:, None] & row_ok[None, :] & (rel_t >= -window_left) & (rel_t <= window_right))
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            p_t = tl.where(allowed_t, tl.exp2(s_t * qk_scale_log2 - lse_log2[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk_tile = dk_ptr + b64 * dk_sb + key0 * dk_sl + kvh64 * dk_sh + (offs_n[:, None] * dk_sl + offs_d[None, :])
    dv_tile = dv_ptr + b64 * dv_sb + key0 * dv_sl + kvh64 * dv_sh + (offs_n[:, None] * dv_sl + offs_d[None, :])
    tl.store(dk_tile, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_tile, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Decode.
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_new", "num_kv_heads", "cache_len", "head_dim",
                               "kn_sb", "kn_st", "kn_sh", "vn_sb", "vn_st", "vn_sh",
                               "kc_sb", "kc_sl", "kc_sh", "vc_sb", "vc_sl", "vc_sh"])
def _kv_append_kernel(
    k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, seqlens_ptr,
    kn_sb, kn_st, kn_sh,
    vn_sb, vn_st, vn_sh,
    kc_sb, kc_sl, kc_sh,
    vc_sb, vc_sl, vc_sh,
    n_new, num_kv_heads, cache_len, head_dim,
    BLOCK_D: tl.constexpr,
):
    # One program = one new (token, KV head) row of one sequence; rows past the cache are dropped.
    pid = tl.program_id(0)
    t = pid // num_kv_heads
    kvh = (pid % num_kv_heads).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pos = tl.load(seqlens_ptr + b) + t
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    store_ok = d_ok & (pos >= 0) & (pos < cache_len)
    pos64 = pos.to(tl.int64)
    t64 = t.to(tl.int64)
    k_row = tl.load(k_new_ptr + b * kn_sb + t64 * kn_st + kvh * kn_sh + offs_d, mask=d_ok)
    v_row = tl.load(v_new_ptr + b * vn_sb + t64 * vn_st + kvh * vn_sh + offs_d, mask=d_ok)
    tl.store(k_cache_ptr + b * kc_sb + pos64 * kc_sl + kvh * kc_sh + offs_d, k_row, mask=store_ok)
    tl.store(v_cache_ptr + b * vc_sb + pos64 * vc_sl + kvh * vc_sh + offs_d, v_row, mask=store_ok)


@triton.jit(do_not_specialize=_DECODE_SIZE_ARGS)
def _mqa_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seqlens_ptr, o_part_ptr, lse_part_ptr,
    q_sb, q_st, q_sh,
    kc_sb, kc_sl, kc_sh,
    vc_sb, vc_sl, vc_sh,
    n_query, cache_len, appended, group, num_q_heads, head_dim,
    num_splits, m_chunks, split_len,
    qk_scale_log2, window_left, window_right,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program = one (cache split, KV head, sequence) and BLOCK_M of the group * n_query rows
    # (row r = token r // group, query head kvh * group + r % group) that read this KV head.
    # Partial results: o_part [B, n, Hq, num_splits, D] and lse_part [B, n, Hq, num_splits], fp32.
    pid0 = tl.program_id(0)
    split = pid0 // m_chunks
    chunk = pid0 % m_chunks
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    kv_len = tl.maximum(tl.minimum(tl.load(seqlens_ptr + b) + appended, cache_len), 0)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    r = chunk * BLOCK_M + offs_m
    row_ok = r < group * n_query
    t = r // group
    h = kvh * group + r % group
    q_tile = q_ptr + b64 * q_sb + (t.to(tl.int64)[:, None] * q_st + h[:, None] * q_sh + offs_d[None, :])
    q = tl.load(q_tile, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    query_pos = kv_len - n_query + t
    first_t = (chunk * BLOCK_M) // group
    last_t = (tl.minimum((chunk + 1) * BLOCK_M, group * n_query) - 1) // group
    split_lo = split * split_len
    split_hi = tl.minimum(split_lo + split_len, kv_len)
    key_lo = tl.maximum(split_lo, kv_len - n_query + first_t - window_left)
    key_hi = tl.minimum(split_hi, kv_len - n_query + last_t + window_right + 1)

    k_rows = k_cache_ptr + b64 * kc_sb + kvh.to(tl.int64) * kc_sh
    v_rows = v_cache_ptr + b64 * vc_sb + kvh.to(tl.int64) * vc_sh
    k_offs = offs_n[:, None] * kc_sl + offs_d[None, :]
    v_offs = offs_n[:, None] * vc_sl + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # split_lo is a multiple of BLOCK_N, so the rounded-down start stays inside the split.
    key_start = (key_lo // BLOCK_N) * BLOCK_N
    k_tile_base = k_rows + key_start.to(tl.int64) * kc_sl
    v_tile_base = v_rows + key_start.to(tl.int64) * vc_sl
    for n0 in range(key_start, key_hi, BLOCK_N):
        keys = n0 + offs_n
        kv_mask = (keys < split_hi)[:, None] & d_ok[None, :]
        k = tl.load(k_tile_base + k_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_tile_base + v_offs, mask=kv_mask, other=0.0)
        allowed = _band_mask(keys, split_hi, query_pos, window_left, window_right)
        acc, m_i, l_i = _online_softmax_tile(acc, m_i, l_i, q, k, v, allowed, qk_scale_log2, DOT_PRECISION)
        k_tile_base += BLOCK_N * kc_sl
        v_tile_base += BLOCK_N * vc_sl

    out, lse = _finish_rows(acc, m_i, l_i)
    part_row = ((b64 * n_query + t) * num_q_heads + h) * num_splits + split  # [BLOCK_M] int64
    tl.store(o_part_ptr + (part_row[:, None] * head_dim + offs_d[None, :]), out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_part_ptr + part_row, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits", "head_dim"])
def _mqa_decode_combine_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    num_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program = one output row (b, t, h): out = sum_s exp(lse_s - lse) * out_s.
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    lse_row = lse_part_ptr + row * num_splits
    o_row = o_part_ptr + row * num_splits * head_dim

    m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        lse_s = tl.load(lse_row + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse_s)
    m = tl.max(m_vec, 0)
    shift = tl.where(m == float("-inf"), 0.0, m)

    weight_sum = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        lse_s = tl.load(lse_row + s0 + offs_s, mask=s_ok, other=float("-inf"))
        w = tl.exp(lse_s - shift)
        o_s = tl.load(o_row + ((s0 + offs_s)[:, None] * head_dim + offs_d[None, :]),
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        weight_sum += w
        acc += w[:, None] * o_s
    total = tl.sum(weight_sum, 0)
    seen = total > 0.0
    out = tl.sum(acc, 0) / tl.where(seen, total, 1.0)
    lse = tl.where(seen, shift + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(out_ptr + row * head_dim + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + row, lse)


# ----------------------------------------------------------------------------------------------
# Launch settings: one tile per (kernel, dtype class, BLOCK_D). COMPILE_CONFIGS lists the same menu.
# ----------------------------------------------------------------------------------------------


class _Tile(NamedTuple):
    block_m: int  # query rows (decode: packed group * token rows)
    block_n: int  # keys
    num_warps: int
    num_stages: int


_BLOCK_DS = (16, 32, 64, 128, 256)


def _menu(spec: Dict[int, Tuple[int, int, int, int]]) -> Dict[int, _Tile]:
    return {block_d: _Tile(*tile) for block_d, tile in spec.items()}


# (kernel, "half" (fp16/bf16) or "fp32") -> BLOCK_D -> (BLOCK_M, BLOCK_N, warps, stages), chosen
# with compile_check to stay within 255 registers without spilling on sm_80 and sm_90 (fp32 at
# BLOCK_D = 256 excepted, see the module docstring).
# The attention kernels always see 16-aligned operands (the launchers pad the others), so their
# tiles load in 16-byte vectors. The decode kernel reads the caches in place, so it also has a
# menu for caches whose head_dim or strides are not multiples of 16 ("decode_unaligned"): loads go
# element by element there and cost registers for addresses, hence the smaller tiles.
# Decode: BLOCK_M is the packed-row tile for group * n_query > 16 rows; up to 16 rows use 16.
# Tiles keep BLOCK_M >= BLOCK_D where they can: Triton then spreads the warps over the rows of
# both products, not over their columns (which would give every warp the whole Q tile).
_TILES: Dict[Tuple[str, str], Dict[int, _Tile]] = {
    ("fwd", "half"): _menu({16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 8, 3),
                            128: (128, 64, 8, 2), 256: (64, 32, 8, 2)}),
    ("fwd", "fp32"): _menu({16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (32, 32, 4, 2),
                            128: (32, 32, 4, 2), 256: (16, 32, 8, 1)}),
    ("bwd_dq", "half"): _menu({16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
                               128: (64, 64, 8, 2), 256: (64, 32, 8, 2)}),
    ("bwd_dq", "fp32"): _menu({16: (32, 32, 4, 2), 32: (32, 16, 4, 2), 64: (32, 16, 4, 2),
                               128: (16, 32, 8, 2), 256: (16, 16, 8, 1)}),
    ("bwd_dkdv", "half"): _menu({16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (32, 64, 4, 2),
                                 128: (32, 64, 8, 2), 256: (32, 32, 8, 2)}),
    ("bwd_dkdv", "fp32"): _menu({16: (32, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2),
                                 128: (16, 16, 4, 2), 256: (16, 16, 8, 1)}),
    ("decode", "half"): _menu({16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3),
                               128: (64, 32, 4, 2), 256: (16, 32, 4, 2)}),
    ("decode", "fp32"): _menu({16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 16, 4, 2),
                               128: (16, 16, 4, 2), 256: (16, 16, 8, 1)}),
    ("decode_unaligned", "half"): _menu({16: (16, 32, 4, 1), 32: (16, 32, 4, 1), 64: (16, 32, 4, 1),
                                         128: (16, 16, 4, 2), 256: (16, 16, 4, 2)}),
    ("decode_unaligned", "fp32"): _menu({16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 16, 4, 2),
                                         128: (16, 16, 8, 1), 256: (16, 16, 8, 1)}),
}
_DECODE_SMALL_BLOCK_M = 16
_COMBINE_BLOCK_S = 8
_COMBINE_WARPS = 2
_APPEND_WARPS = 1
_MAX_DECODE_SPLITS = 128

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32x3 keeps fp32 inputs at about fp32 accuracy on tensor cores; for fp16/bf16 it is unused.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _tile(kernel: str, dtype: torch.dtype, block_d: int) -> _Tile:
    return _TILES[(kernel, _dtype_class(dtype))][block_d]


def _aligned(head_dim: int, *tensors: torch.Tensor) -> bool:
    """Whether the JIT will see head_dim, every stride and every pointer 16-divisible (and unit
    last strides): the specialization whose row loads use 16-byte vectors. Pointers are judged
    by their offset into the storage (torch allocations are 16-byte aligned), which also works
    on the fake tensors torch.compile traces with."""
    return head_dim % 16 == 0 and all(
        t.stride(-1) == 1 and t.storage_offset() * t.element_size() % 16 == 0
        and all(stride % 16 == 0 for stride in t.stride()[:-1])
        for t in tensors)


def _kernel_operands(head_dim: int, *tensors: torch.Tensor) -> Tuple[int, List[torch.Tensor]]:
    """(head_dim, tensors) as the attention kernels take them: the tensors themselves when they
    are aligned (strided views are read in place), else contiguous copies zero-padded to a head
    dim that is a multiple of 16. Zero columns add nothing to a score and give zero output and
    gradient columns, which the launchers cut off again."""
    if _aligned(head_dim, *tensors):
        return head_dim, list(tensors)
    padded = triton.cdiv(head_dim, 16) * 16
    copies = []
    for t in tensors:
        copy = t.new_zeros(t.shape[:-1] + (padded,))
        copy[..., :head_dim] = t
        copies.append(copy)
    return padded, copies


def _unpadded(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t if t.shape[-1] == head_dim else t[..., :head_dim].contiguous()


def _check_inputs(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    if dtype == torch.float64:
        raise TypeError("mqa (triton): float64 is not supported by the Triton kernels; use the cpu or cuda backend")
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"mqa (triton): unsupported dtype {dtype}; expected float16, bfloat16 or float32")
    for t in tensors[1:]:
        assert t.dtype == dtype, f"mqa (triton): dtype mismatch {t.dtype} vs {dtype}"
        assert t.device == tensors[0].device, "mqa (triton): tensors on different devices"
    head_dim = tensors[0].shape[-1]
    if not 1 <= head_dim <= 256:
        raise ValueError(f"mqa (triton): head dim {head_dim} outside 1..256")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t: torch.Tensor, varlen: bool) -> Tuple[int, int, int]:
    """(batch, sequence, head) element strides; packed tensors have no batch dimension (stride 0)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> Tuple[int, int]:
    """(batch, sequence) strides of a contiguous lse [B, Lq, Hq] / [Tq, Hq] (head stride 1)."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _assert_tile_offsets(t: torch.Tensor, varlen: bool) -> None:
    # Offsets inside a tile (<= 256 rows or heads) are int32.
    _, row_stride, head_stride = _strides(t, varlen)
    assert max(abs(row_stride), abs(head_stride)) * 256 <= _INT32_MAX, "mqa (triton): strides too large"


def _clamped_windows(causal: bool, window_left: int, window_right: int, reach: int) -> Tuple[int, int]:
    """Window sides as the kernels take them: non-negative, unbounded -> reach (>= any |rel|),
    causal folded into the right side (j <= i + shift is window_right = 0)."""
    assert reach < _MAX_REACH, "mqa (triton): sequence lengths too large"
    left = reach if window_left < 0 else min(window_left, reach)
    right = reach if window_right < 0 else min(window_right, reach)
    if causal:
        right = 0
    return left, right


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


class _Problem(NamedTuple):
    """Geometry shared by the forward and backward launchers."""

    varlen: bool
    batch: int
    seqlen_q: int  # dense Lq, or max_seqlen_q when packed (sizes the grid)
    seqlen_k: int
    q_heads: int
    kv_heads: int
    head_dim: int
    cu_q: torch.Tensor  # int32; a 1-element placeholder when dense (never read then)
    cu_k: torch.Tensor
    window_left: int
    window_right: int


def _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left,
             window_right) -> _Problem:
    varlen = cu_seqlens_q is not None
    assert (cu_seqlens_k is not None) == varlen, "mqa (triton): give both cu_seqlens or neither"
    if varlen:
        assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert cu_seqlens_q.dim() == 1 and cu_seqlens_q.shape == cu_seqlens_k.shape and cu_seqlens_q.numel() >= 1
        assert cu_seqlens_q.device == q.device and cu_seqlens_k.device == q.device
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        assert seqlen_q >= 0 and seqlen_k >= 0
        cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    else:
        assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and k.shape[0] == q.shape[0]
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        cu_q = cu_k = torch.empty(1, dtype=torch.int32, device=q.device)
    q_heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    assert k.shape == v.shape and k.shape[-1] == head_dim, "mqa (triton): k/v shape mismatch"
    assert kv_heads >= 1 and q_heads % kv_heads == 0, "mqa (triton): Hq must be a multiple of Hkv"
    assert batch <= _GRID_YZ_MAX and q_heads <= _GRID_YZ_MAX, "mqa (triton): batch or heads exceed the grid"
    left, right = _clamped_windows(causal, window_left, window_right, seqlen_q + seqlen_k)
    return _Problem(varlen, batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, cu_q, cu_k, left, right)


def _new_rows_like(t: torch.Tensor, varlen: bool) -> torch.Tensor:
    """Contiguous output like t. Packed tensors may hold rows outside every sequence, which no
    program writes: those are zeroed (their lse is -inf: they see no key)."""
    if varlen:
        return torch.zeros_like(t, memory_format=torch.contiguous_format)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# Launch functions.
# ----------------------------------------------------------------------------------------------


def mqa_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                window_left, window_right) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse float32 of shape q.shape[:-1]) of GQA/MQA attention."""
    _check_inputs(q, k, v)
    pb = _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left,
                  window_right)
    head_dim, (q, k, v) = _kernel_operands(pb.head_dim, q, k, v)
    out = _new_rows_like(q, pb.varlen)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device) if pb.varlen else \
        torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    tile = _tile("fwd", q.dtype, block_d)
    grid = (triton.cdiv(pb.seqlen_q, tile.block_m), pb.q_heads, pb.batch)
    if out.numel() > 0 and 0 not in grid:
        for t in (q, k, v, out):
            _assert_tile_offsets(t, pb.varlen)
        _launch(_mqa_fwd_kernel, grid,
                q, k, v, out, lse, pb.cu_q, pb.cu_k,
                *_strides(q, pb.varlen), *_strides(k, pb.varlen), *_strides(v, pb.varlen),
                *_strides(out, pb.varlen), *_lse_strides(lse, pb.varlen),
                pb.seqlen_q, pb.seqlen_k, int(pb.varlen), pb.q_heads // pb.kv_heads, head_dim,
                float(scale) * _LOG2E.value, pb.window_left, pb.window_right,
                DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                BLOCK_D=block_d, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return _unpadded(out, pb.head_dim), lse


def mqa_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                 causal, window_left, window_right) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q like q, grad_k like k, grad_v like v), contiguous, in the input dtype."""
    _check_inputs(q, k, v, grad_out, out)
    assert grad_out.shape == q.shape and out.shape == q.shape, "mqa (triton): grad_out/out shape mismatch"
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32 and lse.device == q.device
    lse = lse.contiguous()
    pb = _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left,
                  window_right)
    head_dim, (q, k, v, grad_out, out) = _kernel_operands(pb.head_dim, q, k, v, grad_out, out)
    grad_q = _new_rows_like(q, pb.varlen)
    grad_k = _new_rows_like(k, pb.varlen)
    grad_v = _new_rows_like(v, pb.varlen)
    if q.numel() == 0 or k.numel() == 0:  # no query sees a key: zero gradients
        return tuple(_unpadded(g.zero_(), pb.head_dim) for g in (grad_q, grad_k, grad_v))
    for t in (q, k, v, grad_out, out, grad_q, grad_k, grad_v):
        _assert_tile_offsets(t, pb.varlen)
    delta = torch.empty_like(lse)
    lse_strides = _lse_strides(lse, pb.varlen)
    block_d = _block_d(head_dim)
    sizes = (pb.seqlen_q, pb.seqlen_k, int(pb.varlen), pb.q_heads // pb.kv_heads, head_dim,
             float(scale), float(scale) * _LOG2E.value, pb.window_left, pb.window_right)
    precision = _dot_precision(q.dtype)

    # dQ first: it writes delta, which the dK/dV kernel reads.
    tile = _tile("bwd_dq", q.dtype, block_d)
    grid = (triton.cdiv(pb.seqlen_q, tile.block_m), pb.q_heads, pb.batch)
    if 0 not in grid:
        _launch(_mqa_bwd_dq_kernel, grid,
                q, k, v, out, grad_out, lse, delta, grad_q, pb.cu_q, pb.cu_k,
                *_strides(q, pb.varlen), *_strides(k, pb.varlen), *_strides(v, pb.varlen),
                *_strides(out, pb.varlen), *_strides(grad_out, pb.varlen), *_strides(grad_q, pb.varlen),
                *lse_strides, *sizes,
                DOT_PRECISION=precision, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=block_d,
                num_warps=tile.num_warps, num_stages=tile.num_stages)
    tile = _tile("bwd_dkdv", q.dtype, block_d)
    grid = (triton.cdiv(pb.seqlen_k, tile.block_n), pb.kv_heads, pb.batch)
    if 0 not in grid:
        _launch(_mqa_bwd_dkdv_kernel, grid,
                q, k, v, grad_out, lse, delta, grad_k, grad_v, pb.cu_q, pb.cu_k,
                *_strides(q, pb.varlen), *_strides(k, pb.varlen), *_strides(v, pb.varlen),
                *_strides(grad_out, pb.varlen), *_strides(grad_k, pb.varlen), *_strides(grad_v, pb.varlen),
                *lse_strides, *sizes,
                DOT_PRECISION=precision, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=block_d,
                num_warps=tile.num_warps, num_stages=tile.num_stages)
    return _unpadded(grad_q, pb.head_dim), _unpadded(grad_k, pb.head_dim), _unpadded(grad_v, pb.head_dim)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(work_items: int, kv_tiles: int, sm_count: int) -> int:
    """Split count from shapes only (never from cache_seqlens, so CUDA graphs can be captured).

    No split while the (sequence, KV head, row chunk) work items alone fill 80 % of the SMs or
    the cache is one tile. Otherwise the smallest count whose last wave is at least 85 % as full
    as the best count's, at most one split per KV tile and 128 in all."""
    if kv_tiles <= 1 or work_items >= 0.8 * sm_count:
        return 1
    candidates = range(1, min(kv_tiles, _MAX_DECODE_SPLITS) + 1)

    def wave_fill(splits: int) -> float:
        waves = work_items * splits / sm_count
        return waves / math.ceil(waves)

    best = max(wave_fill(s) for s in candidates)
    return next(s for s in candidates if wave_fill(s) >= 0.85 * best)


def mqa_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, window_left, window_right,
               num_splits) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, n, Hq, D] like q, lse [B, n, Hq] float32); appends k_new/v_new into the caches first."""
    _check_inputs(q, k_cache, v_cache)
    assert q.dim() == 4 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    batch, n_query, q_heads, head_dim = q.shape
    _, cache_len, kv_heads, _ = k_cache.shape
    assert k_cache.shape[0] == batch and k_cache.shape[3] == head_dim, "mqa (triton): cache shape mismatch"
    assert kv_heads >= 1 and q_heads % kv_heads == 0, "mqa (triton): Hq must be a multiple of Hkv"
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (batch,)
    assert cache_seqlens.device == q.device
    assert (k_new is None) == (v_new is None), "mqa (triton): give both k_new and v_new or neither"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "mqa (triton): caches need a unit last stride"
    assert batch <= _GRID_YZ_MAX and kv_heads <= _GRID_YZ_MAX
    q = _unit_last_stride(q)
    cache_seqlens = cache_seqlens.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    for t in (q, k_cache, v_cache):
        _assert_tile_offsets(t, False)
    block_d = _block_d(head_dim)
    group = q_heads // kv_heads

    appended = 0
    if k_new is not None:
        _check_inputs(q, k_new, v_new)
        assert k_new.shape == (batch, n_query, kv_heads, head_dim) and v_new.shape == k_new.shape
        k_new, v_new = _unit_last_stride(k_new), _unit_last_stride(v_new)
        appended = n_query
        _launch(_kv_append_kernel, (n_query * kv_heads, batch),
                k_new, v_new, k_cache, v_cache, cache_seqlens,
                *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
                n_query, kv_heads, cache_len, head_dim,
                BLOCK_D=block_d, num_warps=_APPEND_WARPS, num_stages=1)

    # The caches are read in place; a misaligned q (small) is copied rather than giving up vectors.
    aligned = _aligned(head_dim, k_cache, v_cache)
    if aligned and not _aligned(head_dim, q):
        q = q.clone(memory_format=torch.contiguous_format)
    tile = _tile("decode" if aligned else "decode_unaligned", q.dtype, block_d)
    rows = group * n_query
    block_m = _DECODE_SMALL_BLOCK_M if rows <= _DECODE_SMALL_BLOCK_M else tile.block_m
    m_chunks = triton.cdiv(rows, block_m)
    kv_tiles = triton.cdiv(cache_len, tile.block_n)
    if num_splits <= 0:
        num_splits = choose_num_splits(batch * kv_heads * m_chunks, kv_tiles, _device_sm_count(q.device))
    num_splits = max(1, min(int(num_splits), kv_tiles, _MAX_DECODE_SPLITS))
    split_len = triton.cdiv(max(kv_tiles, 1), num_splits) * tile.block_n
    num_splits = triton.cdiv(max(cache_len, 1), split_len)  # drop splits that would start past the cache
    left, right = _clamped_windows(causal, window_left, window_right, cache_len + n_query)

    o_part = torch.empty((batch, n_query, q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((batch, n_query, q_heads, num_splits), dtype=torch.float32, device=q.device)
    _launch(_mqa_decode_split_kernel, (num_splits * m_chunks, kv_heads, batch),
            q, k_cache, v_cache, cache_seqlens, o_part, lse_part,
            *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
            n_query, cache_len, appended, group, q_heads, head_dim,
            num_splits, m_chunks, split_len,
            float(scale) * _LOG2E.value, left, right,
            DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_D=block_d,
            num_warps=tile.num_warps, num_stages=tile.num_stages)
    _launch(_mqa_decode_combine_kernel, (batch * n_query * q_heads,),
            o_part, lse_part, out, lse, num_splits, head_dim,
            BLOCK_S=_COMBINE_BLOCK_S, BLOCK_D=block_d, num_warps=_COMBINE_WARPS, num_stages=1)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Every specialization the launch functions can produce, for compile_check.
# ----------------------------------------------------------------------------------------------

_ALIGNED = [["tt.divisibility", 16]]


def _signature(kernel, pointer_dtypes: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    """Argument name -> triton type: pointers as given, constexprs, the float scales fp32, every
    other argument i32 (the type the JIT gives sizes, strides and windows below 2**31)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_dtypes:
            signature[name] = "*" + pointer_dtypes[name]
        elif name in ("scale", "qk_scale_log2"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _specialized_int_args(kernel) -> List[str]:
    """Integer arguments of an attention kernel the JIT specializes on divisibility by 16."""
    return [name for name in kernel.arg_names if name == "head_dim" or re.fullmatch(r"[a-z]+_s[a-z]{1,2}", name)]


def COMPILE_CONFIGS() -> List[CompileConfig]:
    """Every (kernel, dtype, BLOCK_D, tile) the launch functions use. Pointers are 16-byte aligned
    (torch allocations). The attention kernels and the aligned decode menu ("/a16") compile with
    head_dim and every stride a multiple of 16, as the launchers guarantee; the unaligned decode
    menu with no divisibility known (caches with odd head dims or strides)."""
    attention = [
        # label, kernel, tile menus (aligned, unaligned), data pointers, fp32 pointers
        ("fwd", _mqa_fwd_kernel, ("fwd", None), ("q_ptr", "k_ptr", "v_ptr", "out_ptr"), ("lse_ptr",)),
        ("bwd_dq", _mqa_bwd_dq_kernel, ("bwd_dq", None),
         ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_ptr"), ("lse_ptr", "delta_ptr")),
        ("bwd_dkdv", _mqa_bwd_dkdv_kernel, ("bwd_dkdv", None),
         ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"), ("lse_ptr", "delta_ptr")),
        ("decode_split", _mqa_decode_split_kernel, ("decode", "decode_unaligned"),
         ("q_ptr", "k_cache_ptr", "v_cache_ptr"), ("o_part_ptr", "lse_part_ptr")),
    ]
    int32_pointers = ("cu_q_ptr", "cu_k_ptr", "seqlens_ptr")
    configs = []

    def add(kernel, label, pointer_dtypes, constexprs, num_warps, num_stages, aligned_ints):
        pointer_dtypes = {name: t for name, t in pointer_dtypes.items() if name in kernel.arg_names}
        attrs = {name: _ALIGNED for name in pointer_dtypes}
        attrs.update({name: _ALIGNED for name in aligned_ints})
        configs.append(CompileConfig(
            kernel=kernel, signature=_signature(kernel, pointer_dtypes, constexprs), constexprs=constexprs,
            label=label, options={"num_warps": num_warps, "num_stages": num_stages}, attrs=attrs))

    for dtype, dtype_name in _DTYPE_NAMES.items():
        for block_d in _BLOCK_DS:
            for name, kernel, menus, data_ptrs, fp32_ptrs in attention:
                pointer_dtypes = {**{p: dtype_name for p in data_ptrs}, **{p: "fp32" for p in fp32_ptrs},
                                  **{p: "i32" for p in int32_pointers}}
                for menu, aligned in zip(menus, (True, False)):
                    if menu is None:
                        continue
                    tile = _tile(menu, dtype, block_d)
                    block_ms = sorted({_DECODE_SMALL_BLOCK_M, tile.block_m}) if name == "decode_split" \
                        else [tile.block_m]
                    for block_m in block_ms:
                        constexprs = {"DOT_PRECISION": _dot_precision(dtype), "BLOCK_M": block_m,
                                      "BLOCK_N": tile.block_n, "BLOCK_D": block_d}
                        label = f"mqa/{name}/{dtype_name}/d{block_d}/m{block_m}n{tile.block_n}"
                        add(kernel, label + ("/a16" if aligned else ""), pointer_dtypes, constexprs,
                            tile.num_warps, tile.num_stages, _specialized_int_args(kernel) if aligned else ())
            add(_kv_append_kernel, f"mqa/decode_append/{dtype_name}/d{block_d}",
                {"k_new_ptr": dtype_name, "v_new_ptr": dtype_name, "k_cache_ptr": dtype_name,
                 "v_cache_ptr": dtype_name, "seqlens_ptr": "i32"},
                {"BLOCK_D": block_d}, _APPEND_WARPS, 1, ())
            add(_mqa_decode_combine_kernel, f"mqa/decode_combine/{dtype_name}/d{block_d}",
                {"o_part_ptr": "fp32", "lse_part_ptr": "fp32", "out_ptr": dtype_name, "lse_ptr": "fp32"},
                {"BLOCK_S": _COMBINE_BLOCK_S, "BLOCK_D": block_d}, _COMBINE_WARPS, 1, ())
    return configs
