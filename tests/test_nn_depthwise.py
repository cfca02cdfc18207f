"""fusekit.nn depthwise modules against their PyTorch twins (nn.Conv2d / nn.Conv1d / split+conv+cat)."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune

from backend_matrix import module_backend_params
from fusekit.backends import BackendError, use_backend
from fusekit.testing.checks import assert_close_to_twin
from fusekit.nn.depthwise import DepthwiseConv1d, DepthwiseConv2d, InceptionDWConv2d, convert_depthwise


DEPTHWISE_BACKENDS = module_backend_params("depthwise_conv2d")
INCEPTION_BACKENDS = module_backend_params("inception_dwconv2d")


assert_matches = assert_close_to_twin


def conv_twin(module, plain=nn.Conv2d):
    """The plain nn.Conv2d / nn.Conv1d that ``module`` must behave like, with its parameters copied in."""
    twin = plain(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                 padding=module.padding, dilation=module.dilation, groups=module.groups,
                 bias=module.bias is not None, padding_mode=module.padding_mode, dtype=module.weight.dtype)
    twin.load_state_dict(module.state_dict())
    return twin


def conv2d_twin(module):
    return conv_twin(module, nn.Conv2d)


def conv1d_twin(module):
    return conv_twin(module, nn.Conv1d)


CONV2D_CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=7, padding=3, stride=2),
    dict(kernel_size=(5, 1), padding=(2, 0), dilation=(1, 3)),
    dict(kernel_size=(1, 13), padding="same"),
    dict(kernel_size=4, padding="same"),  # asymmetric: the extra pad goes bottom/right
    dict(kernel_size=3, padding="valid", dilation=2),
    dict(kernel_size=31, padding=15, bias=False),
    dict(kernel_size=(51, 5), padding=(25, 2)),
    dict(kernel_size=(6, 2), padding=(4, 0), stride=(1, 3)),  # padding beyond the kernel extent
    dict(kernel_size=5, padding=2, padding_mode="reflect"),
    dict(kernel_size=(3, 5), padding=(1, 2), stride=(2, 1), padding_mode="circular"),
    dict(kernel_size=3, padding="same", dilation=2, padding_mode="replicate"),
]


def config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items()).replace(" ", "")


@pytest.mark.parametrize("config", CONV2D_CONFIGS, ids=config_id)
@pytest.mark.parametrize("backend", DEPTHWISE_BACKENDS)
def test_depthwise_conv2d_module_forward_matches_nn_conv2d(config, backend):
    torch.manual_seed(0)
    module = DepthwiseConv2d(6, backend=backend, **config)
    x = torch.randn(2, 6, 13, 17)
    assert_matches(module(x), conv2d_twin(module)(x))


@pytest.mark.parametrize("config", [CONV2D_CONFIGS[i] for i in (0, 1, 4, 7, 9, 10)], ids=config_id)
@pytest.mark.parametrize("backend", DEPTHWISE_BACKENDS)
def test_depthwise_conv2d_module_parameter_and_input_gradients_match_nn_conv2d_in_float64(config, backend):
    torch.manual_seed(1)
    module = DepthwiseConv2d(5, backend=backend, dtype=torch.float64, **config)
    twin = conv2d_twin(module)
    x = torch.randn(3, 5, 11, 14, dtype=torch.float64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    grad_out = torch.randn_like(twin(x_twin))
    module(x).backward(grad_out)
    twin(x_twin).backward(grad_out)
    assert_matches(x.grad, x_twin.grad)
    assert_matches(module.weight.grad, twin.weight.grad)
    if module.bias is not None:
        assert_matches(module.bias.grad, twin.bias.grad)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted"])
@pytest.mark.parametrize("backend", DEPTHWISE_BACKENDS)
def test_depthwise_conv2d_module_handles_channels_last_and_non_contiguous_inputs(layout, backend):
    torch.manual_seed(2)
    module = DepthwiseConv2d(8, 5, padding=2, stride=(1, 2), backend=backend)
    base = torch.randn(2, 8, 15, 19)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(2, 8, 15, 38)[..., ::2]
    else:
        x = base.permute(0, 1, 3, 2)
    assert not x.is_contiguous()
    out, expected = module(x), conv2d_twin(module)(x)
    assert_matches(out, expected)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", DEPTHWISE_BACKENDS)
def test_depthwise_conv2d_module_accepts_unbatched_input_like_nn_conv2d(backend):
    torch.manual_seed(3)
    module = DepthwiseConv2d(4, 3, padding=1, padding_mode="reflect", backend=backend)
    x = torch.randn(4, 9, 10)
    out = module(x)
    assert out.shape == (4, 9, 10)
    assert_matches(out, conv2d_twin(module)(x))


def test_depthwise_conv2d_module_is_an_nn_conv2d_with_its_parameters_init_and_repr():
    torch.manual_seed(4)
    module = DepthwiseConv2d(12, (7, 3), stride=2, padding=(3, 1), dilation=(1, 2), bias=True)
    torch.manual_seed(4)
    reference = nn.Conv2d(12, 12, (7, 3), stride=2, padding=(3, 1), dilation=(1, 2), groups=12)
    assert isinstance(module, nn.Conv2d)
    assert [(n, p.shape) for n, p in module.named_parameters()] == \
        [(n, p.shape) for n, p in reference.named_parameters()]
    assert torch.equal(module.weight, reference.weight) and torch.equal(module.bias, reference.bias)
    assert module.extra_repr() == reference.extra_repr()
    assert repr(module).startswith("DepthwiseConv2d(12, 12, kernel_size=(7, 3)")
    assert "backend='reference'" in repr(DepthwiseConv2d(2, 3, backend="reference"))


def test_depthwise_conv2d_module_loads_nn_conv2d_state_dict_both_ways():
    torch.manual_seed(5)
    reference = nn.Conv2d(6, 6, 5, padding=2, groups=6)
    module = DepthwiseConv2d(6, 5, padding=2)
    module.load_state_dict(reference.state_dict())
    assert torch.equal(module.weight, reference.weight) and torch.equal(module.bias, reference.bias)
    torch.manual_seed(6)
    source = DepthwiseConv2d(6, 5, padding=2)
    reference.load_state_dict(source.state_dict())
    assert list(source.state_dict()) == ["weight", "bias"]
    assert torch.equal(reference.weight, source.weight) and torch.equal(reference.bias, source.bias)


def test_depthwise_conv1d_module_loads_nn_conv1d_state_dict_both_ways():
    torch.manual_seed(7)
    reference = nn.Conv1d(6, 6, 9, padding=4, groups=6, bias=False)
    module = DepthwiseConv1d(6, 9, padding=4, bias=False)
    module.load_state_dict(reference.state_dict())
    assert torch.equal(module.weight, reference.weight)
    source = DepthwiseConv1d(6, 9, padding=4, bias=False)
    reference.load_state_dict(source.state_dict())
    assert torch.equal(reference.weight, source.weight)
    assert isinstance(module, nn.Conv1d) and module.extra_repr() == reference.extra_repr()


CONV1D_CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=31, padding="same"),
    dict(kernel_size=4, padding="same", bias=False),
    dict(kernel_size=5, stride=2, dilation=3, padding=4),
    dict(kernel_size=7, padding=3, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="circular"),
]


@pytest.mark.parametrize("config", CONV1D_CONFIGS, ids=config_id)
@pytest.mark.parametrize("backend", DEPTHWISE_BACKENDS)
def test_depthwise_conv1d_module_forward_and_float64_gradients_match_nn_conv1d(config, backend):
    torch.manual_seed(8)
    module = DepthwiseConv1d(6, backend=backend, dtype=torch.float64, **config)
    twin = conv1d_twin(module)
    x = torch.randn(3, 6, 37, dtype=torch.float64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    out, expected = module(x), twin(x_twin)
    assert_matches(out, expected)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert_matches(x.grad, x_twin.grad)
    assert_matches(module.weight.grad, twin.weight.grad)
    if module.bias is not None:
        assert_matches(module.bias.grad, twin.bias.grad)
    x32 = torch.randn(2, 37, 6).transpose(1, 2)  # [N, L, C] viewed as [N, C, L]: not contiguous
    assert_matches(module.float()(x32), twin.float()(x32))


def test_depthwise_modules_pass_their_backend_to_the_op():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(BackendError, match="'cuda' cannot run"):
        DepthwiseConv2d(4, 3, backend="cuda")(x)
    with pytest.raises(BackendError, match="'cuda' cannot run"):
        DepthwiseConv1d(4, 3, backend="cuda")(x[:, :, 0])
    module = DepthwiseConv2d(4, 3)
    with use_backend("cuda"), pytest.raises(BackendError, match="'cuda' cannot run"):
        module(x)
    with use_backend("cuda"):  # an explicit module backend wins over the context default
        DepthwiseConv2d(4, 3, backend="reference")(x)


def test_depthwise_modules_reject_bad_channels_and_backend_names():
    with pytest.raises(ValueError, match="channels must be a positive int"):
        DepthwiseConv2d(0, 3)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        DepthwiseConv1d(2.0, 3)
    with pytest.raises(ValueError, match="backend must be"):
        DepthwiseConv2d(4, 3, backend="gpu")


@pytest.mark.parametrize("backend", DEPTHWISE_BACKENDS)
def test_depthwise_conv2d_module_compiles_fullgraph(backend):
    torch.manual_seed(9)
    module = DepthwiseConv2d(4, 5, padding=2, backend=backend)
    x = torch.randn(2, 4, 9, 11)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    assert_matches(compiled(x), conv2d_twin(module)(x))


# ---------------------------------------------------------------------------------------------
# from_conv / convert_depthwise
# ---------------------------------------------------------------------------------------------

def test_from_conv_shares_parameters_and_keeps_dtype_training_flag_and_output():
    torch.manual_seed(10)
    conv = nn.Conv2d(6, 6, 7, padding=3, stride=2, groups=6, padding_mode="reflect", dtype=torch.float64).eval()
    module = DepthwiseConv2d.from_conv(conv, backend="reference")
    assert module.weight is conv.weight and module.bias is conv.bias
    assert module.weight.dtype == torch.float64 and not module.training
    assert module.backend == "reference" and module.padding_mode == "reflect" and module.stride == (2, 2)
    x = torch.randn(2, 6, 12, 13, dtype=torch.float64)
    assert_matches(module(x), conv(x))

    conv1d = nn.Conv1d(5, 5, 4, padding="same", groups=5, bias=False)
    module1d = DepthwiseConv1d.from_conv(conv1d)
    assert module1d.weight is conv1d.weight and module1d.bias is None
    x1 = torch.randn(3, 5, 20)
    assert_matches(module1d(x1), conv1d(x1))


class ForwardOverridingConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("make_conv, cls, error, message", [
    (lambda: nn.Conv2d(8, 8, 3), DepthwiseConv2d, ValueError, "groups == in_channels == out_channels"),
    (lambda: nn.Conv2d(8, 16, 3, groups=8), DepthwiseConv2d, ValueError, "channel multiplier 1"),
    (lambda: nn.Conv2d(8, 8, 3, groups=4), DepthwiseConv2d, ValueError, "groups=4"),
    (lambda: nn.Conv1d(8, 8, 3, groups=8), DepthwiseConv2d, TypeError, "expected an nn.Conv2d"),
    (lambda: nn.Conv2d(8, 8, 3, groups=8), DepthwiseConv1d, TypeError, "expected an nn.Conv1d"),
    (lambda: nn.ConvTranspose2d(8, 8, 3, groups=8), DepthwiseConv2d, TypeError, "ConvTranspose2d"),
    (lambda: ForwardOverridingConv(8, 8, 3, groups=8), DepthwiseConv2d, ValueError, "overrides forward"),
    (lambda: prune.l1_unstructured(nn.Conv2d(8, 8, 3, groups=8), "weight", amount=0.5), DepthwiseConv2d,
     ValueError, "not a plain registered parameter"),
], ids=["dense", "multiplier2", "grouped", "conv1d_into_2d", "conv2d_into_1d", "transposed",
        "overridden_forward", "pruned"])
def test_from_conv_rejects_convs_that_are_not_plain_depthwise_naming_the_rule(make_conv, cls, error, message):
    with pytest.raises(error, match=message):
        cls.from_conv(make_conv())


class MixedNet(nn.Module):
    """Depthwise and non-depthwise convs, nested, 2-D and 1-D."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)                      # dense: untouched
        self.dw7 = nn.Conv2d(8, 8, 7, padding=3, groups=8)             # depthwise
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)         # grouped: untouched
        self.expand = nn.Conv2d(8, 16, 3, padding=1, groups=8)         # multiplier 2: untouched
        self.blocks = nn.Sequential(
            nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False),    # depthwise
            nn.GELU(),
            nn.Conv2d(16, 16, 1, groups=16),                           # depthwise 1x1
        )
        self.head = nn.Conv1d(16, 16, 9, padding=4, groups=16, padding_mode="reflect")  # depthwise 1-D

    def forward(self, x):
        x = self.blocks(self.expand(self.grouped(self.dw7(self.stem(x)))))
        return self.head(x.flatten(2))


