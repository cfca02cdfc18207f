"""Output of fusekit-bench: aligned text tables, markdown tables, JSON / CSV rows and a speedup plot."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if v < 1000 else f"{v:.0f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _speedup(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _status(row: Mapping[str, Any]) -> str:
    if row["correct"]:
        return "ok"
    return row["note"].split(" ", 1)[0] or "FAILED"   # FAILED, ERROR or UNSUPPORTED


def short_key(key: str) -> str:
    return key.replace("channels_last", "cl")


def speedup_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k in row:
            if k.startswith("speedup_vs_") and k not in keys:
                keys.append(k)
    return keys


def _columns(baseline_keys: Sequence[str]) -> list[tuple[str, Callable[[Mapping[str, Any]], str], str]]:
    cols = [
        ("provider", lambda r: r["provider"], "<"),
        ("layout", lambda r: r["layout"], "<"),
        ("median ms", lambda r: _ms(r["median_ms"]), ">"),
        ("p20-p80 ms", lambda r: "-" if r["p20_ms"] is None else f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}", ">"),
        ("GB/s", lambda r: _num(r["gbps"], ".1f"), ">"),
        ("%BW", lambda r: _pct(r["frac_bw"]), ">"),
        ("GFLOP/s", lambda r: _num(r["gflops"], ".1f"), ">"),
        ("%FMA", lambda r: _pct(r["frac_flops"]), ">"),
    ]
    for key in baseline_keys:
        cols.append((f"vs {short_key(key[len('speedup_vs_'):])}", lambda r, k=key: _speedup(r.get(k)), ">"))
    cols += [("max err", lambda r: _num(r["max_abs_err"], ".1e"), ">"),
             ("status", _status, "<")]
    return cols


def header_lines(env: Mapping[str, Any], ceilings: Mapping[str, Any], timer_desc: str) -> list[str]:
    arch = f" ({env['arch']})" if env.get("arch") else ""
    return [
        f"fusekit-bench on {env['device']}{arch}, {env['threads']} threads, {env['timestamp']}",
        f"torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | fusekit {env['fusekit']} "
        f"| commit {env['commit']}",
        f"ceilings measured here: copy {ceilings['copy_gbps']:.1f} GB/s ({ceilings['copy_desc']}); "
        f"FMA {ceilings['fma_gflops']:.1f} GFLOP/s ({ceilings['fma_desc']})",
        f"timing: {timer_desc}; %BW = GB/s / copy GB/s, %FMA = GFLOP/s / FMA GFLOP/s; "
        "'vs X' = X's median / this row's median",
    ]


def group_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["op"], row["case"], row["shape"], row["dtype"], row["mode"]), []).append(row)
    return list(groups.values())


def text_block(group: Sequence[Mapping[str, Any]]) -> str:
    """One (op, case, batch, dtype, mode) group as an aligned plain-text table."""
    first = group[0]
    cols = _columns(speedup_keys(group))
    cells = [[c[0] for c in cols]] + [[c[1](r) for c in cols] for r in group]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [f"{first['op']}  {first['case']}  {first['shape']}  {first['dtype']}  {first['mode']}"
             f"  (reference checked on {first['checked']})"]
    for row in cells:
        lines.append("  " + "  ".join(f"{v:{c[2]}{w}}" for v, c, w in zip(row, cols, widths)).rstrip())
    for r in group:
        if r["note"]:
            lines.append(f"  note: {r['provider']} {r['layout']}: {r['note']}")
    return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = speedup_keys(rows)
    head = ["op", "case", "shape", "dtype", "layout", "mode", "provider", "median ms", "p20-p80 ms", "GB/s", "%BW",
            "GFLOP/s", "%FMA"] + [f"vs {short_key(k[len('speedup_vs_'):])}" for k in keys] + ["max err", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["case"], r["shape"], r["dtype"], r["layout"], r["mode"], r["provider"], _ms(r["median_ms"]),
                 "-" if r["p20_ms"] is None else f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}",
                 _num(r["gbps"], ".1f"), _pct(r["frac_bw"]), _num(r["gflops"], ".1f"), _pct(r["frac_flops"])]
        cells += [_speedup(r.get(k)) for k in keys]
        cells += [_num(r["max_abs_err"], ".1e"), _status(r)]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_json(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    _atomic_write(path, json.dumps(list(rows), indent=1, default=str) + "\n")


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    os.replace(tmp, path)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("fusekit-bench: --plot needs matplotlib, which is not installed "
                         "(pip install matplotlib), or leave out --plot")


def plot_speedups(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Bars: speedup of each fusekit row over the fastest baseline of its group, per case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, series = [], {}
    for group in group_rows(rows):
        base = [r["median_ms"] for r in group if r["baseline"] and r["median_ms"]]
        ours = [r for r in group if not r["baseline"]]
        if not base or not ours:
            continue
        first = group[0]
        labels.append(f"{first['case']} N={first['batch']}\n{first['dtype']} {first['mode']}")
        for r in ours:
            name = f"{r['provider']} {r['layout']}"
            series.setdefault(name, {})[len(labels) - 1] = min(base) / r["median_ms"] if r["median_ms"] else 0.0
    if not labels:
        raise SystemExit("fusekit-bench: nothing to plot (no group has both a timed fusekit row and a baseline)")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(sorted(series.items())):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in values]
        ax.bar(xs, list(values.values()), width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over the fastest PyTorch baseline")
    first = rows[0]
    ax.set_title(f"fusekit {first['fusekit']} ({str(first['commit'])[:12]}) on {first['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
