"""fusekit.nn.convert: one in-place pass that swaps every module family fusekit computes (inverted
residuals, InceptionNeXt mixers, NATTEN 0.17 / >= 0.20 neighborhood attention, GQA attention,
depthwise convs) in a mixed model, leaving what it cannot express with a reason; outputs,
gradients and state dicts are unchanged. Also every reference model's eager twin, converted."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from fusekit import models
from fusekit.models.gqa import GroupedQueryAttention
from fusekit.models.large_kernel import InceptionDWConv2d as EagerInceptionDWConv2d
from fusekit.models.mobilenet import InvertedResidual as EagerInvertedResidual
from fusekit.nn import (ConversionReport, DepthwiseConv1d, DepthwiseConv2d, InceptionDWConv2d, InvertedResidual,
                        MultiQueryAttention, NeighborhoodAttention1D, NeighborhoodAttention2D, convert)
from fusekit.nn.convert import FAMILIES, FamilyCount
from fusekit.testing.checks import assert_close_to_twin
from fusekit.testing.reference import na_reference


# ----------------------------------------------------------------------------------------------
# fake NATTEN modules: the two module APIs, computing with the masked dense reference
# ----------------------------------------------------------------------------------------------

def _per_axis(value, rank):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def _natten_attention(module, x):
    """qkv -> masked dense neighborhood attention (na_reference, float64) -> proj, as NATTEN computes."""
    b, *spatial, c = x.shape
    qkv = module.qkv(x).reshape(b, *spatial, 3, module.num_heads, module.head_dim)
    q, k, v = qkv.unbind(-3)
    out, _ = na_reference(q, k, v, module.kernel_size, getattr(module, "stride", 1), module.dilation,
                          module.is_causal, scale=module.scale, rpb=getattr(module, "rpb", None))
    return module.proj_drop(module.proj(out.to(x.dtype).reshape(b, *spatial, c)))


class natten017:  # noqa: N801  (a namespace standing for the natten 0.17 package)
    class NeighborhoodAttention2D(nn.Module):
        def __init__(self, dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False,
                     qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
            super().__init__()
            self.num_heads = num_heads
            self.head_dim = dim // num_heads
            self.scale = qk_scale or self.head_dim ** -0.5
            self.kernel_size, self.dilation, self.is_causal = (_per_axis(kernel_size, 2), _per_axis(dilation, 2),
                                                               _per_axis(is_causal, 2))
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            if rel_pos_bias:
                self.rpb = nn.Parameter(torch.randn(num_heads, 2 * self.kernel_size[0] - 1,
                                                    2 * self.kernel_size[1] - 1) * 0.1)
            else:
                self.register_parameter("rpb", None)
            self.attn_drop_rate = attn_drop
            self.attn_drop = nn.Dropout(self.attn_drop_rate)
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(proj_drop)

        def forward(self, x):
            return _natten_attention(self, x)


class natten020:  # noqa: N801  (natten >= 0.20: a generic base class holds forward)
    class NeighborhoodAttentionGeneric(nn.Module):
        def __init__(self, na_dim, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False,
                     qkv_bias=True, qk_scale=None, proj_drop=0.0):
            super().__init__()
            self.na_dim, self.embed_dim, self.num_heads = na_dim, embed_dim, num_heads
            self.head_dim = embed_dim // num_heads
            self.scale = qk_scale or self.head_dim ** -0.5
            self.kernel_size, self.stride = _per_axis(kernel_size, na_dim), _per_axis(stride, na_dim)
            self.dilation, self.is_causal = _per_axis(dilation, na_dim), _per_axis(is_causal, na_dim)
            self.expected_input_tensor_rank = na_dim + 2
            self.qkv = nn.Linear(embed_dim, embed_dim * 3, bias=qkv_bias)
            self.proj = nn.Linear(embed_dim, embed_dim)
            self.proj_drop = nn.Dropout(proj_drop)

        def forward(self, x):
            return _natten_attention(self, x)

    class NeighborhoodAttention1D(NeighborhoodAttentionGeneric):
        def __init__(self, embed_dim, num_heads, kernel_size, **kwargs):
            super().__init__(1, embed_dim, num_heads, kernel_size, **kwargs)

    class NeighborhoodAttention2D(NeighborhoodAttentionGeneric):
        def __init__(self, embed_dim, num_heads, kernel_size, **kwargs):
            super().__init__(2, embed_dim, num_heads, kernel_size, **kwargs)


class LlamaAttention(nn.Module):
    """Hugging Face's Llama attention shape: grouped K/V heads, but rotary embeddings and a mask
    come in as forward arguments, so its semantics cannot be read off its structure."""

    def __init__(self, hidden_size, num_heads, num_key_value_heads):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.num_key_value_groups = num_heads // num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        b, length, _ = hidden_states.shape
        cos, sin = position_embeddings

        def heads(t):
            return t.view(b, length, -1, self.head_dim).transpose(1, 2)

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

        q, k, v = (heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
                                             scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class ForwardOverridingConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


# ----------------------------------------------------------------------------------------------
# a model with every family, convertible and not
# ----------------------------------------------------------------------------------------------

C, H, W = 16, 8, 8


def norm(x):
    return 3 * F.layer_norm(x, x.shape[-1:])


class MixedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)                                # dense: not a family
        self.ir = EagerInvertedResidual(C, C, 1, 2)                              # fused
        self.ir_gelu = EagerInvertedResidual(C, C, 1, 2)                         # left (GELU); its dw conv converted
        self.ir_gelu.conv[0][2] = nn.GELU()
        self.mixer = EagerInceptionDWConv2d(C, square_kernel_size=3, band_kernel_size=5, branch_ratio=0.25)
        self.dw = nn.Conv2d(C, C, 5, padding=2, groups=C)                        # depthwise
        self.dw_hooked = nn.Conv2d(C, C, 3, padding=1, groups=C)                 # left: hooks
        self.dw_hooked.register_forward_hook(lambda module, args, out: out * 0.5)
        self.dw_overridden = ForwardOverridingConv(C, C, 3, padding=1, groups=C)  # left: overrides forward
        self.dw_weight_norm = parametrizations.weight_norm(nn.Conv2d(C, C, 3, padding=1, groups=C))  # left
        self.dw_multiplier = nn.Conv2d(C, 2 * C, 3, padding=1, groups=C)         # left: channel multiplier 2
        self.squeeze = nn.Conv2d(2 * C, C, 1)                                    # dense
        self.na017 = natten017.NeighborhoodAttention2D(dim=C, num_heads=2, kernel_size=3, dilation=2,
                                                       rel_pos_bias=True)
        self.na020 = natten020.NeighborhoodAttention2D(C, 4, (3, 5), stride=(1, 2), dilation=(2, 1), qk_scale=0.3)
        self.na020_1d = natten020.NeighborhoodAttention1D(C, 2, 5, stride=2, is_causal=True)
        self.seq_dw = nn.Conv1d(C, C, 3, padding=1, groups=C)                    # depthwise 1-D
        self.gqa = GroupedQueryAttention(C, 4, 2, bias=True, window=(6, None))
        self.llama = LlamaAttention(C, 4, 2)                                    # left: unknown semantics
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.mixer(self.ir_gelu(self.ir(x)))
        x = self.dw_weight_norm(self.dw_overridden(self.dw_hooked(self.dw(x))))
        x = self.squeeze(self.dw_multiplier(x)).permute(0, 2, 3, 1)              # [B, H, W, C]
        # unit-scale tokens before each attention, so that scale, bias and masks all matter
        x = x + self.na017(norm(x))
        x = x + self.na020(norm(x))
        x = x.flatten(1, 2)                                                      # [B, L, C]
        x = x + self.na020_1d(norm(x))
        x = x + self.seq_dw(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.gqa(norm(x))
        angle = torch.arange(x.shape[1]).unsqueeze(1) * 0.3 ** torch.arange(C // 8).repeat(2)
        x = x + self.llama(norm(x), (angle.cos(), angle.sin()))
        return self.head(x)  # per token: a mean would hide a wrong module


REPLACED = {
    "ir": ("InvertedResidual", "InvertedResidual", "inverted_residual"),
    "mixer": ("InceptionDWConv2d", "InceptionDWConv2d", "inception_dwconv"),
    "na017": ("NeighborhoodAttention2D", "NeighborhoodAttention2D", "neighborhood_attention"),
    "na020": ("NeighborhoodAttention2D", "NeighborhoodAttention2D", "neighborhood_attention"),
    "na020_1d": ("NeighborhoodAttention1D", "NeighborhoodAttention1D", "neighborhood_attention"),
    "gqa": ("GroupedQueryAttention", "MultiQueryAttention", "gqa_attention"),
    "ir_gelu.conv.1.0": ("Conv2d", "DepthwiseConv2d", "depthwise"),
    "dw": ("Conv2d", "DepthwiseConv2d", "depthwise"),
    "seq_dw": ("Conv1d", "DepthwiseConv1d", "depthwise"),
}
LEFT = {  # name: (class, family, a phrase of the reason)
    "ir_gelu": ("InvertedResidual", "inverted_residual", "GELU"),
    "llama": ("LlamaAttention", "gqa_attention", "position_embeddings, attention_mask"),
    "dw_hooked": ("Conv2d", "depthwise", "hooks"),
    "dw_overridden": ("ForwardOverridingConv", "depthwise", "overrides forward"),
    "dw_weight_norm": ("ParametrizedConv2d", "depthwise", "not a plain registered parameter"),
    "dw_multiplier": ("Conv2d", "depthwise", "channel multiplier 1"),
}
NEW_CLASSES = {"ir": InvertedResidual, "mixer": InceptionDWConv2d, "na017": NeighborhoodAttention2D,
               "na020": NeighborhoodAttention2D, "na020_1d": NeighborhoodAttention1D, "gqa": MultiQueryAttention,
               "ir_gelu.conv.1.0": DepthwiseConv2d, "dw": DepthwiseConv2d, "seq_dw": DepthwiseConv1d}


def _twins(seed=0):
    """(model to convert, unconverted reference) with the same weights."""
    torch.manual_seed(seed)
    model = MixedModel()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    reference = MixedModel()
    reference.load_state_dict(model.state_dict(), strict=True)
    return model, reference


def _inputs(seed=1):
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# the mixed model
# ----------------------------------------------------------------------------------------------

def test_report_lists_every_replaced_module_and_every_left_one_with_its_reason():
    model, _ = _twins()
    report = convert(model)
    assert isinstance(report, ConversionReport)
    assert {name: rest for name, *rest in report.replaced} == {k: list(v) for k, v in REPLACED.items()}
    assert len(report.replaced) == len(REPLACED)
    left = {name: (cls, family, reason) for name, cls, family, reason in report.left}
    assert set(left) == set(LEFT)
    for name, (cls, family, phrase) in LEFT.items():
        assert left[name][:2] == (cls, family), name
        assert phrase in left[name][2], (name, left[name][2])
    for name, cls in NEW_CLASSES.items():
        assert type(model.get_submodule(name)) is cls, name
    for name, (cls, _, _) in LEFT.items():
        assert type(model.get_submodule(name)).__name__ == cls, name
    assert list(report.counts()) == list(FAMILIES)
    assert report.counts() == {
        "inverted_residual": FamilyCount(1, 1), "inception_dwconv": FamilyCount(1, 0),
        "neighborhood_attention": FamilyCount(3, 0), "gqa_attention": FamilyCount(1, 1),
        "depthwise": FamilyCount(3, 4)}
    text = str(report)
    for name in list(REPLACED) + list(LEFT):
        assert name in text
    assert "GroupedQueryAttention -> MultiQueryAttention" in text and "channel multiplier 1" in text
    assert not hasattr(model, "fusekit_fused") and not hasattr(model, "fusekit_skipped")


def test_replacements_share_parameters_and_submodules_and_keep_attention_settings():
    model, _ = _twins()
    old = {name: model.get_submodule(name) for name in REPLACED}
    convert(model, backend="cpu")
    for name in ("na017", "na020", "na020_1d"):
        new, was = model.get_submodule(name), old[name]
        assert new.qkv is was.qkv and new.proj is was.proj and new.proj_drop is was.proj_drop
        assert new.scale == was.scale and new.backend == "cpu"
        assert new.kernel_size == _per_axis(was.kernel_size, new.rank)
        assert new.dilation == _per_axis(was.dilation, new.rank)
        assert new.stride == _per_axis(getattr(was, "stride", 1), new.rank)
        assert new.is_causal == _per_axis(was.is_causal, new.rank)
    assert model.na017.rpb is old["na017"].rpb and model.na020.rpb is None
    gqa, was = model.gqa, old["gqa"]
    assert all(getattr(gqa, p) is getattr(was, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert (gqa.num_heads, gqa.num_kv_heads, gqa.head_dim, gqa.causal, gqa.window, gqa.scale) == \
        (4, 2, 4, True, (6, None), None)
    assert model.mixer.dwconv_w is old["mixer"].dwconv_w and model.dw.weight is old["dw"].weight


def test_state_dict_keys_and_values_are_identical_and_load_both_ways():
    model, reference = _twins()
    before = model.state_dict(keep_vars=True)
    convert(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[key] is before[key] for key in before)
    reference.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_converted_model_computes_the_same_outputs_and_gradients(train):
    model, reference = _twins()
    convert(model)
    model.train(train)
    reference.train(train)
    x = _inputs()
    out, expected = model(x), reference(x)
    assert_close_to_twin(out, expected)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert_close_to_twin(parameter.grad, reference_parameters[name].grad, "backward")
    reference_buffers = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():  # BN running statistics, updated identically in training
        assert_close_to_twin(buffer.float(), reference_buffers[name].float())


def test_ops_selects_families_and_leaves_the_others_untouched():
    model, reference = _twins()
    report = convert(model, ops=["neighborhood_attention", "depthwise"])
    assert {family for *_, family in report.replaced} == {"neighborhood_attention", "depthwise"}
    assert {family for _, _, family, _ in report.left} == {"depthwise"}
    assert type(model.ir) is EagerInvertedResidual and type(model.mixer) is EagerInceptionDWConv2d
    assert type(model.gqa) is GroupedQueryAttention
    # with the inverted residuals left, their depthwise convs are converted instead; the mixer's too
    assert isinstance(model.ir.conv[1][0], DepthwiseConv2d) and isinstance(model.mixer.dwconv_hw, DepthwiseConv2d)
    assert type(model.na017) is NeighborhoodAttention2D
    model.eval()
    reference.eval()
    x = _inputs()
    assert_close_to_twin(model(x), reference(x))
    report = convert(model, ops=("gqa_attention",))
    assert [name for name, *_ in report.replaced] == ["gqa"] and [r[0] for r in report.left] == ["llama"]


@pytest.mark.parametrize("ops, message", [
    (["depthwise", "attention"], "unknown ops \\['attention'\\]; allowed: inverted_residual, inception_dwconv, "
                                 "neighborhood_attention, gqa_attention, depthwise"),
    ("depthwise", "ops=\\['depthwise'\\]"),
])
def test_unknown_ops_raise_value_error_naming_the_allowed_families(ops, message):
    model, _ = _twins()
    with pytest.raises(ValueError, match=message):
        convert(model, ops=ops)
    assert type(model.dw) is nn.Conv2d  # nothing was converted


def test_invalid_arguments_raise_value_errors():
    model, _ = _twins()
    with pytest.raises(ValueError, match="backend must be"):
        convert(model, backend="gpu")
    with pytest.raises(ValueError, match="min_kernel_size"):
        convert(model, min_kernel_size=0)
    with pytest.raises(ValueError, match="inverted_residual_mode"):
        convert(model, inverted_residual_mode="fast")


def test_converting_twice_changes_nothing():
    model, _ = _twins()
    first = convert(model)
    classes = {name: type(module) for name, module in model.named_modules()}
    state = model.state_dict(keep_vars=True)
    second = convert(model)
    assert second.replaced == [] and second.left == first.left
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert all(model.state_dict(keep_vars=True)[key] is value for key, value in state.items())


def test_min_kernel_size_applies_to_plain_depthwise_convs_and_is_reported():
    model, _ = _twins()
    report = convert(model, min_kernel_size=5)
    left = {name: reason for name, _, _, reason in report.left}
    assert "kernel_size (3, 3) is below min_kernel_size=5" in left["ir_gelu.conv.1.0"]
    assert "kernel_size (3,) is below min_kernel_size=5" in left["seq_dw"]
    assert type(model.dw) is DepthwiseConv2d and type(model.mixer) is InceptionDWConv2d  # 3x3 branch inside


def test_a_module_shared_under_two_names_becomes_one_fusekit_module():
    na = natten020.NeighborhoodAttention1D(8, 2, 3)
    model = nn.Sequential(na, nn.GELU(), na)
    report = convert(model)
    assert [r[0] for r in report.replaced] == ["0", "2"]
    assert model[0] is model[2] and isinstance(model[0], NeighborhoodAttention1D)


def test_the_model_itself_cannot_be_replaced_in_place():
    with pytest.raises(ValueError, match="in place.*neighborhood_attention"):
        convert(natten017.NeighborhoodAttention2D(8, 2, 3))
    with pytest.raises(ValueError, match="in place.*depthwise"):
        convert(nn.Conv2d(4, 4, 3, groups=4))
    assert convert(nn.Conv2d(4, 4, 3, groups=4), ops=["gqa_attention"]).replaced == []
    # a module that is left may be the model itself
    report = convert(LlamaAttention(8, 2, 1))
    assert [(name, family) for name, _, family, _ in report.left] == [("", "gqa_attention")]
    assert "<model>" in str(report)


# ----------------------------------------------------------------------------------------------
# what is left, per family
# ----------------------------------------------------------------------------------------------

class natten_cross:  # noqa: N801  (a NATTEN-named module whose forward takes extra key/value tokens)
    class NeighborhoodAttention2D(natten017.NeighborhoodAttention2D):
        def forward(self, x, additional_keys=None, additional_values=None):  # noqa: ARG002
            return super().forward(x)


class NAOverridingForward(natten017.NeighborhoodAttention2D):
    def forward(self, x):
        return super().forward(x).relu()


class NAPadding014(natten017.NeighborhoodAttention2D):
    """NATTEN <= 0.14 also kept window_size and padded inputs smaller than the window."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_size = self.kernel_size[0] * self.dilation[0]


