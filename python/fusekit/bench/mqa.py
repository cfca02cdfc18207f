"""Multi-query / grouped-query attention benchmarks: shapes, baselines, byte and FLOP counts.

Shapes (DESIGN.md 6): D = 64/128, Hq = 32, Hkv = 1 (MQA) / 4 / 8 (Llama-style GQA); prefill
512..16K tokens, causal, plus a sliding window; decode one new token per sequence (appended to
the cache in place) at batch 1..64 over 1K..128K cached tokens. The CPU targets of the issue
are cases of their own (cpu.*). Inputs are heads-last [B, L, H, D] (layout "bshd"); the SDPA
baselines read the same memory through [B, H, L, D] views.

Work counted: prefill forward 4 * B * Hq * D * (allowed query-key pairs) FLOPs (QK^T and PV);
backward 10 * ... (QK^T recomputed, dV, dP, dQ, dK); bytes = q, k, v, out (+ dout, dq, dk, dv)
once each. Decode bytes = the K/V cache rows read (2 * B * L * Hkv * D * itemsize) plus q,
out and the appended rows: the KV read dominates, so GB/s over the copy ceiling is the
bandwidth fraction the issue asks for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import BenchOp, Case, QuickItem, spread_indices


def _fusekit():
    import fusekit
    return fusekit


def _reference():
    from fusekit.testing import reference
    return reference


def _pairs(lq: int, lk: int, causal: bool, window: tuple[int, int]) -> int:
    """Allowed (query, key) pairs of one sequence and head (bottom-right aligned)."""
    left, right = window
    total = 0
    for i in range(lq):
        pos = i + lk - lq
        hi = min(lk - 1, pos if causal else lk - 1)
        if right >= 0:
            hi = min(hi, pos + right)
        lo = max(0, pos - left) if left >= 0 else 0
        total += max(0, hi - lo + 1)
    return total


def _unsupported(message: str):
    from fusekit import BackendError
    raise BackendError(message)


def _flash_attn():
    try:
        import flash_attn
    except ImportError:
        _unsupported("flash-attn is not installed")
    return flash_attn


def _sdpa_heads_last(q, k, v, expand: bool, attn_mask=None, is_causal: bool = False):
    """SDPA on [B, H, L, D] views of heads-last tensors: enable_gqa, or K/V repeated to Hq heads."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if expand:
        group = q.shape[2] // k.shape[2]
        kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=not expand)
    return out.transpose(1, 2)


class _AttentionBench:
    """What both attention ops share: heads-last inputs used as given, a batch fixed per case, and
    reference subsets by KV head (a KV head and its Hq/Hkv query heads are independent of the rest)."""

    layouts = ("bshd",)
    q_like = ("q",)

    def batches(self, case: Case, requested):
        return [case.dims["B"]]

    def to_layout(self, t, layout):
        return t

    def output_layout_ok(self, y, layout):
        return True

    def subset_units(self, case: Case) -> int:
        return case.dims["Hkv"]

    def select_units(self, case: Case, count: int, gen: torch.Generator):
        return spread_indices(case.dims["Hkv"], count, gen)

    def _q_heads(self, case: Case, sel: torch.Tensor) -> torch.Tensor:
        group = case.dims["Hq"] // case.dims["Hkv"]
        return (sel.unsqueeze(1) * group + torch.arange(group)).flatten()

    def slice_inputs(self, case, inputs, sel):
        out = {}
        for name, t in inputs.items():
            if t.dim() < 3:
                out[name] = t
                continue
            idx = self._q_heads(case, sel) if name in self.q_like else sel
            out[name] = t.index_select(2, idx.to(t.device))
        return out

    def slice_result(self, case, name, t, sel):
        idx = self._q_heads(case, sel) if name in ("y", "grad_q") else sel
        return t.index_select(2, idx.to(t.device))