@pytest.mark.parametrize("min_kernel_size, expected", [
    (1, ["dw7", "blocks.0", "blocks.2", "head"]),
    (3, ["dw7", "blocks.0", "head"]),
    (8, ["head"]),
])
def test_convert_depthwise_replaces_only_depthwise_convs_and_keeps_state_dict_and_output(min_kernel_size, expected):
    torch.manual_seed(11)
    model = MixedNet().double()
    before = model.state_dict(keep_vars=True)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    out_before = model(x)
    replaced = convert_depthwise(model, min_kernel_size=min_kernel_size, backend="reference")
    assert replaced == expected
    for name, module in model.named_modules():
        if name in expected:
            assert isinstance(module, (DepthwiseConv2d, DepthwiseConv1d)) and module.backend == "reference"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            assert type(module) in (nn.Conv1d, nn.Conv2d), name
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)
    assert_matches(model(x), out_before)
    assert convert_depthwise(model, min_kernel_size=min_kernel_size) == []  # already converted


def test_convert_depthwise_replaces_a_shared_conv_by_one_module_under_every_name():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    assert convert_depthwise(model) == ["0", "2"]
    assert model[0] is model[2] and isinstance(model[0], DepthwiseConv2d)
    assert model[0].weight is conv.weight


def test_convert_depthwise_leaves_hooked_and_subclassed_convs_and_rejects_a_bare_conv():
    hooked = nn.Conv2d(4, 4, 3, groups=4)
    hooked.register_forward_hook(lambda module, inputs, output: output)
    model = nn.Sequential(hooked, ForwardOverridingConv(4, 4, 3, groups=4))
    assert convert_depthwise(model) == []
    assert type(model[0]) is nn.Conv2d and type(model[1]) is ForwardOverridingConv
    with pytest.raises(ValueError, match="from_conv"):
        convert_depthwise(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="min_kernel_size"):
        convert_depthwise(model, min_kernel_size=0)


