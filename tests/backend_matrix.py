"""(backend, device) pairs each operator family is tested on; GPU pairs carry the gpu marker."""
import pytest
import torch

import fusekit


def backend_device_params(op: str, backends=("cpu", "cuda", "triton", "reference")):
    """pytest params of (backend, device): CPU-tensor backends always, CUDA ones marked gpu.

    Triton runs on CPU tensors under the interpreter (no GPU) and on CUDA tensors otherwise.
    A backend that cannot run on this machine is skipped with its reason.
    """
    available = fusekit.available_backends(op)
    params = []
    for backend in backends:
        if backend == "cpu":
            pairs = [("cpu", "cpu")]
        elif backend == "cuda":
            pairs = [("cuda", "cuda")]
        elif backend == "triton":
            pairs = [("triton", "cuda" if torch.cuda.is_available() else "cpu")]
        else:
            pairs = [("reference", "cpu")] + ([("reference", "cuda")] if torch.cuda.is_available() else [])
        for b, d in pairs:
            marks = [pytest.mark.gpu] if d == "cuda" else []
            if available.get(b) is not None and not (b == "cuda" and not torch.cuda.is_available()):
                marks.append(pytest.mark.skip(reason=f"{b}: {available[b]}"))
            params.append(pytest.param(b, d, id=f"{b}-{d}", marks=marks))
    return params


def dtypes_for(backend: str, device: str):
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    if backend == "triton":  # interpreter: numpy has no bfloat16 arithmetic, kernels upcast anyway
        return [torch.float32, torch.float16]
    return [torch.float32, torch.bfloat16, torch.float16]


def module_backend_params(op: str):
    """Backends a fusekit.nn module test runs on: "reference", the default (auto), and "cpu"."""
    cpu_missing = fusekit.available_backends(op)["cpu"]
    return [
        pytest.param("reference", id="reference"),
        pytest.param(None, id="default"),
        pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
            cpu_missing is not None, reason=f"cpu backend unavailable: {cpu_missing}")),
    ]