class MultiQueryAttentionBench(_AttentionBench, BenchOp):
    name = "multi_query_attention"
    description = ("fusekit.multi_query_attention (prefill / training) == softmax attention with Hq/Hkv query "
                   "heads per K/V head, causal bottom-right")
    data_inputs = ("q", "k", "v")
    param_inputs = ()
    backend_op = "multi_query_attention"
    modes = ("fwd", "fwd_bwd")

    def cases(self) -> list[Case]:
        out = []

        def add(name, L, Hq, Hkv, D, B, source, causal=True, window=(-1, -1), tags=()):
            out.append(Case(self.name, name, {"L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "B": B, "causal": causal,
                                              "window": window}, source, frozenset(tags)))

        for L in (512, 2048, 8192, 16384):
            B = max(1, 16384 // L)
            add(f"gqa8.d128.L{L}", L, 32, 8, 128, B, f"Llama-style GQA (32 query / 8 KV heads, D 128), {L} tokens")
            add(f"mqa.d64.L{L}", L, 32, 1, 64, B, f"MQA (32 query heads, one KV head, D 64), {L} tokens")
            add(f"gqa4.d64.L{L}", L, 32, 4, 64, B, f"GQA (32 query / 4 KV heads, D 64), {L} tokens")
        add("gqa8.d128.L8192.w1024", 8192, 32, 8, 128, 2, "GQA with a 1024-token sliding window (Mistral-style)",
            window=(1024, 0))
        for L in (1024, 2048):
            add(f"cpu.gqa4.d64.L{L}", L, 16, 4, 64, 1, f"CPU prefill target: 16 query / 4 KV heads, D 64, {L} tokens")
            add(f"cpu.gqa4.d64.L{L}.full", L, 16, 4, 64, 1, f"as cpu.gqa4.d64.L{L}, not causal", causal=False)
        add("tiny.gqa", 13, 4, 2, 16, 2, "test shape: odd length, 2 query heads per KV head", tags=("test",))
        add("tiny.mqa.window", 17, 4, 1, 8, 1, "test shape: MQA with a (3, 2) window", window=(3, 2), tags=("test",))
        return out

    def quick_items(self) -> list[QuickItem]:
        return [QuickItem("cpu.gqa4.d64.L1024", {"cpu": 1}, ("fwd", "fwd_bwd")),
                QuickItem("gqa8.d128.L2048", {"cuda": 8}, ("fwd", "fwd_bwd"))]

    def baselines(self) -> dict[str, str]:
        return {"sdpa_gqa": "F.scaled_dot_product_attention(enable_gqa=True) on [B, H, L, D] views",
                "sdpa_expanded": "K/V repeated to Hq heads (repeat_interleave), then SDPA",
                "flex": "torch.compile(flex_attention) with the causal/window mask_mod, enable_gqa=True",
                "flash_attn": "flash_attn.flash_attn_func (GQA native), when installed"}

    def default_baselines(self, device: str) -> list[str]:
        names = ["sdpa_gqa", "sdpa_expanded"] + (["flex", "flash_attn"] if device == "cuda" else [])
        return [f"{n}_bshd" for n in names]

    def shape(self, case: Case, batch: int) -> str:
        d = case.dims
        extra = "" if d["window"] == (-1, -1) else f" w{d['window'][0]},{d['window'][1]}"
        return f"{batch}x{d['L']} h{d['Hq']}/{d['Hkv']} d{d['D']}{' causal' if d['causal'] else ''}{extra}"

    def output_shape(self, case: Case, batch: int) -> tuple:
        d = case.dims
        return (batch, d["L"], d["Hq"], d["D"])

    def make_inputs(self, case, batch, dtype, device, gen):
        d = case.dims
        shapes = {"q": (batch, d["L"], d["Hq"], d["D"]), "k": (batch, d["L"], d["Hkv"], d["D"]),
                  "v": (batch, d["L"], d["Hkv"], d["D"])}
        return {n: torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype)
                for n, s in shapes.items()}

    def reference(self, case, inputs):
        d = case.dims
        return _reference().mqa_reference(inputs["q"], inputs["k"], inputs["v"], d["causal"], *d["window"])[0]

    def reference_name(self) -> str:
        return "fusekit.testing.reference.mqa_reference (float64, explicit mask)"

    def fusekit_fn(self, case, backend):
        d = case.dims
        chosen = None if backend == "auto" else backend
        window = None if d["window"] == (-1, -1) else d["window"]
        return lambda q, k, v: _fusekit().multi_query_attention(q, k, v, causal=d["causal"], window=window,
                                                                backend=chosen)

    def baseline_fn(self, case, name):
        d = case.dims
        causal, (left, right) = d["causal"], d["window"]
        plain_causal = causal and left < 0 and right < 0
        dense = not causal and left < 0 and right < 0

        def mask(lq, lk, device):
            return _reference().attention_mask(lq, lk, causal, left, right, device)

        def sdpa(q, k, v, expand):
            attn_mask = None if (plain_causal or dense) else mask(q.shape[1], k.shape[1], q.device)
            return _sdpa_heads_last(q, k, v, expand, attn_mask, plain_causal)

        if name == "sdpa_gqa":
            return lambda q, k, v: sdpa(q, k, v, False)
        if name == "sdpa_expanded":
            return lambda q, k, v: sdpa(q, k, v, True)
        if name == "flex":
            return self._flex(causal, left, right)
        if name == "flash_attn":
            def flash(q, k, v):
                fa = _flash_attn()
                return fa.flash_attn_func(q, k, v, causal=causal, window_size=(left, right))
            return flash
        raise KeyError(name)

    @staticmethod
    def _flex(causal, left, right):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        compiled = torch.compile(flex_attention, dynamic=False)
        cache = {}

        def mask_mod(b, h, q_idx, kv_idx):
            pos = q_idx  # same length: bottom-right == top-left
            ok = kv_idx <= pos if causal else kv_idx >= 0
            if left >= 0:
                ok = ok & (kv_idx >= pos - left)
            if right >= 0:
                ok = ok & (kv_idx <= pos + right)
            return ok

        def flex(q, k, v):
            key = (q.shape[1], q.device)
            if key not in cache:
                cache[key] = create_block_mask(mask_mod, None, None, q.shape[1], k.shape[1], device=q.device)
            out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=cache[key],
                           enable_gqa=True)
            return out.transpose(1, 2)
        return flex

    def macs_per_unit(self, case: Case, batch: int) -> float:
        d = case.dims
        group = d["Hq"] // d["Hkv"]
        # the float64 reference materializes the logits: count them with the two products
        return batch * group * d["L"] * d["L"] * (2 * d["D"] + 8)

    def work(self, case: Case, batch: int, mode: str, itemsize: int) -> tuple[int, int]:
        d = case.dims
        pairs = _pairs(d["L"], d["L"], d["causal"], d["window"])
        q = batch * d["L"] * d["Hq"] * d["D"]
        kv = batch * d["L"] * d["Hkv"] * d["D"]
        fwd_flops = 4 * batch * d["Hq"] * d["D"] * pairs
        fwd_bytes = (2 * q + 2 * kv) * itemsize
        if mode == "fwd":
            return fwd_bytes, fwd_flops
        bwd_bytes = (4 * q + 4 * kv) * itemsize   # read q, k, v, out, dout; write dq, dk, dv
        return fwd_bytes + bwd_bytes, fwd_flops + 10 * batch * d["Hq"] * d["D"] * pairs


