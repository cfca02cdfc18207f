"""fusekit-bench on tiny shapes: rows, correctness gate, speedups, outputs. CPU only, a few seconds."""
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fusekit.bench import cli, harness, report
from fusekit.bench.depthwise import DepthwiseConv2dBench, InceptionDWConv2dBench
from fusekit.testing.tolerances import tolerance

FAST = ["--device", "cpu", "--min-run-time", "0.01", "--threads", "1"]


def _case(op, name):
    return next(c for c in op.cases() if c.name == name)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["depthwise_conv2d", "inception_dwconv2d", "--case", "tiny.k3", "tiny.band5", "--batch", "2",
            "--mode", "fwd", "fwd_bwd", "--backends", "auto", "--json", str(out / "rows.json"),
            "--csv", str(out / "rows.csv")] + FAST
    status = cli.main(argv)
    with open(out / "rows.json") as f:
        rows = json.load(f)
    with open(out / "rows.csv") as f:
        csv_rows = list(csv.DictReader(f))
    return status, rows, csv_rows


def test_every_provider_is_checked_then_timed_with_metadata(tiny_run):
    status, rows, csv_rows = tiny_run
    assert status == 0
    providers = {(r["op"], r["mode"], r["provider"], r["layout"]) for r in rows}
    for op in ("depthwise_conv2d", "inception_dwconv2d"):
        for mode in ("fwd", "fwd_bwd"):
            for layout in ("nchw", "channels_last"):
                assert (op, mode, "fusekit:auto", layout) in providers
                assert (op, mode, "torch", layout) in providers
    assert len(rows) == 16 and len(csv_rows) == 16
    for r in rows:
        assert r["correct"] is True and r["checked"] == "all", r
        assert 0 <= r["max_abs_err"] < 1e-3
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert math.isclose(r["gbps"], r["bytes"] / (r["median_ms"] * 1e6), rel_tol=1e-9)
        assert math.isclose(r["gflops"], r["flops"] / (r["median_ms"] * 1e6), rel_tol=1e-9)
        assert math.isclose(r["frac_bw"], r["gbps"] / r["copy_gbps"], rel_tol=1e-9)
        for key in ("device", "torch", "triton", "cuda", "fusekit", "commit", "timestamp", "threads"):
            assert key in r
        assert r["threads"] == 1
    assert {row["provider"] for row in csv_rows} == {"fusekit:auto", "torch"}


def test_speedups_are_baseline_median_over_row_median_in_the_same_group(tiny_run):
    _, rows, _ = tiny_run
    for group in report.group_rows(rows):
        base = {r["layout"]: r["median_ms"] for r in group if r["baseline"]}
        assert set(base) == {"nchw", "channels_last"}
        for r in group:
            for layout, median in base.items():
                assert math.isclose(r[f"speedup_vs_torch_{layout}"], median / r["median_ms"], rel_tol=1e-12)


def test_bytes_and_flops_follow_the_documented_formulas(tiny_run):
    _, rows, _ = tiny_run
    # tiny.k3: x = y = 2*5*9*11, w = 5*3*3, b = 5, fp32
    x, w, b = 2 * 5 * 9 * 11, 5 * 9, 5
    fwd = next(r for r in rows if r["case"] == "tiny.k3" and r["mode"] == "fwd")
    assert fwd["bytes"] == 4 * (x + w + b + x) and fwd["flops"] == 2 * x * 9
    fb = next(r for r in rows if r["case"] == "tiny.k3" and r["mode"] == "fwd_bwd")
    assert fb["bytes"] == 4 * ((x + w + b + x) + (x + w + x) + (x + x + w + b)) and fb["flops"] == 3 * 2 * x * 9


def _run_with(op, case, providers, check_macs=None, modes=("fwd", "fwd_bwd")):
    ts = harness.TimerSettings("cpu", 1, min_run_time=0.01)
    rs = harness.RunSettings(ts, ["nchw"], [], [], tolerance, check_macs)
    env = harness.environment("cpu", 1)
    ceilings = {"copy_gbps": 1.0, "fma_gflops": 1.0}
    return harness.run_item(harness.WorkItem(op, case, 2, "fp32", modes), rs, env, ceilings, providers)