# ---------------------------------------------------------------------------------------------
# InceptionDWConv2d
# ---------------------------------------------------------------------------------------------

class EagerInceptionDWConv2d(nn.Module):
    """Twin written from the definition: split (C - 3gc, gc, gc, gc), three depthwise nn.Conv2d, cat."""

    def __init__(self, in_channels, square_kernel_size=3, band_kernel_size=11, branch_ratio=0.125):
        super().__init__()
        gc = int(in_channels * branch_ratio)
        self.dwconv_hw = nn.Conv2d(gc, gc, square_kernel_size, padding=square_kernel_size // 2, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, band_kernel_size), padding=(0, band_kernel_size // 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (band_kernel_size, 1), padding=(band_kernel_size // 2, 0), groups=gc)
        self.split_indexes = (in_channels - 3 * gc, gc, gc, gc)

    def forward(self, x):
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_indexes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


INCEPTION_VARIANTS = {
    "default": dict(in_channels=64),
    "atto": dict(in_channels=40, band_kernel_size=9, branch_ratio=0.25),
    "odd": dict(in_channels=27, square_kernel_size=5, band_kernel_size=7),
}


def inception_pair(variant, dtype=torch.float32, backend=None):
    torch.manual_seed(12)
    eager = EagerInceptionDWConv2d(**INCEPTION_VARIANTS[variant]).to(dtype)
    with torch.no_grad():  # fresh random values everywhere, biases included
        for p in eager.parameters():
            p.normal_()
    module = InceptionDWConv2d(**INCEPTION_VARIANTS[variant], backend=backend).to(dtype)
    module.load_state_dict(eager.state_dict())
    return module, eager


@pytest.mark.parametrize("variant", INCEPTION_VARIANTS)
@pytest.mark.parametrize("backend", INCEPTION_BACKENDS)
def test_inception_dwconv2d_module_matches_eager_twin_output_and_all_float64_gradients(variant, backend):
    module, eager = inception_pair(variant, torch.float64, backend)
    channels = INCEPTION_VARIANTS[variant]["in_channels"]
    x = torch.randn(3, channels, 13, 17, dtype=torch.float64, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    out, expected = module(x), eager(x_eager)
    assert_matches(out, expected)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert_matches(x.grad, x_eager.grad)
    eager_params = dict(eager.named_parameters())
    for name, p in module.named_parameters():
        assert_matches(p.grad, eager_params[name].grad)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("backend", INCEPTION_BACKENDS)
def test_inception_dwconv2d_module_float32_output_matches_eager_twin_in_every_layout(layout, backend):
    module, eager = inception_pair("atto", torch.float32, backend)
    x = torch.randn(2, 40, 11, 15)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(2, 40, 11, 30)[..., ::2]
    out = module(x)
    assert_matches(out, eager(x))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_inception_dwconv2d_module_has_inceptionnext_layout_init_and_state_dict_both_ways():
    for variant, kwargs in INCEPTION_VARIANTS.items():
        torch.manual_seed(13)
        eager = EagerInceptionDWConv2d(**kwargs)
        torch.manual_seed(13)
        module = InceptionDWConv2d(**kwargs)
        assert module.split_indexes == eager.split_indexes, variant
        eager_state, state = eager.state_dict(), module.state_dict()
        assert list(state) == list(eager_state)
        assert all(torch.equal(state[k], eager_state[k]) for k in state), "same construction order, same init"
        for name in ("dwconv_hw", "dwconv_w", "dwconv_h"):
            assert type(getattr(module, name)) is nn.Conv2d
            assert repr(getattr(module, name)) == repr(getattr(eager, name))
    module, eager = inception_pair("default")
    fresh = EagerInceptionDWConv2d(**INCEPTION_VARIANTS["default"])
    fresh.load_state_dict(module.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), eager.state_dict().values()))
    assert InceptionDWConv2d(96).split_indexes == (60, 12, 12, 12)


