"""fusekit.nn.MultiQueryAttention, KVCache and the GQA decoder example."""
import pytest
import torch
import torch.nn.functional as F

import fusekit
from fusekit.nn import GQADecoder, KVCache, MultiQueryAttention
from fusekit.testing.checks import assert_close_to_twin

from backend_matrix import module_backend_params

BACKENDS = module_backend_params("multi_query_attention")


def _sdpa_twin(module: MultiQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """The same layer written with PyTorch's SDPA (enable_gqa) and the same projection weights."""
    b, length, _ = x.shape
    q = module.q_proj(x).view(b, length, module.num_heads, module.head_dim).transpose(1, 2)
    k = module.k_proj(x).view(b, length, module.num_kv_heads, module.head_dim).transpose(1, 2)
    v = module.v_proj(x).view(b, length, module.num_kv_heads, module.head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=module.causal, enable_gqa=True)
    return module.o_proj(out.transpose(1, 2).reshape(b, length, -1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_kv_heads", [1, 2, 8])
def test_module_matches_sdpa_twin_forward_and_backward(backend, num_kv_heads):
    torch.manual_seed(0)
    module = MultiQueryAttention(64, 8, num_kv_heads, bias=True, backend=backend)
    x = torch.randn(2, 19, 64, requires_grad=True)
    out = module(x)
    twin = _sdpa_twin(module, x)
    assert_close_to_twin(out, twin)
    g = torch.randn_like(out)
    gx, = torch.autograd.grad(out, x, g)
    gx_twin, = torch.autograd.grad(twin, x, g)
    assert_close_to_twin(gx, gx_twin, "backward")


def test_module_loads_llama_style_attention_state_dict():
    src = {"q_proj.weight": torch.randn(64, 64), "k_proj.weight": torch.randn(16, 64),
           "v_proj.weight": torch.randn(16, 64), "o_proj.weight": torch.randn(64, 64)}
    module = MultiQueryAttention(64, 8, 2)
    module.load_state_dict(src)
    assert torch.equal(module.k_proj.weight, src["k_proj.weight"])


def test_module_rejects_head_counts_that_do_not_divide():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MultiQueryAttention(64, 8, 3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiQueryAttention(60, 8, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_generation_matches_no_cache_forward(backend):
    torch.manual_seed(1)
    model = GQADecoder(vocab_size=97, dim=64, depth=2, num_heads=8, num_kv_heads=2, max_len=64, backend=backend).eval()
    prompt = torch.randint(0, 97, (3, 7))
    with torch.no_grad():
        cached = model.generate(prompt, 12, use_cache=True)
        uncached = model.generate(prompt, 12, use_cache=False)
        assert torch.equal(cached, uncached)
        # logits of every cached step equal the no-cache forward over the whole sequence
        full = model(cached)
        cache = model.new_cache(3)
        step_logits = [model(cached[:, :7], cache)]
        for t in range(7, cached.shape[1]):
            step_logits.append(model(cached[:, t:t + 1], cache, start=t))
        torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=1e-4, rtol=1e-4)
        assert cache.seqlens.tolist() == [cached.shape[1]] * 3


def test_kv_cache_holds_one_buffer_per_layer_and_advances_lengths():
    cache = KVCache(3, batch=2, max_len=10, num_kv_heads=2, head_dim=8)
    assert len(cache.k) == 3 and cache.k[0].shape == (2, 10, 2, 8)
    cache.advance(4)
    assert cache.layer(1).seqlens.tolist() == [4, 4]
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0]


def test_generation_past_the_cache_length_raises():
    model = GQADecoder(vocab_size=11, dim=32, depth=1, num_heads=4, num_kv_heads=1, max_len=64).eval()
    cache = model.new_cache(1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="too short"):
            model(torch.zeros(1, 1, dtype=torch.long), cache, start=4)
