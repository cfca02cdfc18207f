"""Reference models (fusekit.models): every fusekit model against its eager PyTorch twin, in fp32 on
CPU, at size="test": checkpoints, eval forward, one training step, torch.compile, torch.export,
KV-cache generation and channels_last inputs."""
from __future__ import annotations

import copy

import pytest
import torch

from fusekit import models
from fusekit.testing.models import (assert_model_close, assert_named_tensors_close, build_twins,
                                    to_float64, training_step)

ARCHS = list(models.ARCHS)
IMAGE_ARCHS = [a for a in ARCHS if models.ARCHS[a].kind == "image"]
BATCH = 2


class Twins:
    """One arch's fusekit model and eager twin (same weights, eval mode) with a batch. Tests that
    change a model (train mode, optimizer step, compile) work on deep copies; results that several
    tests compare against are computed once, on demand."""

    def __init__(self, arch: str):
        self.arch = arch
        self.fused, self.eager = build_twins(arch)
        self.fused.eval()
        self.eager.eval()
        gen = torch.Generator().manual_seed(1)
        self.inputs, self.targets = models.example_batch(arch, BATCH, size="test", generator=gen)
        self._cache = {}

    def eager_logits(self) -> torch.Tensor:
        if "eager_logits" not in self._cache:
            with torch.no_grad():
                self._cache["eager_logits"] = self.eager(self.inputs)
        return self._cache["eager_logits"]

    def fused_logits(self) -> torch.Tensor:
        if "fused_logits" not in self._cache:
            with torch.no_grad():
                self._cache["fused_logits"] = self.fused(self.inputs)
        return self._cache["fused_logits"]

    def eager_training_step(self) -> dict:
        if "eager_step" not in self._cache:
            self._cache["eager_step"] = training_step(self.train_copy(self.eager), self.arch,
                                                      [(self.inputs, self.targets)])
        return self._cache["eager_step"]

    def eager_training_step_float64(self) -> dict:
        if "eager_step64" not in self._cache:
            model, chunks = to_float64(self.train_copy(self.eager), [(self.inputs, self.targets)])
            self._cache["eager_step64"] = training_step(model, self.arch, chunks)
        return self._cache["eager_step64"]

    @staticmethod
    def train_copy(model: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(model).train()


@pytest.fixture(scope="module", params=ARCHS)
def twins(request) -> Twins:
    return Twins(request.param)


@pytest.fixture(scope="module", params=IMAGE_ARCHS)
def image_twins(request) -> Twins:
    return Twins(request.param)


def _assert_training_step_matches(got: dict, twins: Twins, what: str) -> None:
    expected = twins.eager_training_step()
    assert_model_close(got["loss"], expected["loss"], f"{what}: loss")
    for key, kind, text in [("grads", "backward", "parameter gradients"), ("buffers", "forward", "buffers"),
                            ("params", "backward", "parameters after the SGD step")]:
        assert_named_tensors_close(got[key], expected[key], f"{what}: {text}", kind,
                                   expected64=lambda key=key: twins.eager_training_step_float64()[key])


def test_fusekit_and_eager_twins_have_identical_state_dict_keys_and_shapes(twins):
    fused_shapes = {k: tuple(v.shape) for k, v in twins.fused.state_dict().items()}
    eager_shapes = {k: tuple(v.shape) for k, v in twins.eager.state_dict().items()}
    assert fused_shapes == eager_shapes
    # both directions, between independently initialized models
    torch.manual_seed(123)
    other_fused = models.build(twins.arch, impl="fusekit", size="test")
    other_eager = models.build(twins.arch, impl="eager", size="test")
    other_eager.load_state_dict(twins.fused.state_dict(), strict=True)
    other_fused.load_state_dict(twins.eager.state_dict(), strict=True)
    for k, v in twins.fused.state_dict().items():
        assert torch.equal(other_eager.state_dict()[k], v), k
        assert torch.equal(other_fused.state_dict()[k], v), k


def test_eval_forward_logits_match_eager_twin(twins):
    logits = twins.fused_logits()
    classes = models.ARCHS[twins.arch].config("test")[models.ARCHS[twins.arch].classes_key]
    assert logits.shape[0] == BATCH and logits.shape[-1] == classes
    assert_model_close(logits, twins.eager_logits(), f"{twins.arch} eval logits")


def test_training_step_matches_eager_twin_loss_gradients_running_stats_and_sgd_update(twins):
    fused = twins.train_copy(twins.fused)
    got = training_step(fused, twins.arch, [(twins.inputs, twins.targets)])
    assert len(got["grads"]) == len(list(fused.parameters())), "every parameter gets a gradient"
    _assert_training_step_matches(got, twins, f"{twins.arch} training step")


def test_compiled_fullgraph_eval_forward_matches_eager(twins):
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(twins.fused), fullgraph=True)  # inductor
    # Compile time is what costs here (about a minute of CPU per model otherwise): scalar C++
    # kernels and in-process g++ calls instead of a pool of compile workers.
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False, "compile_threads": 1}), torch.no_grad():
        logits = compiled(twins.inputs)
    assert_model_close(logits, twins.fused_logits(), f"{twins.arch} compiled (inductor) eval logits")
    torch._dynamo.reset()


