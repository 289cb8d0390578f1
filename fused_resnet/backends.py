"""Which backend runs: what each can run here, and which one was asked for. (Which function computes an op for
that backend is fused_resnet.dispatch's job.)

  triton  Triton kernels (fused_resnet/kernels). CUDA tensors; CPU tensors only under TRITON_INTERPRET=1.
  cuda    CUDA C++ kernels of the compiled extension fused_resnet._C (csrc/cuda). CUDA tensors.
  cpu     C++ CPU kernels of the compiled extension (csrc/cpu). CPU tensors.
  eager   plain PyTorch ops (fused_resnet/reference.py). Any device, always available: the last fallback.

A backend asked for explicitly (argument, module option, ``set_backend`` or the FUSED_RESNET_BACKEND
environment variable) that cannot run raises ``BackendUnavailableError`` saying why. With no request, the
first available one in ``AUTO_ORDER`` runs; when that is ``eager`` on CUDA (no fused kernel can run there), a
warning says why, once per process. Availability is computed once at import, so resolving a backend is plain
dictionary work that torch.compile traces without graph breaks.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import sys
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpu", "eager")

# Preference when no backend is requested. On CUDA, Triton goes first until benchmarks/RESULTS.md says
# otherwise: both GPU paths are provisional until measured on the device.
AUTO_ORDER = {"cuda": ("triton", "cuda", "eager"), "cpu": ("cpu", "eager")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or for these tensors."""


def _source_root() -> str | None:
    """The source checkout this package runs from (an editable install), or None (an installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return root
    return None


def rebuild_command() -> str:
    """The command that compiles fused_resnet._C against the running torch. An installed wheel is rebuilt from
    source: pip's cache would hand back the wheel built against the old torch, hence --no-cache-dir."""
    root = _source_root()
    if root is not None:
        return f"cd {shlex.quote(root)} && pip install --no-build-isolation -e ."
    return "pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps SOURCE"


def _rebuild_hint() -> str:
    hint = f"`{rebuild_command()}`"
    if _source_root() is None:
        hint += " (SOURCE: a fused_resnet source checkout or its sdist .tar.gz)"
    return hint


def _recorded_torch() -> str | None:
    """The torch version fused_resnet._C was compiled against (fused_resnet/_torch_build.py, written by the
    build beside _C), or None when the build left no record (a build older than the record)."""
    try:
        from ._torch_build import TORCH_VERSION
    except ImportError:
        return None
    return str(TORCH_VERSION)


def torch_mismatch(built: str | None, running: str) -> str | None:
    """Why _C must not be loaded under this torch, or None. Releases are compared (the public version,
    ``2.13.0`` of ``2.13.0+cpu``): a C++ extension binds to one release's C++ symbols and loading it under
    another fails with an undefined symbol at best. Local labels (+cpu, +cu128) share the C++ API."""
    if built is None or built.split("+", 1)[0] == str(running).split("+", 1)[0]:
        return None
    return (f"fused_resnet._C was compiled against torch {built} but torch {running} is installed (a compiled "
            f"extension runs only with the torch it was built against); rebuild it: {_rebuild_hint()}")


def _probe_extension() -> tuple[bool, str, bool]:
    """(loaded, reason if not, has CUDA kernels). _C is not loaded at all under another torch release."""
    built = _recorded_torch()
    mismatch = torch_mismatch(built, torch.__version__)
    if mismatch is not None:
        return False, mismatch, False
    try:
        importlib.import_module("fused_resnet._C")
    except ImportError as exc:
        versions = f", compiled against torch {built}, running torch {torch.__version__}" if built else ""
        cause = ("an undefined symbol means it was compiled against another torch; "
                 if "undefined symbol" in str(exc) else "")
        return False, (f"the compiled extension fused_resnet._C is not available ({exc}{versions}); {cause}"
                       f"(re)build it against this torch: {_rebuild_hint()}"), False
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet_C::bn_act", "CUDA")
    return True, "", has_cuda


_EXT_OK, _EXT_REASON, _EXT_HAS_CUDA = _probe_extension()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CUDA_AVAILABLE = torch.cuda.is_available()


def extension_loaded() -> bool:
    """Whether the compiled extension fused_resnet._C imported (its ops are then registered)."""
    return _EXT_OK


def _status(backend: str, device_type: str) -> tuple[bool, str]:
    if backend == "eager":
        return True, ""
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the 'cpu' backend runs CPU tensors, these are on {device_type}"
        return _EXT_OK, _EXT_REASON
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the 'cuda' backend runs CUDA tensors, these are on {device_type}"
        if not _EXT_OK:
            return False, _EXT_REASON
        if not _EXT_HAS_CUDA:
            return False, ("fused_resnet._C was built without CUDA kernels (no CUDA toolkit or a CPU torch at "
                           "build time); rebuild on a CUDA machine, FUSED_RESNET_CUDA=1 forces it")
        return True, ""
    if backend == "triton":
        if not _TRITON_INSTALLED:
            return False, "triton is not installed (pip install triton)"
        if device_type == "cuda":
            return (_CUDA_AVAILABLE, "" if _CUDA_AVAILABLE else "CUDA is not available")
        if device_type == "cpu":
            if TRITON_INTERPRET:
                return True, ""
            return False, "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1)"
        return False, f"Triton does not run {device_type} tensors"
    return False, f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}"


_STATUS = {(b, d): _status(b, d) for b in BACKENDS for d in ("cpu", "cuda")}


def backend_status(backend: str, device: torch.device | str) -> tuple[bool, str]:
    """(available, reason if not) of ``backend`` for tensors on ``device``."""
    device_type = torch.device(device).type
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return _STATUS.get((backend, device_type)) or _status(backend, device_type)