def _hooked(module):
    module.register_forward_pre_hook(lambda m, args: None)
    return module


def _with_rpb_of_shape(shape):
    module = natten017.NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True)
    module.rpb = nn.Parameter(torch.zeros(shape))
    return module


def _with_attribute(module, name, value):
    setattr(module, name, value)
    return module


class GQAOverridingForward(GroupedQueryAttention):
    def forward(self, x, cache=None):
        return 2 * super().forward(x, cache)


@pytest.mark.parametrize("make, phrase", [
    (lambda: natten_cross.NeighborhoodAttention2D(8, 2, 3), "forward takes additional_keys, additional_values"),
    (lambda: NAOverridingForward(8, 2, 3), "overrides the forward of NeighborhoodAttention2D"),
    (lambda: NAPadding014(8, 2, 3), "unknown attributes ['window_size']"),
    (lambda: _hooked(natten017.NeighborhoodAttention2D(8, 2, 3)), "hooks"),
    (lambda: _with_rpb_of_shape((2, 3, 3)), "rpb has shape (2, 3, 3), expected (2, 5, 5)"),
    (lambda: natten017.NeighborhoodAttention2D(8, 2, 3, is_causal=True), None),
    (lambda: natten020.NeighborhoodAttention2D(8, 2, 3, stride=4), "stride must satisfy"),
    (lambda: _with_attribute(natten017.NeighborhoodAttention2D(8, 2, 3), "num_heads", 3), "num_heads 3"),
    (lambda: _with_attribute(natten017.NeighborhoodAttention2D(8, 2, 3), "attn_drop", nn.AlphaDropout(0.1)),
     "attn_drop is AlphaDropout"),
    (lambda: _with_attribute(natten017.NeighborhoodAttention2D(8, 2, 3), "scale", torch.tensor(0.5)),
     "scale must be a Python number"),
    (lambda: GQAOverridingForward(8, 2, 1), "overrides the forward of GroupedQueryAttention"),
    (lambda: _with_attribute(GroupedQueryAttention(8, 2, 1), "rope_theta", 1e4), "unknown attributes ['rope_theta']"),
    (lambda: _with_attribute(GroupedQueryAttention(8, 2, 1), "num_kv_heads", 3), "num_kv_heads (3)"),
    (lambda: _hooked(GroupedQueryAttention(8, 2, 1)), "hooks"),
], ids=["extra_kv_tokens", "na_forward_overridden", "natten014_padding", "hooks", "rpb_shape", "causal_converts",
        "stride_gt_kernel", "heads_mismatch", "unknown_dropout", "tensor_scale", "gqa_forward_overridden",
        "gqa_unknown_attribute", "gqa_heads_mismatch", "gqa_hooks"])