def test_compiled_fullgraph_training_step_matches_eager_twin(twins):
    # aot_eager traces the joint forward/backward graph through the fusekit ops' fake kernels and
    # autograd formulas with fullgraph=True, which is what this checks; inductor's code generation
    # of that graph would only add minutes of C++ compilation on CPU.
    torch._dynamo.reset()
    fused = twins.train_copy(twins.fused)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    got = training_step(compiled, twins.arch, [(twins.inputs, twins.targets)], named=fused)
    _assert_training_step_matches(got, twins, f"{twins.arch} compiled training step")
    torch._dynamo.reset()


@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "grad"])
def test_exported_eval_program_matches_eager_and_calls_fusekit_ops(twins, grad_enabled):
    # the language model is exported without a cache: forward(tokens). Under no_grad the fused
    # inverted-residual blocks export their folded inference kernel, with grad their training op.
    with torch.set_grad_enabled(grad_enabled):
        program = torch.export.export(copy.deepcopy(twins.fused).eval(), (twins.inputs,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any(t.startswith("fusekit.") for t in targets), f"{twins.arch}: no fusekit op in the exported graph"
    with torch.no_grad():
        logits = program.module()(twins.inputs)
    assert_model_close(logits, twins.eager_logits(), f"{twins.arch} exported program logits")


def _greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_gqa_decoder_cached_greedy_generation_matches_eager_twin_and_uncached_generation():
    t = Twins("gqa_decoder")
    prompt, new = t.inputs[:, :5], 10
    with torch.no_grad():
        fused_cached = t.fused.generate(prompt, new)
        eager_cached = t.eager.generate(prompt, new)
    fused_uncached = _greedy_without_cache(t.fused, prompt, new)
    eager_uncached = _greedy_without_cache(t.eager, prompt, new)
    assert fused_cached.shape == (prompt.shape[0], prompt.shape[1] + new)
    assert torch.equal(fused_cached[:, :prompt.shape[1]], prompt)
    assert torch.equal(eager_uncached, fused_uncached), "fusekit vs eager, without cache"
    assert torch.equal(fused_cached, fused_uncached), "fusekit: KV-cache generation vs no cache"
    assert torch.equal(eager_cached, eager_uncached), "eager twin: KV-cache generation vs no cache"


@pytest.mark.parametrize("model_too", [False, True], ids=["input", "input_and_model"])
def test_channels_last_input_gives_same_logits(image_twins, model_too):
    model = image_twins.fused
    if model_too:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = image_twins.inputs.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(x)
    assert_model_close(logits, image_twins.eager_logits(), f"{image_twins.arch} channels_last logits")
