#!/usr/bin/env python3
"""Everything fusekit needs from a GPU machine, in one command: build, GPU tests, Triton compile
check, benchmark sweep, summary.

    python benchmarks/gpu_suite.py [--out DIR] [--steps build tests compile_check bench] [--commit SHA]

Made for a machine with an NVIDIA GPU, its own torch/triton and no network:
1. build    pip install --no-build-isolation --no-deps -e . with TORCH_CUDA_ARCH_LIST set from the
            visible GPU, MAX_JOBS=16 and FUSEKIT_CUDA=1 (a build that drops CUDA fails);
2. tests    pytest tests -m "gpu or not gpu" (every test, GPU ones included) with JUnit XML, from
            which <out>/gpu_verified.json records per (op, GPU backend) whether all its tests passed;
3. compile_check   python -m fusekit.triton_kernels.compile_check --json;
4. bench    fusekit-bench --sweep on cuda (fp32 fp16 bf16, both layouts, fwd and fwd_bwd) into
            JSON/CSV rows, with "auto" judged by the gpu_verified.json just written.
Each step runs in its own process with a time limit; a failing step is recorded and the next
one runs. The suite writes <out>/summary.md (steps, tests, verification, compile check, result
table, device, versions, commit), suite.json and logs/, and copies the main files to $OUT when
that variable is set. Default out: benchmarks/results/<date>-<gpu>/. Exit status 1 when a step
failed.

A device machine's copy of the tree may lack .git: pass --commit (or set FUSEKIT_COMMIT) so the
results name the commit they measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("build", "tests", "compile_check", "bench")
GPU_BACKENDS = ("cuda", "triton")
STEP_TIMEOUT_S = {"build": 900, "tests": 1200, "compile_check": 600, "bench": 3600}
SUMMARY_RESERVE_S = 20        # kept back from the deadline to write the summary
BENCH_LAST_CASE_S = 45        # the bench starts no case later than this before its own limit
DEFAULT_BENCH_ARGS = ("--sweep --dtype fp32 fp16 bf16 "
                      "--mode fwd fwd_bwd --warmup-ms 10 --rep-ms 40")
OUT_FILES = ("summary.md", "bench.json", "gpu_verified.json", "junit.xml", "compile_check.json", "suite.json",
             "logs.txt")


def probe(python: str, env: dict) -> dict:
    """Device and versions as the machine's own python sees them."""
    code = (
        "import json, platform, torch\n"
        "d = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "     'gpu': None, 'capability': None}\n"
        "try:\n    import triton; d['triton'] = triton.__version__\n"
        "except Exception as e:\n    d['triton'] = None\n"
        "if torch.cuda.is_available():\n"
        "    d['gpu'] = torch.cuda.get_device_name(); d['capability'] = list(torch.cuda.get_device_capability())\n"
        "print(json.dumps(d))\n")
    info = {}
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-2000:]}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        info = {"error": repr(exc)}
    info["nvidia_smi"] = _first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"])
    info["nvcc"] = _first_line(["nvcc", "--version"], last=True)
    return info


