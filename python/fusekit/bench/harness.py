"""Measurement core of fusekit-bench.

One work item is (op, case, batch, dtype, modes). For each item the harness draws seeded inputs,
computes the float64 reference (on a channel subset when the full reference would be too slow),
checks every provider (fusekit backends and PyTorch baselines, in each memory layout) against it,
times only the providers that passed, and derives GB/s, GFLOP/s, fractions of this device's
measured ceilings and speedups against each baseline timed in the same item.

Op-specific knowledge (shapes, inputs, baselines, byte and FLOP counts) lives in the op modules
(depthwise.py) as BenchOp subclasses; this file knows nothing of convolutions.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import subprocess
import time
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Container, Mapping, Sequence

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
LAYOUTS = ("nchw", "channels_last")
# every layout an op may declare: image ops run NCHW and channels_last, attention ops heads-last [B, L, H, D]
ALL_LAYOUTS = LAYOUTS + ("bshd",)
# fwd: forward only (no autograd graph); fwd_bwd: forward + backward for every input;
# bwd / bwd_data / bwd_weight: backward only, replayed on a graph built once (retain_graph),
# for all inputs / the data input only / the parameters only.
MODES = ("fwd", "fwd_bwd", "bwd", "bwd_data", "bwd_weight")
FUSEKIT_BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
# Device whose tensors a backend's kernels take; "auto" and "reference" follow the inputs.
BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}
QUANTILES = (0.5, 0.2, 0.8)
# Below this median a do_bench time is dominated by launch overhead: re-time with a CUDA graph.
CUDA_GRAPH_BELOW_MS = 0.05
# CPU calls slower than this (seconds; the NCHW PyTorch paths at large kernels) are timed once.
SLOW_CALL_S = 1.0
# Float64 reference work allowed per item before it is restricted to a channel subset, in
# multiply-adds. The shared reference is an explicit loop over kernel taps, ~1e8 MAC/s on this
# project's 2-core CPU; its gradients go through autograd and cost several times the forward.
DEFAULT_CHECK_MACS = {"cpu": 6e7, "cuda": 5e10}
REFERENCE_GRAD_COST = 8.0
# Exceptions by which fusekit says a backend cannot run a case (not a bug: reported as UNSUPPORTED).
UNSUPPORTED_ERRORS = ("BackendError", "ExtensionUnavailable")


@dataclasses.dataclass(frozen=True)
class Case:
    """A benchmark shape without its batch size."""
    op: str
    name: str
    dims: Mapping[str, Any]
    source: str                       # where the shape comes from (model, stage) or why it is representative
    tags: frozenset = frozenset()     # "test": tiny shapes, run only when named


@dataclasses.dataclass(frozen=True)
class QuickItem:
    """One entry of the --quick suite: a case at a device-dependent batch, in the given modes."""
    case: str
    batch: Mapping[str, int]          # device type -> batch (a device left out does not run the item)
    modes: tuple


@dataclasses.dataclass(frozen=True)
class WorkItem:
    op: "BenchOp"
    case: Case
    batch: int
    dtype: str
    modes: tuple

    def label(self) -> str:
        return f"{self.op.name} {self.case.name} N={self.batch} {self.dtype} {'+'.join(self.modes)}"


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str                         # "fusekit:<backend>" or a baseline name ("torch")
    layout: str
    is_baseline: bool
    fn: Callable[..., torch.Tensor]   # fn(**inputs) -> output

    @property
    def key(self) -> str:
        return f"{self.name}_{self.layout}"


class BenchOp:
    """What the harness needs to know about one operator. Subclasses fill in every method."""

    name = ""
    description = ""
    data_inputs: tuple = ("x",)       # inputs that take the layout and get grad in bwd_data
    param_inputs: tuple = ()          # inputs that get grad in bwd_weight
    backend_op = ""                   # name for fusekit.available_backends
    layouts: tuple = LAYOUTS          # memory layouts its providers run in
    modes: tuple = MODES              # modes it supports (an inference-only op: ("fwd",))

    def cases(self) -> list[Case]:
        raise NotImplementedError

    def batches(self, case: Case, requested: Sequence[int]) -> list[int]:
        """Batch sizes to run a case at when the user named none (``requested`` is the CLI default)."""
        return list(requested)

    def default_baselines(self, device: str) -> list[str]:
        """Baseline keys (<name>_<layout>) run when the user names none."""
        return [f"{name}_{layout}" for name in self.baselines() for layout in self.layouts]

    def quick_items(self) -> list[QuickItem]:
        return []

    def baselines(self) -> dict[str, str]:
        """Baseline name -> one-line description."""
        raise NotImplementedError

    def shape(self, case: Case, batch: int) -> str:
        raise NotImplementedError

    def make_inputs(self, case: Case, batch: int, dtype: torch.dtype, device: str,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def output_shape(self, case: Case, batch: int) -> tuple:
        raise NotImplementedError

    def to_layout(self, t: torch.Tensor, layout: str) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()

    def output_layout_ok(self, y: torch.Tensor, layout: str) -> bool:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        return y.is_contiguous(memory_format=fmt)

    def reference(self, case: Case, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def reference_name(self) -> str:
        raise NotImplementedError

    def baseline_fn(self, case: Case, name: str) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def fusekit_backends(self) -> dict[str, str | None]:
        import fusekit
        return fusekit.available_backends(self.backend_op)

    def fusekit_fn(self, case: Case, backend: str) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def work(self, case: Case, batch: int, mode: str, itemsize: int) -> tuple[int, int]:
        """(bytes moved, floating-point operations) of one call in ``mode``."""
        raise NotImplementedError

    # Channel subsets for the reference: outputs of different channels are independent.
    def subset_units(self, case: Case) -> int:
        """How many independently selectable channel units the case has."""
        raise NotImplementedError

    def macs_per_unit(self, case: Case, batch: int) -> float:
        raise NotImplementedError

    def select_units(self, case: Case, count: int, gen: torch.Generator) -> Any:
        raise NotImplementedError

    def slice_inputs(self, case: Case, inputs: Mapping[str, torch.Tensor], sel: Any) -> dict:
        raise NotImplementedError

    def slice_result(self, case: Case, name: str, t: torch.Tensor, sel: Any) -> torch.Tensor:
        raise NotImplementedError


def spread_indices(total: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` sorted distinct indices in [0, total): always the first and the last, the rest seeded-random."""
    if count >= total:
        return torch.arange(total)
    ends = [0, total - 1][:count]
    middle = torch.randperm(max(total - 2, 0), generator=gen)[: max(count - 2, 0)] + 1
    return torch.cat([torch.tensor(ends, dtype=torch.long), middle]).unique(sorted=True)


