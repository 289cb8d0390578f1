"""Build-level checks that need no GPU: every CUDA source compiles for sm_90, and the build switches fail
clearly. (Running the CUDA kernels is checked by the parity tests on a CUDA machine.)"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


@pytest.mark.skipif(not _nvcc_available(), reason="nvcc (CUDA toolkit) not installed on this machine")
def test_cuda_sources_compile_for_sm90():
    """nvcc compiles every csrc/cuda/*.cu for sm_90 and g++ type-checks the torch bindings."""
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_cuda_compile.sh")], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"CUDA compile check failed:\n{result.stdout}\n{result.stderr}"
    assert "check_cuda_compile: OK" in result.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_forcing_cuda_with_cpu_torch_fails_clearly():
    env = {**os.environ, "FUSED_RESNET_CUDA": "1"}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode != 0
    assert "FUSED_RESNET_CUDA=1 but" in result.stderr and "CPU build" in result.stderr


def test_bad_cuda_switch_is_rejected():
    env = {**os.environ, "FUSED_RESNET_CUDA": "maybe"}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode != 0 and "must be auto, 0 or 1" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# The CUTLASS switch (FUSED_RESNET_CUTLASS) and the header lookup, through setup.py's own functions.

def _setup_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fused_resnet_setup_under_test", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only under __main__
    return module


def _found():
    return "/opt/cutlass/include", "CUTLASS 4.2.0.0 headers in /opt/cutlass/include"


def _missing():
    return None, "the nvidia-cutlass wheel is not installed (pip install nvidia-cutlass==4.2.0.0)"


@pytest.mark.parametrize("mode, with_cuda, find, expected", [
    ("auto", True, _found, (True, "/opt/cutlass/include")),
    ("auto", True, _missing, (False, None)),
    ("auto", False, _found, (False, None)),
    ("0", True, _found, (False, None)),
    ("0", False, _missing, (False, None)),
    ("1", True, _found, (True, "/opt/cutlass/include")),
    (" AUTO ", True, _found, (True, "/opt/cutlass/include")),
])
def test_cutlass_switch_decides(monkeypatch, mode, with_cuda, find, expected):
    setup_py = _setup_module()
    monkeypatch.setenv("FUSED_RESNET_CUTLASS", mode)
    build, include, why = setup_py.cutlass_build_decision(with_cuda, find=find)
    assert (build, include) == expected
    assert why


@pytest.mark.parametrize("with_cuda, find, message", [
    (True, _missing, "FUSED_RESNET_CUTLASS=1 but the nvidia-cutlass wheel is not installed"),
    (False, _found, "FUSED_RESNET_CUTLASS=1 but the CUDA kernels are not being built"),
])
def test_forcing_cutlass_fails_clearly(monkeypatch, with_cuda, find, message):
    setup_py = _setup_module()
    monkeypatch.setenv("FUSED_RESNET_CUTLASS", "1")
    with pytest.raises(SystemExit) as info:
        setup_py.cutlass_build_decision(with_cuda, find=find)
    assert message in str(info.value)


def test_cutlass_include_lookup(monkeypatch):
    """The installed wheel at the pinned version gives its include dir; a missing wheel or another version
    gives None and a reason that names the pin."""
    import importlib.metadata
    setup_py = _setup_module()
    include, why = setup_py.cutlass_include()
    try:
        installed = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == setup_py.CUTLASS_VERSION:
        assert include is not None and os.path.isfile(os.path.join(include, setup_py.CUTLASS_PROBE)), why
    else:
        assert include is None and setup_py.CUTLASS_VERSION in why

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    include, why = setup_py.cutlass_include()
    assert include is None and "not installed" in why and setup_py.CUTLASS_VERSION in why
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.5.1")
    include, why = setup_py.cutlass_include()
    assert include is None and "3.5.1" in why and setup_py.CUTLASS_VERSION in why


def test_bad_cutlass_switch_is_rejected():
    env = {**os.environ, "FUSED_RESNET_CUTLASS": "maybe"}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode != 0 and "FUSED_RESNET_CUTLASS must be auto, 0 or 1" in result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_cpu_build_skips_cutlass_and_forcing_it_fails():
    """With a CPU torch the CUTLASS part is off under auto (the CPU build is unchanged) and forcing it fails
    with a message naming the reason."""
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "FUSED_RESNET_CUTLASS": "auto"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "building CUTLASS convolutions: False (no CUDA build)" in result.stderr
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "FUSED_RESNET_CUTLASS": "1"}, timeout=300)
    assert result.returncode != 0
    assert "FUSED_RESNET_CUTLASS=1 but the CUDA kernels are not being built" in result.stderr