def _first_line(cmd: list, last: bool = False) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    return (lines[-1] if last else lines[0]) if lines else None


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_step(name: str, cmd: list, env: dict, log_path: str, timeout: float) -> dict:
    """Run one step in its own process group, output to log_path; never raises."""
    started = time.monotonic()
    record = {"step": name, "command": " ".join(shlex.quote(c) for c in cmd), "log": os.path.relpath(log_path,
              os.path.dirname(os.path.dirname(log_path))), "timeout_s": round(timeout)}
    if timeout <= 0:
        record.update(status="skipped", rc=None, seconds=0.0, reason="no time left before the deadline")
        return record
    print(f"[gpu_suite] {name}: {record['command']} (limit {timeout:.0f} s)", flush=True)
    with open(log_path, "w") as log:
        log.write(f"$ {record['command']}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            record.update(status="failed", rc=None, seconds=0.0, reason=f"could not start: {exc}")
            return record
        try:
            rc = proc.wait(timeout=timeout)
            record.update(status="ok" if rc == 0 else "failed", rc=rc)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the step's own process group: pip, ninja, nvcc, pytest
            proc.wait()
            record.update(status="timeout", rc=None, reason=f"killed after {timeout:.0f} s")
    record["seconds"] = round(time.monotonic() - started, 1)
    print(f"[gpu_suite] {name}: {record['status']} in {record['seconds']} s", flush=True)
    return record


# ----------------------------------------------------------------------------------------------
# JUnit XML -> per (op, backend) verification
# ----------------------------------------------------------------------------------------------

def _outcome(case: ET.Element) -> str:
    for tag in ("failure", "error"):
        if case.find(tag) is not None:
            return "failed"
    return "skipped" if case.find("skipped") is not None else "passed"


def classify_test(case: ET.Element, ops: list) -> list:
    """The (op, GPU backend) pairs a test case speaks for.

    1. properties fusekit_op / fusekit_backend (pytest's record_property) when the test sets them;
    2. else the backend from a "<backend>-cuda" pair in the parameter id (tests/backend_matrix.py ids),
       the op from the test function name, else from the test file name (keyword: the op's first word);
    3. a test with no backend in its id but "cuda" or "gpu" in its name speaks for every GPU backend of its op.
    """
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    if props.get("fusekit_op") and props.get("fusekit_backend"):
        return [(props["fusekit_op"], props["fusekit_backend"])] if props["fusekit_backend"] in GPU_BACKENDS else []
    name = case.get("name", "")
    func, _, param = name.partition("[")
    tokens = re.split(r"[-\[\]]", param)
    backends = sorted({tokens[i] for i in range(len(tokens) - 1) if tokens[i] in GPU_BACKENDS and tokens[i + 1] == "cuda"})
    module = case.get("classname", "").split(".")[-1]
    op = next((o for where in (func, module) for key in (lambda o: o, lambda o: o.split("_")[0])
               for o in ops if key(o) in where), None)
    if op is None:
        return []
    if backends:
        return [(op, b) for b in backends]
    if "cuda" in func or "gpu" in func:
        return [(op, b) for b in GPU_BACKENDS]
    return []


def verification(junit_path: str, ops: list, arch: str | None, commit: str, device: str | None,
                 torch_version: str | None, tests_status: str) -> dict:
    tally = {op: {b: {"passed": 0, "failed": 0, "skipped": 0, "failing": []} for b in GPU_BACKENDS} for op in ops}
    reason = None
    try:
        root = ET.parse(junit_path).getroot()
        for case in root.iter("testcase"):
            outcome = _outcome(case)
            for op, backend in classify_test(case, ops):
                entry = tally.setdefault(op, {}).setdefault(backend, {"passed": 0, "failed": 0, "skipped": 0,
                                                                      "failing": []})
                entry[outcome] += 1
                if outcome == "failed" and len(entry["failing"]) < 20:
                    entry["failing"].append(f"{case.get('classname')}::{case.get('name')}")
    except (OSError, ET.ParseError) as exc:
        reason = f"no test results ({exc})"
    if tests_status != "ok" and reason is None and tests_status in ("timeout", "skipped"):
        reason = f"the test step did not finish ({tests_status})"
    out = {}
    for op, backends in tally.items():
        out[op] = {}
        for backend, t in backends.items():
            passed = reason is None and t["passed"] > 0 and t["failed"] == 0
            entry = {"passed": passed, "arch": arch, "commit": commit, "tests_passed": t["passed"],
                     "tests_failed": t["failed"], "tests_skipped": t["skipped"], "device": device,
                     "torch": torch_version, "date": datetime.date.today().isoformat()}
            if not passed:
                entry["reason"] = reason or ("no GPU test ran for it" if t["passed"] == 0 and t["failed"] == 0
                                             else f"{t['failed']} test(s) failed")
            if t["failing"]:
                entry["failing"] = t["failing"]
            out[op][backend] = entry
    return out


def junit_totals(junit_path: str) -> dict | None:
    try:
        root = ET.parse(junit_path).getroot()
    except (OSError, ET.ParseError):
        return None
    totals = {"passed": 0, "failed": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        outcome = _outcome(case)
        totals[outcome] += 1
        if outcome == "failed":
            totals["failing"].append(f"{case.get('classname')}::{case.get('name')}")
    return totals


def registered_ops(python: str, env: dict) -> list:
    try:
        out = subprocess.run([python, "-c", "import json, fusekit; print(json.dumps(fusekit.registered_ops()))"],
                             capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return ["depthwise_conv2d", "inception_dwconv2d"]


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------

def summary_markdown(info: dict, commit: str, steps: list, totals: dict | None, verified: dict | None,
                     compile_report: dict | None, rows: list | None, bench_note: str) -> str:
    gpu = info.get("gpu") or "no GPU visible"
    cap = info.get("capability")
    lines = [f"# fusekit GPU suite: {datetime.date.today().isoformat()} on {gpu}", "",
             f"- commit: `{commit}`",
             f"- device: {gpu}" + (f" (sm_{cap[0]}{cap[1]})" if cap else "") + f"; nvidia-smi: {info.get('nvidia_smi')}",
             f"- torch {info.get('torch')} (CUDA {info.get('cuda')}), triton {info.get('triton')}, "
             f"python {info.get('python')}, nvcc: {info.get('nvcc')}", "",
             "## Steps", "", "| step | status | seconds | log |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['step']} | {s['status']}{' (' + s['reason'] + ')' if s.get('reason') else ''} "
                     f"| {s.get('seconds', '')} | {s.get('log', '')} |")
    lines += ["", "## Tests", ""]
    if totals is None:
        lines.append("No JUnit XML: the test step did not produce results.")
    else:
        lines.append(f"{totals['passed']} passed, {totals['failed']} failed or errored, {totals['skipped']} skipped.")
        for name in totals["failing"][:50]:
            lines.append(f"- FAILED `{name}`")
    lines += ["", "## GPU verification (gpu_verified.json)", ""]
    if verified:
        lines += ["| op | backend | verified | tests passed | failed | skipped | note |", "|---|---|---|---|---|---|---|"]
        for op, backends in verified.items():
            for backend, e in backends.items():
                lines.append(f"| {op} | {backend} | {'yes' if e['passed'] else 'no'} | {e['tests_passed']} "
                             f"| {e['tests_failed']} | {e['tests_skipped']} | {e.get('reason', '')} |")
    else:
        lines.append("Not written.")
    lines += ["", "## Triton compile check", ""]
    if compile_report:
        crow = compile_report.get("rows", [])
        failed = [r for r in crow if not r.get("ok")]
        spills = [r for r in crow if r.get("ok") and r.get("local", 0) > 0]
        lines.append(f"{len(crow)} compilations for archs {compile_report.get('archs')} with triton "
                     f"{compile_report.get('triton')}: {len(failed)} failed, {len(spills)} spill to local memory.")
        for r in failed[:30]:
            lines.append(f"- FAILED sm_{r.get('arch')} {r.get('kernel')} [{r.get('label')}]: {r.get('error')}")
    else:
        lines.append("No report.")
    lines += ["", "## Benchmarks", ""]
    if rows:
        first = rows[0]
        timers = sorted({r["timer"] for r in rows if r.get("timer")})
        lines.append(f"Ceilings measured in the run: copy {first['copy_gbps']:.0f} GB/s, fp32 matmul (TF32 off) "
                     f"{first['fma_gflops']:.0f} GFLOP/s. Timers: {', '.join(timers)} (do_bench flushes L2; "
                     "cuda_graph is used for rows under 0.05 ms). 'vs X' = X's median / the row's median. "
                     f"{len(rows)} rows. {bench_note}")
        lines.append("")
        try:
            sys.path.insert(0, os.path.join(REPO, "python"))
            from fusekit.bench.report import markdown_table
            lines.append(markdown_table(rows))
        except Exception as exc:  # the rows are in bench.json either way
            lines.append(f"(table not rendered: {type(exc).__name__}: {exc}; see bench.json)")
    else:
        lines.append(f"No rows. {bench_note}")
    return "\n".join(lines) + "\n"


def default_out_dir(info: dict) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or "no-gpu").lower()).strip("-")
    base = os.path.join(REPO, "benchmarks", "results", f"{datetime.date.today().isoformat()}-{gpu}")
    return base if not os.path.exists(base) else f"{base}-{datetime.datetime.now().strftime('%H%M%S')}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", help="output directory (default: benchmarks/results/<date>-<gpu>/)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run, in this order")
    p.add_argument("--commit", help="commit the tree is at (default: git rev-parse HEAD, else $FUSEKIT_COMMIT)")
    p.add_argument("--arch-list", help="TORCH_CUDA_ARCH_LIST for the build (default: the visible GPU's)")
    p.add_argument("--max-jobs", default="16", help="MAX_JOBS for the build (default 16)")
    p.add_argument("--deadline", type=float, default=560.0,
                   help="seconds for the whole suite; later steps get what is left (default 560, 0 = none)")
    p.add_argument("--bench-args", default=DEFAULT_BENCH_ARGS,
                   help=f"arguments of fusekit-bench after --device cuda (default: {DEFAULT_BENCH_ARGS!r})")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x -k depthwise'")
    p.add_argument("--allow-no-gpu", action="store_true",
                   help="run even when no GPU is visible (to try the suite itself; tests then skip GPU cases)")
    args = p.parse_args(argv)
    started = time.monotonic()
    python = sys.executable

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    info = probe(python, env)
    if not info.get("gpu") and not args.allow_no_gpu:
        print(f"gpu_suite: no CUDA GPU visible to {python} ({info.get('error', 'torch.cuda.is_available() is False')}); "
              "use --allow-no-gpu to run anyway", file=sys.stderr)
        return 2
    commit = args.commit or git_commit() or os.environ.get("FUSEKIT_COMMIT") or "unknown"
    env["FUSEKIT_COMMIT"] = commit
    cap = info.get("capability")
    arch = f"sm_{cap[0]}{cap[1]}" if cap else None
    out = os.path.abspath(args.out or default_out_dir(info))
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    print(f"[gpu_suite] {info.get('gpu')} ({arch}), torch {info.get('torch')}, triton {info.get('triton')}, "
          f"commit {commit}; results in {out}", flush=True)

    def time_left(step: str) -> float:
        if not args.deadline:
            return STEP_TIMEOUT_S[step]
        return min(STEP_TIMEOUT_S[step], args.deadline - SUMMARY_RESERVE_S - (time.monotonic() - started))

    steps, tests_status = [], "not run"
    junit = os.path.join(out, "junit.xml")
    verified_path = os.path.join(out, "gpu_verified.json")
    bench_json = os.path.join(out, "bench.json")
    verified = None
    bench_note = ""
    for step in args.steps:
        log = os.path.join(out, "logs", f"{step}.log")
        if step == "build":
            build_env = dict(env, MAX_JOBS=args.max_jobs, FUSEKIT_CUDA="1")
            build_env["TORCH_CUDA_ARCH_LIST"] = args.arch_list or (f"{cap[0]}.{cap[1]}" if cap else "8.0;9.0")
            if not cap:
                build_env.pop("FUSEKIT_CUDA")
            rec = run_step(step, [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                           build_env, log, time_left(step))
            rec["arch_list"] = build_env["TORCH_CUDA_ARCH_LIST"]
        elif step == "tests":
            cmd = [python, "-m", "pytest", "tests", "-m", "gpu or not gpu", f"--junitxml={junit}", "-q", "-rfE",
                   "-p", "no:cacheprovider"] + shlex.split(args.pytest_args)
            rec = run_step(step, cmd, env, log, time_left(step))
            tests_status = rec["status"]
            # pytest exits 1 when a test failed: the step ran, the failures are in the verification
            if rec["rc"] == 1 and os.path.exists(junit):
                rec["status"] = "ok (tests failed)"
                tests_status = "ok"
            verified = verification(junit, registered_ops(python, env), arch, commit, info.get("gpu"),
                                    info.get("torch"), tests_status)
            with open(verified_path, "w") as f:
                json.dump(verified, f, indent=1)
        elif step == "compile_check":
            rec = run_step(step, [python, "-m", "fusekit.triton_kernels.compile_check", "--json",
                                  os.path.join(out, "compile_check.json")], env, log, time_left(step))
        else:
            limit = time_left(step)
            bench_env = dict(env)
            if os.path.exists(verified_path):
                bench_env["FUSEKIT_GPU_VERIFIED"] = verified_path   # "auto" as the tests just judged it
                bench_note = "'auto' chose among the GPU backends verified by this run's tests."
            else:
                bench_note = "'auto' chose among the GPU backends verified in the package's gpu_verified.json."
            cmd = [python, "-m", "fusekit.bench", "--device", "cuda" if cap else "cpu", *shlex.split(args.bench_args),
                   "--json", bench_json, "--csv", os.path.join(out, "bench.csv"),
                   "--max-time", str(max(1, round(limit - BENCH_LAST_CASE_S)))]
            rec = run_step(step, cmd, bench_env, log, limit)
            if rec["rc"] == 1:
                rec["status"] = "ok (fusekit rows failed)"
            with open(log) as f:
                tail = [ln for ln in f.read().splitlines() if "cases not started" in ln]
            if tail:
                bench_note += " " + tail[-1].strip()
        steps.append(rec)

    rows = None
    if os.path.exists(bench_json):
        with open(bench_json) as f:
            rows = json.load(f)
    compile_report = None
    if os.path.exists(os.path.join(out, "compile_check.json")):
        with open(os.path.join(out, "compile_check.json")) as f:
            compile_report = json.load(f)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(info, commit, steps, junit_totals(junit), verified, compile_report, rows, bench_note))
    with open(os.path.join(out, "suite.json"), "w") as f:
        json.dump({"info": info, "commit": commit, "arch": arch, "steps": steps,
                   "seconds": round(time.monotonic() - started, 1)}, f, indent=1)
    with open(os.path.join(out, "logs.txt"), "w") as f:
        for rec in steps:
            path = os.path.join(out, "logs", f"{rec['step']}.log")
            f.write(f"===== {rec['step']}: {rec['status']} ({rec.get('seconds')} s)\n")
            if os.path.exists(path):
                with open(path, errors="replace") as log:
                    text = log.read()
                f.write(text[-200_000:] + "\n")   # the tail: build logs can be long
    if os.environ.get("OUT"):
        for name in OUT_FILES:
            if os.path.exists(os.path.join(out, name)):
                shutil.copy(os.path.join(out, name), os.path.join(os.environ["OUT"], name))
    print(f"[gpu_suite] done in {time.monotonic() - started:.0f} s: {out}/summary.md", flush=True)
    return 0 if all(s["status"].startswith("ok") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