def test_wrong_or_crashing_provider_is_reported_and_not_timed():
    op = DepthwiseConv2dBench()
    case = _case(op, "tiny.k6x3")
    good = op.baseline_fn(case, "torch")

    def off_by_a_little(x, weight, bias):
        return good(x, weight, bias) + 1e-2

    def crashes(x, weight, bias):
        raise RuntimeError("kernel exploded")

    rows = _run_with(op, case, [harness.Provider("good", "nchw", False, good),
                                harness.Provider("wrong", "nchw", False, off_by_a_little),
                                harness.Provider("crash", "nchw", False, crashes)])
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in ("fwd", "fwd_bwd"):
        assert by["good", mode]["correct"] and by["good", mode]["median_ms"] > 0
        assert not by["wrong", mode]["correct"] and by["wrong", mode]["median_ms"] is None
        assert by["wrong", mode]["note"].startswith("FAILED y:")
        assert math.isclose(by["wrong", mode]["max_abs_err"], 1e-2, rel_tol=1e-3)
        assert by["crash", mode]["note"].startswith("ERROR RuntimeError: kernel exploded")
        assert by["crash", mode]["median_ms"] is None


def test_wrong_gradient_alone_fails_fwd_bwd_but_not_fwd():
    op = DepthwiseConv2dBench()
    case = _case(op, "tiny.k3")

    class WrongWeightGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def bad_grad(x, weight, bias):
        return F.conv2d(x, WrongWeightGrad.apply(weight), bias, padding="same", groups=x.shape[1])

    rows = _run_with(op, case, [harness.Provider("bad_grad", "nchw", False, bad_grad)])
    by = {r["mode"]: r for r in rows}
    assert by["fwd"]["correct"]
    assert not by["fwd_bwd"]["correct"] and "grad_weight" in by["fwd_bwd"]["note"]


@pytest.mark.parametrize("op_cls,case_name,channel", [(DepthwiseConv2dBench, "tiny.k3", -1),
                                                      (InceptionDWConv2dBench, "tiny.band5", -1),
                                                      (InceptionDWConv2dBench, "tiny.band5", 0)])
def test_channel_subset_check_always_covers_first_and_last_channels(op_cls, case_name, channel):
    op = op_cls()
    case = _case(op, case_name)
    good = op.baseline_fn(case, "torch")

    def wrong_in_one_channel(**inputs):
        y = good(**inputs).clone()
        y[:, channel] += 1.0
        return y

    rows = _run_with(op, case, [harness.Provider("one_channel_off", "nchw", False, wrong_in_one_channel)],
                     check_macs=1.0, modes=("fwd",))
    assert rows[0]["checked"] != "all"
    assert not rows[0]["correct"]


def test_quick_plan_holds_the_headline_cpu_cases():
    args = cli.build_parser().parse_args([])
    items = cli.plan(args, cli.OPS, "cpu", quick=True)
    got = {(i.op.name, i.case.name, i.batch, i.dtype, i.modes) for i in items}
    assert ("depthwise_conv2d", "replknet31b.s1", 8, "fp32", ("fwd",)) in got
    assert ("depthwise_conv2d", "replknet31b.s1", 1, "fp32", ("fwd_bwd",)) in got
    assert ("depthwise_conv2d", "convnext_t.s1", 8, "fp32", ("fwd",)) in got
    assert ("depthwise_conv2d", "convnext_t.s1", 1, "fp32", ("fwd_bwd",)) in got
    assert ("inception_dwconv2d", "inceptionnext_t.s1", 8, "fp32", ("fwd", "fwd_bwd")) in got
    assert ("multi_query_attention", "cpu.gqa4.d64.L1024", 1, "fp32", ("fwd", "fwd_bwd")) in got
    assert ("multi_query_decode", "cpu.mqa.d64.L8k", 2, "fp32", ("fwd",)) in got
    sweep = cli.plan(cli.build_parser().parse_args(["--sweep"]), cli.OPS, "cpu", quick=False)
    assert {i.batch for i in sweep if i.op.name.startswith("depthwise")} == {1, 8, 64}
    assert not any("test" in i.case.tags for i in sweep)
    # attention cases carry their own batch; decoding is inference-only
    assert all(i.batch == i.case.dims["B"] for i in sweep if i.op.name.startswith("multi_query"))
    assert all(i.modes == ("fwd",) for i in sweep if i.op.name == "multi_query_decode")


