"""Depthwise-convolution benchmarks: model shapes, baselines, byte and FLOP counts.

Shapes are the depthwise layers of each model at 224 x 224 input (stage resolutions 56/28/14/7):
- ConvNeXt-T: 7x7, C = 96/192/384/768.
- RepLKNet-31B: 31x31 C=128 @56, 29x29 C=256 @28, 27x27 C=512 @14, 13x13 C=1024 @7.
- SLaK-T: ConvNeXt-T widened 1.3x (C = 124/249/499/998), kernels 51/49/47/13 decomposed into a
  long x 5 and a 5 x long depthwise conv (the 5x5 branch is left out).
- UniRepLKNet-T: C = 80/160/320/640; stages 2-4 use 13x13 (stage 1 uses 3x3, not benchmarked);
  the 13x13 is the deployed kernel after the dilated branches are merged into it.
- InceptionNeXt-T token mixer: C = 96/192/384/768, square 3, band 11, branch ratio 0.125.
- 1-D: a Conformer-style convolution module (C=512, k=31) at 1024 frames and a k=63 long
  convolution (C=1024, L=8192); these two lengths are representative, not taken from a paper.
All layers use stride 1 and "same" padding, as in the models.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from .harness import BenchOp, Case, QuickItem, spread_indices

QUICK_BATCH_CPU_CUDA = {"cpu": 8, "cuda": 64}


def _resolve_pad(padding, k: int, d: int, axis: int) -> tuple[int, int]:
    if padding == "same":
        total = d * (k - 1)
        return total // 2, total - total // 2
    if padding == "valid":
        return 0, 0
    p = padding if isinstance(padding, int) else padding[axis]
    return p, p


def _out_size(size: int, k: int, s: int, d: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _fusekit():
    import fusekit
    return fusekit


def _references():
    from fusekit.testing import reference
    return reference


def _seeded_inputs(gen, device, dtype, shapes: Mapping[str, tuple], fan_in: Mapping[str, int]) -> dict:
    """Normal inputs; weights scaled by 1/sqrt(taps) so outputs stay O(1) at every kernel size."""
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if name in fan_in:
            t = t / math.sqrt(fan_in[name])
        out[name] = t.to(dtype)
    return out


class _ChannelSubset:
    """Channel subsets for ops whose inputs are x [N, C, ...], weight [C, ...], bias [C]."""

    def subset_units(self, case: Case) -> int:
        return case.dims["C"]

    def select_units(self, case: Case, count: int, gen: torch.Generator):
        return spread_indices(case.dims["C"], count, gen)

    def slice_inputs(self, case, inputs, sel):
        return {"x": inputs["x"].index_select(1, sel.to(inputs["x"].device)),
                "weight": inputs["weight"].index_select(0, sel.to(inputs["weight"].device)),
                "bias": inputs["bias"].index_select(0, sel.to(inputs["bias"].device))}

    def slice_result(self, case, name, t, sel):
        dim = 1 if name in ("y", "grad_x") else 0
        return t.index_select(dim, sel.to(t.device))


class _DepthwiseConvBench(_ChannelSubset):
    """x, weight, bias -> y convolutions whose case dims carry stride, padding and dilation.

    Subclasses name their float64 reference, PyTorch baseline and fusekit function."""

    reference_fn: str      # name in fusekit.testing.reference
    torch_fn: staticmethod  # F.conv1d / F.conv2d
    fusekit_fn_name: str   # name in fusekit

    def reference(self, case, inputs):
        d = case.dims
        return getattr(_references(), self.reference_fn)(inputs["x"], inputs["weight"], inputs["bias"],
                                                         d["stride"], d["padding"], d["dilation"])

    def reference_name(self) -> str:
        return f"fusekit.testing.reference.{self.reference_fn} (float64)"

    def baseline_fn(self, case, name):
        d = case.dims
        conv = self.torch_fn
        return lambda x, weight, bias: conv(x, weight, bias, d["stride"], d["padding"], d["dilation"],
                                            groups=x.shape[1])

    def fusekit_fn(self, case, backend):
        d = case.dims
        fn = getattr(_fusekit(), self.fusekit_fn_name)
        chosen = None if backend == "auto" else backend
        return lambda x, weight, bias: fn(x, weight, bias, d["stride"], d["padding"], d["dilation"], backend=chosen)


class DepthwiseConv2dBench(_DepthwiseConvBench, BenchOp):
    name = "depthwise_conv2d"
    description = "fusekit.depthwise_conv2d == F.conv2d(x, w, b, groups=C)"
    data_inputs = ("x",)
    param_inputs = ("weight", "bias")
    backend_op = "depthwise_conv2d"
    reference_fn = "depthwise_conv2d_reference"
    torch_fn = staticmethod(F.conv2d)
    fusekit_fn_name = "depthwise_conv2d"

    def cases(self) -> list[Case]:
        cases = []

        def add(name, C, H, kh, kw, source, tags=(), W=None, stride=1, padding="same", dilation=1):
            cases.append(Case(self.name, name, {"C": C, "H": H, "W": W or H, "kh": kh, "kw": kw, "stride": stride,
                                                "padding": padding, "dilation": dilation}, source, frozenset(tags)))

        for i, (C, H) in enumerate(((96, 56), (192, 28), (384, 14), (768, 7)), 1):
            add(f"convnext_t.s{i}", C, H, 7, 7, f"ConvNeXt-T stage {i}")
        for i, (k, C, H) in enumerate(((31, 128, 56), (29, 256, 28), (27, 512, 14), (13, 1024, 7)), 1):
            add(f"replknet31b.s{i}", C, H, k, k, f"RepLKNet-31B stage {i}")
        for i, (k, C, H) in enumerate(((51, 124, 56), (49, 249, 28), (47, 499, 14), (13, 998, 7)), 1):
            add(f"slak_t.s{i}.{k}x5", C, H, k, 5, f"SLaK-T stage {i}, {k}x5 branch")
            add(f"slak_t.s{i}.5x{k}", C, H, 5, k, f"SLaK-T stage {i}, 5x{k} branch")
        for i, (C, H) in enumerate(((160, 28), (320, 14), (640, 7)), 2):
            add(f"unireplknet_t.s{i}", C, H, 13, 13, f"UniRepLKNet-T stage {i} (deployed 13x13)")
        # tiny shapes for tests and smoke runs: odd sizes, an even kernel, stride and dilation
        add("tiny.k3", 5, 9, 3, 3, "test shape", ("test",), W=11)
        add("tiny.k6x3", 6, 7, 6, 3, "test shape: even kernel, asymmetric 'same'", ("test",), W=8)
        add("tiny.s2d2", 4, 11, 5, 5, "test shape: stride 2, dilation 2", ("test",), W=10, stride=2,
            padding=3, dilation=2)
        return cases

    def quick_items(self) -> list[QuickItem]:
        # on the CPU, PyTorch's NCHW backward takes seconds even at batch 1: fwd_bwd runs at batch 1 there
        return [QuickItem("replknet31b.s1", QUICK_BATCH_CPU_CUDA, ("fwd",)),
                QuickItem("replknet31b.s1", {"cpu": 1, "cuda": 64}, ("fwd_bwd",)),
                QuickItem("convnext_t.s1", QUICK_BATCH_CPU_CUDA, ("fwd",)),
                QuickItem("convnext_t.s1", {"cpu": 1, "cuda": 64}, ("fwd_bwd",))]

    def baselines(self) -> dict[str, str]:
        return {"torch": "F.conv2d(groups=C) on the same tensors"}

    def _geometry(self, case: Case):
        d = case.dims
        sh, sw = _pair(d["stride"])
        dh, dw = _pair(d["dilation"])
        ph = _resolve_pad(d["padding"], d["kh"], dh, 0)
        pw = _resolve_pad(d["padding"], d["kw"], dw, 1)
        return _out_size(d["H"], d["kh"], sh, dh, ph), _out_size(d["W"], d["kw"], sw, dw, pw)

    def shape(self, case: Case, batch: int) -> str:
        d = case.dims
        extra = "" if d["stride"] == 1 and d["dilation"] == 1 else f" s{d['stride']} d{d['dilation']}"
        return f"{batch}x{d['C']}x{d['H']}x{d['W']} k{d['kh']}x{d['kw']}{extra}"

    def output_shape(self, case: Case, batch: int) -> tuple:
        return (batch, case.dims["C"], *self._geometry(case))

    def make_inputs(self, case, batch, dtype, device, gen):
        d = case.dims
        return _seeded_inputs(gen, device, dtype,
                              {"x": (batch, d["C"], d["H"], d["W"]), "weight": (d["C"], 1, d["kh"], d["kw"]),
                               "bias": (d["C"],)},
                              {"weight": d["kh"] * d["kw"]})

    def macs_per_unit(self, case: Case, batch: int) -> float:
        ho, wo = self._geometry(case)
        return batch * ho * wo * case.dims["kh"] * case.dims["kw"]

    def work(self, case: Case, batch: int, mode: str, itemsize: int) -> tuple[int, int]:
        d = case.dims
        ho, wo = self._geometry(case)
        x = batch * d["C"] * d["H"] * d["W"]
        y = batch * d["C"] * ho * wo
        w = d["C"] * d["kh"] * d["kw"]
        b = d["C"]
        per_direction = 2 * y * d["kh"] * d["kw"]
        return _directions(mode, itemsize, per_direction,
                           fwd=x + w + b + y,          # read x, w, b; write y
                           bwd_data=y + w + x,         # read gy, w; write gx
                           bwd_weight=y + x + w + b)   # read gy, x; write gw, gb


def _directions(mode: str, itemsize: int, flops_per_direction: int, *, fwd: int, bwd_data: int,
                bwd_weight: int) -> tuple[int, int]:
    """(bytes, flops) of a mode, summing the directions it runs: each kernel reads its operands
    once and writes its results once (the minimum traffic of unfused kernels)."""
    parts = {"fwd": ("fwd",), "fwd_bwd": ("fwd", "bwd_data", "bwd_weight"), "bwd": ("bwd_data", "bwd_weight"),
             "bwd_data": ("bwd_data",), "bwd_weight": ("bwd_weight",)}[mode]
    elements = {"fwd": fwd, "bwd_data": bwd_data, "bwd_weight": bwd_weight}
    return sum(elements[p] for p in parts) * itemsize, flops_per_direction * len(parts)


class DepthwiseConv1dBench(_DepthwiseConvBench, BenchOp):
    name = "depthwise_conv1d"
    description = ("fusekit.depthwise_conv1d == F.conv1d(x, w, b, groups=C) on [N, C, L]; layout nchw means "
                   "[N, C, L] memory, channels_last a transposed [N, L, C] tensor")
    data_inputs = ("x",)
    param_inputs = ("weight", "bias")
    backend_op = "depthwise_conv2d"   # the 1-D op runs as the 2-D op on [N, C, 1, L]
    reference_fn = "depthwise_conv1d_reference"
    torch_fn = staticmethod(F.conv1d)
    fusekit_fn_name = "depthwise_conv1d"

    def cases(self) -> list[Case]:
        def case(name, C, L, k, source, tags=(), stride=1, padding="same", dilation=1):
            return Case(self.name, name, {"C": C, "L": L, "k": k, "stride": stride, "padding": padding,
                                          "dilation": dilation}, source, frozenset(tags))
        return [case("conformer.k31", 512, 1024, 31, "Conformer-style conv module, C=512 k=31, 1024 frames "
                     "(representative length)"),
                case("long1d.k63", 1024, 8192, 63, "long 1-D convolution C=1024 L=8192 k=63 (representative)"),
                case("tiny.k7", 5, 17, 7, "test shape", ("test",))]

    def baselines(self) -> dict[str, str]:
        return {"torch": "F.conv1d(groups=C) on the same tensors"}

    def _length(self, case: Case) -> int:
        d = case.dims
        return _out_size(d["L"], d["k"], d["stride"], d["dilation"], _resolve_pad(d["padding"], d["k"], d["dilation"], 0))

    def shape(self, case: Case, batch: int) -> str:
        d = case.dims
        return f"{batch}x{d['C']}x{d['L']} k{d['k']}"

    def output_shape(self, case: Case, batch: int) -> tuple:
        return (batch, case.dims["C"], self._length(case))

    def to_layout(self, t: torch.Tensor, layout: str) -> torch.Tensor:
        if layout == "channels_last":
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        return t.contiguous()

    def output_layout_ok(self, y: torch.Tensor, layout: str) -> bool:
        return True  # no memory-format contract for 3-D tensors

    def make_inputs(self, case, batch, dtype, device, gen):
        d = case.dims
        return _seeded_inputs(gen, device, dtype,
                              {"x": (batch, d["C"], d["L"]), "weight": (d["C"], 1, d["k"]), "bias": (d["C"],)},
                              {"weight": d["k"]})

    def macs_per_unit(self, case: Case, batch: int) -> float:
        return batch * self._length(case) * case.dims["k"]

    def work(self, case: Case, batch: int, mode: str, itemsize: int) -> tuple[int, int]:
        d = case.dims
        x = batch * d["C"] * d["L"]
        y = batch * d["C"] * self._length(case)
        w = d["C"] * d["k"]
        b = d["C"]
        return _directions(mode, itemsize, 2 * y * d["k"], fwd=x + w + b + y, bwd_data=y + w + x,
                           bwd_weight=y + x + w + b)


class InceptionDWConv2dBench(BenchOp):
    name = "inception_dwconv2d"
    description = ("fusekit.inception_dwconv2d == InceptionNeXt's InceptionDWConv2d: split (C-3g, g, g, g), "
                   "identity | kxk | 1xband | bandx1 depthwise, cat")
    data_inputs = ("x",)
    param_inputs = ("w_hw", "b_hw", "w_w", "b_w", "w_h", "b_h")
    backend_op = "inception_dwconv2d"

    def cases(self) -> list[Case]:
        def case(name, C, H, source, tags=(), square=3, band=11, ratio=0.125, W=None):
            return Case(self.name, name, {"C": C, "H": H, "W": W or H, "square": square, "band": band,
                                          "ratio": ratio}, source, frozenset(tags))
        out = [case(f"inceptionnext_t.s{i}", C, H, f"InceptionNeXt-T stage {i} token mixer")
               for i, (C, H) in enumerate(((96, 56), (192, 28), (384, 14), (768, 7)), 1)]
        out.append(case("tiny.band5", 16, 10, "test shape: square 3, band 5, ratio 0.25", ("test",), band=5, ratio=0.25,
                        W=9))
        return out

    def quick_items(self) -> list[QuickItem]:
        return [QuickItem("inceptionnext_t.s1", QUICK_BATCH_CPU_CUDA, ("fwd", "fwd_bwd"))]

    def baselines(self) -> dict[str, str]:
        return {"torch": "InceptionNeXt's module in PyTorch: split + three F.conv2d(groups=g) + cat"}

    @staticmethod
    def _gc(case: Case) -> int:
        return int(case.dims["C"] * case.dims["ratio"])

    def shape(self, case: Case, batch: int) -> str:
        d = case.dims
        return f"{batch}x{d['C']}x{d['H']}x{d['W']} g{self._gc(case)} sq{d['square']} band{d['band']}"

    def output_shape(self, case: Case, batch: int) -> tuple:
        d = case.dims
        return (batch, d["C"], d["H"], d["W"])

    def make_inputs(self, case, batch, dtype, device, gen):
        d, g = case.dims, self._gc(case)
        sq, band = d["square"], d["band"]
        return _seeded_inputs(gen, device, dtype,
                              {"x": (batch, d["C"], d["H"], d["W"]),
                               "w_hw": (g, 1, sq, sq), "b_hw": (g,),
                               "w_w": (g, 1, 1, band), "b_w": (g,),
                               "w_h": (g, 1, band, 1), "b_h": (g,)},
                              {"w_hw": sq * sq, "w_w": band, "w_h": band})

    def reference(self, case, inputs):
        return _references().inception_dwconv2d_reference(**inputs)

    def reference_name(self) -> str:
        return "fusekit.testing.reference.inception_dwconv2d_reference (float64)"

    def baseline_fn(self, case, name):
        d = case.dims
        sq, band = d["square"], d["band"]

        def four_modules(x, w_hw, b_hw, w_w, b_w, w_h, b_h):
            g = w_hw.shape[0]
            x_id, x_hw, x_w, x_h = torch.split(x, (x.shape[1] - 3 * g, g, g, g), dim=1)
            return torch.cat((x_id,
                              F.conv2d(x_hw, w_hw, b_hw, padding=sq // 2, groups=g),
                              F.conv2d(x_w, w_w, b_w, padding=(0, band // 2), groups=g),
                              F.conv2d(x_h, w_h, b_h, padding=(band // 2, 0), groups=g)), dim=1)
        return four_modules

    def fusekit_fn(self, case, backend):
        fk = _fusekit()
        chosen = None if backend == "auto" else backend
        return lambda **inputs: fk.inception_dwconv2d(**inputs, backend=chosen)

    # subsets: the same local channels of each branch plus some identity channels, so the
    # sliced tensors are again a valid InceptionDWConv2d problem
    def subset_units(self, case: Case) -> int:
        return self._gc(case)

    def macs_per_unit(self, case: Case, batch: int) -> float:
        d = case.dims
        return batch * d["H"] * d["W"] * (d["square"] ** 2 + 2 * d["band"])

    def select_units(self, case: Case, count: int, gen: torch.Generator):
        n_id = case.dims["C"] - 3 * self._gc(case)
        return spread_indices(n_id, min(count, n_id), gen), spread_indices(self._gc(case), count, gen)

    def _channels(self, case: Case, sel) -> torch.Tensor:
        ident, branch = sel
        g = self._gc(case)
        first = case.dims["C"] - 3 * g
        return torch.cat([ident, branch + first, branch + first + g, branch + first + 2 * g])

    def slice_inputs(self, case, inputs, sel):
        chans = self._channels(case, sel)
        branch = sel[1]
        out = {}
        for k, v in inputs.items():
            out[k] = v.index_select(1 if k == "x" else 0, (chans if k == "x" else branch).to(v.device))
        return out

    def slice_result(self, case, name, t, sel):
        if name in ("y", "grad_x"):
            return t.index_select(1, self._channels(case, sel).to(t.device))
        return t.index_select(0, sel[1].to(t.device))

    def work(self, case: Case, batch: int, mode: str, itemsize: int) -> tuple[int, int]:
        # identity channels are a copy (read + write) in forward and in backward-data; the
        # weight gradient reads x and gy of the 3g convolved channels only
        d, g = case.dims, self._gc(case)
        plane = d["H"] * d["W"]
        x = batch * d["C"] * plane
        taps = d["square"] ** 2 + 2 * d["band"]
        w = g * taps
        b = 3 * g
        conv = batch * 3 * g * plane
        return _directions(mode, itemsize, 2 * batch * g * plane * taps,
                           fwd=x + w + b + x, bwd_data=x + w + x, bwd_weight=conv + conv + w + b)


OPS = (DepthwiseConv2dBench(), DepthwiseConv1dBench(), InceptionDWConv2dBench())
