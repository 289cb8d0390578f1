"""Backend selection, fallbacks and the messages users see when something is missing."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_resnet
from fused_resnet import BackendUnavailableError, backends


def _run(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_RESNET_BACKEND")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_import_without_compiled_extension_falls_back_with_a_message():
    result = _run("""
        import sys, warnings
        sys.modules["fused_resnet._C"] = None          # as if the extension was never built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fused_resnet
        messages = " ".join(str(w.message) for w in caught)
        assert "pip install --no-build-isolation -e ." in messages, messages
        import torch
        info = fused_resnet.build_info()
        assert info["extension"] is False and "eager" in info["available"]["cpu"]
        assert fused_resnet.backends.resolve(None, torch.device("cpu")) == "eager"
        bn = fused_resnet.BatchNormAct2d(4, fuse_relu=True)
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        bn(x).sum().backward()
        assert x.grad is not None
        try:
            fused_resnet.batch_norm_act(x, None, None, training=True, backend="cpu")
        except fused_resnet.BackendUnavailableError as exc:
            assert "not available" in str(exc) and "pip install" in str(exc), exc
            print("FALLBACK-OK")
    """)
    assert "FALLBACK-OK" in result.stdout, result.stderr


def test_triton_on_cpu_needs_the_interpreter():
    result = _run("""
        import torch, fused_resnet
        try:
            fused_resnet.batch_norm_act(torch.randn(2, 4, 3, 3), None, None, training=True, backend="triton")
        except fused_resnet.BackendUnavailableError as exc:
            assert "TRITON_INTERPRET=1" in str(exc) or "not installed" in str(exc), exc
            print("CLEAR-ERROR")
    """)
    assert "CLEAR-ERROR" in result.stdout, result.stderr


def test_environment_variable_selects_backend():
    result = _run("import fused_resnet; print(fused_resnet.get_backend())", FUSED_RESNET_BACKEND="eager")
    assert result.stdout.strip().endswith("eager"), result.stderr
    # An invalid value does not break the import (the command line must be able to report it in one line); the
    # first op that picks a backend automatically raises, naming it.
    bad = _run("import torch, fused_resnet; fused_resnet.BatchNormAct2d(4)(torch.randn(2, 4, 3, 3))",
               FUSED_RESNET_BACKEND="fastest")
    assert bad.returncode != 0 and "ValueError" in bad.stderr and "FUSED_RESNET_BACKEND='fastest'" in bad.stderr
    explicit = _run("import torch, fused_resnet; print(fused_resnet.BatchNormAct2d(4, backend='eager')"
                    "(torch.randn(2, 4, 3, 3)).shape)", FUSED_RESNET_BACKEND="fastest")
    assert explicit.returncode == 0, explicit.stderr


def test_set_backend_is_global_and_explicit():
    cpu = torch.device("cpu")
    try:
        fused_resnet.set_backend("eager")
        assert backends.resolve(None, cpu) == "eager"
        assert backends.resolve("cpu" if backends.extension_loaded() else "eager", cpu) != "triton"
        fused_resnet.set_backend("cuda")  # explicit: must not silently fall back on CPU tensors
        with pytest.raises(BackendUnavailableError, match="'cuda' backend runs CUDA tensors"):
            fused_resnet.BatchNormAct2d(4)(torch.randn(2, 4, 3, 3))
        with pytest.raises(ValueError, match="unknown backend"):
            fused_resnet.set_backend("tpu")
    finally:
        fused_resnet.set_backend(None)
    assert fused_resnet.get_backend() is None


def test_auto_prefers_compiled_cpu_kernels():
    expected = "cpu" if backends.extension_loaded() else "eager"
    assert backends.resolve(None, torch.device("cpu")) == expected
    assert backends.available_backends("cpu")[-1] == "eager"


def test_build_info_is_complete():
    info = fused_resnet.build_info()
    for key in ("torch", "extension", "extension_cuda_kernels", "triton_installed", "available", "default"):
        assert key in info
