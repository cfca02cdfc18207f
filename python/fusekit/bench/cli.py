"""fusekit-bench: fusekit kernels against what a PyTorch user would run instead, on this machine.

Every provider (each fusekit backend and each PyTorch baseline, in each memory layout) is checked
against a float64 reference before it is timed; a provider that fails is reported and not timed.
With no arguments: the quick suite (about a minute) on the best device present.
``fusekit-bench model ...`` benchmarks whole reference models instead (fusekit.bench.model).
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from typing import Sequence

import torch

from . import harness, report
from .depthwise import OPS as DEPTHWISE_OPS
from .inverted_residual import OPS as INVERTED_RESIDUAL_OPS
from .mqa import OPS as ATTENTION_OPS
from .na import OPS as NEIGHBORHOOD_OPS

OPS = DEPTHWISE_OPS + ATTENTION_OPS + NEIGHBORHOOD_OPS + INVERTED_RESIDUAL_OPS

OPS_BY_NAME = {op.name: op for op in OPS}
QUICK_DTYPES = {"cpu": ["fp32"], "cuda": ["fp32", "bf16"]}
SWEEP_DTYPES = {"cpu": ["fp32"], "cuda": ["fp32", "fp16", "bf16"]}
SWEEP_BATCHES = [64, 8, 1]  # largest first: a sweep cut short by --max-time keeps the GPU-filling batches
DEFAULT_BATCHES = [8]
DEFAULT_MODES = ["fwd", "fwd_bwd"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusekit-bench",
        description="Benchmark fusekit kernels against PyTorch baselines measured in the same run. "
                    "Correctness against a float64 reference is checked before anything is timed. "
                    "Without arguments: --quick on CUDA if available, else on the CPU.",
        epilog="Whole models: fusekit-bench model --arch ARCH ... (fusekit.models against their eager twins and "
               "torch.compile; see fusekit-bench model --help). "
               "Exit status: 0 when every fusekit row that ran was correct, 1 when one FAILED or raised, "
               "2 on a usage error.")
    p.add_argument("ops", nargs="*", metavar="op", help=f"operators to run (default: all): {', '.join(OPS_BY_NAME)}")
    p.add_argument("--case", nargs="+", metavar="NAME",
                   help="cases by name, prefix (replknet31b) or glob (slak_t.*); test shapes (tiny...) and shapes "
                        "sized for another device run only when named")
    p.add_argument("--dtype", nargs="+", choices=list(harness.DTYPES), help="default: fp32 on CPU; on CUDA "
                   "fp32 bf16 (--quick) or fp32 fp16 bf16")
    p.add_argument("--layout", nargs="+", choices=list(harness.ALL_LAYOUTS),
                   help="memory layouts of the fusekit rows (default: every layout of the op: nchw and "
                        "channels_last for convolutions, bshd for attention; baselines carry their own layout)")
    p.add_argument("--mode", nargs="+", choices=list(harness.MODES), help="default: fwd fwd_bwd")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--backends", nargs="+", choices=list(harness.FUSEKIT_BACKENDS),
                   help="fusekit backends (default: auto with --quick, else auto plus every backend that runs on "
                        "the device)")
    p.add_argument("--baselines", nargs="+", metavar="NAME",
                   help="baselines as <name>_<layout>, e.g. torch_nchw torch_channels_last sdpa_gqa_bshd, or none "
                        "(default: every baseline of each op; see --list)")
    p.add_argument("--batch", nargs="+", type=int, help=f"batch sizes (default: {DEFAULT_BATCHES}; --sweep: "
                   f"{SWEEP_BATCHES})")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--quick", action="store_true", help="the quick suite: a few headline cases, about a minute")
    sel.add_argument("--sweep", action="store_true", help="every case at batch 1, 8 and 64")
    p.add_argument("--threads", type=int, help="CPU threads for every measurement (default: torch.get_num_threads())")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list (rewritten after every case)")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV (rewritten after every case)")
    p.add_argument("--plot", metavar="PATH", help="bar chart of speedups over the fastest baseline (matplotlib)")
    p.add_argument("--list", action="store_true", help="list ops, cases, backends on this machine and baselines")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--min-run-time", type=float, default=0.2, metavar="S",
                   help="CPU: seconds per blocked_autorange measurement (default 0.2)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA: do_bench warmup budget (default 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="CUDA: do_bench repetition budget (default 100)")
    p.add_argument("--timer", choices=["auto", "do_bench", "cuda_graph"], default="auto",
                   help="CUDA timer; auto re-times with a CUDA graph below "
                        f"{harness.CUDA_GRAPH_BELOW_MS} ms (default auto)")
    chk = p.add_mutually_exclusive_group()
    chk.add_argument("--check-macs", type=float, metavar="N",
                     help="float64 reference work per case before it checks a channel subset only "
                          f"(default {harness.DEFAULT_CHECK_MACS['cpu']:.0e} on CPU, "
                          f"{harness.DEFAULT_CHECK_MACS['cuda']:.0e} on CUDA)")
    chk.add_argument("--full-check", action="store_true", help="check every channel against the reference")
    p.add_argument("--max-time", type=float, metavar="S", help="start no new case after S seconds")
    return p


def _match(case: harness.Case, patterns: Sequence[str] | None) -> bool:
    if not patterns:
        return "test" not in case.tags
    return any(case.name == pat or case.name.startswith(pat + ".") or fnmatch.fnmatchcase(case.name, pat)
               for pat in patterns)


def _for_device(case: harness.Case, device: str, patterns: Sequence[str] | None) -> bool:
    """A case tagged with a device type (a shape sized for it) runs on other devices only when named."""
    sized_for = {"cpu", "cuda"} & case.tags
    return not sized_for or device in sized_for or bool(patterns)


def plan(args, ops: Sequence[harness.BenchOp], device: str, quick: bool) -> list[harness.WorkItem]:
    dtypes = args.dtype or (QUICK_DTYPES if quick else SWEEP_DTYPES)[device]
    items: list[harness.WorkItem] = []
    if quick:
        merged: dict[tuple, tuple] = {}   # quick items of one shape share their inputs and reference
        for op in ops:
            cases = {c.name: c for c in op.cases()}
            for q in op.quick_items():
                case = cases[q.case]
                if args.case and not _match(case, args.case):
                    continue
                if device not in q.batch and not args.batch:
                    continue   # a quick item for the other device only
                for batch in args.batch or [q.batch[device]]:
                    _, _, _, modes = merged.setdefault((op.name, case.name, batch), (op, case, batch, []))
                    modes += [m for m in q.modes if m not in modes and (not args.mode or m in args.mode)
                              and m in op.modes]
        return [harness.WorkItem(op, case, batch, dtype, tuple(modes))
                for dtype in dtypes for op, case, batch, modes in merged.values() if modes]
    default_batches = SWEEP_BATCHES if args.sweep else DEFAULT_BATCHES
    modes = tuple(args.mode or DEFAULT_MODES)
    selected = [(op, case) for op in ops for case in op.cases()
                if _match(case, args.case) and _for_device(case, device, args.case)]
    per_case = {(op.name, case.name): args.batch or op.batches(case, default_batches) for op, case in selected}
    rounds = max((len(b) for b in per_case.values()), default=0)
    for index in range(rounds):   # batch outermost: a sweep cut short by --max-time still covers every dtype
        for dtype in dtypes:
            for op, case in selected:
                batches = per_case[(op.name, case.name)]
                op_modes = tuple(m for m in modes if m in op.modes)
                if index < len(batches) and op_modes:
                    items.append(harness.WorkItem(op, case, batches[index], dtype, op_modes))
    return items


def select_backends(op: harness.BenchOp, device: str, requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(backends to run, notes on the ones left out)."""
    try:
        available = op.fusekit_backends()
    except Exception as exc:
        return [], [f"{op.name}: fusekit is not usable here ({type(exc).__name__}: {exc}); baselines only"]
    notes, chosen = [], []
    if requested is None:
        chosen = ["auto"] + [b for b, why in available.items()
                             if why is None and harness.BACKEND_DEVICE.get(b) == device]
        return chosen, notes
    for b in requested:
        why = None if b == "auto" else available.get(b, "unknown backend")
        if why is None and harness.BACKEND_DEVICE.get(b, device) != device and not (b == "triton" and device == "cpu"):
            why = f"its kernels take {harness.BACKEND_DEVICE[b]} tensors, not {device}"
        if why is None:
            chosen.append(b)
        else:
            notes.append(f"{op.name}: backend {b} left out: {why}")
    return chosen, notes


