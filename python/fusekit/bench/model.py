"""fusekit-bench model: whole reference models (fusekit.models) against their eager twins and torch.compile.

For every (arch, batch, dtype) the eager twin is built with seeded random weights, the fusekit model is
built and loads the twin's state_dict (strict), and ``torch.compile(eager twin)`` (default mode) is the
third provider, "compile". Each provider runs its own copy of those weights in the row's dtype, on the
same seeded random batch (``fusekit.models.example_batch``).

Checked before anything is timed; a provider that fails is reported FAILED (or ERROR when it raises)
and is not timed:
- infer: the logits against the eager twin run in float64 (a copy of the row's dtype-rounded weights,
  ``.double()``, on the same inputs) and against the eager twin in the row's dtype, as a norm-wise
  relative error max|out - ref| / max|ref| (see MODEL_BOUND_FACTOR).
- train: the loss (|loss - ref| / |ref|) and the gradients of every parameter (||g - g_ref|| / ||g_ref||,
  L2 over all parameters together) after one backward, against the same two references.
- decode (language models only): greedy ``model.generate(prompt, G, use_cache=True)`` on the batch's tokens;
  the generated tokens must equal the eager twin's exactly (same dtype), and the eager twin's must equal the
  float64 generation's (where they do not, that is noted and the others are compared with eager only). The
  logits the last token was chosen from (captured by a hook on the model's head) are compared like infer's.
The eager twin fails only on non-finite results (it is what PyTorch computes); see MODEL_BOUND_FACTOR for
the bounds the others are held to.
The float64 reference runs on the first CHECK_BATCH samples of the batch at most (see there).

Timed (fusekit.bench.harness.time_call: blocked_autorange on the CPU, triton do_bench on CUDA):
- infer: one forward under torch.inference_mode() in eval mode;
- train: one training step: zero_grad(set_to_none=True), forward in train mode, loss, backward and a
  torch.optim.SGD step with lr = 0 (the step's cost is paid, the weights stay exactly as they were, so
  repeated steps cannot drift). Infer always runs before train: training steps move BatchNorm running
  statistics, which eval mode reads;
- decode: the whole generate call (prefill + G - 1 cached steps); throughput = B * G generated tokens / median.
  One more timed call, generate(prompt, 1), splits it: prefill = its median, per decode step =
  (median(G) - median(1)) / (G - 1). torch.compile is not run for decode.
Rows report throughput (images/s, or tokens/s for language models), median and p20/p80 ms, speedups
against eager and compile, the peak memory of one call (see peak_memory) and, for train, the activation
memory autograd saves for backward (eager and fusekit; torch.compile's saved tensors live inside its
compiled autograd function, out of reach of saved_tensors_hooks).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import importlib
import math
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .. import models
from ..testing.tolerances import relative_error, tolerance
from . import harness, report
from .inverted_residual import saved_for_backward

IMPLS = ("fusekit", "eager", "compile")   # row order within a group
MODES = ("infer", "train", "decode")      # run order: infer first (training steps move BN running stats)
LM_ONLY_MODES = ("decode",)               # KV-cache generation: language models (ArchSpec.kind == "lm") only
DEFAULT_DECODE_TOKENS = 32
COMPILE_DECODE_NOTE = "not run: torch.compile of cached generation is not benchmarked"
DEFAULT_DTYPES = {"cpu": ["fp32"], "cuda": ["fp32", "bf16"]}
# The float64 reference runs on at most this many samples (the first ones of the batch): DiNAT's eager
# masked dense attention in float64 at batch 64 would need tens of GB. In eval mode samples are independent,
# so the first rows of a provider's full-batch logits are compared; in train mode (BatchNorm batch statistics,
# the batch-mean loss) eager and fusekit run one more step on that sub-batch for the float64 comparison, and
# compile is compared with eager in the same dtype only (one compilation per mode, not two).
CHECK_BATCH = 8
# Whole-model bounds, defined here once. fusekit.testing.tolerances bounds one operator elementwise by
# (atol, rtol); a model chains dozens of operators whose rounding errors add up roughly like the square
# root of the depth (10..40 blocks here), so a model passes when its norm-wise relative error
# (max|out - ref| / max|ref| for logits, |loss - ref| / |ref|, ||g - g_ref|| / ||g_ref|| for gradients) is
# at most MODEL_BOUND_FACTOR x the table's rtol for the dtype (forward entry for logits and loss, backward
# entry for gradients): fp32 5e-4 / 2.5e-3, fp16 5e-2 / 0.1, bf16 0.1 / 0.25. fp32 on CUDA with TF32
# enabled (cuDNN convolutions use it by default) is held to the fp16 bound: TF32 keeps fp16's 10-bit
# mantissa. Against the eager twin in the same dtype, twice the bound (each is within it of float64).
# Where the eager twin itself is further from float64 than that (a ReLU kink that rounding flips, one-pass
# BatchNorm statistics that cancel: seen at 4e-2 on fp32 channels_last MobileNetV2 gradients), the other
# providers are held to twice the twin's own error instead: as accurate as the model PyTorch runs.
MODEL_BOUND_FACTOR = 5.0
MEMORY_DESCRIPTION = {
    "cuda": "peak mem = torch.cuda.max_memory_allocated() during one warm call (after reset_peak_memory_stats) "
            "minus what was allocated before it",
    "cpu": "peak mem = resident-set high-water mark during one warm call (/proc/self/clear_refs reset, VmHWM) "
           "minus VmRSS before it, after gc and malloc_trim; memory the allocator already held is not counted",
}
_STATUS_KB = ("VmRSS", "VmHWM")


def model_bounds(dtype: torch.dtype, device: str) -> tuple[float, float]:
    """(forward bound for logits and loss, backward bound for gradients), see MODEL_BOUND_FACTOR."""
    table_dtype = torch.float16 if dtype == torch.float32 and _tf32_enabled(device) else dtype
    return (MODEL_BOUND_FACTOR * tolerance(table_dtype, "forward")[1],
            MODEL_BOUND_FACTOR * tolerance(table_dtype, "backward")[1])


def _tf32_enabled(device: str) -> bool:
    return device == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest")


def gradient_error(grads: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> float:
    """||g - g_ref|| / ||g_ref||, L2 over every parameter together."""
    if set(grads) != set(ref):
        raise ValueError(f"parameters differ from the reference's: {sorted(set(grads) ^ set(ref))[:5]}")
    diff = total = 0.0
    for name, r in ref.items():
        g = grads[name].to(r.device)
        diff += float((g - r).square().sum())
        total += float(r.square().sum())
    if not math.isfinite(diff):
        return float("nan")
    return math.sqrt(diff / total) if total > 0 else math.sqrt(diff)


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------

def _read_status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_KB:
                out[key] = int(value.split()[0])
    return out


def _malloc_trim() -> None:
    """Give the C allocator's free pages back to the kernel, so the next call's peak shows up in VmHWM."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def peak_memory(run: Callable[[], Any], device: str) -> tuple[int | None, float]:
    """(peak bytes of one call of ``run`` as MEMORY_DESCRIPTION says, or None where it cannot be measured;
    the call's wall time in seconds)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, time.perf_counter() - start
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current VmRSS
        before = _read_status_kb()["VmRSS"]
    except (OSError, KeyError):
        before = None
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    if before is None:
        return None, seconds
    try:
        return max(0, _read_status_kb()["VmHWM"] - before) * 1024, seconds
    except (OSError, KeyError):
        return None, seconds


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------

@dataclass
class Provider:
    impl: str
    module: nn.Module                     # holds the parameters (the compiled module's original)
    fn: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer


def _prepare(module: nn.Module, device: str, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    module = copy.deepcopy(module).to(device=device, dtype=dtype)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def _make_provider(impl: str, base: nn.Module, device: str, dtype: torch.dtype, channels_last: bool) -> Provider:
    module = _prepare(base, device, dtype, channels_last)
    fn = torch.compile(module) if impl == "compile" else module
    # lr = 0: the step reads the gradients and rewrites the weights, which stay exactly the same
    return Provider(impl, module, fn, torch.optim.SGD(module.parameters(), lr=0.0))


def _infer_run(p: Provider, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        with torch.inference_mode():
            return p.fn(x)
    return run


def _train_run(p: Provider, arch: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        p.optimizer.zero_grad(set_to_none=True)
        loss = models.loss(arch, p.fn(x), y)
        loss.backward()
        p.optimizer.step()
        return loss
    return run


def _train_result(fn: Callable, module: nn.Module, arch: str, x: torch.Tensor, y: torch.Tensor):
    """(loss, {name: gradient as float64}) of one forward + backward in train mode."""
    module.train()
    module.zero_grad(set_to_none=True)
    loss = models.loss(arch, fn(x), y)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double()
             for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


# ----------------------------------------------------------------------------------------------
# one work item: an arch at one batch and dtype, every requested mode and impl
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    size: str
    device: str
    impls: Sequence[str]
    modes: Sequence[str]
    channels_last: bool | None            # None: on for image models
    timer: harness.TimerSettings
    seed: int
    decode_tokens: int = DEFAULT_DECODE_TOKENS


def arch_modes(arch: str, modes: Sequence[str]) -> list[str]:
    """The requested modes that apply to ``arch`` (decode to language models only)."""
    lm = models.ARCHS[arch].kind == "lm"
    return [m for m in modes if lm or m not in LM_ONLY_MODES]


@dataclass
class Built:
    """The arch's models in float32 on the CPU, or why one could not be built."""
    eager: nn.Module | None
    fusekit: nn.Module | None
    eager_error: str = ""
    fusekit_error: str = ""


