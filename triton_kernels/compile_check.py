"""Compile every Triton kernel configuration of this package for given GPU architectures, with no GPU.

    python -m fusekit.triton_kernels.compile_check [--arch 80 90] [--json PATH] [--only SUBSTRING]
    python triton_kernels/compile_check.py ...          (from the repository root, while developing)

Each kernel module of the package that exposes COMPILE_CONFIGS() is imported; every CompileConfig
it lists is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)).
Per configuration the table reports registers, stack, local memory (spills) and static shared
memory from `cuobjdump --dump-resource-usage` on the cubin, and the dynamic shared memory Triton
asks for at launch (metadata). Nothing is run. Exits 1 naming every configuration that failed.

With TRITON_INTERPRET set, @triton.jit yields interpreter objects that cannot be compiled, so the
check then re-runs itself in a subprocess with the variable removed.
"""

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

_TRUE_VALUES = ("1", "true", "on", "yes")
_RESOURCE_FIELDS = ("REG", "STACK", "SHARED", "LOCAL")


def _package_name() -> str:
    """The package this file belongs to; as a script, the repository's triton_kernels directory."""
    if __package__:
        return __package__
    package_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(package_dir))
    return os.path.basename(package_dir)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_VALUES


def _rerun_without_interpreter(argv) -> int:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if __package__:
        command = [sys.executable, "-m", f"{__package__}.compile_check", *argv]
    else:
        command = [sys.executable, os.path.abspath(__file__), *argv]
    return subprocess.call(command, env=env)


def _kernel_modules(package_name: str):
    package = importlib.import_module(package_name)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name == "compile_check":
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        if hasattr(module, "COMPILE_CONFIGS"):
            yield info.name, module


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(bundled):
        return bundled
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    raise FileNotFoundError("cuobjdump: not in triton/backends/nvidia/bin nor on PATH")


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    usage = {}
    for line in out.splitlines():
        if "REG:" in line:
            for field in _RESOURCE_FIELDS:
                match = re.search(rf"\b{field}:(\d+)", line)
                if match:
                    usage[field] = int(match.group(1))
            break
    missing = [f for f in _RESOURCE_FIELDS if f not in usage]
    if missing:
        raise RuntimeError(f"cuobjdump output lacks {missing}:\n{out}")
    return usage


def _make_source(config):
    """ASTSource for a CompileConfig, across the triton versions that name things differently."""
    try:
        from triton.compiler import ASTSource
    except ImportError:  # older layouts
        from triton.compiler.compiler import ASTSource
    params = inspect.signature(ASTSource.__init__).parameters
    arg_index = {name: i for i, name in enumerate(config.kernel.arg_names)}
    kwargs = {}
    if "constexprs" in params:
        kwargs["constexprs"] = dict(config.constexprs)
    else:
        kwargs["constants"] = {arg_index[name]: value for name, value in config.constexprs.items()}
    if "attrs" in params and config.attrs:
        kwargs["attrs"] = {(arg_index[name],): value for name, value in config.attrs.items()}
    return ASTSource(config.kernel, dict(config.signature), **kwargs)


def _shared_memory(metadata) -> int:
    shared = metadata["shared"] if isinstance(metadata, dict) else getattr(metadata, "shared")
    return int(shared)


def _compile_one(config, arch: int, cuobjdump: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    row = {"label": config.label, "kernel": config.kernel.__name__, "arch": arch,
           "num_warps": config.options.get("num_warps")}
    start = time.perf_counter()
    try:
        compiled = triton.compile(_make_source(config), target=GPUTarget("cuda", arch, 32),
                                  options=dict(config.options))
        usage = _resource_usage(compiled.asm["cubin"], cuobjdump)
        row.update(ok=True, shared=_shared_memory(compiled.metadata), regs=usage["REG"],
                   stack=usage["STACK"], local=usage["LOCAL"], static_shared=usage["SHARED"])
    except Exception as error:  # report every failure, then exit non-zero
        row.update(ok=False, error=f"{type(error).__name__}: {error}".strip(),
                   traceback=traceback.format_exc())
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _print_table(rows) -> None:
    header = ("arch", "config", "warps", "regs", "spill(local B)", "stack B", "shared B", "static shared B", "s")
    lines = [header]
    for r in rows:
        if r["ok"]:
            lines.append((f"sm_{r['arch']}", r["label"], str(r["num_warps"]), str(r["regs"]), str(r["local"]),
                          str(r["stack"]), str(r["shared"]), str(r["static_shared"]), f"{r['seconds']:.1f}"))
        else:
            lines.append((f"sm_{r['arch']}", r["label"], str(r["num_warps"]), "FAILED", "", "", "", "",
                          f"{r['seconds']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--json", help="also write the rows (with versions) to this JSON file")
    parser.add_argument("--only", help="compile only configurations whose label contains this substring")
    args = parser.parse_args(argv)

    if _interpreter_requested():
        return _rerun_without_interpreter(argv)

    import triton
    from triton.runtime.jit import JITFunction

    package_name = _package_name()
    configs = []
    for module_name, module in _kernel_modules(package_name):
        for config in module.COMPILE_CONFIGS():
            if not isinstance(config.kernel, JITFunction):
                # Decorated while the interpreter was on (set through triton.knobs, say): start clean.
                return _rerun_without_interpreter(argv)
            if args.only is None or args.only in config.label:
                configs.append((module_name, config))
    if not configs:
        print("no configurations to compile", file=sys.stderr)
        return 1

    cuobjdump = _cuobjdump()
    rows = []
    started = time.perf_counter()
    for arch in args.arch:
        for module_name, config in configs:
            row = _compile_one(config, arch, cuobjdump)
            row["module"] = module_name
            rows.append(row)
    elapsed = time.perf_counter() - started

    _print_table(rows)
    failed = [r for r in rows if not r["ok"]]
    # recent Triton/ptxas report register spills as stack frame (STACK) rather than LOCAL: count both
    spilling = [r for r in rows if r["ok"] and (r["local"] > 0 or r["stack"] > 0)]
    print(f"\n{len(rows)} compilations ({len(configs)} configs x {len(args.arch)} archs) in {elapsed:.0f} s "
          f"with triton {triton.__version__}; {len(failed)} failed; {len(spilling)} use local memory or a stack frame (spills)")
    for r in spilling:
        print(f"  spills: sm_{r['arch']} {r['label']}: {r['local']} B local, {r['stack']} B stack")
    for r in failed:
        print(f"\nFAILED: sm_{r['arch']} {r['module']}.{r['kernel']} [{r['label']}]: {r['error']}", file=sys.stderr)
        print(r["traceback"], file=sys.stderr)

    if args.json:
        report = {"triton": triton.__version__, "archs": args.arch, "seconds": round(elapsed, 1),
                  "rows": [{k: v for k, v in r.items() if k != "traceback"} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