def test_attention_modules_that_cannot_be_expressed_are_left_with_the_reason(make, phrase):
    module = make()
    model = nn.Sequential(module)
    report = convert(model)
    if phrase is None:  # control: a plain module of the same kind converts
        assert [r[0] for r in report.replaced] == ["0"] and report.left == []
        return
    assert report.replaced == [] and model[0] is module
    assert len(report.left) == 1 and report.left[0][0] == "0"
    assert phrase in report.left[0][3], report.left[0][3]


def test_inception_mixer_with_hooked_or_parametrized_branch_convs_is_left():
    hooked = EagerInceptionDWConv2d(16, band_kernel_size=5, branch_ratio=0.25)
    _hooked(hooked.dwconv_w)
    normed = EagerInceptionDWConv2d(16, band_kernel_size=5, branch_ratio=0.25)
    parametrizations.weight_norm(normed.dwconv_h)
    model = nn.Sequential(hooked, normed)
    report = convert(model, ops=["inception_dwconv"])
    assert report.replaced == []
    reasons = {name: reason for name, _, _, reason in report.left}
    assert "dwconv_w has hooks" in reasons["0"]
    assert "is not an odd depthwise nn.Conv2d" in reasons["1"]


# ----------------------------------------------------------------------------------------------
# every reference model: the eager twin, converted, is the fusekit model
# ----------------------------------------------------------------------------------------------