def _error_note(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"ERROR {type(exc).__name__}: {message}"[:300]


def build_models(arch: str, size: str, seed: int) -> Built:
    built = Built(None, None)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built.eager = models.build(arch, impl="eager", size=size)
    except Exception as exc:
        built.eager_error = _error_note(exc)
        built.fusekit_error = "ERROR the eager twin could not be built: " + built.eager_error
        return built
    try:
        fused = models.build(arch, impl="fusekit", size=size)
        fused.load_state_dict(built.eager.state_dict(), strict=True)
        built.fusekit = fused
    except Exception as exc:
        built.fusekit_error = _error_note(exc)
    return built


def _row(arch: str, spec: models.ArchSpec, s: Settings, batch: int, dtype: str, mode: str, impl: str,
         layout: str, env: Mapping[str, Any]) -> dict:
    row = {
        "arch": arch, "size": s.size, "kind": spec.kind,
        "shape": "x".join(map(str, models.input_shape(arch, batch, s.size))),
        "batch": batch, "dtype": dtype, "mode": mode, "impl": impl, "layout": layout,
        "baseline": impl != "fusekit", "correct": False, "note": "",
        "logits_err_vs_fp64": None, "logits_err_vs_eager": None, "loss_err_vs_fp64": None, "loss_err_vs_eager": None,
        "grad_err_vs_fp64": None, "grad_err_vs_eager": None, "bound_fwd": None, "bound_bwd": None,
        "check_batch": None, "first_call_s": None, "compile_s": None,
        "timer": None, "median_ms": None, "p20_ms": None, "p80_ms": None, "samples": None,
        "throughput": None, "throughput_unit": "tokens/s" if spec.kind == "lm" else "images/s",
        "speedup_vs_eager": None, "speedup_vs_compile": None,
        "peak_mem_bytes": None, "saved_bytes": None, "saved_vs_eager": None,
        # decode only: G, generated tokens equal to the references' (None: not compared), and the split timing
        "decode_tokens": s.decode_tokens if mode == "decode" else None,
        "tokens_equal_fp64": None, "tokens_equal_eager": None, "prefill_ms": None, "decode_ms_per_step": None,
    }
    for key, value in env.items():
        row["device_arch" if key == "arch" else key] = value
    return row


def _within(err: float | None, bound: float) -> bool:
    return err is None or err <= bound   # NaN fails


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), its wall time in seconds, device work included)."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@dataclass
class Batch:
    """The item's batch on the device, and its first ``check`` samples for the float64 reference."""
    x: torch.Tensor
    y: torch.Tensor
    check: int
    x_ref: torch.Tensor
    bounds: tuple[float, float]