def print_list(ops: Sequence[harness.BenchOp], device: str) -> None:
    print(f"device for a run without --device: {device}")
    for op in ops:
        print(f"\n{op.name}: {op.description}")
        try:
            avail = op.fusekit_backends()
            print("  fusekit backends on this machine:")
            for b, why in avail.items():
                print(f"    {b:10s} {'available' if why is None else 'unavailable: ' + why}")
        except Exception as exc:
            print(f"  fusekit backends: unusable ({type(exc).__name__}: {exc})")
        print("  baselines:")
        for name, desc in op.baselines().items():
            print(f"    {', '.join(f'{name}_{layout}' for layout in op.layouts)}: {desc}")
        quick = {q.case for q in op.quick_items()}
        print("  cases (q = in --quick; test shapes run only when named):")
        for case in op.cases():
            mark = "q" if case.name in quick else ("t" if "test" in case.tags else " ")
            print(f"    {mark} {case.name:22s} {op.shape(case, 1)[2:]:34s} {case.source}")


def timer_description(ts: harness.TimerSettings) -> str:
    if ts.device == "cpu":
        return (f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={ts.min_run_time} s), "
                f"num_threads={ts.threads}; median and p20/p80 over blocks")
    graph = {"auto": f"; CUDA graph (do_bench_cudagraph, no L2 flush) below {harness.CUDA_GRAPH_BELOW_MS} ms",
             "do_bench": "", "cuda_graph": "; CUDA graphs for every row (no L2 flush)"}[ts.timer]
    return f"triton.testing.do_bench(warmup={ts.warmup_ms} ms, rep={ts.rep_ms} ms, L2 flushed), quantiles 0.5/0.2/0.8{graph}"


