"""Neighborhood attention benchmarks (fusekit.na1d / na2d / na3d): shapes, baselines, byte and FLOP counts.

Shapes (DESIGN.md 6): DiNAT-T stages (56x56 / 28x28 / 14x14 / 7x7 tokens, 2/4/8/16 heads, D 32,
k 7, NA and DiNA with dilation 8/4/2), MedViTV2-style NA with relative positional bias (k 7,
D 32), large windows (1-D 32K tokens window 2048, 2-D 128x128 window 31x31, 3-D 16x32x32 window
7x7x7) and the CPU target of the issue (cpu.na2d.56.k7: 56x56, k 7, 4 heads, D 32, batch 2). Model
shapes run at batch 32 on GPUs and batch 2 on the CPU (cpu.*), with smaller large-window cases on
the CPU: each case is tagged with the device it is sized for and runs elsewhere only when named.
The reference is checked on a subset of KV heads (all batch elements). Inputs are
heads-last [B, *spatial, H, D] (layout "bshd"); the baselines read the same memory through
[B, H, N, D] views of the row-major flattened tokens.

Baselines, all measured in the same run: masked SDPA (the dense boolean NA mask built once per
case; with rpb a dense float bias rebuilt from rpb in every call so its gradient flows),
compiled FlexAttention with a mask_mod written from the definition (rpb through score_mod),
the unfused PyTorch implementation (gather the neighbours with na_neighbors' index table,
logits, softmax, weighted sum) and NATTEN (>= 0.20 functional API) when it is installed.

Work counted: forward 4 * B * Hq * D * (query-key pairs) FLOPs (QK^T and PV; pairs = tokens *
prod(k) without causal axes, the exact count with them); backward 10 * ... as the MQA bench
counts (QK^T recomputed, dV, dP, dQ, dK): fwd_bwd = 3.5x forward. Bytes = q, k, v, out (+ rpb;
+ dout, dq, dk, dv, drpb) once each.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.utils.checkpoint
import torch.nn.functional as F

from .harness import BenchOp, Case, QuickItem, spread_indices

# Float64 reference: fusekit.testing.reference.na_reference materializes [B, Hq, N, N] logits;
# above this many bytes per logits tensor the bench checks with the float64 neighbour gather below.
DENSE_REFERENCE_BYTES = 512 << 20
# Bytes of neighbour keys (or values) one float64 reference chunk gathers.
REFERENCE_CHUNK_BYTES = 256 << 20
# Share of the device's memory a baseline may plan to allocate; above it the baseline is left
# out (reported as UNSUPPORTED) instead of exhausting the memory of a shared machine.
BASELINE_MEMORY_SHARE = {"cpu": 0.3, "cuda": 0.6}


def _fusekit():
    import fusekit
    return fusekit


def _reference():
    from fusekit.testing import reference
    return reference


def _unsupported(message: str):
    from fusekit import BackendError
    raise BackendError(message)


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _require_memory(nbytes: float, device: torch.device, what: str) -> None:
    budget = BASELINE_MEMORY_SHARE.get(device.type, 0.3) * _device_memory(device)
    if nbytes > budget:
        _unsupported(f"{what} would take {nbytes / 2 ** 30:.1f} GiB (more than {budget / 2 ** 30:.1f} GiB here)")


def _numel(shape) -> int:
    return math.prod(shape)


class _Geometry:
    """Per-case index tables from the definition (fusekit.testing.reference.na_neighbors),
    built once per device outside every timed call."""

    def __init__(self, d: dict):
        self.d = d
        self._cache: dict = {}

    def _get(self, name: str, device: torch.device, build):
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def neighbors(self, device):
        """(key [N, K], valid [N, K], flat rpb index [N, K]) on ``device``."""
        d = self.d

        def build():
            key, valid, rel = _reference().na_neighbors(d["spatial"], d["kernel"], d["stride"], d["dilation"],
                                                        d["causal"])
            flat = torch.zeros_like(key)
            for ax, k in enumerate(d["kernel"]):
                flat = flat * (2 * k - 1) + rel[..., ax]
            return key.to(device), valid.to(device), torch.where(valid, flat, torch.zeros_like(flat)).to(device)
        return self._get("neighbors", device, build)

    def mask(self, device):
        d = self.d
        return self._get("mask", device, lambda: _reference().na_mask(d["spatial"], d["kernel"], d["stride"],
                                                                      d["dilation"], d["causal"], device))

    def pair_rows(self, device):
        """(query token, key token, flat rpb index) of every valid pair: where the dense bias goes."""
        def build():
            key, valid, flat = self.neighbors(device)
            rows = torch.arange(key.shape[0], device=device).view(-1, 1).expand_as(key)
            return rows[valid], key[valid], flat[valid]
        return self._get("pairs", device, build)


def _gather_attention(q, k, v, key, valid, flat_idx, rpb, scale, chunk: int, checkpoint: bool):
    """Unfused NA over tokens flattened row-major: q [B, N, Hq, D], k/v [B, N, Hkv, D]; per chunk of c
    queries gather the neighbours' keys and values ([B, Hkv, c, K, D]), logits, softmax, weighted sum
    (batched matrix products per query). Query head h reads KV head h // (Hq / Hkv): K/V are never
    expanded to Hq heads."""
    b, n, hq, dim = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qt = q.reshape(b, n, hkv, g, dim).permute(0, 2, 1, 3, 4)                # [B, Hkv, N, g, D]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)                        # [B, Hkv, N, D]
    extra = () if rpb is None else (rpb.reshape(hkv, g, -1),)

    def block(qc, kk, vv, key_c, valid_c, flat_c, *maybe_rpb):
        kn, vn = kk[:, :, key_c], vv[:, :, key_c]                        # [B, Hkv, c, K, D]
        logits = (qc @ kn.transpose(-1, -2)) * scale                     # [B, Hkv, c, g, K]
        if maybe_rpb:
            logits = logits + maybe_rpb[0][:, :, flat_c].transpose(1, 2)  # [Hkv, c, g, K]
        logits = logits.masked_fill(~valid_c.view(1, 1, valid_c.shape[0], 1, -1), float("-inf"))
        out = torch.softmax(logits, dim=-1) @ vn                         # [B, Hkv, c, g, D]
        return out.permute(0, 2, 1, 3, 4).reshape(b, -1, hq, dim)

    outs = []
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        args = (qt[:, :, sl], kt, vt, key[sl], valid[sl], flat_idx[sl], *extra)
        if checkpoint:
            outs.append(torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False))
        else:
            outs.append(block(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class NeighborhoodAttentionBench(BenchOp):
    name = "neighborhood_attention"
    description = ("fusekit.na1d / na2d / na3d: softmax attention of each token over its k-neighbourhood "
                   "(NATTEN semantics: clamped windows, dilation, stride, causal axes, rpb, GQA)")
    data_inputs = ("q", "k", "v")
    param_inputs = ("rpb",)           # only in cases with relative positional bias
    backend_op = "neighborhood_attention"
    layouts = ("bshd",)
    modes = ("fwd", "fwd_bwd")

    def __init__(self):
        self._geometry: dict[str, _Geometry] = {}

    # ------------------------------------------------------------------------------------------
    # cases
    # ------------------------------------------------------------------------------------------

    def cases(self) -> list[Case]:
        out = []

        def add(name, spatial, kernel, heads, D, B, source, stride=1, dilation=1, causal=False, rpb=False,
                kv_heads=None, tags=()):
            rank = len(spatial)

            def axes(x):
                return tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank
            out.append(Case(self.name, name, {
                "spatial": tuple(spatial), "kernel": axes(kernel), "stride": axes(stride),
                "dilation": axes(dilation), "causal": axes(causal), "Hq": heads, "Hkv": kv_heads or heads,
                "D": D, "B": B, "rpb": rpb}, source, frozenset(tags)))

        add("cpu.na2d.56.k7", (56, 56), 7, 4, 32, 2, "CPU target of the issue: 56x56 tokens, k 7, 4 heads, D 32, "
            "batch 2", tags=("cpu",))
        # model shapes at batch 32 on GPUs, batch 2 on the CPU (each tagged with the device it is sized for)
        for device, batch in (("cuda", 32), ("cpu", 2)):
            prefix = "" if device == "cuda" else "cpu."
            for i, (size, heads, dil) in enumerate(((56, 2, 8), (28, 4, 4), (14, 8, 2), (7, 16, 1)), 1):
                add(f"{prefix}dinat_t.s{i}.na", (size, size), 7, heads, 32, batch,
                    f"DiNAT-T stage {i} NA layer (batch {batch})", tags=(device,))
                if dil > 1:
                    add(f"{prefix}dinat_t.s{i}.dina", (size, size), 7, heads, 32, batch,
                        f"DiNAT-T stage {i} DiNA layer, dilation {dil} (batch {batch})", dilation=dil, tags=(device,))
            for i, (size, heads) in enumerate(((28, 6), (14, 12)), 1):
                add(f"{prefix}medvitv2.s{i}.rpb", (size, size), 7, heads, 32, batch,
                    f"MedViTV2-style NA with relative positional bias, k 7, D 32, {size}x{size} tokens, {heads} heads "
                    f"(representative; batch {batch})", rpb=True, tags=(device,))
        add("large.na1d.32k.w2048", (32768,), 2048, 8, 128, 1, "1-D, 32K tokens, window 2048, 8 heads, D 128",
            tags=("cuda",))
        add("large.na2d.128.w31", (128, 128), 31, 8, 128, 1, "2-D, 128x128 tokens, window 31x31, 8 heads, D 128",
            tags=("cuda",))
        add("large.na3d.16x32x32.w7", (16, 32, 32), 7, 8, 128, 1, "3-D video, 16x32x32 tokens, window 7x7x7, "
            "8 heads, D 128", tags=("cuda",))
        # large windows at CPU size: the dense baselines stay within a few hundred MB
        add("cpu.large.na1d.4k.w512", (4096,), 512, 4, 64, 1, "1-D, 4K tokens, window 512, 4 heads, D 64",
            tags=("cpu",))
        add("cpu.large.na2d.48.w15", (48, 48), 15, 4, 64, 1, "2-D, 48x48 tokens, window 15x15, 4 heads, D 64",
            tags=("cpu",))
        add("cpu.large.na3d.8x16x16.w5", (8, 16, 16), 5, 4, 64, 1, "3-D video, 8x16x16 tokens, window 5x5x5, "
            "4 heads, D 64", tags=("cpu",))
        # test shapes: every baseline on every feature at a few hundred tokens
        add("tiny.na1d.causal.gqa", (37,), 5, 4, 16, 2, "test shape: 1-D causal, stride 2, GQA 4/2",
            stride=2, causal=True, kv_heads=2, tags=("test",))
        add("tiny.na2d.rpb.dil", (9, 10), 3, 2, 16, 2, "test shape: 2-D, dilation 2 on one axis, rpb",
            dilation=(2, 1), rpb=True, tags=("test",))
        add("tiny.na3d.mixed", (4, 6, 5), (2, 3, 3), 2, 16, 1, "test shape: 3-D, even kernel, causal first axis, "
            "stride 2 on the last, MQA", stride=(1, 1, 2), causal=(True, False, False), kv_heads=1, tags=("test",))
        return out

    def quick_items(self) -> list[QuickItem]:
        return [QuickItem("cpu.na2d.56.k7", {"cpu": 2}, ("fwd", "fwd_bwd")),
                QuickItem("dinat_t.s1.na", {"cuda": 32}, ("fwd", "fwd_bwd")),
                QuickItem("large.na2d.128.w31", {"cuda": 1}, ("fwd", "fwd_bwd"))]

    def batches(self, case: Case, requested):
        return [case.dims["B"]]

    def geometry(self, case: Case) -> _Geometry:
        # only the latest case's tables are kept: a 32K-token mask and neighbour table take GiBs
        if case.name not in self._geometry:
            self._geometry = {case.name: _Geometry(case.dims)}
        return self._geometry[case.name]

    @staticmethod
    def _tokens(case: Case) -> int:
        return _numel(case.dims["spatial"])

    @staticmethod
    def _slots(case: Case) -> int:
        return _numel(case.dims["kernel"])

    def shape(self, case: Case, batch: int) -> str:
        d = case.dims

        def axes(name, values, skip):
            return "" if all(x == skip for x in values) else f" {name}{'x'.join(str(int(x)) for x in values)}"
        heads = f"h{d['Hq']}" if d["Hq"] == d["Hkv"] else f"h{d['Hq']}/{d['Hkv']}"
        return (f"{batch}x{'x'.join(map(str, d['spatial']))} {heads} d{d['D']} k{'x'.join(map(str, d['kernel']))}"
                + axes("s", d["stride"], 1) + axes("dil", d["dilation"], 1)
                + (" causal" if all(d["causal"]) else axes("causal", d["causal"], False))
                + (" rpb" if d["rpb"] else ""))

    def output_shape(self, case: Case, batch: int) -> tuple:
        d = case.dims
        return (batch, *d["spatial"], d["Hq"], d["D"])

    def make_inputs(self, case, batch, dtype, device, gen):
        d = case.dims

        def rnd(shape, std=1.0):
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)
        out = {"q": rnd((batch, *d["spatial"], d["Hq"], d["D"])),
               "k": rnd((batch, *d["spatial"], d["Hkv"], d["D"])),
               "v": rnd((batch, *d["spatial"], d["Hkv"], d["D"]))}
        if d["rpb"]:
            out["rpb"] = rnd((d["Hq"], *(2 * k - 1 for k in d["kernel"])), 0.5)
        return out

    def to_layout(self, t, layout):
        return t

    def output_layout_ok(self, y, layout):
        return True

    # ------------------------------------------------------------------------------------------
    # reference, checked on a subset of KV heads (a KV head, its query heads and their rpb rows
    # are independent of the other heads)
    # ------------------------------------------------------------------------------------------

    def _dense_reference_fits(self, case: Case, batch: int, q_heads: int) -> bool:
        return batch * q_heads * self._tokens(case) ** 2 * 8 <= DENSE_REFERENCE_BYTES

    def reference(self, case, inputs):
        d = case.dims
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        rpb = inputs.get("rpb")
        if self._dense_reference_fits(case, q.shape[0], q.shape[-2]):
            return _reference().na_reference(q, k, v, d["kernel"], d["stride"], d["dilation"], d["causal"],
                                             rpb=rpb)[0]
        key, valid, flat = self.geometry(case).neighbors(q.device)
        b, n = q.shape[0], self._tokens(case)
        per_query = b * self._slots(case) * k.shape[-2] * d["D"] * 8
        chunk = max(1, min(n, REFERENCE_CHUNK_BYTES // per_query))
        out = _gather_attention(q.reshape(b, n, *q.shape[-2:]), k.reshape(b, n, *k.shape[-2:]),
                                v.reshape(b, n, *v.shape[-2:]), key, valid, flat, rpb, d["D"] ** -0.5, chunk,
                                checkpoint=q.requires_grad)
        return out.reshape(q.shape)

    def reference_name(self) -> str:
        return ("fusekit.testing.reference.na_reference (float64, dense NA mask); cases whose dense logits "
                f"exceed {DENSE_REFERENCE_BYTES >> 20} MiB: float64 neighbour gather over na_neighbors, "
                "query-chunked")

    def subset_units(self, case: Case) -> int:
        return case.dims["Hkv"]

    def macs_per_unit(self, case: Case, batch: int) -> float:
        d = case.dims
        group = d["Hq"] // d["Hkv"]
        n = self._tokens(case)
        keys = n if self._dense_reference_fits(case, batch, 2 * group) else self._slots(case)
        return batch * group * n * keys * (2 * d["D"] + 8)

    def select_units(self, case: Case, count: int, gen: torch.Generator):
        return spread_indices(case.dims["Hkv"], count, gen)

    def _q_heads(self, case: Case, sel: torch.Tensor) -> torch.Tensor:
        group = case.dims["Hq"] // case.dims["Hkv"]
        return (sel.unsqueeze(1) * group + torch.arange(group)).flatten()

    def slice_inputs(self, case, inputs, sel):
        out = {}
        for name, t in inputs.items():
            if name == "rpb":
                out[name] = t.index_select(0, self._q_heads(case, sel).to(t.device))
            else:
                idx = self._q_heads(case, sel) if name == "q" else sel
                out[name] = t.index_select(t.dim() - 2, idx.to(t.device))
        return out

    def slice_result(self, case, name, t, sel):
        if name == "grad_rpb":
            return t.index_select(0, self._q_heads(case, sel).to(t.device))
        idx = self._q_heads(case, sel) if name in ("y", "grad_q") else sel
        return t.index_select(t.dim() - 2, idx.to(t.device))

    # ------------------------------------------------------------------------------------------
    # providers
    # ------------------------------------------------------------------------------------------

    def fusekit_fn(self, case, backend):
        d = case.dims
        chosen = None if backend == "auto" else backend
        rank = len(d["spatial"])

        def fused(q, k, v, rpb=None):
            na = getattr(_fusekit(), f"na{rank}d")
            return na(q, k, v, d["kernel"], d["stride"], d["dilation"], d["causal"], rpb=rpb, backend=chosen)
        return fused

    def baselines(self) -> dict[str, str]:
        return {"sdpa_masked": "F.scaled_dot_product_attention with the dense [N, N] boolean NA mask (built once per "
                               "case; with rpb a dense float bias rebuilt from rpb per call), enable_gqa for GQA",
                "flex": "torch.compile(flex_attention, dynamic=False), NA mask_mod from the definition, block mask "
                        "built once per case; rpb via score_mod (no backward on CPU)",
                "unfused": "PyTorch: gather neighbour K/V with na_neighbors' index table, logits (+ rpb), softmax, "
                           "weighted sum",
                "natten": "natten.na1d/na2d/na3d (>= 0.20 API), when installed"}

    def default_baselines(self, device: str) -> list[str]:
        return [f"{n}_bshd" for n in self.baselines()]

    def baseline_fn(self, case, name):
        if name == "sdpa_masked":
            return self._sdpa(case)
        if name == "flex":
            return self._flex(case)
        if name == "unfused":
            return self._unfused(case)
        if name == "natten":
            return self._natten(case)
        raise KeyError(name)

    def _sdpa(self, case: Case):
        d, geo = case.dims, self.geometry(case)
        n = self._tokens(case)
        gqa = d["Hq"] != d["Hkv"]

        def sdpa(q, k, v, rpb=None):
            b = q.shape[0]
            # the dense mask (bool) and the additive float bias SDPA turns it into
            _require_memory(n * n * (1 + q.element_size() * (d["Hq"] if rpb is not None else 1)), q.device,
                            "the dense NA mask")
            if rpb is None:
                mask = geo.mask(q.device)
            else:
                rows, keys, flat = geo.pair_rows(q.device)
                mask = _dense_bias(rpb, rows, keys, flat, n)
            qt = q.reshape(b, n, d["Hq"], d["D"]).transpose(1, 2)
            kt = k.reshape(b, n, d["Hkv"], d["D"]).transpose(1, 2)
            vt = v.reshape(b, n, d["Hkv"], d["D"]).transpose(1, 2)
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
            return out.transpose(1, 2).reshape(q.shape)
        return sdpa

    def _flex(self, case: Case):
        d = case.dims
        spatial, kernel, stride, dilation, causal = d["spatial"], d["kernel"], d["stride"], d["dilation"], d["causal"]
        n = self._tokens(case)
        state: dict[str, Any] = {}

        def coords(idx):
            """Row-major flattened token index -> per-axis coordinates."""
            out = []
            for size in reversed(spatial):
                out.append(idx % size)
                idx = idx // size
            return out[::-1]

        def mask_mod(b, h, q_idx, kv_idx):
            ok = None
            for ax, (qc, kc) in enumerate(zip(coords(q_idx), coords(kv_idx))):
                L, k, s, dil = spatial[ax], kernel[ax], stride[ax], dilation[ax]
                group = qc % dil
                qi, ki = qc // dil, kc // dil
                group_len = (L - group + dil - 1) // dil
                if causal[ax]:
                    leader = torch.minimum((qi // s) * s + s - 1, group_len - 1)
                    start = torch.clamp(leader - k + 1, min=0)
                    axis_ok = (ki >= start) & (ki <= qi)
                else:
                    leader = torch.minimum((qi // s) * s + s // 2, group_len - 1)
                    start = torch.minimum(torch.clamp(leader - k // 2, min=0), group_len - k)
                    axis_ok = (ki >= start) & (ki < start + k)
                axis_ok = axis_ok & (kc % dil == group)
                ok = axis_ok if ok is None else ok & axis_ok
            return ok

        def rpb_score_mod(rpb):
            def score_mod(score, b, h, q_idx, kv_idx):
                # clamped: Flex also scores the masked pairs of partly masked blocks, whose offsets fall outside rpb
                idx = [torch.clamp((kc - qc) // dil + k - 1, 0, 2 * k - 2) for qc, kc, k, dil in
                       zip(coords(q_idx), coords(kv_idx), kernel, dilation)]
                return score + rpb[(h, *idx)]
            return score_mod

        def flex(q, k, v, rpb=None):
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
                _unsupported("FlexAttention has no backward on the CPU")
            if "compiled" not in state:
                # every case is a new static shape: a sweep recompiles flex_attention once per (case, dtype, mode),
                # beyond dynamo's default limit of 8, after which it would silently run the eager (dense) Flex
                import torch._dynamo.config as dynamo_config
                dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 128)
                state["compiled"] = torch.compile(flex_attention, dynamic=False)
            key = str(q.device)
            if key not in state:
                # compiled block-mask construction on GPUs: the eager one evaluates the mask on N^2 int64 tensors
                build = torch.compile(create_block_mask) if q.device.type == "cuda" else create_block_mask
                state[key] = build(mask_mod, None, None, n, n, device=q.device)
            b = q.shape[0]
            qt = q.reshape(b, n, d["Hq"], d["D"]).transpose(1, 2)
            kt = k.reshape(b, n, d["Hkv"], d["D"]).transpose(1, 2)
            vt = v.reshape(b, n, d["Hkv"], d["D"]).transpose(1, 2)
            out = state["compiled"](qt, kt, vt, score_mod=None if rpb is None else rpb_score_mod(rpb),
                                    block_mask=state[key], enable_gqa=d["Hq"] != d["Hkv"])
            return out.transpose(1, 2).reshape(q.shape)
        return flex

    def _unfused(self, case: Case):
        d, geo = case.dims, self.geometry(case)
        n, slots = self._tokens(case), self._slots(case)

        def unfused(q, k, v, rpb=None):
            b = q.shape[0]
            grad = torch.is_grad_enabled() and q.requires_grad
            gathered = 2 * b * n * slots * d["Hkv"] * d["D"] * q.element_size()   # neighbour K and V
            logits = 2 * b * n * slots * d["Hq"] * q.element_size()               # logits and softmax
            _require_memory((gathered + logits) * (4 if grad else 2), q.device, "the gathered neighbours")
            key, valid, flat = geo.neighbors(q.device)
            out = _gather_attention(q.reshape(b, n, d["Hq"], d["D"]), k.reshape(b, n, d["Hkv"], d["D"]),
                                    v.reshape(b, n, d["Hkv"], d["D"]), key, valid, flat, rpb, d["D"] ** -0.5,
                                    n, checkpoint=False)
            return out.reshape(q.shape)
        return unfused

    def _natten(self, case: Case):
        d = case.dims
        rank = len(d["spatial"])

        def natten_na(q, k, v, rpb=None):
            try:
                import natten
            except ImportError:
                _unsupported("natten is not installed")
            fn = getattr(natten, f"na{rank}d", None)
            if fn is None:
                _unsupported(f"natten {getattr(natten, '__version__', '?')} has no natten.na{rank}d (>= 0.20 API)")
            if rpb is not None:
                _unsupported("NATTEN >= 0.20 has no relative positional bias")
            return fn(q, k, v, kernel_size=d["kernel"], stride=d["stride"], dilation=d["dilation"],
                      is_causal=d["causal"])
        return natten_na

    # ------------------------------------------------------------------------------------------
    # work
    # ------------------------------------------------------------------------------------------

    def _pairs(self, case: Case) -> int:
        """Query-key pairs of one batch element and head: the product over axes of each axis' window sizes."""
        d = case.dims
        total = 1
        for L, k, s, dil, c in zip(d["spatial"], d["kernel"], d["stride"], d["dilation"], d["causal"]):
            total *= sum(count for _, count in _reference().na_axis_windows(L, k, s, dil, bool(c)))
        return total

    def work(self, case: Case, batch: int, mode: str, itemsize: int) -> tuple[int, int]:
        d = case.dims
        pairs = self._pairs(case)
        n = self._tokens(case)
        q = batch * n * d["Hq"] * d["D"]
        kv = batch * n * d["Hkv"] * d["D"]
        rpb = d["Hq"] * _numel(2 * k - 1 for k in d["kernel"]) if d["rpb"] else 0
        fwd_flops = 4 * batch * d["Hq"] * d["D"] * pairs
        fwd_bytes = (2 * q + 2 * kv + rpb) * itemsize
        if mode == "fwd":
            return fwd_bytes, fwd_flops
        bwd_bytes = (4 * q + 4 * kv + 2 * rpb) * itemsize   # read q, k, v, out, dout (+rpb); write dq, dk, dv (+drpb)
        return fwd_bytes + bwd_bytes, fwd_flops + 10 * batch * d["Hq"] * d["D"] * pairs


def _dense_bias(rpb: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, flat: torch.Tensor, n: int) -> torch.Tensor:
    """[Hq, N, N] additive mask: rpb on every (query, neighbour) pair, -inf elsewhere (differentiable in rpb)."""
    heads = rpb.shape[0]
    bias = torch.full((heads, n, n), float("-inf"), device=rpb.device, dtype=rpb.dtype)
    head_idx = torch.arange(heads, device=rpb.device).view(-1, 1)
    return bias.index_put((head_idx, rows.view(1, -1), keys.view(1, -1)), rpb.reshape(heads, -1)[:, flat])


OPS = (NeighborhoodAttentionBench(),)
