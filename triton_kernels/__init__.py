"""Triton kernels of fusekit, installed as ``fusekit.triton_kernels``.

Importing this package does not import triton: each kernel module (``depthwise_conv2d``, ...)
imports it itself, so ``fusekit`` keeps importing where triton is missing.

A kernel module exposes plain-Python launch functions and ``COMPILE_CONFIGS()``, which lists
every (kernel, signature, constexprs) combination its launch functions can use;
``python -m fusekit.triton_kernels.compile_check`` compiles them all for sm_80 / sm_90 without a GPU.
"""

from typing import Any, Dict, NamedTuple


class CompileConfig(NamedTuple):
    """One specialization a launch function can produce, in the form triton.compile takes."""

    kernel: Any  # the @triton.jit function
    signature: Dict[str, str]  # every argument name -> "*fp32" / "i32" / "constexpr"
    constexprs: Dict[str, Any]  # constexpr argument name -> value
    label: str  # human-readable: direction, layout, dtype, tile
    options: Dict[str, Any]  # num_warps / num_stages, as passed at launch
    attrs: Dict[str, Any]  # argument name -> specialization attributes (16-byte aligned pointers)