class Progress:
    """One status line per case on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int):
        self.total = total
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, index: int, label: str) -> None:
        if self.total <= 1:
            return
        width = 24
        done = int(width * index / self.total)
        line = (f"[{'#' * done}{'.' * (width - done)}] {index}/{self.total} "
                f"{time.monotonic() - self.start:5.0f}s  {label}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.total > 1 and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["model"]:
        from . import model
        return model.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [o for o in args.ops if o not in OPS_BY_NAME]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; ops: {list(OPS_BY_NAME)}")
    ops = [OPS_BY_NAME[o] for o in args.ops] or list(OPS)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.list:
        print_list(ops, device)
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.plot:
        report.require_matplotlib()
    for key in args.baselines or []:
        if key == "none":
            continue
        try:
            harness.split_baseline_key(key)
        except ValueError as exc:
            parser.error(str(exc))
    quick = args.quick or (not args.sweep and not args.case and not args.batch)
    items = plan(args, ops, device, quick)
    if not items:
        parser.error("no case matches the selection (see --list)")
    try:
        from fusekit.testing.tolerances import tolerance
    except ImportError as exc:
        print(f"fusekit-bench: fusekit.testing.tolerances is missing ({exc}): cannot check correctness",
              file=sys.stderr)
        return 2

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    ts = harness.TimerSettings(device, threads, args.min_run_time, args.warmup_ms, args.rep_ms, args.timer)
    backends, notes = {}, []
    for op in ops:
        requested = args.backends or (["auto"] if quick else None)
        backends[op.name], op_notes = select_backends(op, device, requested)
        notes += op_notes
    check_macs = None if args.full_check else (args.check_macs or harness.DEFAULT_CHECK_MACS[device])
    layouts = args.layout or list(harness.ALL_LAYOUTS)

    env = harness.environment(device, threads)
    ceilings = harness.measure_ceilings(ts)
    print("\n".join(report.header_lines(env, ceilings, timer_description(ts))))
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()

    rows: list[dict] = []
    progress = Progress(len(items))
    skipped = 0
    for index, item in enumerate(items):
        if args.max_time is not None and time.monotonic() - progress.start > args.max_time:
            skipped = len(items) - index
            break
        progress.update(index, item.label())
        baselines = [] if args.baselines == ["none"] else (args.baselines or item.op.default_baselines(device))
        rs = harness.RunSettings(ts, layouts, backends[item.op.name], baselines, tolerance, check_macs, args.seed)
        # an op may wrap the harness pass (extra passes, row annotations) with its own run_item
        item_rows = getattr(item.op, "run_item", harness.run_item)(item, rs, env, ceilings)
        rows += item_rows
        progress.finish()
        print()
        for group in report.group_rows(item_rows):
            print(report.text_block(group))
        sys.stdout.flush()
        if args.json:
            report.write_json(args.json, rows)
        if args.csv:
            report.write_csv(args.csv, rows)
    progress.update(len(items) - skipped, "done")
    progress.finish()

    bad = [r for r in rows if not r["baseline"] and not r["correct"] and not r["note"].startswith("UNSUPPORTED")]
    print(f"\n{len(rows)} rows; {len(bad)} fusekit rows failed or raised"
          + (f"; {skipped} cases not started (--max-time {args.max_time} s)" if skipped else ""))
    for r in bad:
        print(f"  {r['op']} {r['case']} {r['shape']} {r['dtype']} {r['mode']} {r['provider']} {r['layout']}: {r['note']}")
    if args.plot:
        report.plot_speedups(args.plot, rows)
        print(f"plot written to {args.plot}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
