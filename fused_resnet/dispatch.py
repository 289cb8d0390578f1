"""The one dispatch point: which function computes an op, for a backend, a device and given inputs.

Ops of the contract:
  BatchNorm   bn_stats, bn_finalize, bn_act, bn_backward_reduce, bn_backward_elemt
  convolution conv_fwd (prologue / statistics or bias+residual+ReLU epilogue), conv_dgrad, conv_wgrad

Each implementation declares the ops it provides (``PROVIDES``) and, for the convolutions, the inputs it
supports (``supports_conv``). A backend that does not provide an op falls back op by op:
  triton  BatchNorm: fused_resnet/kernels/batch_norm.py; convolutions: kernels/conv_fwd.py, conv_bwd.py
          (bf16, fp16, fp32 on CUDA, or on CPU tensors in Triton's interpreter)
  cuda    BatchNorm: the compiled extension (csrc/cuda); convolutions: "aten" (below), or "cuda" when asked
          for (set_conv_impl / FUSED_RESNET_CONV=cuda): the compiled conv_fwd / dgrad / wgrad
          (ops/conv_compiled.py: CUTLASS kernels on CUDA for the calls they take, "aten" for the others)
  cpu     BatchNorm: the compiled extension (csrc/cpu); convolutions: "aten"
  eager   everything in fused_resnet/reference.py
"aten" convolutions are ATen's (cuDNN on CUDA) with the backend's own BatchNorm kernels for the prologue and
the statistics (reference.conv_* with ``bn=`` that backend): today's path, and the fallback for every input
the Triton convolutions do not take (float64, other devices).

Which backend runs is fused_resnet.backends' business (explicit request, process-wide setting,
FUSED_RESNET_BACKEND, automatic order). Here: given that backend, which convolution implementation runs for
one convolution (``conv_choice``): Triton's fused kernels, the compiled "cuda" one, or "aten". On CUDA the
choice is made per shape by measuring the candidates once (like torch.backends.cudnn.benchmark) and cached;
FUSED_RESNET_CONV=triton|cuda|aten|auto or ``set_conv_impl`` overrides it. "cuda" (the CUTLASS kernels) is a
candidate of the automatic choice only when CUDA_CONV_AUTO is set: they compile but have not yet been run on
a GPU. Nothing else in the package maps an op to a function.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from . import backends

BN_OPS = ("bn_stats", "bn_finalize", "bn_act", "bn_backward_reduce", "bn_backward_elemt")
CONV_OPS = ("conv_fwd", "conv_dgrad", "conv_wgrad")
PROVIDES = {
    "triton": BN_OPS + CONV_OPS,
    "cuda": BN_OPS,
    "cpu": BN_OPS,
    "eager": BN_OPS + CONV_OPS,
}
CONV_IMPLS = ("triton", "cuda", "aten")
# Whether the automatic per-shape choice measures the compiled "cuda" convolutions. Off until their GPU
# parity tests have passed (they have only been compile-checked); set_conv_impl("cuda") uses them regardless.
CUDA_CONV_AUTO = False
TRITON_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _module(backend: str):
    if backend == "triton":
        return importlib.import_module("fused_resnet.kernels.batch_norm")
    if backend in ("cpu", "cuda"):
        return torch.ops.fused_resnet_C
    if backend == "eager":
        return importlib.import_module("fused_resnet.reference")
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(backends.BACKENDS)}")


def implementation(op: str, backend: str) -> Callable:
    """The function computing BatchNorm op ``op`` for ``backend`` (same name and signature in every
    implementation: the contract in csrc/ops.cpp and fused_resnet/ops/batch_norm.py)."""
    if op not in BN_OPS:
        raise ValueError(f"fused_resnet: {op!r} is not a BatchNorm op of the contract ({', '.join(BN_OPS)})")
    return getattr(_module(backend), op)


def bn_implementation(backend: str):
    """An object with every BatchNorm op of ``backend`` as attributes (for code that calls several)."""
    return _module(backend)


# ---------------------------------------------------------------------------------------------------------
# Convolutions


def supports_conv(impl: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether convolution implementation ``impl`` takes these inputs."""
    if impl == "aten":
        return True
    if impl == "cuda":  # the CUTLASS kernels, on CUDA tensors only (CPU: only when asked for, conv_functions)
        from .ops import conv_compiled
        return (x.device.type == "cuda" and conv_compiled.cutlass_built() and x.dim() == 4
                and x.dtype in conv_compiled.CUTLASS_DTYPES and weight.dtype == x.dtype)
    if impl != "triton":
        return False
    if x.dtype not in TRITON_CONV_DTYPES or weight.dtype != x.dtype or x.dim() != 4:
        return False
    if x.device.type == "cuda":
        return backends.backend_status("triton", x.device)[0]
    return x.device.type == "cpu" and backends.TRITON_INTERPRET


