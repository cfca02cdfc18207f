"""fusekit.nn.InvertedResidual / MBConv / FusedMBConv and fuse_inverted_residuals: torchvision's and
timm's module layouts (state dict keys, cross-layout loading), eager twins built from plain torch.nn
with the same structure and names (eval and training: outputs, gradients, running statistics), a
whole MobileNetV2 converted in place, MobileTL mode, and the argument errors."""
import copy
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusekit.nn.inverted_residual import (FusedMBConv, InvertedResidual, MBConv, _make_divisible,
                                          fuse_inverted_residuals)
from fusekit.models.mobilenet import Conv2dNormActivation
from fusekit.models.mobilenet import InvertedResidual as TvInvertedResidual
from fusekit.models.mobilenet import MobileNetV2 as TvMobileNetV2
from fusekit.testing.checks import assert_close_to_twin

ACT = {"relu6": lambda: nn.ReLU6(inplace=True), "silu": lambda: nn.SiLU(inplace=True),
       "relu": lambda: nn.ReLU(inplace=True), "hardswish": lambda: nn.Hardswish(inplace=True)}


# ----------------------------------------------------------------------------------------------
# eager twins: torchvision's and timm's blocks as plain torch.nn, with their structure and names
# ----------------------------------------------------------------------------------------------

# torchvision's conv-BN-SiLU and conv-BN (MBConv / FusedMBConv stages)
silu_cna = partial(Conv2dNormActivation, activation_layer=nn.SiLU)
plain_cna = partial(Conv2dNormActivation, activation_layer=None)


