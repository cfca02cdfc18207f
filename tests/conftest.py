"""Test configuration: Triton runs in its interpreter when no GPU is present.

TRITON_INTERPRET must be set before any Triton kernel module is imported (@triton.jit reads it
at decoration time), which is why it is set here, at conftest import, before the test modules.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA is not available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
