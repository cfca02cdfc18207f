"""Seeded random case generators for parity sweeps (shared by tests and benchmarks)."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class DepthwiseCase:
    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    channels_last: bool
    bias: bool

    def out_size(self) -> tuple[int, int]:
        ho = (self.h + self.padding[0] + self.padding[1] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        wo = (self.w + self.padding[2] + self.padding[3] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        return ho, wo

    def __str__(self) -> str:
        layout = "cl" if self.channels_last else "nchw"
        return (f"{self.n}x{self.c}x{self.h}x{self.w}-k{self.kh}x{self.kw}-s{self.stride[0]}{self.stride[1]}"
                f"-p{''.join(map(str, self.padding))}-d{self.dilation[0]}{self.dilation[1]}-{layout}"
                f"{'-bias' if self.bias else ''}")


def random_depthwise_cases(count: int, seed: int, max_size: int = 16, kernels=(1, 2, 3, 4, 5, 7),
                           max_stride: int = 3, max_dilation: int = 3, max_pad: int = 4) -> list[DepthwiseCase]:
    """Cases with odd channel counts, sizes smaller than the kernel, asymmetric padding, both layouts."""
    rng = random.Random(seed)
    out: list[DepthwiseCase] = []
    while len(out) < count:
        case = DepthwiseCase(
            n=rng.choice([1, 1, 2, 3]), c=rng.choice([1, 3, 5, 13, 16, 17, 24]),
            h=rng.randint(1, max_size), w=rng.randint(1, max_size),
            kh=rng.choice(kernels), kw=rng.choice(kernels),
            stride=(rng.randint(1, max_stride), rng.randint(1, max_stride)),
            padding=tuple(rng.randint(0, max_pad) for _ in range(4)),  # type: ignore[arg-type]
            dilation=(rng.randint(1, max_dilation), rng.randint(1, max_dilation)),
            channels_last=rng.random() < 0.5, bias=rng.random() < 0.7)
        ho, wo = case.out_size()
        if ho >= 1 and wo >= 1:
            out.append(case)
    return out


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    lq: int
    lk: int
    hq: int
    hkv: int
    d: int
    causal: bool
    window: tuple[int, int]  # (left, right); -1 = unbounded

    def __str__(self) -> str:
        win = "" if self.window == (-1, -1) else f"-w{self.window[0]},{self.window[1]}"
        return (f"b{self.batch}-q{self.lq}-k{self.lk}-h{self.hq}/{self.hkv}-d{self.d}"
                f"{'-causal' if self.causal else ''}{win}")


def random_attention_cases(count: int, seed: int, max_len: int = 40, head_dims=(1, 8, 24, 32, 63, 64),
                           groups=(1, 2, 4), kv_heads=(1, 2)) -> list[AttentionCase]:
    """Lq < Lk, Lq == Lk and Lq > Lk (rows that see no key), causal, one- and two-sided windows."""
    rng = random.Random(seed)
    out: list[AttentionCase] = []
    for _ in range(count):
        lq = rng.randint(1, max_len)
        lk = rng.choice([lq, rng.randint(1, max_len)])
        hkv = rng.choice(kv_heads)
        window = rng.choice([(-1, -1), (-1, -1), (rng.randint(0, 8), -1), (-1, rng.randint(0, 8)),
                             (rng.randint(0, 8), rng.randint(0, 8))])
        out.append(AttentionCase(batch=rng.choice([1, 2, 3]), lq=lq, lk=lk, hq=hkv * rng.choice(groups), hkv=hkv,
                                 d=rng.choice(head_dims), causal=rng.random() < 0.5, window=window))
    return out


@dataclass(frozen=True)
class NeighborhoodCase:
    batch: int
    spatial: tuple
    kernel_size: tuple
    stride: tuple
    dilation: tuple
    is_causal: tuple
    hq: int
    hkv: int
    d: int
    rpb: bool

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def slots(self) -> int:
        n = 1
        for k in self.kernel_size:
            n *= k
        return n

    def conf(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation, is_causal=self.is_causal)

    def __str__(self) -> str:
        axes = "x".join(map(str, self.spatial))
        causal = "".join("c" if c else "-" for c in self.is_causal)
        return (f"b{self.batch}-{axes}-k{self.kernel_size}-s{self.stride}-d{self.dilation}-{causal}"
                f"-h{self.hq}/{self.hkv}-d{self.d}{'-rpb' if self.rpb else ''}")


def random_neighborhood_cases(count: int, seed: int, ranks=(1, 2, 3), head_dims=(1, 8, 16, 24, 32, 33),
                              max_tokens: int = 300) -> list[NeighborhoodCase]:
    """Odd and even kernels, windows shifted at both borders, dilation groups of unequal length,
    strides up to the kernel, per-axis causal, GQA/MQA, relative positional bias."""
    rng = random.Random(seed)
    out: list[NeighborhoodCase] = []
    while len(out) < count:
        rank = rng.choice(ranks)
        per_axis_max = {1: 40, 2: 14, 3: 7}[rank]
        spatial, ks, ss, ds = [], [], [], []
        for _ in range(rank):
            k = rng.randint(2, min(7, per_axis_max))
            d = rng.choice([1, 1, 2, 3])
            length = rng.randint(k * d, max(k * d, per_axis_max))
            spatial.append(length)
            ks.append(k)
            ss.append(rng.choice([1, 1, rng.randint(1, k)]))
            ds.append(d)
        if len(out) % 3 == 2:  # a third non-causal with rpb
            causal = (False,) * rank
        else:
            causal = tuple(rng.random() < 0.3 for _ in range(rank))
        tokens = 1
        for s in spatial:
            tokens *= s
        if tokens > max_tokens:
            continue
        hkv = rng.choice([1, 2])
        out.append(NeighborhoodCase(batch=rng.choice([1, 2]), spatial=tuple(spatial), kernel_size=tuple(ks),
                                    stride=tuple(ss), dilation=tuple(ds), is_causal=causal,
                                    hq=hkv * rng.choice([1, 2, 4]), hkv=hkv, d=rng.choice(head_dims),
                                    rpb=not any(causal) and rng.random() < 0.6))
    return out