class MultiQueryDecodeBench(_AttentionBench, BenchOp):
    name = "multi_query_decode"
    description = ("fusekit.multi_query_decode: one new token per sequence appended to a KV cache in place, then "
                   "attention over the whole cache")
    data_inputs = ("q",)
    param_inputs = ()
    backend_op = "multi_query_decode"
    modes = ("fwd",)

    def cases(self) -> list[Case]:
        out = []

        def add(name, L, Hq, Hkv, D, B, source, tags=()):
            out.append(Case(self.name, name, {"L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "B": B, "n": 1}, source,
                            frozenset(tags)))

        for hkv, d in ((1, 64), (8, 128), (4, 64)):
            for L in (1024, 8192, 32768, 131072):
                for B in (1, 8, 64):
                    if B * L * hkv * d * 4 > 2 ** 31:  # K+V in fp16 above 4 GiB: left out
                        continue
                    add(f"h32kv{hkv}.d{d}.L{L // 1024}k.b{B}", L, 32, hkv, d, B,
                        f"decode, 32 query / {hkv} KV heads, D {d}, {L} cached tokens, batch {B}")
        add("cpu.mqa.d64.L8k", 8192, 16, 1, 64, 2, "CPU decode target: B 2, 16 query heads, 1 KV head, D 64, 8K cached")
        add("tiny.decode", 37, 8, 2, 16, 3, "test shape", tags=("test",))
        return out

    def quick_items(self) -> list[QuickItem]:
        return [QuickItem("cpu.mqa.d64.L8k", {"cpu": 2}, ("fwd",)),
                QuickItem("h32kv8.d128.L8k.b8", {"cuda": 8}, ("fwd",))]

    def baselines(self) -> dict[str, str]:
        return {"sdpa_gqa": "append with slice assignment, then F.scaled_dot_product_attention(enable_gqa=True) over "
                            "the valid cache prefix ([B, H, L, D] views)",
                "sdpa_expanded": "append, then K/V repeated to Hq heads and SDPA",
                "flash_attn": "flash_attn.flash_attn_with_kvcache (in-place append, split-KV), when installed"}

    def default_baselines(self, device: str) -> list[str]:
        names = ["sdpa_gqa", "sdpa_expanded"] + (["flash_attn"] if device == "cuda" else [])
        return [f"{n}_bshd" for n in names]

    def shape(self, case: Case, batch: int) -> str:
        d = case.dims
        return f"{batch}x{d['n']} cache {d['L']} h{d['Hq']}/{d['Hkv']} d{d['D']}"

    def output_shape(self, case: Case, batch: int) -> tuple:
        d = case.dims
        return (batch, d["n"], d["Hq"], d["D"])

    def make_inputs(self, case, batch, dtype, device, gen):
        d = case.dims
        n = d["n"]

        def rnd(shape):
            return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return {"q": rnd((batch, n, d["Hq"], d["D"])),
                "k_cache": rnd((batch, d["L"], d["Hkv"], d["D"])), "v_cache": rnd((batch, d["L"], d["Hkv"], d["D"])),
                "k_new": rnd((batch, n, d["Hkv"], d["D"])), "v_new": rnd((batch, n, d["Hkv"], d["D"])),
                "cache_seqlens": torch.full((batch,), d["L"] - n, dtype=torch.int32, device=device)}

    def reference(self, case, inputs):
        seqlens = inputs["cache_seqlens"].detach().long()
        return _reference().mqa_decode_reference(inputs["q"], inputs["k_cache"], inputs["v_cache"], seqlens,
                                                 inputs["k_new"], inputs["v_new"])[0]

    def reference_name(self) -> str:
        return "fusekit.testing.reference.mqa_decode_reference (float64)"

    def fusekit_fn(self, case, backend):
        chosen = None if backend == "auto" else backend

        def decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens):
            # the lengths are right by construction: no host check (a GPU synchronization) in timed calls
            return _fusekit().multi_query_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                 check_lengths=False, backend=chosen)
        return decode

    def baseline_fn(self, case, name):
        d = case.dims
        n, total = d["n"], d["L"]  # every sequence holds L - n tokens, plus the n appended

        def sdpa(q, k_cache, v_cache, k_new, v_new, cache_seqlens, expand):
            k_cache[:, total - n:total] = k_new
            v_cache[:, total - n:total] = v_new
            # n == 1: the new token sees every key, so no mask
            return _sdpa_heads_last(q, k_cache[:, :total], v_cache[:, :total], expand)

        if name == "sdpa_gqa":
            return lambda **t: sdpa(**t, expand=False)
        if name == "sdpa_expanded":
            return lambda **t: sdpa(**t, expand=True)
        if name == "flash_attn":
            def flash(q, k_cache, v_cache, k_new, v_new, cache_seqlens):
                fa = _flash_attn()
                return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                                  causal=True)
            return flash
        raise KeyError(name)

    def macs_per_unit(self, case: Case, batch: int) -> float:
        d = case.dims
        return batch * (d["Hq"] // d["Hkv"]) * d["n"] * d["L"] * (2 * d["D"] + 8)

    def work(self, case: Case, batch: int, mode: str, itemsize: int) -> tuple[int, int]:
        d = case.dims
        kv_read = 2 * batch * d["L"] * d["Hkv"] * d["D"]
        q_out = 2 * batch * d["n"] * d["Hq"] * d["D"]
        appended = 2 * batch * d["n"] * d["Hkv"] * d["D"]
        return (kv_read + q_out + appended) * itemsize, 4 * batch * d["Hq"] * d["n"] * d["D"] * d["L"]


OPS = (MultiQueryAttentionBench(), MultiQueryDecodeBench())
