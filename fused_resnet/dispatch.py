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
  cpu     BatchNorm: the compiled extension (csrc/cpu); convolutions: "aten", or "gemm" (conv_gemm.py: one
          im2col + GEMM) on the small maps where it is measured faster
  eager   everything in fused_resnet/reference.py
"aten" convolutions are ATen's (cuDNN on CUDA) with the backend's own BatchNorm kernels for the prologue and
the statistics (reference.conv_* with ``bn=`` that backend): today's path, and the fallback for every input
the Triton convolutions do not take (float64, other devices).

Which backend runs is fused_resnet.backends' business (explicit request, process-wide setting,
FUSED_RESNET_BACKEND, automatic order). Here: given that backend, which convolution implementation runs for
one convolution (``conv_choice``): on the triton backend Triton's fused kernels or "aten", on the cpu backend
"aten" or "gemm". Where there are two, the choice is made per shape by measuring both once (like
torch.backends.cudnn.benchmark) and cached; FUSED_RESNET_CONV=triton|cuda|aten|gemm|auto or ``set_conv_impl``
overrides it. The compiled "cuda" convolutions (CUTLASS, on the triton and cuda backends) are a candidate of
the measured choice only when CUDA_CONV_AUTO is set: they compile but have not yet been run on a GPU.
Nothing else in the package maps an op to a function.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import os
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from . import _layout, backends, conv_gemm

BN_OPS = ("bn_stats", "bn_finalize", "bn_act", "bn_backward_reduce", "bn_backward_elemt")
CONV_OPS = ("conv_fwd", "conv_dgrad", "conv_wgrad")
PROVIDES = {
    "triton": BN_OPS + CONV_OPS,
    "cuda": BN_OPS,
    "cpu": BN_OPS,
    "eager": BN_OPS + CONV_OPS,
}
CONV_IMPLS = ("triton", "cuda", "aten", "gemm")
# Whether the measured per-shape choice includes the compiled "cuda" convolutions. Off until their GPU parity
# tests have passed (they have only been compile-checked); set_conv_impl("cuda") uses them regardless.
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
    """fwd / dgrad / wgrad of a convolution implementation ("triton", "cuda": the compiled ones, CUTLASS on
    CUDA and their C++ twins on CPU tensors, "gemm", or "aten" with ``backend``'s BatchNorm kernels for its
    prologue and statistics); dgrad_bn (dgrad with the prologue BatchNorm's ReLU mask and
    backward reduction in its epilogue) and backward (dgrad and wgrad from one call) where the implementation
    has them (None otherwise); dgrad_bn_takes(grad_out, weight, x, mean, stride, dilation, groups): whether
    dgrad_bn computes that call in one kernel (else the caller runs dgrad, then the BatchNorm backward)."""
    if impl == "triton":
        fwd = importlib.import_module("fused_resnet.kernels.conv_fwd")
        bwd = importlib.import_module("fused_resnet.kernels.conv_bwd")
        return SimpleNamespace(fwd=fwd.conv_fwd, dgrad=bwd.conv_dgrad, wgrad=bwd.conv_wgrad,
                               dgrad_bn=bwd.conv_dgrad_bn, dgrad_bn_takes=_takes_every_call, backward=None)
    if impl == "aten":
        ref = importlib.import_module("fused_resnet.reference")
        bn = _module(backend)
        return SimpleNamespace(fwd=functools.partial(ref.conv_fwd, bn=bn), dgrad=ref.conv_dgrad,
                               wgrad=functools.partial(ref.conv_wgrad, bn=bn), dgrad_bn=None, dgrad_bn_takes=None,
                               backward=functools.partial(ref.conv_backward, bn=bn))
    if impl == "cuda":
        compiled = importlib.import_module("fused_resnet.ops.conv_compiled")
        bn = _module(backend)
        return SimpleNamespace(fwd=functools.partial(compiled.conv_fwd, bn=bn), dgrad=compiled.conv_dgrad,
                               wgrad=functools.partial(compiled.conv_wgrad, bn=bn),
                               dgrad_bn=functools.partial(compiled.conv_dgrad_bn, bn=bn),
                               dgrad_bn_takes=compiled.dgrad_bn_takes, backward=None)
    if impl == "gemm":
        bn = _module(backend)
        return SimpleNamespace(fwd=functools.partial(conv_gemm.conv_fwd, bn=bn), dgrad=conv_gemm.conv_dgrad,
                               wgrad=functools.partial(conv_gemm.conv_wgrad, bn=bn), dgrad_bn=None,
                               dgrad_bn_takes=None, backward=functools.partial(conv_gemm.conv_backward, bn=bn))
    raise ValueError(f"unknown convolution implementation {impl!r}; choose from {', '.join(CONV_IMPLS)}")