class TvStochasticDepth(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p, self.mode = p, "row"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        noise = torch.empty([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * noise.div_(1 - self.p)


class TvSqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.SiLU(inplace=True), nn.Sigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class TvMBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, t, sd_prob=0.0, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = _make_divisible(cin * t, 8)
        layers = [silu_cna(cin, hidden, 1, norm_layer=norm_layer)] if hidden != cin else []
        layers += [silu_cna(hidden, hidden, k, stride, groups=hidden, norm_layer=norm_layer),
                   TvSqueezeExcitation(hidden, max(1, cin // 4)),
                   plain_cna(hidden, cout, 1, norm_layer=norm_layer)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = TvStochasticDepth(sd_prob)
        self.out_channels = cout

    def forward(self, x):
        y = self.block(x)
        if self.use_res_connect:
            y = self.stochastic_depth(y)
            y += x
        return y


class TvFusedMBConv(TvMBConv):
    def __init__(self, cin, cout, k, stride, t, sd_prob=0.0, norm_layer=nn.BatchNorm2d):
        nn.Module.__init__(self)
        self.use_res_connect = stride == 1 and cin == cout
        hidden = _make_divisible(cin * t, 8)
        if hidden != cin:
            layers = [silu_cna(cin, hidden, k, stride, norm_layer=norm_layer),
                      plain_cna(hidden, cout, 1, norm_layer=norm_layer)]
        else:
            layers = [silu_cna(cin, cout, k, stride, norm_layer=norm_layer)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = TvStochasticDepth(sd_prob)
        self.out_channels = cout


class Conv2dSame(nn.Conv2d):
    """timm's dynamic TF "SAME" conv: pads (total // 2, total - total // 2) per axis from the input size."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def timm_conv(cin, cout, k, stride=1, groups=1, same=False, dilation=1):
    if same and stride > 1:
        return Conv2dSame(cin, cout, k, stride, 0, dilation, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 * dilation, dilation, groups=groups, bias=False)


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, c, eps=1e-5, momentum=0.1, act="identity"):
        super().__init__(c, eps=eps, momentum=momentum)
        self.drop = nn.Identity()
        self.act = nn.Identity() if act == "identity" else ACT[act]()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class TimmDropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1 - self.drop_prob
        return x * x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep).div_(keep)


class TimmSqueezeExcite(nn.Module):
    def __init__(self, c, rd, act="silu", gate=nn.Sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, rd, 1, bias=True)
        self.act1 = ACT[act]()
        self.conv_expand = nn.Conv2d(rd, c, 1, bias=True)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class TimmInvertedResidual(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, exp_ratio=6.0, act="relu6", se=False, same=False, eps=1e-5,
                 drop_path=0.0, mid=None, dilation=1):
        super().__init__()
        mid = mid or _make_divisible(cin * exp_ratio)
        self.has_skip = cin == cout and stride == 1
        self.conv_pw = timm_conv(cin, mid, 1)
        self.bn1 = BatchNormAct2d(mid, eps, act=act)
        self.conv_dw = timm_conv(mid, mid, k, stride, mid, same, dilation)
        self.bn2 = BatchNormAct2d(mid, eps, act=act)
        self.aa = nn.Identity()
        self.se = TimmSqueezeExcite(mid, round(cin * 0.25), act) if se else nn.Identity()
        self.conv_pwl = timm_conv(mid, cout, 1)
        self.bn3 = BatchNormAct2d(cout, eps)
        self.drop_path = TimmDropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x):
        y = self.bn3(self.conv_pwl(self.se(self.aa(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))))
        return self.drop_path(y) + x if self.has_skip else y


class TimmDepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, act="relu6", se=False, same=False, eps=1e-5, drop_path=0.0):
        super().__init__()
        self.has_skip = cin == cout and stride == 1
        self.conv_dw = timm_conv(cin, cin, k, stride, cin, same)
        self.bn1 = BatchNormAct2d(cin, eps, act=act)
        self.aa = nn.Identity()
        self.se = TimmSqueezeExcite(cin, round(cin * 0.25), act) if se else nn.Identity()
        self.conv_pw = timm_conv(cin, cout, 1)
        self.bn2 = BatchNormAct2d(cout, eps)
        self.drop_path = TimmDropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x):
        y = self.bn2(self.conv_pw(self.se(self.aa(self.bn1(self.conv_dw(x))))))
        return self.drop_path(y) + x if self.has_skip else y


class TimmEdgeResidual(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, exp_ratio=4.0, act="silu", same=False, eps=1e-5, drop_path=0.0):
        super().__init__()
        mid = _make_divisible(cin * exp_ratio)
        self.has_skip = cin == cout and stride == 1
        self.conv_exp = timm_conv(cin, mid, k, stride, 1, same)
        self.bn1 = BatchNormAct2d(mid, eps, act=act)
        self.aa, self.se = nn.Identity(), nn.Identity()
        self.conv_pwl = timm_conv(mid, cout, 1)
        self.bn2 = BatchNormAct2d(cout, eps)
        self.drop_path = TimmDropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x):
        y = self.bn2(self.conv_pwl(self.se(self.aa(self.bn1(self.conv_exp(x))))))
        return self.drop_path(y) + x if self.has_skip else y


class TimmConvBnAct(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, act="silu", same=False, eps=1e-5, skip=True, drop_path=0.0):
        super().__init__()
        self.has_skip = skip and cin == cout and stride == 1
        self.conv = timm_conv(cin, cout, k, stride, 1, same)
        self.bn1 = BatchNormAct2d(cout, eps, act=act)
        self.aa = nn.Identity()
        self.drop_path = TimmDropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x):
        y = self.bn1(self.conv(x))
        return self.drop_path(y) + x if self.has_skip else y


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _randomize(module, seed=0):
    """Non-trivial BN statistics and affine parameters, so a wrong fold or stat shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(3)
    return module


def _assert_state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _compare(fused, twin, x, *, train, seed=None, steps=1):
    """Same state dict in; outputs (and in training gradients and BN buffers after the step) agree."""
    fused.train(train)
    twin.train(train)
    for _ in range(steps):
        xf = x.clone().requires_grad_(train)
        xt = x.clone().requires_grad_(train)
        if seed is not None:
            torch.manual_seed(seed)
        out = fused(xf)
        if seed is not None:
            torch.manual_seed(seed)
        expected = twin(xt)
        assert out.shape == expected.shape
        assert_close_to_twin(out, expected)
        if not train:
            with torch.no_grad():   # the BN-folded inference kernels (no autograd graph)
                assert_close_to_twin(fused(x), twin(x))
            continue
        grad = torch.randn_like(expected)
        out.backward(grad)
        expected.backward(grad)
        assert_close_to_twin(xf.grad, xt.grad, "backward")
        twin_params = dict(twin.named_parameters())
        for name, p in fused.named_parameters():
            assert p.grad is not None, name
            assert_close_to_twin(p.grad, twin_params[name].grad, "backward")
    twin_buffers = dict(twin.named_buffers())
    for name, b in fused.named_buffers():
        if b.dtype == torch.long:
            assert torch.equal(b, twin_buffers[name]), name
        else:
            assert_close_to_twin(b, twin_buffers[name])


# ----------------------------------------------------------------------------------------------
# layouts and state dicts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", (1, 6))
def test_torchvision_layout_has_torchvision_keys_and_shapes(t):
    torch.manual_seed(0)
    twin = TvInvertedResidual(16, 24, 2, t)
    fused = InvertedResidual(16, 24, 2, t)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    first = "conv.0.0.weight"
    assert fused.state_dict()[first].shape == ((16 * t, 16, 1, 1) if t != 1 else (16, 1, 3, 3))
    assert (fused.use_res_connect, fused.out_channels, fused._is_cn) == (False, 24, True)
    fused.load_state_dict(_randomize(twin).state_dict())
    _assert_state_equal(fused, twin)


@pytest.mark.parametrize("build", [
    lambda: (InvertedResidual(16, 24, 2, 6, layout="timm"), TimmInvertedResidual(16, 24, 3, 2, 6, mid=96)),
    lambda: (InvertedResidual(16, 8, 1, 1, layout="timm"), TimmDepthwiseSeparable(16, 8)),
    lambda: (MBConv(16, 16, 5, 1, 6, layout="timm"), TimmInvertedResidual(16, 16, 5, 1, 6, "silu", se=True)),
    lambda: (MBConv(16, 16, 3, 1, 1, layout="timm"), TimmDepthwiseSeparable(16, 16, act="silu", se=True)),
    lambda: (FusedMBConv(16, 24, 3, 2, 4, layout="timm"), TimmEdgeResidual(16, 24, 3, 2, 4)),
    lambda: (FusedMBConv(24, 24, 3, 1, 1, layout="timm"), TimmConvBnAct(24, 24)),
], ids=["ir", "ds", "ir-se", "ds-se", "edge", "conv-bn-act"])
def test_timm_layout_has_timm_keys_and_shapes(build):
    fused, twin = build()
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    fused.load_state_dict(_randomize(twin).state_dict())
    _assert_state_equal(fused, twin)


@pytest.mark.parametrize("make", [
    lambda layout: InvertedResidual(16, 16, 1, 6, layout=layout),
    lambda layout: InvertedResidual(12, 8, 1, 1, layout=layout),
    lambda layout: MBConv(16, 24, 5, 2, 6, layout=layout, se_channels=4),
    lambda layout: MBConv(16, 16, 3, 1, 1, layout=layout, se_channels=4),
    lambda layout: FusedMBConv(16, 32, 3, 2, 4, layout=layout),
    lambda layout: FusedMBConv(24, 24, 3, 1, 1, layout=layout),
], ids=["ir-t6", "ir-t1", "mbconv-t6", "mbconv-t1", "fused-t4", "fused-t1"])
def test_state_dict_round_trips_torchvision_fusekit_timm_and_both_layouts_compute_the_same(make):
    tv, timm = _randomize(make("torchvision"), 1), make("timm")
    timm.load_state_dict(tv.state_dict())       # torchvision keys into the timm layout
    assert set(timm.state_dict()) != set(tv.state_dict())
    back = make("torchvision")
    back.load_state_dict(timm.state_dict())     # and timm keys back
    _assert_state_equal(back, tv)
    x = torch.randn(2, _cin(tv), 9, 9)
    tv.eval(), timm.eval()
    with torch.no_grad():
        torch.testing.assert_close(timm(x), tv(x))


def _cin(module):
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d)).in_channels


def test_timm_checkpoint_loads_into_torchvision_layout_and_matches_timm_twin():
    torch.manual_seed(0)
    twin = _randomize(TimmInvertedResidual(16, 16, 3, 1, 6, "silu", se=True)).eval()
    fused = MBConv(16, 16, 3, 1, 6).eval()     # torchvision layout, SE width 16 // 4 = round(16 * 0.25)
    fused.load_state_dict(twin.state_dict())
    assert "block.2.fc1.weight" in fused.state_dict()
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        assert_close_to_twin(fused(x), twin(x))


def test_se_width_follows_each_library_and_se_channels_overrides():
    assert MBConv(30, 30, layout="torchvision").block[2].fc1.out_channels == 7     # max(1, 30 // 4)
    assert MBConv(30, 30, layout="timm").se.conv_reduce.out_channels == 8          # round(7.5) = 8
    assert MBConv(2, 2, layout="torchvision").block[2].fc1.out_channels == 1
    assert MBConv(30, 30, se_channels=5).block[2].fc1.out_channels == 5
    assert isinstance(MBConv(30, 30, se_ratio=0, layout="timm").se, nn.Identity)


def test_mismatched_checkpoint_shapes_are_reported_by_load_state_dict():
    with pytest.raises(RuntimeError, match="size mismatch"):
        InvertedResidual(16, 16, 1, 6).load_state_dict(InvertedResidual(16, 16, 1, 4).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        InvertedResidual(16, 16, 1, 6, layout="timm").load_state_dict(InvertedResidual(16, 16, 1, 4).state_dict())


# ----------------------------------------------------------------------------------------------
# numerics against the eager twins (fp32, CPU)
# ----------------------------------------------------------------------------------------------

TWIN_CASES = {
    # name: (fused factory, twin factory, input shape)
    "ir-tv-t6-s1-res-odd": (lambda: InvertedResidual(13, 13, 1, 6), lambda: TvInvertedResidual(13, 13, 1, 6),
                            (2, 13, 9, 7)),
    "ir-tv-t1": (lambda: InvertedResidual(12, 7, 1, 1), lambda: TvInvertedResidual(12, 7, 1, 1), (2, 12, 9, 9)),
    "ir-tv-t4-s2-eps1e-3": (lambda: InvertedResidual(13, 20, 2, 4, eps=1e-3),
                            lambda: TvInvertedResidual(13, 20, 2, 4, lambda c: nn.BatchNorm2d(c, eps=1e-3)),
                            (2, 13, 11, 10)),
    "ir-timm-t6-s2-tfsame-even": (
        lambda: InvertedResidual(16, 24, 2, 6, layout="timm", tf_same=True, eps=1e-3),
        lambda: TimmInvertedResidual(16, 24, 3, 2, 6, same=True, eps=1e-3, mid=96), (2, 16, 10, 8)),
    "ds-timm-t1-res": (lambda: InvertedResidual(8, 8, 1, 1, layout="timm"),
                       lambda: TimmDepthwiseSeparable(8, 8), (2, 8, 7, 7)),
    "mbconv-tv-t6-k5-s2": (lambda: MBConv(13, 24, 5, 2, 6), lambda: TvMBConv(13, 24, 5, 2, 6), (2, 13, 11, 11)),
    "mbconv-tv-t1-res": (lambda: MBConv(16, 16, 3, 1, 1), lambda: TvMBConv(16, 16, 3, 1, 1), (2, 16, 9, 9)),
    "mbconv-timm-t4-tfsame-s2": (
        lambda: MBConv(12, 20, 5, 2, 4, layout="timm", tf_same=True, eps=1e-3),
        lambda: TimmInvertedResidual(12, 20, 5, 2, 4, "silu", se=True, same=True, eps=1e-3), (2, 12, 10, 10)),
    "fused-tv-t4-s2": (lambda: FusedMBConv(12, 20, 3, 2, 4), lambda: TvFusedMBConv(12, 20, 3, 2, 4),
                       (2, 12, 9, 10)),
    "fused-tv-t1-res": (lambda: FusedMBConv(16, 16, 3, 1, 1), lambda: TvFusedMBConv(16, 16, 3, 1, 1),
                        (2, 16, 7, 7)),
    "edge-timm-t4-res-eps1e-3": (lambda: FusedMBConv(16, 16, 3, 1, 4, layout="timm", eps=1e-3),
                                 lambda: TimmEdgeResidual(16, 16, 3, 1, 4, eps=1e-3), (2, 16, 7, 9)),
    "cba-timm-tfsame-s2": (lambda: FusedMBConv(8, 8, 3, 2, 1, layout="timm", tf_same=True),
                           lambda: TimmConvBnAct(8, 8, 3, 2, same=True), (2, 8, 10, 10)),
}


@pytest.mark.parametrize("case", sorted(TWIN_CASES))
@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
def test_module_matches_eager_twin(case, train):
    make_fused, make_twin, shape = TWIN_CASES[case]
    torch.manual_seed(0)
    twin = _randomize(make_twin())
    fused = make_fused()
    fused.load_state_dict(twin.state_dict())
    _compare(fused, twin, torch.randn(shape), train=train, steps=2 if train else 1)


@pytest.mark.parametrize("layout", ("torchvision", "timm"))
def test_stochastic_depth_drops_rows_like_the_twin_in_training_only(layout):
    torch.manual_seed(0)
    if layout == "torchvision":
        twin, fused = TvMBConv(16, 16, 3, 1, 4, sd_prob=0.5), MBConv(16, 16, 3, 1, 4, stochastic_depth_prob=0.5)
    else:
        twin = TimmInvertedResidual(16, 16, 3, 1, 4, "silu", se=True, drop_path=0.5)
        fused = MBConv(16, 16, 3, 1, 4, stochastic_depth_prob=0.5, layout="timm")
    fused.load_state_dict(_randomize(twin).state_dict())
    x = torch.randn(8, 16, 5, 5)
    _compare(fused, twin, x, train=True, seed=3)
    torch.manual_seed(3)
    dropped = copy.deepcopy(fused).train()(x) - x    # some samples take only the shortcut
    assert any(bool((d == 0).all()) for d in dropped) and not all(bool((d == 0).all()) for d in dropped)
    _compare(fused, twin, x, train=False)


# ----------------------------------------------------------------------------------------------
# fuse_inverted_residuals
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
def test_converted_mobilenet_v2_matches_eager_model(train):
    torch.manual_seed(0)
    eager = _randomize(TvMobileNetV2(num_classes=10, width_mult=0.25))
    fused_model = copy.deepcopy(eager)
    params_before = {n: p for n, p in fused_model.named_parameters()}
    returned = fuse_inverted_residuals(fused_model)
    assert returned is fused_model
    assert fused_model.fusekit_fused == [f"features.{i}" for i in range(1, 18)]
    assert fused_model.fusekit_skipped == {}
    assert all(isinstance(fused_model.features[i], InvertedResidual) for i in range(1, 18))
    assert fused_model.features[1].conv[0][0].weight.shape[1] == 1          # t = 1 block: dw first
    for n, p in fused_model.named_parameters():                             # shared, not copied
        assert p is params_before[n]
    fused_model.classifier[0].p = 0.0
    eager.classifier[0].p = 0.0
    # training: the last stages normalize over 2 x 2 x 2 values, which makes fp32 input gradients of the
    # 17-block chain ill-conditioned (eager vs fused differ by ~1% in fp32, 1e-12 in fp64): check in fp64
    dtype = torch.float64 if train else torch.float32
    _compare(fused_model.to(dtype), eager.to(dtype), torch.randn(2, 3, 64, 64, dtype=dtype), train=train)


def test_converter_shares_tensors_and_keeps_training_flags_and_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(TvInvertedResidual(8, 8, 1, 6), TimmInvertedResidual(8, 16, 3, 2, 6, "silu", se=True))
    model.eval()
    model[1].train()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    fuse_inverted_residuals(model)
    assert isinstance(model[0], InvertedResidual) and isinstance(model[1], MBConv)
    assert (model[0].training, model[1].training) == (False, True)
    assert model[0].use_res_connect and not model[1].has_skip
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)


def test_converter_fuses_every_timm_and_torchvision_block_kind():
    torch.manual_seed(0)
    blocks = nn.Sequential(
        TimmConvBnAct(8, 8, 3, 1, same=True, eps=1e-3),
        TimmEdgeResidual(8, 16, 3, 2, 4, same=True, eps=1e-3),
        TimmDepthwiseSeparable(16, 16, act="silu", se=True),
        TimmInvertedResidual(16, 24, 5, 2, 6, "silu", se=True, same=True, eps=1e-3),
        TimmInvertedResidual(24, 24, 3, 1, 1.0, "relu6", mid=24),     # timm ir with exp_ratio 1: keeps conv_pw
        TvFusedMBConv(24, 24, 3, 1, 1),
        TvFusedMBConv(24, 32, 3, 1, 4),
        TvMBConv(32, 32, 3, 1, 1),
        TvMBConv(32, 40, 5, 2, 6),
    )
    eager = _randomize(blocks)
    fused_model = fuse_inverted_residuals(copy.deepcopy(eager))
    assert fused_model.fusekit_fused == [str(i) for i in range(9)], fused_model.fusekit_skipped
    kinds = [type(m) for m in fused_model]
    assert kinds == [FusedMBConv, FusedMBConv, MBConv, MBConv, InvertedResidual, FusedMBConv, FusedMBConv, MBConv,
                     MBConv]
    assert [m.tf_same for m in fused_model] == [False, True, False, True] + [False] * 5
    x = torch.randn(2, 8, 12, 12)
    _compare(fused_model, eager, x, train=False)
    _compare(fused_model, eager, x, train=True)


def test_converter_leaves_blocks_it_cannot_express_unchanged_and_says_why():
    torch.manual_seed(0)
    gelu = TvInvertedResidual(8, 8, 1, 6)
    gelu.conv[0][2] = nn.GELU()
    gelu.conv[1][2] = nn.GELU()
    tanh_gate = TimmInvertedResidual(8, 8, 3, 1, 6, "silu", se=True)
    tanh_gate.se.gate = nn.Tanh()
    grouped = TimmInvertedResidual(8, 8, 3, 1, 6)
    grouped.conv_dw = nn.Conv2d(48, 48, 3, 1, 1, groups=24, bias=False)       # timm group_size 2
    dilated_same = TimmInvertedResidual(8, 16, 3, 2, 6, same=True, dilation=2)
    pw_act = TimmDepthwiseSeparable(8, 8)
    pw_act.bn2.act = nn.ReLU()
    mixed = TimmInvertedResidual(8, 8, 3, 1, 6)
    mixed.bn2.act = nn.ReLU()
    good = TvInvertedResidual(8, 8, 1, 6)
    model = nn.Sequential(gelu, tanh_gate, grouped, dilated_same, pw_act, mixed, good)
    originals = list(model)
    fuse_inverted_residuals(model)
    assert model.fusekit_fused == ["6"]
    assert [model[i] is originals[i] for i in range(6)] == [True] * 6
    why = model.fusekit_skipped
    assert set(why) == {"0", "1", "2", "3", "4", "5"}
    assert "GELU" in why["0"] and "Tanh" in why["1"] and "depthwise" in why["2"] and "dilation" in why["3"]
    assert "pw_act" in why["4"] and "different activations" in why["5"]


def test_converting_a_single_block_returns_its_replacement():
    block = _randomize(TvInvertedResidual(8, 16, 2, 6)).eval()
    fused = fuse_inverted_residuals(block)
    assert isinstance(fused, InvertedResidual) and fused.fusekit_fused == [""]
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        assert_close_to_twin(fused(x), block(x))


# ----------------------------------------------------------------------------------------------
# MobileTL and errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda mode: InvertedResidual(16, 16, 1, 6, mode=mode),
                                  lambda mode: MBConv(16, 16, 3, 1, 4, mode=mode, layout="timm")],
                         ids=["ir", "mbconv-timm"])
def test_mobiletl_freezes_internal_bn_statistics_and_weights(make):
    torch.manual_seed(0)
    module = _randomize(make("mobiletl")).train()
    internal = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][:2]
    project_bn = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][2]
    before = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in internal]
    project_before = project_bn.running_mean.clone()
    module(torch.randn(2, 16, 7, 7)).square().sum().backward()
    for bn, (mean, var, count) in zip(internal, before):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert torch.equal(bn.num_batches_tracked, count)
        assert bn.weight.grad is None or not bn.weight.grad.any()
        assert bn.bias.grad is not None and bn.bias.grad.abs().sum() > 0
    assert not torch.equal(project_bn.running_mean, project_before)       # the project BN still trains
    # frozen internal BNs = eager with those two BNs in eval mode
    twin = make("recompute")
    twin.load_state_dict(module.state_dict())
    twin.train()
    for bn in [m for m in twin.modules() if isinstance(m, nn.BatchNorm2d)][:2]:
        bn.eval()
    module.zero_grad()
    x = torch.randn(2, 16, 7, 7)
    assert_close_to_twin(module(x), twin(x))