@pytest.mark.parametrize("backend", INCEPTION_BACKENDS)
def test_inception_dwconv2d_from_module_shares_the_convs_and_matches(backend):
    _, eager = inception_pair("default")
    module = InceptionDWConv2d.from_module(eager, backend=backend)
    assert module.dwconv_w is eager.dwconv_w and module.split_indexes == eager.split_indexes
    x = torch.randn(2, 64, 10, 9)
    assert_matches(module(x), eager(x))
    broken = EagerInceptionDWConv2d(64)
    broken.dwconv_w = nn.Conv2d(8, 8, (1, 11), padding=(0, 4), groups=8)
    with pytest.raises(ValueError, match="padding"):
        InceptionDWConv2d.from_module(broken)


def test_inception_dwconv2d_module_rejects_even_kernels_and_bad_branch_ratios():
    with pytest.raises(ValueError, match="odd"):
        InceptionDWConv2d(64, square_kernel_size=4)
    with pytest.raises(ValueError, match="odd"):
        InceptionDWConv2d(64, band_kernel_size=10)
    with pytest.raises(ValueError, match="branch channels"):
        InceptionDWConv2d(4, branch_ratio=0.125)   # gc = 0
    with pytest.raises(ValueError, match="branch channels"):
        InceptionDWConv2d(12, branch_ratio=0.5)    # 3 * gc > C