def _takes_every_call(*args) -> bool:
    return True


def _env_conv_impl() -> Optional[str]:
    name = os.environ.get("FUSED_RESNET_CONV", "auto").strip().lower()
    return None if name in ("", "auto") else name


_conv_override: Optional[str] = _env_conv_impl()
_conv_cache: dict = {}


def set_conv_impl(name: Optional[str]) -> None:
    """Force the convolution implementation where it applies ("triton", "cuda", "aten" or "gemm"), or None /
    "auto": choose per shape (measured). A forced implementation that does not take an input (Triton's
    kernels off the triton backend or outside their dtypes, "cuda" without the CUTLASS build or off CUDA
    tensors, "gemm" off the cpu backend or beyond its sizes) falls back to "aten" there."""
    global _conv_override
    if name is not None and name != "auto" and name not in CONV_IMPLS:
        raise ValueError(f"unknown convolution implementation {name!r}; choose from auto, {', '.join(CONV_IMPLS)}")
    _conv_override = None if name in (None, "auto") else name


# What conv_setting takes: an implementation forced, "auto" (dispatch's measured choice as it stands:
# CUDA_CONV_AUTO decides whether the compiled "cuda" convolutions are among its candidates) or "auto+cuda" (the
# measured choice with them among the candidates: how the benchmarks measure the per-shape selection before
# CUDA_CONV_AUTO is turned on).
CONV_SETTINGS = ("auto", "auto+cuda", *CONV_IMPLS)


@contextlib.contextmanager
def conv_setting(name: str):
    """Run the block with convolution setting ``name`` (CONV_SETTINGS), then restore what was set before:
    lets one process measure several settings side by side (fused-resnet bench's ``fused-<backend>:conv=...``
    variants, interleaved step by step). Per-shape choices measured under "auto" and "auto+cuda" are cached
    apart (their candidates differ)."""
    global _conv_override, CUDA_CONV_AUTO
    if name not in CONV_SETTINGS:
        raise ValueError(f"unknown convolution setting {name!r}; choose from {', '.join(CONV_SETTINGS)}")
    saved = _conv_override, CUDA_CONV_AUTO
    _conv_override = None if name.startswith("auto") else name
    CUDA_CONV_AUTO = CUDA_CONV_AUTO or name == "auto+cuda"
    try:
        yield
    finally:
        _conv_override, CUDA_CONV_AUTO = saved


def conv_choices() -> dict:
    """The per-shape choices measured so far: {shape key: implementation} (for benchmarks and reports)."""
    return dict(_conv_cache)


def conv_key(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int, prologue: bool,
             kind: str) -> tuple:
    return (kind, x.device.type, x.dtype, tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding),
            tuple(dilation), groups, prologue, x.is_contiguous(memory_format=torch.channels_last))


def _heuristic(x: torch.Tensor, weight: torch.Tensor, groups: int) -> str:
    """Before (or without) a measurement: Triton where its tensor-core tiles are not mostly padding."""
    c_g, k_g = weight.shape[1], weight.shape[0] // groups
    return "triton" if c_g >= 16 and k_g >= 16 else "aten"