def _check_infer(row: dict, p: Provider, b: Batch, ref_out: torch.Tensor, eager_out: torch.Tensor | None):
    """Sets the row's logits errors; returns the full-batch logits."""
    p.module.eval()
    out, row["first_call_s"] = _timed(_infer_run(p, b.x), b.x.device)
    row["logits_err_vs_fp64"] = relative_error(out[:b.check], ref_out)
    if eager_out is not None:
        row["logits_err_vs_eager"] = relative_error(out, eager_out)
    return out


def _check_train(row: dict, p: Provider, arch: str, b: Batch, ref: tuple, eager: tuple | None):
    """Sets the row's loss and gradient errors; returns (loss, gradients) of the full batch."""
    (loss, grads), row["first_call_s"] = _timed(lambda: _train_result(p.fn, p.module, arch, b.x, b.y), b.x.device)
    if eager is not None:
        row["loss_err_vs_eager"] = abs(loss - eager[0]) / max(abs(eager[0]), 1e-30)
        row["grad_err_vs_eager"] = gradient_error(grads, eager[1])
    sub = None
    if b.check == b.x.shape[0]:
        sub = loss, grads
    elif p.impl != "compile":
        sub = _train_result(p.fn, p.module, arch, b.x[:b.check], b.y[:b.check])
    else:
        row["note"] = (f"float64 check at batch {b.check} for eager and fusekit only; compile is checked against "
                       "eager in the same dtype")
    if sub is not None:
        row["loss_err_vs_fp64"] = abs(sub[0] - ref[0]) / max(abs(ref[0]), 1e-30)
        row["grad_err_vs_fp64"] = gradient_error(sub[1], ref[1])
    return loss, grads