def test_attention_rows_are_checked_against_the_reference_and_timed_with_sdpa_baselines(tmp_path):
    argv = ["multi_query_attention", "multi_query_decode", "--case", "tiny.gqa", "tiny.decode", "--json",
            str(tmp_path / "rows.json")] + FAST
    assert cli.main(argv) == 0
    with open(tmp_path / "rows.json") as f:
        rows = json.load(f)
    keys = {(r["op"], r["mode"], r["provider"]) for r in rows}
    for provider in ("fusekit:auto", "sdpa_gqa", "sdpa_expanded"):
        assert ("multi_query_attention", "fwd", provider) in keys
        assert ("multi_query_attention", "fwd_bwd", provider) in keys
        assert ("multi_query_decode", "fwd", provider) in keys
    assert not any(r["op"] == "multi_query_decode" and r["mode"] != "fwd" for r in rows)
    for r in rows:
        if r["provider"] in ("fusekit:auto", "sdpa_gqa", "sdpa_expanded"):
            assert r["correct"] is True and r["layout"] == "bshd", r
            assert r["speedup_vs_sdpa_gqa_bshd"] is not None


def test_list_names_ops_backends_and_baselines(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for word in ("depthwise_conv2d", "inception_dwconv2d", "depthwise_conv1d", "replknet31b.s1", "torch_nchw",
                 "torch_channels_last", "cpu", "available"):
        assert word in out


def test_plot_needs_matplotlib_or_writes_a_png(tmp_path):
    argv = ["depthwise_conv2d", "--case", "tiny.k3", "--batch", "1", "--mode", "fwd", "--backends", "auto",
            "--layout", "nchw", "--plot", str(tmp_path / "s.png")] + FAST
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="matplotlib"):
            cli.main(argv)
    else:
        assert cli.main(argv) == 0
        assert (tmp_path / "s.png").stat().st_size > 0


