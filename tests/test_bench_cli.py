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