@dataclass
class Generation:
    tokens: torch.Tensor        # [B, L + G]: the prompt and the G generated tokens
    last_logits: torch.Tensor   # [B, vocab]: the logits the last generated token was chosen from


def _generate(module: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Generation:
    """``module.generate`` with the KV cache; the last step's logits are read by a hook on ``module.head``
    (generate returns tokens only), so the checked call is the timed one."""
    last: dict[str, torch.Tensor] = {}

    def keep_last(_module, _args, out):
        last["logits"] = out[:, -1].detach().clone()

    hook = module.head.register_forward_hook(keep_last)
    try:
        module.eval()
        tokens = module.generate(prompt, new_tokens, use_cache=True)
    finally:
        hook.remove()
    return Generation(tokens, last["logits"])


def _check_decode(row: dict, p: Provider, b: Batch, new_tokens: int, ref: Generation | None,
                  eager: Generation | None) -> Generation:
    """Sets the row's token matches and last-step logits errors (logits only where the tokens, hence the
    contexts, are equal); ref None: not compared with float64."""
    gen, row["first_call_s"] = _timed(lambda: _generate(p.module, b.x, new_tokens), b.x.device)
    if eager is not None:
        row["tokens_equal_eager"] = torch.equal(gen.tokens, eager.tokens)
        if row["tokens_equal_eager"]:
            row["logits_err_vs_eager"] = relative_error(gen.last_logits, eager.last_logits)
    if ref is not None:
        row["tokens_equal_fp64"] = torch.equal(gen.tokens[:b.check], ref.tokens.to(gen.tokens.device))
        if row["tokens_equal_fp64"]:
            row["logits_err_vs_fp64"] = relative_error(gen.last_logits[:b.check], ref.last_logits)
    return gen


def _passes(row: Mapping[str, Any], fwd: float, bwd: float) -> bool:
    """Every error of the row within the bounds (fwd for logits and loss, bwd for gradients; twice that
    against eager in the same dtype). NaN passes nothing."""
    return all(_within(row[f"{what}_err_vs_{against}"],
                       (1 if against == "fp64" else 2) * (bwd if what == "grad" else fwd))
               for what in ("logits", "loss", "grad") for against in ("fp64", "eager"))


def _bound_text(bounds: tuple[float, float], mode: str) -> str:
    if mode == "decode":
        return (f"generated tokens equal to eager's (and float64's where eager's are); last-step logits "
                f"{bounds[0]:.1e} from float64, 2x that from eager")
    if mode == "infer":
        return f"logits {bounds[0]:.1e} from float64, 2x that from eager"
    return f"loss {bounds[0]:.1e}, gradients {bounds[1]:.1e} from float64, 2x that from eager"


def _bounds_after_eager(dtype_bounds: tuple[float, float], eager: Mapping[str, Any], mode: str) -> tuple[float, float]:
    """The dtype's bounds, or twice the eager twin's own error against float64 where that is larger."""
    def relaxed(bound, err):
        return max(bound, 2 * err) if err is not None and math.isfinite(err) else bound
    if mode != "train":
        return relaxed(dtype_bounds[0], eager["logits_err_vs_fp64"]), dtype_bounds[1]
    return relaxed(dtype_bounds[0], eager["loss_err_vs_fp64"]), relaxed(dtype_bounds[1], eager["grad_err_vs_fp64"])


def run_item(arch: str, built: Built, batch: int, dtype_name: str, s: Settings, env: Mapping[str, Any]) -> list[dict]:
    spec = models.ARCHS[arch]
    device, dtype = s.device, harness.DTYPES[dtype_name]
    channels_last = spec.kind == "image" and s.channels_last is not False
    layout = "channels_last" if channels_last else "contiguous"
    # the eager twin runs first (the others are compared with it), also when it is not a row of its own
    run_impls = ["eager"] + [i for i in IMPLS if i in s.impls and i != "eager"]
    modes = arch_modes(arch, s.modes)
    rows = {(mode, impl): _row(arch, spec, s, batch, dtype_name, mode, impl, layout, env)
            for mode in modes for impl in run_impls}
    wanted = [rows[(mode, impl)] for mode in modes for impl in IMPLS if impl in s.impls]
    if built.eager is None:
        for row in wanted:
            row["note"] = built.eager_error
        return wanted
    if "compile" in s.impls:
        torch._dynamo.reset()   # a fresh cache per item: no recompile limits or automatic dynamic shapes
    gen = harness.make_generator("cpu", (zlib.crc32(f"{arch}|{batch}".encode()) ^ s.seed) & 0x7FFFFFFF)
    x, y = models.example_batch(arch, batch, s.size, "cpu", dtype, gen)
    x, y = x.to(device), y.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check = min(batch, CHECK_BATCH)
    b = Batch(x, y, check, x[:check].double() if x.is_floating_point() else x[:check], model_bounds(dtype, device))
    samples_per_call = batch * (x.shape[1] if spec.kind == "lm" else 1)

    providers: dict[str, Provider] = {}
    for impl in run_impls:
        note = ""
        if impl == "fusekit" and built.fusekit is None:
            note = built.fusekit_error
        else:
            try:
                providers[impl] = _make_provider(impl, built.fusekit if impl == "fusekit" else built.eager, device,
                                                 dtype, channels_last)
            except Exception as exc:
                note = _error_note(exc)
        for mode in modes:
            rows[(mode, impl)]["note"] = note
    # the float64 reference: the eager twin with this dtype's rounded weights, run in float64
    reference = _prepare(built.eager, device, dtype, channels_last).double()

    for mode in modes:
        group = {impl: rows[(mode, impl)] for impl in run_impls}
        try:
            if mode == "infer":
                reference.eval()
                with torch.no_grad():
                    ref = reference(b.x_ref)
            elif mode == "decode":
                ref = _generate(reference, b.x_ref, s.decode_tokens)
            else:
                ref = _train_result(reference, reference, arch, b.x_ref, y[:check])
        except Exception as exc:
            for impl, row in group.items():
                if impl in providers:
                    row["note"] = "ERROR float64 reference: " + _error_note(exc)[len("ERROR "):]
            continue
        eager_result = None
        bounds = b.bounds
        for impl in run_impls:
            p, row = providers.get(impl), group[impl]
            if p is None:
                continue
            row["check_batch"] = check
            if mode == "decode" and impl == "compile":
                row["note"] = COMPILE_DECODE_NOTE
                continue
            try:
                if mode == "infer":
                    result = _check_infer(row, p, b, ref, eager_result)
                elif mode == "decode":
                    result = _check_decode(row, p, b, s.decode_tokens, ref, eager_result)
                else:
                    result = _check_train(row, p, arch, b, ref, eager_result)
                if impl == "compile":
                    row["compile_s"] = row["first_call_s"]
            except Exception as exc:   # reported, never timed
                row["note"] = _error_note(exc)
                continue
            if impl == "eager":
                # the twin is what PyTorch computes: it fails only on non-finite results; where it is itself
                # further from float64 than the dtype's bound (kinks that flip, BatchNorm statistics that
                # cancel), the other providers are held to twice its error instead
                row.update(bound_fwd=bounds[0], bound_bwd=bounds[1] if mode == "train" else None)
                ok = _passes(row, math.inf, math.inf)
                if mode == "decode":
                    ok = ok and bool(torch.isfinite(result.last_logits).all())
                if ok:
                    eager_result = result
                    if mode == "decode" and not row["tokens_equal_fp64"]:
                        # what PyTorch computes in this dtype: the others are held to it alone
                        row["note"] = ("the eager twin's generated tokens differ from float64's (first "
                                       f"{check} sequences): the others are compared with eager only")
                        ref = None
                    elif not _passes(row, *bounds):
                        row["note"] = (f"the eager twin itself is beyond the {dtype_name} bound: "
                                       f"{_bound_text(bounds, mode)}")
                    bounds = _bounds_after_eager(bounds, row, mode)
            else:
                row.update(bound_fwd=bounds[0], bound_bwd=bounds[1] if mode == "train" else None)
                ok = _passes(row, *bounds) and row["tokens_equal_eager"] is not False \
                    and row["tokens_equal_fp64"] is not False
            del result
            if not ok:
                row["note"] = (f"FAILED beyond the bound: {_bound_text(bounds, mode)}"
                               + (f"; {row['note']}" if row["note"] else ""))
                continue
            row["correct"] = True
            if impl not in s.impls:
                continue
            try:
                _time_provider(row, p, mode, arch, x, y, s,
                               batch * s.decode_tokens if mode == "decode" else samples_per_call)
            except Exception as exc:
                row["correct"] = False
                row["note"] = _error_note(exc) + " (while timing)"
        del ref, eager_result
        _add_speedups([group[impl] for impl in run_impls if impl in s.impls])
    del reference, providers
    if device == "cuda":
        torch.cuda.empty_cache()
    return wanted


def _decode_run(p: Provider, prompt: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    def run():
        return p.module.generate(prompt, new_tokens, use_cache=True)
    return run


def _time_provider(row: dict, p: Provider, mode: str, arch: str, x: torch.Tensor, y: torch.Tensor, s: Settings,
                   samples_per_call: int) -> None:
    if mode == "infer":
        p.module.eval()
        run = _infer_run(p, x)
    elif mode == "decode":
        p.module.eval()
        run = _decode_run(p, x, s.decode_tokens)
    else:
        p.module.train()
        run = _train_run(p, arch, x, y)
    # one warm call: its peak memory, and its time tells the CPU timer whether to time one call only
    row["peak_mem_bytes"], warm_s = peak_memory(run, s.device)
    timing = harness.time_call(run, s.timer, warm_s)
    row.update(timer=timing.timer, median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
               samples=timing.samples, throughput=samples_per_call / (timing.median_ms * 1e-3))
    if mode == "decode" and s.decode_tokens > 1:
        # generate with one new token is the prefill alone: the rest of the call is G - 1 cached steps
        prefill_run = _decode_run(p, x, 1)
        _, prefill_s = _timed(prefill_run, x.device)
        prefill = harness.time_call(prefill_run, s.timer, prefill_s)
        row["prefill_ms"] = prefill.median_ms
        row["decode_ms_per_step"] = (timing.median_ms - prefill.median_ms) / (s.decode_tokens - 1)
    if mode == "train" and p.impl != "compile":
        p.optimizer.zero_grad(set_to_none=True)
        exclude = list(p.module.parameters()) + list(p.module.buffers())
        out, row["saved_bytes"] = saved_for_backward(lambda x: p.fn(x), {"x": x}, exclude)
        del out


def _add_speedups(group: Sequence[dict]) -> None:
    by_impl = {r["impl"]: r for r in group}
    for row in group:
        for base in ("eager", "compile"):
            ref = by_impl.get(base)
            if ref is not None and ref["median_ms"] and row["median_ms"]:
                row[f"speedup_vs_{base}"] = ref["median_ms"] / row["median_ms"]
        eager = by_impl.get("eager")
        if eager is not None and eager["saved_bytes"] and row["saved_bytes"] is not None:
            row["saved_vs_eager"] = row["saved_bytes"] / eager["saved_bytes"]


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------

def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2 ** 20:.1f}"


def _err(row: Mapping[str, Any], against: str) -> str:
    if row["mode"] == "decode":
        equal = row[f"tokens_equal_{against}"]
        if equal is None:
            return "-"
        logits = row[f"logits_err_vs_{against}"]
        return ("tokens equal" if equal else "tokens differ") + (f", {logits:.1e}" if logits is not None else "")
    if row["mode"] == "infer":
        return report._num(row[f"logits_err_vs_{against}"], ".1e")
    loss, grad = row[f"loss_err_vs_{against}"], row[f"grad_err_vs_{against}"]
    if loss is None and grad is None:
        return "-"
    return f"{report._num(loss, '.1e')} / {report._num(grad, '.1e')}"


def _throughput(row: Mapping[str, Any]) -> str:
    if row["throughput"] is None:
        return "-"
    return f"{row['throughput']:.4g} {row['throughput_unit']}"


COLUMNS: list[tuple[str, Callable[[Mapping[str, Any]], str]]] = [
    ("arch", lambda r: r["arch"]),
    ("batch", lambda r: str(r["batch"])),
    ("dtype", lambda r: r["dtype"]),
    ("mode", lambda r: r["mode"]),
    ("impl", lambda r: r["impl"]),
    ("layout", lambda r: r["layout"]),
    ("throughput", _throughput),
    ("median ms", lambda r: report._ms(r["median_ms"])),
    ("p20-p80 ms", lambda r: "-" if r["p20_ms"] is None else f"{report._ms(r['p20_ms'])}-{report._ms(r['p80_ms'])}"),
    ("vs eager", lambda r: report._speedup(r["speedup_vs_eager"])),
    ("vs compile", lambda r: report._speedup(r["speedup_vs_compile"])),
    ("peak MiB", lambda r: _mib(r["peak_mem_bytes"])),
    ("saved MiB", lambda r: _mib(r["saved_bytes"])),
    ("err vs fp64", lambda r: _err(r, "fp64")),
    ("err vs eager", lambda r: _err(r, "eager")),
    ("first call s", lambda r: report._num(r["first_call_s"], ".3g")),
    ("status", lambda r: "ok" if r["correct"] else "not run" if r["note"].startswith("not run")
     else (r["note"].split(" ", 1)[0] or "FAILED")),
]


def markdown_rows(rows: Sequence[Mapping[str, Any]], with_head: bool = True) -> list[str]:
    lines = []
    if with_head:
        lines += ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(c[1](r)).replace("|", "/") for c in COLUMNS) + " |")
    return lines


def notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        text = r["note"]
        if r["compile_s"] is not None:
            text = f"first call {r['compile_s']:.1f} s, compilation included" + (f"; {text}" if text else "")
        if r["decode_ms_per_step"] is not None:
            text = (f"{r['decode_tokens']} tokens: prefill (generate with 1 token) {report._ms(r['prefill_ms'])} ms, "
                    f"{report._ms(r['decode_ms_per_step'])} ms per cached decode step "
                    f"({r['batch'] * 1e3 / r['decode_ms_per_step']:.4g} tokens/s)" if r["decode_ms_per_step"] > 0 else
                    f"{r['decode_tokens']} tokens: prefill {report._ms(r['prefill_ms'])} ms, decode steps below "
                    "the timer's resolution") + (f"; {text}" if text else "")
        if text:
            out.append(f"- {r['arch']} N={r['batch']} {r['dtype']} {r['mode']} {r['impl']}: {text}")
    return out


def header_lines(env: Mapping[str, Any], s: Settings) -> list[str]:
    arch = f" ({env['arch']})" if env.get("arch") else ""
    if s.device == "cpu":
        timer = (f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={s.timer.min_run_time} s) "
                 f"({s.timer.slow_calls} calls timed one by one when a warm call takes over "
                 f"{harness.SLOW_CALL_S:g} s)")
    else:
        timer = f"triton.testing.do_bench(warmup={s.timer.warmup_ms} ms, rep={s.timer.rep_ms} ms, L2 flushed)"
    tf32 = " (TF32 on: fp32 held to the fp16 bound)" if _tf32_enabled(s.device) else ""
    decode = []
    if "decode" in s.modes:
        decode = [f"decode (language models) = greedy model.generate(prompt [B, L], G = {s.decode_tokens} new tokens, "
                  "KV cache): prefill + G-1 cached steps, throughput = B*G generated tokens / median; per step = "
                  "(median(G) - median(generate with 1 token)) / (G-1); checked: generated tokens equal the eager "
                  "twin's exactly and the eager twin's equal float64's (else the others are compared with eager "
                  "only), plus the last step's logits (hook on the head) with the infer bound; torch.compile not run"]
    return [
        f"fusekit-bench model on {env['device']}{arch}, {env['threads']} threads, {env['timestamp']}",
        f"torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | fusekit {env['fusekit']} "
        f"| commit {env['commit']}",
        f"timing: {timer}, median and p20/p80; infer = forward under inference_mode in eval mode; train = "
        "zero_grad + forward (train mode) + loss + backward + SGD step (lr 0); throughput = samples / median",
        f"checked before timing: logits (infer) or loss / gradients (train) vs the eager twin in float64 (first "
        f"{CHECK_BATCH} samples at most) and in the same dtype; norm-wise relative error bound "
        f"{MODEL_BOUND_FACTOR:g}x the tolerance table's rtol{tf32}; 'vs X' = X's median / this row's median",
        *decode,
        f"memory: {MEMORY_DESCRIPTION[s.device]}; saved = activation bytes autograd saves for backward "
        "(parameters and buffers left out)",
    ]


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusekit-bench model",
        description="Benchmark whole reference models (fusekit.models): the fusekit model against its eager "
                    "PyTorch twin and torch.compile of the twin, same weights and batch. Every provider is "
                    "checked against the twin run in float64 before it is timed.",
        epilog="Exit status: 0 when every fusekit row was correct, 1 when one FAILED or raised, 2 on a usage error.")
    p.add_argument("--arch", nargs="+", choices=list(models.ARCHS), metavar="ARCH",
                   help=f"models (default: all): {', '.join(models.ARCHS)}")
    p.add_argument("--size", choices=list(models.SIZES), default="full",
                   help="full: the published configuration; test: the small one of the same structure")
    p.add_argument("--batch", nargs="+", type=int,
                   help="batch sizes (default: each arch's own, per device; see --list)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", nargs="+", choices=[d for d in harness.DTYPES if d != "fp64"],
                   help="default: fp32 on CPU, fp32 bf16 on CUDA")
    p.add_argument("--mode", nargs="+", choices=list(MODES),
                   help="default: infer train decode (always run in that order; decode for language models only)")
    p.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS, metavar="G",
                   help=f"decode: new tokens generated per sequence (default {DEFAULT_DECODE_TOKENS})")
    p.add_argument("--impl", nargs="+", choices=list(IMPLS), help="providers (default: fusekit eager compile); "
                   "the eager twin always runs for the check")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last weights and inputs for image models (default: on)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch.get_num_threads())")
    p.add_argument("--slow-calls", type=int, default=3, metavar="N",
                   help="CPU: calls timed one by one (median, p20/p80) when a warm call takes over "
                        f"{harness.SLOW_CALL_S:g} s (default 3)")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list (rewritten after every item)")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV (rewritten after every item)")
    p.add_argument("--markdown", metavar="PATH", help="write the header, the table and its notes as markdown")
    p.add_argument("--min-run-time", type=float, default=1.0, metavar="S",
                   help="CPU: seconds per blocked_autorange measurement (default 1.0)")
    p.add_argument("--warmup-ms", type=float, default=100.0, help="CUDA: do_bench warmup budget (default 100)")
    p.add_argument("--rep-ms", type=float, default=500.0, help="CUDA: do_bench repetition budget (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch")
    p.add_argument("--max-time", type=float, metavar="S", help="start no new (arch, batch, dtype) after S seconds")
    p.add_argument("--list", action="store_true", help="list the archs, their inputs and default batches")
    return p