def _triton_indexing_fits(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> bool:
    """The Triton convolutions' int32 indexing (_layout.int32_indexing_fits) for x, its output and their
    gradients (dense)."""
    n, _, h, w = x.shape
    ho, wo = _layout.conv_output_size(h, w, weight.shape[2], weight.shape[3], stride, padding, dilation)
    k = weight.shape[0]
    return _layout.int32_indexing_fits(n * max(h * w, ho * wo), (x.shape, x.stride()),
                                       ((n, k, ho, wo), (k * ho * wo, ho * wo, wo, 1)))


def conv_candidates(backend: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                    groups: int) -> tuple[str, ...]:
    """The convolution implementations that may run this convolution on ``backend``, "aten" always among
    them: Triton's fused kernels on the triton backend where they take the inputs; the compiled "cuda"
    convolutions on the triton and cuda backends for CUDA tensors they take; on the cpu backend the im2col +
    GEMM convolution where it applies (conv_gemm.applies: small CPU maps)."""
    if backend == "cpu" and conv_gemm.applies(x, weight, stride, padding, dilation, groups):
        return ("aten", "gemm")
    triton_ok = (backend == "triton" and supports_conv("triton", x, weight)
                 and _triton_indexing_fits(x, weight, stride, padding, dilation))
    out = ("triton", "aten") if triton_ok else ("aten",)
    if backend in ("triton", "cuda") and supports_conv("cuda", x, weight):
        out += ("cuda",)
    return out


_conv_records: list = []


@contextlib.contextmanager
def recording_conv_choices():
    """A Counter, {implementation: calls}, of the convolution choices made while the block runs (in every
    thread; under torch.compile the choices made while tracing): what a benchmark reports as having run.
    "cuda" counts the calls sent to the compiled convolutions, which run ATen where CUTLASS does not take
    the call (ops/conv_compiled.cutlass_takes)."""
    counts: collections.Counter = collections.Counter()
    _conv_records.append(counts)
    try:
        yield counts
    finally:
        _conv_records.remove(counts)


def conv_choice(backend: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
                prologue: bool, kind: str, measure: Optional[Callable[[str], float]] = None) -> str:
    """The convolution implementation for one convolution, among ``conv_candidates``.

    The override if any (when a candidate; else "aten"); under the interpreter (CPU tests of the triton
    backend), Triton; otherwise the faster candidate by ``measure(impl) -> seconds``, measured once per shape
    key and cached. Without a way to measure (``measure`` None: under torch.compile, for fake tensors) a
    cached choice or the heuristic."""
    choice = _conv_choice(backend, x, weight, stride, padding, dilation, groups, prologue, kind, measure)
    for counts in _conv_records:
        counts[choice] += 1
    return choice


def _conv_choice(backend: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
                 prologue: bool, kind: str, measure: Optional[Callable[[str], float]]) -> str:
    candidates = conv_candidates(backend, x, weight, stride, padding, dilation, groups)
    if _conv_override is not None:
        return _conv_override if _conv_override in candidates else "aten"
    # "cuda" only when forced (above) until CUDA_CONV_AUTO: it has not been validated on a GPU yet.
    candidates = tuple(c for c in candidates if c != "cuda" or CUDA_CONV_AUTO)
    if len(candidates) == 1:
        return candidates[0]
    if "triton" in candidates and x.device.type != "cuda":
        return "triton"
    key = conv_key(x, weight, stride, padding, dilation, groups, prologue, kind) + (candidates,)
    choice = _conv_cache.get(key)
    if choice is not None:
        return choice
    if measure is None:
        return _heuristic(x, weight, groups) if "triton" in candidates else "aten"
    times = {impl: measure(impl) for impl in candidates}
    choice = min(times, key=times.get)
    _conv_cache[key] = choice
    return choice
