"""Structural re-parameterization: merged layers against the multi-branch blocks they replace.

The blocks below are minimal eager versions written from the formulas (conv + BN branches,
outputs summed, "same"-centered padding), with the attribute names of the original codebases.
Every test uses random weights and random BN statistics (never BN's default buffers).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backend_matrix import module_backend_params
from fusekit.testing.checks import assert_close_to_twin
from fusekit.nn.depthwise import DepthwiseConv2d
from fusekit.nn.reparam import (
    dilated_to_dense,
    fuse_conv_bn,
    merge_depthwise_branches,
    pad_kernel_to,
    reparameterize_blocks,
    reparameterize_depthwise_branches,
    reparameterize_dilated_reparam_block,
    reparameterize_large_kernel_conv,
)

BACKENDS = module_backend_params("depthwise_conv2d")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


assert_reproduces = assert_close_to_twin


@torch.no_grad()
def randomize(model):
    """Random conv weights/biases and random BN affine parameters and running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.3, 2.0)
            if module.affine:
                module.weight.normal_(1, 0.5)
                module.bias.normal_(0, 0.5)
            module.eps = 1e-3  # not BN's default, so a fold that drops eps shows
        elif isinstance(module, nn.Conv2d):
            module.weight.normal_(0, 0.2)
            if module.bias is not None:
                module.bias.normal_()
    return model


