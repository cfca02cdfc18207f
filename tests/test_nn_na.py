"""fusekit.nn.NeighborhoodAttention1D/2D/3D: NATTEN's module APIs (current and 0.17), state dicts,
attention dropout, against a twin written from NATTEN 0.17's unfused forward in plain PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from fusekit.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from fusekit.testing.checks import assert_close_to_twin
from fusekit.testing.reference import na_av_reference, na_qk_reference

from backend_matrix import module_backend_params

BACKENDS = module_backend_params("neighborhood_attention")
MODULES = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}
SHAPES = {1: (2, 13, 32), 2: (2, 7, 9, 32), 3: (1, 4, 5, 6, 32)}


def _natten017_twin(module, x, dropout=None):
    """NATTEN 0.17's unfused module forward, spelled out: qkv, scale q, logits (+ rpb), softmax,
    (dropout), weighted sum, projection."""
    b, spatial = x.shape[0], x.shape[1:-1]
    heads, hd = module.num_heads, module.head_dim
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias).reshape(b, *spatial, 3, heads, hd)
    q, k, v = qkv.unbind(-3)
    args = (module.kernel_size, module.stride, module.dilation, module.is_causal)
    attn = na_qk_reference(q * module.scale, k, *args, scale=1.0, rpb=module.rpb).softmax(-1)
    if dropout is not None:
        attn = dropout(attn)
    out = na_av_reference(attn, v, *args).to(x.dtype).reshape(b, *spatial, heads * hd)
    return F.linear(out, module.proj.weight, module.proj.bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", (1, 2, 3))
def test_module_matches_natten_017_forward_and_gradients(rank, backend):
    torch.manual_seed(rank)
    dilation = {1: 2, 2: (1, 2), 3: 1}[rank]
    module = MODULES[rank](dim=32, num_heads=4, kernel_size=3, dilation=dilation, rel_pos_bias=True, backend=backend)
    twin_params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(SHAPES[rank])
    out = module(x)
    twin = MODULES[rank](dim=32, num_heads=4, kernel_size=3, dilation=dilation, rel_pos_bias=True)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), twin_params):
            p.copy_(q)
    expected = _natten017_twin(twin, x)
    assert_close_to_twin(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for (name, p), t in zip(module.named_parameters(), twin.parameters()):
        assert p.grad is not None, name
        assert_close_to_twin(p.grad, t.grad, "backward")


def test_state_dict_keys_are_natten_names_and_load_both_ways():
    current = NeighborhoodAttention2D(64, 2, 7)
    assert set(current.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    legacy = NeighborhoodAttention2D(dim=64, num_heads=2, kernel_size=7, rel_pos_bias=True, qkv_bias=False)
    assert set(legacy.state_dict()) == {"qkv.weight", "rpb", "proj.weight", "proj.bias"}
    assert legacy.rpb.shape == (2, 13, 13)
    fresh = NeighborhoodAttention2D(dim=64, num_heads=2, kernel_size=7, bias=True, qkv_bias=False)
    fresh.load_state_dict(legacy.state_dict())
    assert torch.equal(fresh.rpb, legacy.rpb)
    with pytest.raises(RuntimeError, match="pass rel_pos_bias=True"):
        NeighborhoodAttention2D(64, 2, 7, qkv_bias=False).load_state_dict(legacy.state_dict())


def test_current_api_positional_order_is_embed_dim_heads_kernel_stride_dilation_causal():
    m = NeighborhoodAttention2D(48, 3, (5, 3), (2, 1), (1, 2), (True, False))
    assert (m.embed_dim, m.num_heads, m.kernel_size, m.stride, m.dilation, m.is_causal) == \
        (48, 3, (5, 3), (2, 1), (1, 2), (True, False))
    legacy = NeighborhoodAttention2D(dim=48, num_heads=3, kernel_size=5, dilation=None)
    assert legacy.dilation == (1, 1) and legacy.rpb is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dropout_applies_to_the_weights_in_training_only(backend):
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=32, num_heads=2, kernel_size=3, rel_pos_bias=True, attn_drop=0.5,
                                     backend=backend)
    x = torch.randn(1, 6, 6, 32)
    torch.manual_seed(1)
    train_out = module(x)
    torch.manual_seed(1)
    expected = _natten017_twin(module, x, dropout=lambda a: F.dropout(a, 0.5, training=True))
    assert_close_to_twin(train_out, expected)
    module.eval()
    eval_out = module(x)
    assert_close_to_twin(eval_out, _natten017_twin(module, x))
    assert not torch.allclose(train_out, eval_out)


def test_bad_module_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        NeighborhoodAttention2D(30, 4, 3)
    with pytest.raises(ValueError, match="non-causal"):
        NeighborhoodAttention1D(dim=32, num_heads=2, kernel_size=3, is_causal=True, rel_pos_bias=True)
    with pytest.raises(ValueError, match="disagree"):
        NeighborhoodAttention2D(32, 2, 3, dim=64)
    with pytest.raises(ValueError, match=r"expects x \[B, X, Y, C\]"):
        NeighborhoodAttention2D(32, 2, 3)(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        NeighborhoodAttention2D(32, 2, 7)(torch.randn(1, 5, 9, 32))
