"""Operator families: schemas, backends, autograd and functional APIs."""
from .depthwise import depthwise_conv1d, depthwise_conv2d, inception_dwconv2d
from .mqa import multi_query_attention, multi_query_decode

__all__ = ["depthwise_conv1d", "depthwise_conv2d", "inception_dwconv2d", "multi_query_attention",
           "multi_query_decode"]