# ----------------------------------------------------------------------------------------------
# environment and device ceilings
# ----------------------------------------------------------------------------------------------

def _git_commit() -> str | None:
    """HEAD of the checkout this fusekit was imported from (with -dirty), None when not in one."""
    try:
        import fusekit
        pkg_dir = os.path.dirname(os.path.abspath(fusekit.__file__))
    except Exception:
        return None
    try:
        top = subprocess.run(["git", "-C", pkg_dir, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0:
            return None
        root = top.stdout.strip()
        # only when the package really is this checkout's python/fusekit, not an install inside some repo
        if os.path.realpath(os.path.join(root, "python", "fusekit")) != os.path.realpath(pkg_dir):
            return None
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def fusekit_commit() -> str:
    """Git HEAD of the checkout fusekit runs from, else $FUSEKIT_COMMIT (set by benchmarks/gpu_suite.py on
    machines whose copy of the tree has no .git), else the commit recorded at build time."""
    commit = _git_commit() or os.environ.get("FUSEKIT_COMMIT")
    if commit:
        return commit
    try:
        from fusekit import _build_info
        return str(getattr(_build_info, "COMMIT", "unknown"))
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, threads: int) -> dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import fusekit
        fusekit_version = fusekit.__version__
    except Exception:
        fusekit_version = "unavailable"
    env = {
        "device": cpu_name() if device == "cpu" else torch.cuda.get_device_name(),
        "device_type": device,
        "arch": None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fusekit": fusekit_version,
        "commit": fusekit_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": threads,
    }
    if device == "cpu":
        env["device"] = f"{env['device']} ({os.cpu_count()} logical CPUs)"
    else:
        major, minor = torch.cuda.get_device_capability()
        env["arch"] = f"sm_{major}{minor}"
    return env


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int | None
    timer: str


def quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Linearly interpolated quantiles (as numpy's default and triton.testing)."""
    v = sorted(values)
    out = []
    for q in qs:
        pos = q * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


@dataclasses.dataclass
class TimerSettings:
    device: str
    threads: int
    min_run_time: float = 0.2         # CPU: seconds per blocked_autorange measurement
    warmup_ms: float = 25.0           # GPU: do_bench warmup budget
    rep_ms: float = 100.0             # GPU: do_bench / do_bench_cudagraph repetition budget
    timer: str = "auto"               # GPU: auto | do_bench | cuda_graph
    slow_calls: int = 1               # CPU: calls timed, one by one, when a warm call takes over SLOW_CALL_S


def time_call(run: Callable[[], Any], ts: TimerSettings, first_call_s: float | None = None) -> Timing:
    """Time ``run``; ``first_call_s`` is how long the correctness call (the warm-up) took."""
    if ts.device == "cpu":
        return _time_cpu(run, ts, first_call_s)
    return _time_cuda(run, ts)


def _time_cpu(run, ts: TimerSettings, first_call_s: float | None) -> Timing:
    from torch.utils.benchmark import Timer
    if first_call_s is not None and first_call_s > SLOW_CALL_S:
        # blocked_autorange would spend a second warm-up call on it: timing calls one by one after
        # the correctness call is the least that measures a warm call of PyTorch's multi-second paths
        times = []
        with _num_threads(ts.threads):
            for _ in range(max(1, ts.slow_calls)):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1e3)
        med, p20, p80 = quantiles(times, QUANTILES)
        return Timing(med, p20, p80, len(times), "single call" if len(times) == 1 else f"{len(times)} single calls")
    # blocked_autorange: one estimate/warm-up pass, then blocks of `number` calls until
    # min_run_time has passed; a call slower than min_run_time is measured once.
    m = Timer(stmt="run()", globals={"run": run}, num_threads=ts.threads).blocked_autorange(
        min_run_time=ts.min_run_time)
    med, p20, p80 = (t * 1e3 for t in quantiles(m.times, QUANTILES))
    return Timing(med, p20, p80, len(m.times) * m.number_per_run, "torch.utils.benchmark")


def _time_cuda(run, ts: TimerSettings) -> Timing:
    import triton.testing

    if ts.timer != "cuda_graph":
        med, p20, p80 = triton.testing.do_bench(run, warmup=ts.warmup_ms, rep=ts.rep_ms, quantiles=list(QUANTILES))
        timing = Timing(med, p20, p80, None, "do_bench")
        if ts.timer == "do_bench" or med >= CUDA_GRAPH_BELOW_MS:
            return timing
    try:
        med, p20, p80 = triton.testing.do_bench_cudagraph(run, rep=ts.rep_ms, quantiles=list(QUANTILES))
    except Exception:
        torch.cuda.synchronize()
        if ts.timer == "cuda_graph":
            raise
        return timing
    return Timing(med, p20, p80, None, "cuda_graph")


@contextmanager
def _num_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_ceilings(ts: TimerSettings) -> dict[str, Any]:
    """Copy bandwidth and fp32 matrix-multiply rate of this device, timed like the providers."""
    if ts.device == "cpu":
        copy_numel, mm = 1 << 25, 2048
    else:
        copy_numel, mm = 1 << 28, 4096
    src = torch.randn(copy_numel, device=ts.device)
    dst = torch.empty_like(src)
    t_copy = time_call(lambda: dst.copy_(src), ts)
    copy_gbps = 2 * src.numel() * src.element_size() / (t_copy.median_ms * 1e6)
    del src, dst
    a = torch.randn(mm, mm, device=ts.device)
    b = torch.randn(mm, mm, device=ts.device)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: CUDA-core / vector-FMA rate
    try:
        t_mm = time_call(lambda: torch.mm(a, b), ts)
    finally:
        torch.set_float32_matmul_precision(previous)
    fma_gflops = 2 * mm ** 3 / (t_mm.median_ms * 1e6)
    copy_mib = copy_numel * 4 >> 20
    return {
        "copy_gbps": copy_gbps,
        "copy_desc": f"copy_ of a {copy_mib} MiB fp32 tensor, bytes read + written",
        "fma_gflops": fma_gflops,
        "fma_desc": (f"fp32 torch.mm {mm}x{mm}x{mm}, TF32 off: the FMA rate a tuned GEMM reaches "
                     "on this device (an attainable ceiling, below the vector/CUDA-core peak)"),
    }


# ----------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------

def make_generator(device: str, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def item_seed(item: WorkItem, seed: int) -> int:
    key = f"{item.op.name}|{item.case.name}|{item.batch}|{item.dtype}"
    return (zlib.crc32(key.encode()) ^ seed) & 0x7FFFFFFF


def grad_names(op: BenchOp, mode: str, present: Container[str] | None = None) -> tuple:
    """Inputs that get a gradient in ``mode``; with ``present``, only those a case has (an optional
    input, such as a bias some cases leave out, is simply absent from the inputs)."""
    if mode in ("fwd_bwd", "bwd"):
        names = op.data_inputs + op.param_inputs
    elif mode == "bwd_data":
        names = op.data_inputs
    elif mode == "bwd_weight":
        names = op.param_inputs
    else:
        names = ()
    return tuple(n for n in names if present is None or n in present)


@dataclasses.dataclass
class Reference:
    outputs: dict                     # "y", "grad_<input>" -> float64 tensors (on the subset)
    sel: Any                          # channel subset, None for all
    checked: str                      # "all" or "k/n channels"
    name: str


def compute_reference(op: BenchOp, case: Case, batch: int, inputs: Mapping[str, torch.Tensor],
                      gy: torch.Tensor, modes: Sequence[str], check_macs: float | None,
                      gen: torch.Generator) -> Reference:
    wanted = sorted({n for m in modes for n in grad_names(op, m, inputs)},
                    key=(op.data_inputs + op.param_inputs).index)
    units = op.subset_units(case)
    cost = op.macs_per_unit(case, batch) * (1 + (REFERENCE_GRAD_COST if wanted else 0))
    count = units if check_macs is None else max(1, min(units, int(check_macs // max(cost, 1))))
    count = max(count, min(units, 2))
    sel = None if count >= units else op.select_units(case, count, gen)
    sub = inputs if sel is None else op.slice_inputs(case, inputs, sel)
    leaves = {k: v.detach().double().requires_grad_(k in wanted) for k, v in sub.items()}
    with torch.enable_grad():
        y = op.reference(case, leaves)
    outputs = {"y": y.detach()}
    if wanted:
        gy_sub = gy if sel is None else op.slice_result(case, "y", gy, sel)
        grads = torch.autograd.grad(y, [leaves[k] for k in wanted], gy_sub.double())
        outputs.update({f"grad_{k}": g.detach() for k, g in zip(wanted, grads)})
    checked = "all" if sel is None else f"{count}/{units} ch"
    return Reference(outputs, sel, checked, op.reference_name())


def check_outputs(op: BenchOp, case: Case, results: Mapping[str, torch.Tensor], ref: Reference,
                  dtype: torch.dtype, tolerance: Callable[[torch.dtype, str], tuple]) -> tuple[float, bool, str]:
    """(max abs error, passed, note). Elementwise |out - ref| <= atol + rtol * |ref|."""
    worst, ok, notes = 0.0, True, []
    for name, out in results.items():
        r = ref.outputs[name]
        if out is None:
            ok = False
            notes.append(f"{name} missing")
            continue
        o = out if ref.sel is None else op.slice_result(case, name, out, ref.sel)
        o = o.detach().double()
        if o.shape != r.shape:
            ok = False
            notes.append(f"{name} shape {tuple(o.shape)} != {tuple(r.shape)}")
            continue
        atol, rtol = tolerance(dtype, "forward" if name == "y" else "backward")
        diff = (o - r).abs()
        err = float(diff.max()) if diff.numel() else 0.0
        if not math.isfinite(err):
            worst = float("nan") if math.isnan(err) else err
        elif math.isfinite(worst):
            worst = max(worst, err)
        bad = int((~(diff <= atol + rtol * r.abs())).sum())
        if bad:
            ok = False
            notes.append(f"{name}: {bad} of {diff.numel()} elements beyond atol={atol:g} rtol={rtol:g}")
    return worst, ok, "; ".join(notes)


def prepare_call(op: BenchOp, provider: Provider, inputs: Mapping[str, torch.Tensor], gy: torch.Tensor,
                 mode: str) -> tuple[Callable[[], Any], Callable[[], dict]]:
    """(run, results): run() is what gets timed; results() returns the outputs to check."""
    inp = {k: (op.to_layout(v, provider.layout) if k in op.data_inputs else v) for k, v in inputs.items()}
    fn = provider.fn
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(**inp)

        def results():
            y = run()
            if not op.output_layout_ok(y, provider.layout):
                raise LayoutError(f"output is not {provider.layout} like its input (strides {y.stride()})")
            return {"y": y}
        return run, results

    names = grad_names(op, mode, inp)
    inp = {k: v.detach().requires_grad_(k in names) for k, v in inp.items()}
    leaves = [inp[k] for k in names]
    g = op.to_layout(gy, provider.layout)
    if mode == "fwd_bwd":
        def run():
            return torch.autograd.grad(fn(**inp), leaves, g)

        def results():
            y = fn(**inp)
            grads = torch.autograd.grad(y, leaves, g)
            return {"y": y.detach(), **{f"grad_{k}": v for k, v in zip(names, grads)}}
        return run, results

    y = fn(**inp)  # backward-only modes replay the backward of this one graph

    def run():
        return torch.autograd.grad(y, leaves, g, retain_graph=True)

    def results():
        return {f"grad_{k}": v for k, v in zip(names, run())}
    return run, results


class LayoutError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# one work item
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunSettings:
    timer: TimerSettings
    layouts: Sequence[str]
    backends: Sequence[str]            # fusekit backends to run ("auto", "cpu", ...)
    baselines: Sequence[str]           # baseline keys ("torch_nchw", ...)
    tolerance: Callable[[torch.dtype, str], tuple]
    check_macs: float | None
    seed: int = 0


def split_baseline_key(key: str) -> tuple[str, str]:
    for layout in ALL_LAYOUTS:
        if key.endswith("_" + layout):
            return key[: -len(layout) - 1], layout
    raise ValueError(f"baseline {key!r} must end in one of {['_' + lay for lay in ALL_LAYOUTS]}")


def providers_for(op: BenchOp, case: Case, rs: RunSettings) -> list[Provider]:
    out = []
    layouts = [lay for lay in rs.layouts if lay in op.layouts] or list(op.layouts)
    for layout in layouts:
        for backend in rs.backends:
            out.append(Provider(f"fusekit:{backend}", layout, False, op.fusekit_fn(case, backend)))
    for key in rs.baselines:
        name, layout = split_baseline_key(key)
        if name in op.baselines() and layout in op.layouts:
            out.append(Provider(name, layout, True, op.baseline_fn(case, name)))
    return out


def run_item(item: WorkItem, rs: RunSettings, env: Mapping[str, Any], ceilings: Mapping[str, Any],
             providers: Sequence[Provider] | None = None) -> list[dict]:
    op, case, device = item.op, item.case, rs.timer.device
    dtype = DTYPES[item.dtype]
    gen = make_generator(device, item_seed(item, rs.seed))
    inputs = op.make_inputs(case, item.batch, dtype, device, gen)
    gy = torch.randn(op.output_shape(case, item.batch), generator=gen, device=device, dtype=torch.float32).to(dtype)
    cpu_gen = make_generator("cpu", item_seed(item, rs.seed))
    ref = compute_reference(op, case, item.batch, inputs, gy, item.modes, rs.check_macs, cpu_gen)
    providers = providers_for(op, case, rs) if providers is None else providers

    rows = []
    for mode in item.modes:
        mode_rows = []
        nbytes, flops = op.work(case, item.batch, mode, dtype.itemsize)
        for provider in providers:
            row = {
                "op": op.name, "case": case.name, "shape": op.shape(case, item.batch), "batch": item.batch,
                "dtype": item.dtype, "layout": provider.layout, "mode": mode,
                "provider": provider.name, "baseline": provider.is_baseline, "timer": None,
                "median_ms": None, "p20_ms": None, "p80_ms": None, "samples": None,
                "gbps": None, "gflops": None, "frac_bw": None, "frac_flops": None,
                "max_abs_err": None, "correct": False, "checked": ref.checked, "reference": ref.name,
                "note": "", "bytes": nbytes, "flops": flops,
            }
            try:
                run, results = prepare_call(op, provider, inputs, gy, mode)
                start = time.perf_counter()
                outputs = results()
                if device == "cuda":
                    torch.cuda.synchronize()
                first_call_s = time.perf_counter() - start
                err, ok, note = check_outputs(op, case, outputs, ref, dtype, rs.tolerance)
                del outputs
            except Exception as exc:  # an unsupported case or a crash: reported, never timed
                kind = "UNSUPPORTED" if type(exc).__name__ in UNSUPPORTED_ERRORS else "ERROR"
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                row["note"] = f"{kind} {type(exc).__name__}: {message}"[:300]
                mode_rows.append(row)
                continue
            row.update(max_abs_err=err, correct=ok)
            if not ok:
                row["note"] = f"FAILED {note}"
                mode_rows.append(row)
                continue
            timer = rs.timer
            if mode.startswith("bwd") and timer.timer == "auto":
                # a backward replayed on a graph recorded outside the capture stream cannot be captured
                timer = dataclasses.replace(timer, timer="do_bench")
            timing = time_call(run, timer, first_call_s)
            row.update(timer=timing.timer, median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                       p80_ms=timing.p80_ms, samples=timing.samples)
            seconds = timing.median_ms * 1e-3
            row["gbps"] = nbytes / seconds / 1e9
            row["gflops"] = flops / seconds / 1e9
            row["frac_bw"] = row["gbps"] / ceilings["copy_gbps"] if ceilings.get("copy_gbps") else None
            row["frac_flops"] = row["gflops"] / ceilings["fma_gflops"] if ceilings.get("fma_gflops") else None
            mode_rows.append(row)
            del run, results
        add_speedups(mode_rows, rs.baselines)
        rows.extend(mode_rows)
    for row in rows:
        row.update({k: env[k] for k in ("device", "arch", "torch", "triton", "cuda", "fusekit", "commit",
                                         "timestamp", "threads")})
        row["copy_gbps"] = ceilings.get("copy_gbps")
        row["fma_gflops"] = ceilings.get("fma_gflops")
    return rows


def add_speedups(rows: list[dict], baseline_keys: Sequence[str]) -> None:
    """speedup_vs_<key> = baseline median / row median, for every baseline timed in the same group."""
    medians = {f"{r['provider']}_{r['layout']}": r["median_ms"] for r in rows if r["baseline"]}
    for row in rows:
        for key in baseline_keys:
            base = medians.get(key)
            row[f"speedup_vs_{key}"] = base / row["median_ms"] if base and row["median_ms"] else None
