"""Drop-in modules built on fusekit's ops, and structural re-parameterization helpers."""
from .convert import ConversionReport, convert
from .depthwise import DepthwiseConv1d, DepthwiseConv2d, InceptionDWConv2d, convert_depthwise
from .inverted_residual import FusedMBConv, InvertedResidual, MBConv, fuse_inverted_residuals
from .mqa import GQADecoder, KVCache, LayerCache, MultiQueryAttention
from .na import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .reparam import (dilated_to_dense, fuse_conv_bn, merge_depthwise_branches, pad_kernel_to,
                      reparameterize_blocks, reparameterize_depthwise_branches,
                      reparameterize_dilated_reparam_block, reparameterize_large_kernel_conv)

__all__ = [
    "ConversionReport", "DepthwiseConv1d", "DepthwiseConv2d", "FusedMBConv", "GQADecoder", "InceptionDWConv2d", "InvertedResidual", "KVCache",
    "LayerCache", "MBConv",
    "MultiQueryAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
    "NeighborhoodAttention3D", "convert", "convert_depthwise", "dilated_to_dense",
    "fuse_conv_bn", "fuse_inverted_residuals", "merge_depthwise_branches", "pad_kernel_to", "reparameterize_blocks",
    "reparameterize_depthwise_branches", "reparameterize_dilated_reparam_block", "reparameterize_large_kernel_conv",
]
