"""DistributedDataParallel training step of every reference model (fusekit impl) over 2 CPU
processes (gloo) against a single-process step on the same global batch.

Each rank takes half of the global batch; the loss is a mean, so DDP's gradient average equals the
global-batch gradient. BatchNorm normalizes with per-process batch statistics under DDP (in any
implementation; SyncBatchNorm is GPU-only), so for BN models two settings are checked: BN layers
in eval mode (frozen statistics, as in fine-tuning) against the global-batch step, and full train
mode against a single process that averages the two half-batch losses (per-half statistics).
The model is wrapped in plain DistributedDataParallel: fusekit needs no DDP-specific code.
"""
from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from fusekit import models
from fusekit.testing.models import (assert_model_close, assert_named_tensors_close, ddp_worker,
                                    has_batchnorm, set_batchnorm_eval, to_float64, training_step)

ARCHS = list(models.ARCHS)
WORLD_SIZE = 2
GLOBAL_BATCH = 4
DEADLINE_S = 480


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Spawns the 2 ranks once for every arch; returns (workdir, {arch: error text of the setup},
    {arch: whether it has BatchNorm})."""
    workdir = tmp_path_factory.mktemp("ddp")
    setup_errors, batchnorm, jobs = {}, {}, []
    for arch in ARCHS:
        try:
            torch.manual_seed(0)
            model = models.build(arch, impl="fusekit", size="test")
        except Exception as e:  # reported by that arch's test; the others still run
            setup_errors[arch] = f"{type(e).__name__}: {e}"
            continue
        gen = torch.Generator().manual_seed(2)
        inputs, targets = models.example_batch(arch, GLOBAL_BATCH, size="test", generator=gen)
        torch.save({"state": model.state_dict(), "inputs": inputs, "targets": targets}, workdir / f"{arch}-init.pt")
        batchnorm[arch] = has_batchnorm(model)
        jobs += [(arch, "train")] + ([(arch, "bn_eval")] if batchnorm[arch] else [])
    if jobs:
        ctx = mp.start_processes(ddp_worker, args=(WORLD_SIZE, _free_port(), str(workdir), jobs),
                                 nprocs=WORLD_SIZE, join=False, start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"DDP workers did not finish within {DEADLINE_S} s")
    return workdir, setup_errors, batchnorm


def _rank_results(workdir, arch: str, mode: str) -> list[dict]:
    results = []
    for rank in range(WORLD_SIZE):
        error = workdir / f"{arch}-{mode}-rank{rank}.error"
        if error.exists():
            pytest.fail(f"{arch} ({mode}) rank {rank} failed under DDP:\n{error.read_text()}")
        results.append(torch.load(workdir / f"{arch}-{mode}-rank{rank}.pt"))
    return results


def _reference_step(arch: str, workdir, mode: str, split: bool, float64: bool = False) -> dict:
    """Single-process step from the same weights: on the global batch, or (split) on the mean of
    the two half-batch losses, one forward each. float64: the eager twin in float64."""
    init = torch.load(workdir / f"{arch}-init.pt")
    model = models.build(arch, impl="eager" if float64 else "fusekit", size="test")
    model.load_state_dict(init["state"], strict=True)
    model.train()
    if mode == "bn_eval":
        set_batchnorm_eval(model)
    inputs, targets = init["inputs"], init["targets"]
    half = inputs.shape[0] // WORLD_SIZE
    chunks = ([(inputs[r * half:(r + 1) * half], targets[r * half:(r + 1) * half]) for r in range(WORLD_SIZE)]
              if split else [(inputs, targets)])
    if float64:
        model, chunks = to_float64(model, chunks)
    return training_step(model, arch, chunks)


def _assert_ranks_match(ranks: list[dict], arch: str, workdir, mode: str, split: bool, what: str) -> dict:
    expected = _reference_step(arch, workdir, mode, split)
    reference64 = {}

    def expected64(key):
        if not reference64:
            reference64.update(_reference_step(arch, workdir, mode, split, float64=True))
        return reference64[key]

    mean_loss = sum(r["loss"] for r in ranks) / len(ranks)
    assert_model_close(mean_loss, expected["loss"], f"{what}: mean of the ranks' losses")
    for rank, got in enumerate(ranks):
        assert_named_tensors_close(got["grads"], expected["grads"], f"{what}, rank {rank}: gradients", "backward",
                                   expected64=lambda: expected64("grads"))
        assert_named_tensors_close(got["params"], expected["params"], f"{what}, rank {rank}: parameters after "
                                   "the SGD step", "backward", expected64=lambda: expected64("params"))
    return expected


@pytest.mark.parametrize("arch", ARCHS)
def test_ddp_training_step_matches_single_process_step(ddp_run, arch):
    workdir, setup_errors, batchnorm = ddp_run
    if arch in setup_errors:
        pytest.fail(f"{arch}: could not build the model: {setup_errors[arch]}")
    if not batchnorm[arch]:
        # train mode gives the global-batch step exactly
        _assert_ranks_match(_rank_results(workdir, arch, "train"), arch, workdir, "train", False, f"{arch} DDP train")
        return
    # BatchNorm, frozen statistics: equal to the global-batch step
    _assert_ranks_match(_rank_results(workdir, arch, "bn_eval"), arch, workdir, "bn_eval", False,
                        f"{arch} DDP, BN eval")
    # BatchNorm in train mode: equal to the mean of the two half-batch losses (per-rank statistics);
    # DDP broadcasts rank 0's buffers before the forward, so rank 0's running statistics are those
    # of the first half
    ranks = _rank_results(workdir, arch, "train")
    expected = _assert_ranks_match(ranks, arch, workdir, "train", True, f"{arch} DDP train (per-rank BN statistics)")
    assert_named_tensors_close(ranks[0]["buffers"], expected["first_buffers"],
                               f"{arch} DDP train, rank 0: BN running statistics")
