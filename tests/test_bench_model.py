"""fusekit-bench model on the test-size reference models: checked rows, timings, the failure gate, outputs. CPU."""
import csv
import json
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusekit.nn
from fusekit import models
from fusekit.bench import cli
from fusekit.bench import model as bench_model

FAST = ["--size", "test", "--device", "cpu", "--min-run-time", "0.01", "--threads", "1"]
ARCHS = ("dinat_t", "convnext_t", "replknet_31b", "inceptionnext_t", "mobilenet_v2", "gqa_decoder")


@pytest.fixture(scope="module")
def all_archs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_model")
    paths = {k: str(out / f"rows.{k}") for k in ("json", "csv", "markdown")}
    # default modes: infer train, and decode for the language model
    argv = ["--arch", *ARCHS, "--batch", "2", "--impl", "fusekit", "eager", "--decode-tokens", "4",
            "--json", paths["json"], "--csv", paths["csv"], "--markdown", paths["markdown"]] + FAST
    status = bench_model.main(argv)
    with open(paths["json"]) as f:
        rows = json.load(f)
    with open(paths["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    with open(paths["markdown"]) as f:
        markdown = f.read()
    return status, rows, csv_rows, markdown


def test_every_registered_arch_is_benchmarked():
    assert set(ARCHS) <= set(models.ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_are_checked_then_timed(all_archs, arch):
    status, rows, _, _ = all_archs
    assert status == 0
    image = models.ARCHS[arch].kind == "image"
    modes = ("infer", "train") if image else ("infer", "train", "decode")
    assert {(r["mode"], r["impl"]) for r in rows if r["arch"] == arch} == {(m, i) for m in modes
                                                                            for i in ("fusekit", "eager")}
    # the decode rows are checked by test_decode_rows_are_checked_then_timed
    mine = {(r["mode"], r["impl"]): r for r in rows if r["arch"] == arch and r["mode"] != "decode"}
    for (mode, impl), r in mine.items():
        assert r["correct"] is True, r
        assert r["batch"] == 2 and r["dtype"] == "fp32" and r["size"] == "test"
        assert r["layout"] == ("channels_last" if image else "contiguous")
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        per_call = 2 if image else 2 * models.input_shape(arch, 2, "test")[1]
        assert r["throughput"] == pytest.approx(per_call / (r["median_ms"] * 1e-3))
        assert r["throughput_unit"] == ("images/s" if image else "tokens/s")
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0
        assert r["speedup_vs_eager"] == pytest.approx(mine[(mode, "eager")]["median_ms"] / r["median_ms"])
        assert r["check_batch"] == 2
        # the eager twin is held to nothing but finite results; past the dtype's bound it raises the others' bound
        if impl == "eager":
            assert r["bound_fwd"] == pytest.approx(5e-4)
            assert r["bound_bwd"] == (pytest.approx(2.5e-3) if mode == "train" else None)
        errors = ["logits"] if mode == "infer" else ["loss", "grad"]
        beyond = [e for e in errors if not r[f"{e}_err_vs_fp64"] <= r["bound_bwd" if e == "grad" else "bound_fwd"]]
        if impl == "fusekit":
            assert not beyond and r["bound_fwd"] >= 5e-4, r
        elif beyond:
            assert "eager twin itself is beyond" in r["note"], r
        if mode == "infer":
            assert r["saved_bytes"] is None
        else:
            assert r["saved_bytes"] > 0
            assert r["saved_vs_eager"] == pytest.approx(r["saved_bytes"] / mine[(mode, "eager")]["saved_bytes"])
        if impl == "fusekit":
            assert r["logits_err_vs_eager" if mode == "infer" else "grad_err_vs_eager"] is not None
        for key in ("device", "device_type", "torch", "triton", "cuda", "fusekit", "commit", "timestamp", "threads"):
            assert key in r
        assert r["threads"] == 1 and r["device_type"] == "cpu"


def test_csv_and_markdown_hold_every_row(all_archs):
    _, rows, csv_rows, markdown = all_archs
    assert len(rows) == len(csv_rows) == 4 * len(ARCHS) + 2   # + decode fusekit / eager for gqa_decoder
    assert "fusekit-bench model on" in markdown and "| arch | batch |" in markdown
    assert markdown.count("| ok |") == len(rows)


DECODE = ["--arch", "gqa_decoder", "--batch", "2", "--mode", "decode", "--decode-tokens", "4",
          "--impl", "fusekit", "eager"] + FAST


def test_decode_rows_are_checked_then_timed(tmp_path):
    path = tmp_path / "rows.json"
    assert bench_model.main(DECODE + ["--json", str(path)]) == 0
    rows = {r["impl"]: r for r in json.loads(path.read_text())}
    assert set(rows) == {"fusekit", "eager"} and all(r["mode"] == "decode" for r in rows.values())
    for impl, r in rows.items():
        assert r["correct"] is True and r["decode_tokens"] == 4 and r["check_batch"] == 2, r
        assert r["tokens_equal_fp64"] is True and r["logits_err_vs_fp64"] <= r["bound_fwd"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["throughput_unit"] == "tokens/s" and r["throughput"] > 0
        assert r["throughput"] == pytest.approx(2 * 4 / (r["median_ms"] * 1e-3))   # generated tokens only
        assert r["prefill_ms"] > 0 and r["decode_ms_per_step"] == pytest.approx((r["median_ms"] - r["prefill_ms"]) / 3)
        assert r["peak_mem_bytes"] is not None and r["saved_bytes"] is None
    assert rows["fusekit"]["tokens_equal_eager"] is True and rows["fusekit"]["logits_err_vs_eager"] is not None


def test_broken_fusekit_decode_is_reported_failed(tmp_path, monkeypatch, capsys):
    import fusekit.nn.mqa as mqa
    plain_decode = mqa.multi_query_decode

    def noisy(*args, **kwargs):
        out = plain_decode(*args, **kwargs)
        return out + 0.5 * out.abs().max() * torch.randn_like(out)

    monkeypatch.setattr(mqa, "multi_query_decode", noisy)
    path = tmp_path / "rows.json"
    assert bench_model.main(DECODE + ["--json", str(path)]) == 1
    rows = {r["impl"]: r for r in json.loads(path.read_text())}
    bad, eager = rows["fusekit"], rows["eager"]
    assert not bad["correct"] and bad["note"].startswith("FAILED"), bad
    assert bad["median_ms"] is None and bad["throughput"] is None and bad["peak_mem_bytes"] is None
    assert eager["correct"] and eager["median_ms"] > 0
    assert "1 fusekit rows failed" in capsys.readouterr().out


def test_decode_is_skipped_with_a_note_for_image_models(capsys):
    assert bench_model.main(["--arch", "convnext_t", "--mode", "decode"] + FAST) == 0
    out = capsys.readouterr().out
    assert "decode applies to language models only; not run for convnext_t" in out and "0 rows" in out


@pytest.fixture
def standin(monkeypatch):
    """A tiny image model registered as an arch: stem conv, BatchNorm, a 7x7 depthwise conv (fusekit's
    DepthwiseConv2d or nn.Conv2d(groups=C)), a linear head. GELU only: no kinks for rounding to flip."""

    class Tiny(nn.Module):
        def __init__(self, impl, backend=None, width=8, num_classes=5):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.norm = nn.BatchNorm2d(width)
            if impl == "fusekit":
                self.dwconv = fusekit.nn.DepthwiseConv2d(width, 7, padding=3, backend=backend)
            else:
                self.dwconv = nn.Conv2d(width, width, 7, padding=3, groups=width)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = F.gelu(self.norm(self.stem(x)))
            x = x + F.gelu(self.dwconv(x))
            return self.head(x.mean((2, 3)))

    module = types.ModuleType("fusekit.models._bench_standin")
    module.tiny = lambda impl, backend=None, **config: Tiny(impl, backend, **config)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    config = {"width": 8, "num_classes": 5}
    spec = models.ArchSpec("standin", "image", "_bench_standin:tiny", {"full": config, "test": config},
                           {"full": (3, 16, 16), "test": (3, 16, 16)}, "stand-in", batch={"cpu": 2, "cuda": 2})
    monkeypatch.setitem(models.ARCHS, "standin", spec)
    return "standin"


def test_compile_provider_is_checked_timed_and_reports_compile_time(standin, tmp_path, monkeypatch):
    # check batch 1 < batch 2: eager and fusekit take an extra float64-checked step, compile is held to eager
    monkeypatch.setattr(bench_model, "CHECK_BATCH", 1)
    # dynamo + AOT autograd as the CLI's torch.compile runs them, without inductor's minute of C++ builds
    compile_default = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_default(model, backend="aot_eager"))
    path = tmp_path / "rows.json"
    assert bench_model.main(["--arch", standin, "--batch", "2", "--json", str(path)] + FAST) == 0
    rows = {(r["mode"], r["impl"]): r for r in json.loads(path.read_text())}
    assert set(rows) == {(m, i) for m in ("infer", "train") for i in ("fusekit", "eager", "compile")}
    for (mode, impl), r in rows.items():
        assert r["correct"] is True and r["median_ms"] > 0 and r["check_batch"] == 1, r
        assert r["speedup_vs_compile"] == pytest.approx(rows[(mode, "compile")]["median_ms"] / r["median_ms"])
    assert rows[("infer", "compile")]["compile_s"] > 0 and rows[("infer", "compile")]["logits_err_vs_eager"] < 1e-3
    train = rows[("train", "compile")]
    assert train["grad_err_vs_fp64"] is None and train["grad_err_vs_eager"] < 1e-3
    assert "compile is checked against eager" in train["note"]
    assert rows[("train", "fusekit")]["grad_err_vs_fp64"] is not None
    assert train["saved_bytes"] is None    # out of reach of saved_tensors_hooks


def test_broken_fusekit_model_is_reported_failed_and_not_timed(standin, tmp_path, monkeypatch, capsys):
    plain_forward = fusekit.nn.DepthwiseConv2d.forward

    def noisy(self, x):
        y = plain_forward(self, x)
        return y + 0.05 * y.detach().abs().max() * torch.randn_like(y)

    monkeypatch.setattr(fusekit.nn.DepthwiseConv2d, "forward", noisy)
    path = tmp_path / "rows.json"
    status = bench_model.main(["--arch", standin, "--impl", "fusekit", "eager", "--json", str(path)] + FAST)
    assert status == 1
    rows = {(r["mode"], r["impl"]): r for r in json.loads(path.read_text())}
    for mode in ("infer", "train"):
        bad, eager = rows[(mode, "fusekit")], rows[(mode, "eager")]
        assert not bad["correct"] and bad["note"].startswith("FAILED"), bad
        assert bad["median_ms"] is None and bad["throughput"] is None and bad["peak_mem_bytes"] is None
        assert eager["correct"] and eager["median_ms"] > 0
    assert "2 fusekit rows failed" in capsys.readouterr().out


def test_fusekit_model_that_cannot_load_the_twins_weights_is_an_error(standin, monkeypatch, capsys):
    module = sys.modules["fusekit.models._bench_standin"]
    build = module.tiny

    def renamed(impl, backend=None, **config):
        m = build(impl, backend, **config)
        if impl == "fusekit":
            m.extra = nn.Linear(2, 2)   # a key the eager state_dict lacks: strict loading fails
        return m

    monkeypatch.setattr(module, "tiny", renamed)
    assert bench_model.main(["--arch", standin, "--impl", "fusekit", "eager", "--mode", "infer"] + FAST) == 1
    out = capsys.readouterr().out
    assert "ERROR RuntimeError: Error(s) in loading state_dict" in out


def test_relative_errors_fail_on_nan():
    ref = torch.tensor([1.0, -2.0])
    assert bench_model.relative_error(torch.tensor([1.0, -2.5]), ref) == pytest.approx(0.25)
    assert not bench_model.relative_error(torch.tensor([float("nan"), 0.0]), ref) <= 1.0
    grads = {"a": torch.tensor([3.0, 4.0])}
    assert bench_model.gradient_error({"a": torch.tensor([3.0, 4.5])}, grads) == pytest.approx(0.1)
    assert not bench_model.gradient_error({"a": torch.tensor([float("inf"), 0.0])}, grads) <= 1.0


def test_cpu_peak_memory_sees_a_temporary_allocation():
    nbytes, seconds = bench_model.peak_memory(lambda: torch.ones(1 << 24).sum(), "cpu")   # 64 MiB, freed at once
    assert seconds > 0
    if nbytes is not None:   # None where /proc is missing
        assert nbytes >= 60 << 20


def test_list_and_routing_through_fusekit_bench(capsys):
    assert cli.main(["model", "--list"]) == 0
    out = capsys.readouterr().out
    for arch in ARCHS:
        assert arch in out
    assert "default batch" in out and "unavailable" not in out
    with pytest.raises(SystemExit):
        cli.main(["model", "--arch", "no_such_model"])
