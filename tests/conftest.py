"""Test configuration: device/backend matrix, seeds, output poisoning.

On a machine without CUDA, Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before
anything imports triton). The interpreter has no bf16 (bf16 loads and tl.dot give garbage), so bf16 Triton
cases run only on CUDA.

Poisoning: every test runs with torch.use_deterministic_algorithms(True), whose fill_uninitialized_memory
fills every torch.empty / at::empty result (kernel outputs and scratch buffers alike) with NaN, so an element
a kernel forgets to write shows up as NaN instead of a stale correct value.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_resnet  # noqa: E402,F401
from fused_resnet import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Every (backend, device) pair the contract is tested on; unavailable ones are skipped with the reason.
BACKEND_DEVICES = [("eager", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
                   ("eager", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]


def backend_device_params():
    params = []
    for backend, device in BACKEND_DEVICES:
        marks = []
        if device == "cuda" and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason="needs a CUDA device"))
        else:
            ok, reason = backends.backend_status(backend, device)
            if not ok:
                marks.append(pytest.mark.skip(reason=f"backend {backend!r} unavailable: {reason}"))
        params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


def skip_unsupported(backend: str, device: str, dtype: torch.dtype) -> None:
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bf16 (garbage loads and tl.dot); bf16 Triton runs on CUDA only")


@pytest.fixture(autouse=True)
def _seed_and_poison():
    torch.manual_seed(0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(previous)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32