_FUSEKIT_TYPES = (DepthwiseConv1d, DepthwiseConv2d, InceptionDWConv2d, InvertedResidual, MultiQueryAttention,
                  NeighborhoodAttention1D, NeighborhoodAttention2D)


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_converted_eager_reference_model_is_the_fusekit_model(arch):
    torch.manual_seed(0)
    fused = models.build(arch, "fusekit", size="test").eval()
    eager = models.build(arch, "eager", size="test").eval()
    eager.load_state_dict(fused.state_dict(), strict=True)
    keys = list(eager.state_dict())
    report = convert(eager)
    assert report.left == [] and report.replaced, str(report)
    fusekit_modules = {name: type(m) for name, m in fused.named_modules() if isinstance(m, _FUSEKIT_TYPES)}
    converted = {name: type(m) for name, m in eager.named_modules() if isinstance(m, _FUSEKIT_TYPES)}
    assert converted == fusekit_modules and fusekit_modules
    assert list(eager.state_dict()) == keys == list(fused.state_dict())
    x, _ = models.example_batch(arch, 2, size="test", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_to_twin(eager(x), fused(x))
    assert sum(c.replaced for c in report.counts().values()) == len(report.replaced)


def test_converted_eager_decoder_generates_with_the_kv_cache_like_the_fusekit_decoder():
    torch.manual_seed(0)
    fused = models.build("gqa_decoder", "fusekit", size="test", window=(5, None)).eval()
    eager = models.build("gqa_decoder", "eager", size="test", window=(5, None)).eval()
    eager.load_state_dict(fused.state_dict(), strict=True)
    assert [r[0] for r in convert(eager).replaced] == ["blocks.0.attn", "blocks.1.attn"]
    prompt, _ = models.example_batch("gqa_decoder", 2, size="test", generator=torch.Generator().manual_seed(3))
    assert torch.equal(eager.generate(prompt[:, :6], 5), fused.generate(prompt[:, :6], 5))