def available_backends(device: torch.device | str) -> list[str]:
    return [b for b in BACKENDS if backend_status(b, device)[0]]


def _env_backend() -> tuple[str | None, str | None]:
    """(backend requested by FUSED_RESNET_BACKEND, or None; the error message when its value is invalid)."""
    raw = os.environ.get("FUSED_RESNET_BACKEND", "")
    name = raw.strip().lower() or None
    if name is not None and name != "auto" and name not in BACKENDS:
        return None, f"FUSED_RESNET_BACKEND={raw!r} is not one of auto, {', '.join(BACKENDS)}"
    return (None if name == "auto" else name), None


# An invalid environment value does not stop the import (a traceback at import breaks every tool that imports
# the package, the command line's one-line errors included); the first op that resolves a backend raises it.
_default_backend, _env_error = _env_backend()


def environment_error() -> str | None:
    """Why FUSED_RESNET_BACKEND is invalid, or None (it is valid, unset, or overridden by set_backend)."""
    return _env_error


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``None`` or ``"auto"``: the fastest available per device). It overrides
    FUSED_RESNET_BACKEND."""
    global _default_backend, _env_error
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    _default_backend = None if name == "auto" else name
    _env_error = None


def get_backend() -> str | None:
    """The process-wide backend request (``None``: automatic)."""
    return _default_backend


def _automatic(device_type: str) -> str:
    for candidate in AUTO_ORDER.get(device_type, ("eager",)):
        if _STATUS.get((candidate, device_type), (False, ""))[0]:
            return candidate
    return "eager"


_warned_auto_eager = False


def _warn_auto_eager() -> None:
    """Once per process: automatic selection runs plain PyTorch ops on CUDA tensors, and why."""
    global _warned_auto_eager
    if _warned_auto_eager or torch.compiler.is_compiling():
        return
    _warned_auto_eager = True
    reasons = "; ".join(f"{b}: {_STATUS.get((b, 'cuda'), (False, '?'))[1]}" for b in AUTO_ORDER["cuda"] if b != "eager")
    warnings.warn(f"fused_resnet: no fused backend can run CUDA tensors here, so automatic selection runs the "
                  f"'eager' backend (plain PyTorch ops, nothing fused) ({reasons}). Ask for backend='eager' "
                  "(or FUSED_RESNET_BACKEND=eager) to silence this.", RuntimeWarning, stacklevel=3)


def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``: ``backend``, else the global request, else auto.
    Meta tensors carry only shapes and dtypes: every request runs the eager ops there (shape inference)."""
    if backend is None and _env_error is not None:
        raise ValueError(f"fused_resnet: {_env_error}")
    if device.type == "meta":
        return "eager"
    name = backend if backend is not None else _default_backend
    if name is None or name == "auto":
        chosen = _automatic(device.type)
        if chosen == "eager" and device.type == "cuda":
            _warn_auto_eager()
        return chosen
    ok, reason = backend_status(name, device)
    if not ok:
        raise BackendUnavailableError(f"fused_resnet backend {name!r} is not available: {reason}")
    return name


def describe(backend: str | None, device: torch.device | str) -> str:
    """``backend`` (a module's option) and what runs for tensors on ``device``, for module reprs:
    "cpu" (asked for), "auto->triton" (chosen automatically), "global->eager" (set_backend or
    FUSED_RESNET_BACKEND), with the reason when it cannot run there."""
    device = torch.device(device)
    def named(name: str, label: str) -> str:
        ok, reason = backend_status(name, device) if name in BACKENDS else (False, "unknown backend")
        return label if ok or device.type == "meta" else f"{label} (unavailable on {device.type}: {reason})"

    if backend is not None and backend != "auto":
        return named(backend, backend)
    if _env_error is not None:
        return f"auto (invalid FUSED_RESNET_BACKEND: {os.environ.get('FUSED_RESNET_BACKEND', '')!r})"
    if _default_backend is not None:
        return named(_default_backend, f"global->{_default_backend}")
    return f"auto->{'eager' if device.type == 'meta' else _automatic(device.type)}"


def build_info() -> dict:
    """What this installation can run, for bug reports and the CLI. ``resolved``: the backend that runs for
    tensors of each device type when none is asked for (None: that device type is absent, or
    FUSED_RESNET_BACKEND is invalid, or the process-wide choice cannot run there)."""
    resolved = {}
    for d in ("cpu", "cuda"):
        name = _default_backend
        if _env_error is not None or (d == "cuda" and not _CUDA_AVAILABLE):
            resolved[d] = None
        elif name is None:
            resolved[d] = _automatic(d)
        else:
            resolved[d] = name if backend_status(name, d)[0] else None
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": _CUDA_AVAILABLE,
        "extension": _EXT_OK,
        "extension_error": _EXT_REASON or None,
        "extension_cuda_kernels": _EXT_HAS_CUDA,
        # The CUTLASS convolutions (csrc/cuda/conv/, setup.py FUSED_RESNET_CUTLASS): dispatch's conv impl "cuda".
        "extension_cutlass_convolutions": bool(_EXT_OK and getattr(sys.modules.get("fused_resnet._C"),
                                                                   "WITH_CUTLASS", False)),
        "extension_built_with_torch": _recorded_torch(),
        "triton_installed": _TRITON_INSTALLED,
        "triton_interpret": TRITON_INTERPRET,
        "available": {d: available_backends(d) for d in ("cpu", "cuda")},
        "default": _default_backend or "auto",
        "resolved": resolved,
        "environment_error": _env_error,
    }