@pytest.mark.parametrize("call, message", [
    (lambda: InvertedResidual(8, 8, 1, 0), "expand_ratio must be a number > 0"),
    (lambda: MBConv(8, 8, 3, 1, -1), "expand_ratio must be a number > 0"),
    (lambda: InvertedResidual(8, 8, 3, 6), "stride must be 1 or 2"),
    (lambda: FusedMBConv(8, 8, 3, 0), "stride must be 1 or 2"),
    (lambda: MBConv(8, 8, 4), "kernel_size must be a positive odd int"),
    (lambda: InvertedResidual(8, 8, 1, 6, kernel_size=2), "kernel_size must be a positive odd int"),
    (lambda: InvertedResidual(8, 8, 1, 6, activation="gelu"), "activation must be one of"),
    (lambda: MBConv(8, 8, se_gate="tanh"), "se_gate must be one of"),
    (lambda: InvertedResidual(8, 8, 1, 6, layout="keras"), "layout must be one of"),
    (lambda: InvertedResidual(8, 8, 1, 6, mode="frozen"), "mode must be one of"),
    (lambda: MBConv(8, 8, se_ratio=0), "always has squeeze-excitation"),
    (lambda: MBConv(8, 8, tf_same=True, dilation=2), "tf_same=True"),
    (lambda: InvertedResidual(8, 8, 1, 6, nn.BatchNorm2d, layout="timm"), "norm_layer is torchvision's"),
    (lambda: InvertedResidual(0, 8, 1, 6), "inp must be a positive int"),
    (lambda: fuse_inverted_residuals(nn.Sequential(), mode="fast"), "mode must be one of"),
])
def test_unsupported_configurations_raise_value_errors_naming_the_rule(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_swish_alias_and_repr():
    m = MBConv(8, 8, activation="swish", layout="timm")
    assert m.activation == "silu"
    assert "layout='timm'" in repr(m) and "activation='silu'" in repr(m)