def print_list() -> None:
    for name, spec in models.ARCHS.items():
        module = spec.builder.split(":")[0]
        try:
            importlib.import_module(f"{models.__name__}.{module}")
            state = "available"
        except Exception as exc:
            state = f"unavailable ({type(exc).__name__}: {exc})"
        inputs = ", ".join(f"{size} {'x'.join(map(str, shape))}" for size, shape in spec.inputs.items())
        batches = ", ".join(f"{d} {b}" for d, b in spec.batch.items())
        print(f"{name:16s} {spec.kind:5s} {state}\n    {spec.description}\n    inputs: {inputs}; "
              f"default batch: {batches}" + (f"\n    {spec.source}" if spec.source else ""))


def _write_outputs(args, lines: Sequence[str], rows: Sequence[dict]) -> None:
    if args.json:
        report.write_json(args.json, rows)
    if args.csv:
        report.write_csv(args.csv, rows)
    if args.markdown:
        text = "\n".join([*lines, "", *markdown_rows(rows), "", *notes(rows)]) + "\n"
        report._atomic_write(args.markdown, text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print_list()
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.batch and min(args.batch) < 1:
        parser.error("--batch: batch sizes must be >= 1")
    if args.decode_tokens < 1:
        parser.error("--decode-tokens: must be >= 1")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    modes = [m for m in MODES if m in (args.mode or MODES)]
    impls = [i for i in IMPLS if i in (args.impl or IMPLS)]
    s = Settings(args.size, device, impls, modes, args.channels_last,
                 harness.TimerSettings(device, threads, args.min_run_time, args.warmup_ms, args.rep_ms, "do_bench",
                                       args.slow_calls),
                 args.seed, args.decode_tokens)
    archs = args.arch or list(models.ARCHS)
    dtypes = args.dtype or DEFAULT_DTYPES[device]

    env = harness.environment(device, threads)
    lines = header_lines(env, s)
    print("\n".join(lines))
    no_decode = [a for a in archs if "decode" in modes and "decode" not in arch_modes(a, modes)]
    if args.mode and no_decode:
        print(f"note: decode applies to language models only; not run for {', '.join(no_decode)}")
    archs = [a for a in archs if arch_modes(a, modes)]
    if not archs:
        print("note: no requested mode applies to the requested archs: nothing to run")
    sys.stdout.flush()
    rows: list[dict] = []
    start = time.monotonic()
    skipped = 0
    for arch in archs:
        built = None
        for batch in args.batch or [models.ARCHS[arch].batch[device]]:
            for dtype in dtypes:
                if args.max_time is not None and time.monotonic() - start > args.max_time:
                    skipped += 1
                    continue
                if built is None:
                    built = build_models(arch, args.size, args.seed)
                print(f"\n{arch} ({args.size}) N={batch} {dtype}: {' '.join(arch_modes(arch, modes))}",
                      file=sys.stderr)
                item_rows = run_item(arch, built, batch, dtype, s, env)
                rows += item_rows
                print("\n" + "\n".join(markdown_rows(item_rows) + notes(item_rows)))
                sys.stdout.flush()
                _write_outputs(args, lines, rows)
        del built
    bad = [r for r in rows if r["impl"] == "fusekit" and not r["correct"]]
    print(f"\n{len(rows)} rows; {len(bad)} fusekit rows failed or raised"
          + (f"; {skipped} items not started (--max-time {args.max_time} s)" if skipped else ""))
    for r in bad:
        print(f"  {r['arch']} N={r['batch']} {r['dtype']} {r['mode']}: {r['note']}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
