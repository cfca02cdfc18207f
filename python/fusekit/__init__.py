"""fusekit: fused CPU, CUDA and Triton kernels with autograd for vision backbones and decoders.

Functional API (``fusekit.depthwise_conv2d``, ``fusekit.multi_query_attention``, ``fusekit.na2d``,
``fusekit.inverted_residual`` ...), modules (``fusekit.nn``), backend control
(``fusekit.use_backend``, ``fusekit.available_backends``) and the benchmark CLI
(``fusekit-bench`` / ``python -m fusekit.bench``).
"""
from .version import __version__
from .ops import schemas as _schemas  # noqa: F401  (op schemas first, then the C++ kernels)
from . import _extension
from .backends import BACKENDS, BackendError, available_backends, registered_ops, use_backend
from ._extension import ExtensionUnavailable
from .ops import (depthwise_conv1d, depthwise_conv2d, inception_dwconv2d, multi_query_attention, multi_query_decode,
                  na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk, na3d, na3d_av, na3d_qk)
from .ops.inverted_residual import fused_mbconv, inverted_residual  # noqa: E402  (the module keeps its name)
from . import nn  # noqa: E402

__all__ = [
    "__version__", "BACKENDS", "BackendError", "ExtensionUnavailable", "available_backends",
    "registered_ops", "use_backend", "depthwise_conv1d", "depthwise_conv2d", "fused_mbconv", "inception_dwconv2d",
    "inverted_residual", "multi_query_attention",
    "multi_query_decode", "na1d", "na1d_av", "na1d_qk", "na2d", "na2d_av", "na2d_qk", "na3d", "na3d_av", "na3d_qk",
    "nn",
]