@functools.lru_cache(maxsize=None)
def conv_functions(impl: str, backend: str) -> SimpleNamespace:
    """fwd / dgrad / wgrad of a convolution implementation ("triton", "cuda", or "aten" with ``backend``'s
    BatchNorm kernels for its prologue and statistics), and dgrad_bn (dgrad with the prologue BatchNorm's ReLU
    mask and backward reduction in its epilogue) where the implementation has it (None otherwise). "cuda" is
    the compiled fwd, dgrad and wgrad (CUTLASS on CUDA, their C++ twins on CPU tensors)."""
    if impl == "triton":
        fwd = importlib.import_module("fused_resnet.kernels.conv_fwd")
        bwd = importlib.import_module("fused_resnet.kernels.conv_bwd")
        return SimpleNamespace(fwd=fwd.conv_fwd, dgrad=bwd.conv_dgrad, wgrad=bwd.conv_wgrad,
                               dgrad_bn=bwd.conv_dgrad_bn)
    if impl == "aten":
        ref = importlib.import_module("fused_resnet.reference")
        bn = _module(backend)
        return SimpleNamespace(fwd=functools.partial(ref.conv_fwd, bn=bn), dgrad=ref.conv_dgrad,
                               wgrad=functools.partial(ref.conv_wgrad, bn=bn), dgrad_bn=None)
    if impl == "cuda":
        ref = importlib.import_module("fused_resnet.reference")
        compiled = importlib.import_module("fused_resnet.ops.conv_compiled")
        bn = _module(backend)
        return SimpleNamespace(fwd=functools.partial(compiled.conv_fwd, bn=bn), dgrad=compiled.conv_dgrad,
                               wgrad=functools.partial(compiled.conv_wgrad, bn=bn), dgrad_bn=None)
    raise ValueError(f"unknown convolution implementation {impl!r}; choose from {', '.join(CONV_IMPLS)}")


def _env_conv_impl() -> Optional[str]:
    name = os.environ.get("FUSED_RESNET_CONV", "auto").strip().lower()
    return None if name in ("", "auto") else name


_conv_override: Optional[str] = _env_conv_impl()
_conv_cache: dict = {}


def set_conv_impl(name: Optional[str]) -> None:
    """Force the convolution implementation where it applies ("triton", "cuda" or "aten"), or None / "auto":
    choose per shape (measured on CUDA). "triton" and "cuda" still fall back to "aten" for inputs their
    kernels do not take."""
    global _conv_override
    if name is not None and name != "auto" and name not in CONV_IMPLS:
        raise ValueError(f"unknown convolution implementation {name!r}; choose from auto, {', '.join(CONV_IMPLS)}")
    _conv_override = None if name in (None, "auto") else name


def conv_choices() -> dict:
    """The per-shape choices made so far on CUDA: {shape key: implementation} (for benchmarks and reports)."""
    return dict(_conv_cache)


def conv_key(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int, prologue: bool,
             kind: str) -> tuple:
    return (kind, x.device.type, x.dtype, tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding),
            tuple(dilation), groups, prologue, x.is_contiguous(memory_format=torch.channels_last))


def _heuristic(x: torch.Tensor, weight: torch.Tensor, groups: int) -> str:
    """Before (or without) a measurement: Triton where its tensor-core tiles are not mostly padding."""
    c_g, k_g = weight.shape[1], weight.shape[0] // groups
    return "triton" if c_g >= 16 and k_g >= 16 else "aten"


def conv_choice(backend: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
                prologue: bool, kind: str, measure: Optional[Callable[[str], float]] = None) -> str:
    """The convolution implementation for one convolution: "triton" (fused kernels), "cuda" (compiled) or
    "aten".

    Triton's only with the triton backend and inputs its kernels take; the compiled one with the triton or
    cuda backend on CUDA tensors it takes (supports_conv). An override names one of these where it applies
    ("aten" otherwise). Then: under the interpreter (CPU tests), Triton; on CUDA, the fastest candidate by
    ``measure(impl) -> seconds``, measured once per shape key and cached ("cuda" a candidate only with
    CUDA_CONV_AUTO). Without a way to measure (``measure`` None: under torch.compile, for fake tensors) a
    cached choice or the heuristic."""
    available = []
    if backend == "triton" and supports_conv("triton", x, weight):
        available.append("triton")
    if backend in ("triton", "cuda") and supports_conv("cuda", x, weight):
        available.append("cuda")
    if _conv_override is not None:
        return _conv_override if _conv_override in available else "aten"
    candidates = [impl for impl in available if impl != "cuda" or CUDA_CONV_AUTO]
    if not candidates:
        return "aten"
    if x.device.type != "cuda":
        return "triton"
    key = conv_key(x, weight, stride, padding, dilation, groups, prologue, kind)
    choice = _conv_cache.get(key)
    if choice is not None:
        return choice
    if measure is None:
        return _heuristic(x, weight, groups) if "triton" in candidates else "aten"
    times = {impl: measure(impl) for impl in candidates + ["aten"]}
    choice = min(times, key=times.get)
    _conv_cache[key] = choice
    return choice
