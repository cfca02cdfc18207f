"""Operator families: schemas, backends, autograd and functional APIs."""
from .depthwise import depthwise_conv1d, depthwise_conv2d, inception_dwconv2d
from . import inverted_residual  # noqa: F401  (functions: fusekit.inverted_residual, fusekit.fused_mbconv)
from .mqa import multi_query_attention, multi_query_decode
from .na import (na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk, na3d, na3d_av, na3d_qk, neighborhood_attention,
                 neighborhood_av, neighborhood_qk)

__all__ = ["depthwise_conv1d", "depthwise_conv2d", "inception_dwconv2d", "multi_query_attention",
           "multi_query_decode", "na1d", "na1d_av", "na1d_qk", "na2d", "na2d_av", "na2d_qk", "na3d", "na3d_av",
           "na3d_qk", "neighborhood_attention", "neighborhood_av", "neighborhood_qk"]