def _gpu_suite():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_verifies_a_backend_only_when_all_its_gpu_tests_passed(tmp_path):
    suite = _gpu_suite()
    junit = tmp_path / "junit.xml"
    junit.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_depthwise" name="test_forward[cuda-cuda]"/>
      <testcase classname="tests.test_depthwise" name="test_padding[(3, 3)-same-cuda-cuda]"/>
      <testcase classname="tests.test_depthwise" name="test_forward[triton-cuda]"/>
      <testcase classname="tests.test_depthwise" name="test_padding[(3, 3)-same-triton-cuda]"><failure/></testcase>
      <testcase classname="tests.test_depthwise" name="test_forward[cpu-cpu]"><failure/></testcase>
      <testcase classname="tests.test_depthwise" name="test_inception_parity[96-12-False-cuda-cuda]"/>
      <testcase classname="tests.test_depthwise" name="test_inception_parity[96-12-True-cuda-cuda]"><skipped/></testcase>
      <testcase classname="tests.test_other" name="test_x[a]">
        <properties><property name="fusekit_op" value="inception_dwconv2d"/>
        <property name="fusekit_backend" value="triton"/></properties></testcase>
    </testsuite></testsuites>""")
    ops = ["depthwise_conv2d", "inception_dwconv2d"]
    v = suite.verification(str(junit), ops, "sm_90", "abc", "H100", "2.11", "ok")
    assert v["depthwise_conv2d"]["cuda"]["passed"] is True and v["depthwise_conv2d"]["cuda"]["tests_passed"] == 2
    assert v["depthwise_conv2d"]["cuda"]["arch"] == "sm_90" and v["depthwise_conv2d"]["cuda"]["commit"] == "abc"
    assert v["depthwise_conv2d"]["triton"]["passed"] is False          # one failure is enough
    assert v["inception_dwconv2d"]["cuda"]["passed"] is True
    assert v["inception_dwconv2d"]["cuda"]["tests_skipped"] == 1
    assert v["inception_dwconv2d"]["triton"]["passed"] is True         # from the recorded properties
    missing = suite.verification(str(tmp_path / "none.xml"), ops, "sm_90", "abc", "H100", "2.11", "timeout")
    assert not any(e["passed"] for backends in missing.values() for e in backends.values())


# ----------------------------------------------------------------------------------------------
# inverted residual (inference and training step)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ir_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ir")
    argv = ["inverted_residual", "inverted_residual_train", "--case", "tiny.ir", "tiny.ir.se.s2", "tiny.fmb",
            "--batch", "2", "--backends", "reference", "--baselines", "eager_channels_last",
            "eager_amp_channels_last", "eager_checkpoint_channels_last", "--json", str(out / "rows.json")] + FAST
    status = cli.main(argv)
    with open(out / "rows.json") as f:
        return status, json.load(f)


def test_inverted_residual_rows_are_checked_timed_and_carry_saved_memory(ir_run):
    status, rows = ir_run
    assert status == 0
    keys = {(r["op"], r["case"], r["mode"], r["provider"]) for r in rows}
    for case in ("tiny.ir", "tiny.ir.se.s2", "tiny.fmb"):
        for provider in ("fusekit:reference", "eager", "eager_amp"):
            assert ("inverted_residual", case, "fwd", provider) in keys
        for provider in ("fusekit:reference", "eager", "eager_checkpoint"):
            assert ("inverted_residual_train", case, "fwd_bwd", provider) in keys
    assert {r["mode"] for r in rows if r["op"] == "inverted_residual"} == {"fwd"}
    assert {r["mode"] for r in rows if r["op"] == "inverted_residual_train"} == {"fwd_bwd"}
    for r in rows:
        assert r["correct"] is True and r["checked"] == "all" and r["median_ms"] > 0, r
        assert r["layout"] == "channels_last"
        base = next(b for b in rows if b["op"] == r["op"] and b["case"] == r["case"] and b["provider"] == "eager")
        assert math.isclose(r["speedup_vs_eager_channels_last"], base["median_ms"] / r["median_ms"], rel_tol=1e-12)
        if r["provider"] == "eager_amp":
            assert r["max_abs_err"] > 1e-4 and "bf16" in r["note"]   # bf16 autocast, its own tolerance
        else:   # gradients sum over the batch's pixels: looser
            assert r["max_abs_err"] < (1e-4 if r["mode"] == "fwd" else 1e-3)
    for case in ("tiny.ir", "tiny.ir.se.s2", "tiny.fmb"):
        train = {r["provider"]: r for r in rows if r["op"] == "inverted_residual_train" and r["case"] == case}
        eager, fused, ckpt = train["eager"], train["fusekit:reference"], train["eager_checkpoint"]
        assert eager["saved_vs_eager"] == 1.0 and eager["saved_bytes"] > 0
        assert 0 < ckpt["saved_bytes"] < eager["saved_bytes"]
        assert 0 < fused["saved_bytes"] < eager["saved_bytes"]
        assert fused["saved_vs_eager"] == fused["saved_bytes"] / eager["saved_bytes"]
        assert "saved for backward" in fused["note"] and fused["grad_vs_eager_max_abs"] < 1e-3


def test_inverted_residual_bytes_and_flops_follow_the_documented_formulas(ir_run):
    _, rows = ir_run
    # tiny.ir: x 2x5x9x9 -> y 2x5x9x9, expand 5->13, dw 3x3, project 13->5, fp32
    x = y = 2 * 5 * 9 * 9
    weights = 13 * 5 + 13 * 9 + 5 * 13 + 2 * (13 + 13 + 5)
    macs = 2 * 9 * 9 * 13 * 5 + 2 * 9 * 9 * 13 * (9 + 5)
    fwd = next(r for r in rows if r["op"] == "inverted_residual" and r["case"] == "tiny.ir")
    assert fwd["bytes"] == 4 * (x + weights + y) and fwd["flops"] == 2 * macs
    train = next(r for r in rows if r["op"] == "inverted_residual_train" and r["case"] == "tiny.ir")
    assert train["bytes"] == 4 * ((x + weights + y) + (y + x + x + weights)) and train["flops"] == 3 * 2 * macs


def test_saved_for_backward_counts_distinct_storages_and_leaves_out_parameters():
    from fusekit.bench.inverted_residual import saved_for_backward
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)

    def fn(x, w):
        h = x * w            # saves x and w
        return (h * x).sum() + h.exp().sum()   # saves h and x again, exp saves its output
    _, nbytes = saved_for_backward(fn, {"x": x, "w": w}, [w])
    assert nbytes == 3 * 32 * 4  # x, h, exp(h); x once, w left out


def test_training_rows_fail_when_fusekit_gradients_differ_from_eager():
    from fusekit.bench.inverted_residual import InvertedResidualTrainBench
    op = InvertedResidualTrainBench()
    case = _case(op, "tiny.ir")
    eager = op.baseline_fn(case, "eager")

    class ScaledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g

    def wrong_weight_grad(**inputs):
        return eager(**dict(inputs, project_w=ScaledGrad.apply(inputs["project_w"])))

    ts = harness.TimerSettings("cpu", 1, min_run_time=0.01)
    rs = harness.RunSettings(ts, ["channels_last"], [], ["eager_channels_last"], tolerance, None)
    item = harness.WorkItem(op, case, 2, "fp32", ("fwd_bwd",))
    providers = [harness.Provider("fusekit:wrong", "channels_last", False, wrong_weight_grad),
                 harness.Provider("eager", "channels_last", True, eager)]
    rows = harness.run_item(item, rs, harness.environment("cpu", 1), {"copy_gbps": 1.0, "fma_gflops": 1.0}, providers)
    from fusekit.bench.inverted_residual import annotate_saved_memory
    annotate_saved_memory(op, item, rs, providers, rows)
    wrong = next(r for r in rows if r["provider"] == "fusekit:wrong")
    assert not wrong["correct"]   # the float64 check already catches it; the direct comparison says so too
    assert wrong["note"].startswith("FAILED")


def test_inverted_residual_quick_and_sweep_plans():
    quick = cli.plan(cli.build_parser().parse_args([]), cli.OPS, "cpu", quick=True)
    got = {(i.op.name, i.case.name, i.batch, i.modes) for i in quick if i.op.name.startswith("inverted_residual")}
    assert got == {("inverted_residual", "quick.mbv2.s2.1", 8, ("fwd",)),
                   ("inverted_residual", "quick.effb0.s4.1", 8, ("fwd",)),
                   ("inverted_residual_train", "quick.mbv2.s3.1", 8, ("fwd_bwd",))}
    sweep = cli.plan(cli.build_parser().parse_args(["inverted_residual", "inverted_residual_train", "--sweep"]),
                     [cli.OPS_BY_NAME["inverted_residual"], cli.OPS_BY_NAME["inverted_residual_train"]], "cpu",
                     quick=False)
    names = {i.case.name for i in sweep}
    assert {"mbv2.s1.0", "mbv2.s2.0", "mbv2.s2.1", "mbv2.s7.0", "effb0.s5.1", "effv2s.s2.0"} <= names
    assert not any(n.startswith(("quick.", "tiny.")) for n in names)
    assert {i.batch for i in sweep} == {1, 8, 64}
    assert len(sweep) == 2 * 3 * len(names)
