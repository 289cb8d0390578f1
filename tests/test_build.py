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