def conv_bn(channels, kernel_size, padding, dilation=1, stride=1):
    branch = nn.Sequential()
    branch.add_module("conv", nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=padding,
                                        dilation=dilation, groups=channels, bias=False))
    branch.add_module("bn", nn.BatchNorm2d(channels))
    return branch


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet: K x K conv+BN (lkb_origin) plus s x s conv+BN (small_conv), summed; lkb_reparam once merged."""

    def __init__(self, channels, kernel_size, small_kernel, stride=1):
        super().__init__()
        self.lkb_origin = conv_bn(channels, kernel_size, kernel_size // 2, stride=stride)
        if small_kernel is not None:
            self.small_conv = conv_bn(channels, small_kernel, small_kernel // 2, stride=stride)

    def forward(self, x):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out


class DecomposedLargeKernelConv(nn.Module):
    """SLaK (Decom=True): K x s (LoRA1) + s x K (LoRA2) + s x s (small_conv), each conv+BN, same padding."""

    def __init__(self, channels, kernel_size, small_kernel):
        super().__init__()
        self.LoRA1 = conv_bn(channels, (kernel_size, small_kernel), (kernel_size // 2, small_kernel // 2))
        self.LoRA2 = conv_bn(channels, (small_kernel, kernel_size), (small_kernel // 2, kernel_size // 2))
        self.small_conv = conv_bn(channels, small_kernel, small_kernel // 2)

    def forward(self, x):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        return self.LoRA1(x) + self.LoRA2(x) + self.small_conv(x)


# UniRepLKNet's branch table: large kernel K -> (branch kernel sizes, branch dilations)
DILATED_BRANCHES = {
    17: ([5, 9, 3, 3, 3], [1, 2, 4, 5, 7]),
    15: ([5, 7, 3, 3, 3], [1, 2, 3, 5, 7]),
    13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]),
    11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
    9: ([5, 5, 3, 3], [1, 2, 3, 4]),
    7: ([5, 3, 3], [1, 2, 3]),
    5: ([3, 3], [1, 2]),
}


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet: K x K conv + BN plus dilated k x k conv + BN branches (padding (r(k-1)+1)//2), summed."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                   bias=False)
        self.origin_bn = nn.BatchNorm2d(channels)
        self.kernel_sizes, self.dilates = DILATED_BRANCHES[kernel_size]
        for k, r in zip(self.kernel_sizes, self.dilates):
            setattr(self, f"dil_conv_k{k}_{r}", nn.Conv2d(channels, channels, k, padding=(r * (k - 1) + 1) // 2,
                                                          dilation=r, groups=channels, bias=False))
            setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x):
        if not hasattr(self, "origin_bn"):
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out


def eval_block(block, dtype):
    return randomize(block).to(dtype).eval()


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(20)


# ---------------------------------------------------------------------------------------------
# weight algebra (checked with F.conv2d)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, dilation", [((3, 3), 2), ((5, 5), 3), ((3, 4), (2, 3)), ((1, 7), (4, 2)),
                                              ((2, 2), 1)])
def test_dilated_to_dense_equals_the_dilated_convolution(kernel, dilation):
    torch.manual_seed(21)
    weight = torch.randn(4, 1, *kernel, dtype=torch.float64)
    dense = dilated_to_dense(weight, dilation)
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    assert dense.shape == (4, 1, dh * (kernel[0] - 1) + 1, dw * (kernel[1] - 1) + 1)
    assert torch.count_nonzero(dense) == torch.count_nonzero(weight)
    x = torch.randn(2, 4, 23, 19, dtype=torch.float64)
    assert_reproduces(F.conv2d(x, dense, padding=3, groups=4),
                      F.conv2d(x, weight, padding=3, dilation=dilation, groups=4))


@pytest.mark.parametrize("kernel, target", [((3, 3), (7, 7)), ((4, 4), (7, 8)), ((3, 5), (10, 6)),
                                            ((1, 1), (5, 4)), ((6, 2), (6, 9))])
def test_pad_kernel_to_keeps_the_same_padded_output(kernel, target):
    torch.manual_seed(22)
    weight = torch.randn(3, 1, *kernel, dtype=torch.float64)
    padded = pad_kernel_to(weight, *target)
    assert padded.shape == (3, 1, *target)
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64)
    assert_reproduces(F.conv2d(x, padded, padding="same", groups=3), F.conv2d(x, weight, padding="same", groups=3))


def test_pad_kernel_to_rejects_a_target_smaller_than_the_kernel():
    with pytest.raises(ValueError, match="smaller than the kernel"):
        pad_kernel_to(torch.randn(2, 1, 5, 5), 3, 7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_depthwise_branches_equals_the_sum_of_same_padded_branches(dtype):
    torch.manual_seed(23)
    c = 5
    specs = [((13, 13), 1, True), ((5, 5), 3, False), ((3, 3), (4, 2), True), ((1, 9), 1, True),
             ((7, 1), (2, 1), False), ((2, 4), 1, True)]  # even sizes too: "same" puts the extra pad last
    branches = [(torch.randn(c, 1, *k, dtype=dtype), torch.randn(c, dtype=dtype) if b else None, d)
                for k, d, b in specs]
    weight, bias = merge_depthwise_branches(branches)
    assert weight.dtype == dtype and bias.dtype == dtype and weight.shape == (c, 1, 13, 13)
    x = torch.randn(3, c, 17, 15, dtype=torch.float64)
    expected = sum(F.conv2d(x, w.double(), None if b is None else b.double(), padding="same", dilation=d, groups=c)
                   for w, b, d in branches)
    merged = F.conv2d(x.to(dtype), weight, bias, padding="same", groups=c)
    assert_reproduces(merged, expected.to(dtype))
    assert merge_depthwise_branches([(branches[1][0], None, 3)])[1] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, bias, affine", [(1, True, True), (6, False, True), (3, True, False),
                                                  (6, True, True)])
def test_fuse_conv_bn_matches_conv_then_eval_bn(dtype, groups, bias, affine):
    torch.manual_seed(24)
    conv = nn.Conv2d(6, 12, 3, padding=1, stride=2, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(12, affine=affine)
    eval_block(nn.Sequential(conv, bn), dtype)
    original_weight = conv.weight.detach().clone()
    fused = fuse_conv_bn(conv, bn)
    assert type(fused) is nn.Conv2d and fused.bias is not None and fused.weight.dtype == dtype
    assert fused.groups == groups and fused.stride == (2, 2)
    x = torch.randn(2, 6, 13, 11, dtype=dtype)
    assert_reproduces(fused(x), bn(conv(x)))
    assert torch.equal(conv.weight, original_weight), "the input conv is left unchanged"


def test_fuse_conv_bn_keeps_the_class_of_fusekit_and_1d_convs():
    torch.manual_seed(25)
    dw = DepthwiseConv2d(4, 5, padding=2, backend="reference")
    bn = nn.BatchNorm2d(4)
    eval_block(nn.Sequential(dw, bn), torch.float64)
    fused = fuse_conv_bn(dw, bn)
    assert type(fused) is DepthwiseConv2d and fused.backend == "reference"
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    assert_reproduces(fused(x), bn(dw(x)))

    conv1d, bn1d = nn.Conv1d(4, 4, 7, padding=3, groups=4).double(), nn.BatchNorm1d(4).double()
    randomize(bn1d).eval()
    x1 = torch.randn(2, 4, 21, dtype=torch.float64)
    assert_reproduces(fuse_conv_bn(conv1d, bn1d)(x1), bn1d(conv1d(x1)))


def test_fuse_conv_bn_rejects_bn_without_running_statistics_or_wrong_width():
    conv = nn.Conv2d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="running statistics"):
        fuse_conv_bn(conv, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="8 features"):
        fuse_conv_bn(conv, nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match="BatchNorm"):
        fuse_conv_bn(conv, nn.LayerNorm(4))


# ---------------------------------------------------------------------------------------------
# merged modules against the multi-branch blocks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel_size, small_kernel, stride", [(31, 5, 1), (13, 5, 2), (27, None, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_replknet_block_merged_in_place_reproduces_the_two_branch_output(kernel_size, small_kernel, stride,
                                                                        dtype, backend):
    block = eval_block(ReparamLargeKernelConv(6, kernel_size, small_kernel, stride), dtype)
    x = torch.randn(3, 6, 21, 19, dtype=dtype)
    expected = block(x)
    merged = reparameterize_large_kernel_conv(block, backend=backend)
    assert block.lkb_reparam is merged and isinstance(merged, DepthwiseConv2d)
    assert not hasattr(block, "lkb_origin") and not hasattr(block, "small_conv")
    assert merged.kernel_size == (kernel_size, kernel_size) and merged.stride == (stride, stride)
    assert merged.weight.dtype == dtype
    assert_reproduces(block(x), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_slak_decomposed_51x5_5x51_5x5_block_merges_into_one_51x51_conv(dtype, backend):
    block = eval_block(DecomposedLargeKernelConv(4, 51, 5), dtype)
    x = torch.randn(2, 4, 19, 23, dtype=dtype)
    expected = block(x)
    merged = reparameterize_large_kernel_conv(block, backend=backend)
    assert merged.kernel_size == (51, 51) and merged.padding == (25, 25)
    assert not any(hasattr(block, n) for n in ("LoRA1", "LoRA2", "small_conv"))
    assert_reproduces(block(x), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel_size", sorted(DILATED_BRANCHES))
def test_unireplknet_dilated_reparam_block_merges_into_its_large_kernel(kernel_size, dtype):
    block = eval_block(DilatedReparamBlock(5, kernel_size), dtype)
    x = torch.randn(2, 5, 23, 17, dtype=dtype)
    expected = block(x)
    merged = reparameterize_dilated_reparam_block(block, backend="reference")
    assert block.lk_origin is merged and merged.kernel_size == (kernel_size, kernel_size)
    assert list(dict(block.named_children())) == ["lk_origin"]
    assert_reproduces(block(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unireplknet_k13_block_reproduces_in_float32_on_the_selected_backend(backend):
    block = eval_block(DilatedReparamBlock(8, 13), torch.float32)
    x = torch.randn(4, 8, 29, 31).contiguous(memory_format=torch.channels_last)
    expected = block(x)
    reparameterize_dilated_reparam_block(block, backend=backend)
    assert_reproduces(block(x), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_generic_branch_merge_handles_missing_bn_identity_even_kernels_and_reflect_padding(dtype, backend):
    torch.manual_seed(26)
    c = 4
    # "same" strings with an even 4x4 branch: the merged kernel is 7x8 and keeps PyTorch's "same"
    even = [(nn.Conv2d(c, c, (7, 3), padding="same", groups=c), nn.BatchNorm2d(c)),
            (nn.Conv2d(c, c, 4, padding="same", groups=c, bias=False), None),
            (nn.Conv2d(c, c, (1, 8), padding="same", groups=c), nn.Identity())]
    reflect = [(nn.Conv2d(c, c, 9, padding=4, groups=c, padding_mode="reflect"), nn.BatchNorm2d(c)),
               (nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=c, padding_mode="reflect"), nn.BatchNorm2d(c))]
    x = torch.randn(3, c, 15, 13, dtype=dtype)
    for branches, kernel in ((even, (7, 8)), (reflect, (9, 9))):
        for conv, bn in branches:
            eval_block(nn.Sequential(conv, bn or nn.Identity()), dtype)
        expected = sum(conv(x) if bn is None else bn(conv(x)) for conv, bn in branches)
        merged = reparameterize_depthwise_branches(branches, backend=backend)
        assert merged.kernel_size == kernel and merged.padding_mode == branches[0][0].padding_mode
        assert_reproduces(merged(x), expected)


def test_generic_branch_merge_rejects_uncentered_padding_mixed_strides_and_dense_convs():
    c = 4
    big = (nn.Conv2d(c, c, 7, padding=3, groups=c), nn.BatchNorm2d(c))
    with pytest.raises(ValueError, match="not centered"):
        reparameterize_depthwise_branches([big, (nn.Conv2d(c, c, 5, padding=1, groups=c), None)])
    with pytest.raises(ValueError, match="stride"):
        reparameterize_depthwise_branches([big, (nn.Conv2d(c, c, 3, padding=1, stride=2, groups=c), None)])
    with pytest.raises(ValueError, match="groups == in_channels == out_channels"):
        reparameterize_depthwise_branches([big, (nn.Conv2d(c, c, 3, padding=1), None)])
    with pytest.raises(ValueError, match="running statistics"):
        reparameterize_depthwise_branches([(big[0], nn.BatchNorm2d(c, track_running_stats=False))])
    with pytest.raises(ValueError, match="already re-parameterized"):
        block = ReparamLargeKernelConv(c, 7, 3)
        reparameterize_large_kernel_conv(block)
        reparameterize_large_kernel_conv(block)


def test_reparameterize_blocks_merges_every_recognized_block_of_a_model():
    model = nn.Sequential(
        ReparamLargeKernelConv(4, 13, 5),
        nn.Sequential(DilatedReparamBlock(4, 9), nn.ReLU()),
        DecomposedLargeKernelConv(4, 11, 3),
        nn.Conv2d(4, 4, 3, padding=1),
    )
    eval_block(model, torch.float64)
    x = torch.randn(2, 4, 15, 16, dtype=torch.float64)
    expected = model(x)
    assert reparameterize_blocks(model, backend="reference") == ["0", "1.0", "2"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert_reproduces(model(x), expected)
    assert reparameterize_blocks(model) == []
