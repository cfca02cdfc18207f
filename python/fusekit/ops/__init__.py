"""Operator families: schemas, backends, autograd and functional APIs."""
from .depthwise import depthwise_conv1d, depthwise_conv2d, inception_dwconv2d

__all__ = ["depthwise_conv1d", "depthwise_conv2d", "inception_dwconv2d"]
