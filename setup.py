"""Builds one extension, fused_resnet._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit
and a CUDA-enabled torch are present (decided on CUDA_HOME / torch.version.cuda, never on a visible GPU).

Environment switches:
  FUSED_RESNET_CUDA=auto|0|1   auto (default): build CUDA when possible; 0: never; 1: require it (error if
                               the toolkit or a CUDA torch is missing).
  FUSED_RESNET_CUTLASS=auto|0|1
                               the CUTLASS fused convolutions (csrc/cuda/conv/, part of the CUDA build). auto
                               (default): build them when the CUDA kernels are built and the CUTLASS headers of
                               the nvidia-cutlass wheel (pinned: CUTLASS_VERSION) are installed; 0: never;
                               1: require them (error if the CUDA build is off or the headers are missing).
  MAX_JOBS                     parallel compile jobs; defaults to half the cores, capped by memory (nvcc
                               needs ~2-3 GB per job), so a 2-core machine compiles one file at a time.
  TORCH_CUDA_ARCH_LIST         CUDA targets; defaults to the visible GPU, else "8.0;9.0".

A compiled torch extension loads only with the torch it was compiled against, so the build must see the
installed torch (build without isolation: `pip install --no-build-isolation ".[cli]"`), the wheel's metadata
pins that torch (`torch==X.Y.Z`, its public version), and the build writes fused_resnet/_torch_build.py beside
_C, which fused_resnet.backends compares with the running torch before loading _C.
"""
import glob
import os
import re
import shutil
import sys

import setuptools
from setuptools import setup

# pyproject.toml's SPDX `license = "BSD-3-Clause"` needs setuptools 77; an isolated build gets it from
# [build-system], a build without isolation (the one that works, see below) uses the installed setuptools.
# (scripts/gpu_session.sh, on a machine with an older setuptools and no registry, rewrites its copy of
# pyproject.toml to the pre-SPDX `license = { text = ... }` table, which older setuptools read.)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml")) as _f:
    _SPDX_LICENSE = re.search(r'^license\s*=\s*"', _f.read(), re.M) is not None
if _SPDX_LICENSE and int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"fused_resnet: the build needs setuptools>=77 (installed: {setuptools.__version__}): "
             "pip install 'setuptools>=77'")

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # build-environment guard (tests/test_packaging.py runs it)
    sys.exit(
        f"fused_resnet: the build cannot import torch ({exc}).\n"
        "The extension is compiled against the installed torch, so the build must see it. If torch is installed,\n"
        "the likely cause is build isolation (the default of pip and `python -m build`: the build runs in a fresh\n"
        "environment without your packages). Build without it:\n"
        "  pip install --no-build-isolation \".[cli]\"    # or, for development: pip install --no-build-isolation -e .\n"
        "  python -m build --no-isolation               # sdist and wheel\n"
        "If torch is not installed, install it first:\n"
        "  pip install torch==2.13.0                    # CPU machine; a GPU machine keeps its CUDA torch"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_RECORD = "_torch_build.py"


def torch_requirement(torch_version: str) -> str:
    """The wheel's torch requirement: the public part of the torch version the build compiles against
    (``2.11.0+cu128`` -> ``torch==2.11.0``). PEP 440 matches ``==2.11.0`` with any local label, so the pin
    accepts that release's CPU and CUDA builds alike (the same C++ API); fused_resnet.backends compares the
    release again at import and names both versions if _C still fails to load."""
    return "torch==" + str(torch_version).split("+", 1)[0]


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8
    return str(max(1, min(cores // 2, int(mem_gib // 3))))


def _find_cuda_toolkit():
    """The CUDA toolkit root, looked up independently of torch (whose CUDA_HOME is None on a CPU build)."""
    if CUDA_HOME is not None:
        return CUDA_HOME
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _cuda_build_decision():
    mode = os.environ.get("FUSED_RESNET_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"fused_resnet: FUSED_RESNET_CUDA must be auto, 0 or 1, got {mode!r}")
    missing = []
    if _find_cuda_toolkit() is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU build")
    if mode == "0":
        return False, "FUSED_RESNET_CUDA=0"
    if mode == "1" and missing:
        sys.exit("fused_resnet: FUSED_RESNET_CUDA=1 but " + "; ".join(missing))
    return not missing, "; ".join(missing) or "toolkit and CUDA torch found"


# The CUTLASS release whose headers the convolutions are written and compile-checked against (the wheel
# ships them under cutlass_library/source/include). Another release is not used: CUTLASS 2.x's conv
# fusion headers are not a stable API.
CUTLASS_VERSION = "4.2.0.0"
CUTLASS_PROBE = os.path.join("cutlass", "conv", "kernel", "default_conv2d_fprop_fusion.h")


def cutlass_include():
    """(the CUTLASS include directory of the installed nvidia-cutlass wheel, or None; why not). Found like
    pybind11.get_include(): from the installed package, without importing it (cutlass_library's __init__
    imports its Python generator, which the build does not need)."""
    import importlib.metadata
    import importlib.util
    try:
        version = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        return None, f"the nvidia-cutlass wheel is not installed (pip install nvidia-cutlass=={CUTLASS_VERSION})"
    if version != CUTLASS_VERSION:
        return None, (f"nvidia-cutlass {version} is installed, fused_resnet's convolutions are written for "
                      f"{CUTLASS_VERSION} (pip install nvidia-cutlass=={CUTLASS_VERSION})")
    spec = importlib.util.find_spec("cutlass_library")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        include = os.path.join(location, "source", "include")
        if os.path.exists(os.path.join(include, CUTLASS_PROBE)):
            return include, f"CUTLASS {version} headers in {include}"
    return None, f"nvidia-cutlass {version} is installed but has no {CUTLASS_PROBE} (a broken install?)"


def cutlass_build_decision(with_cuda: bool, find=cutlass_include):
    """(build the CUTLASS convolutions, include dir or None, why) from FUSED_RESNET_CUTLASS; exits on a bad
    value or on FUSED_RESNET_CUTLASS=1 when they cannot be built."""
    mode = os.environ.get("FUSED_RESNET_CUTLASS", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"fused_resnet: FUSED_RESNET_CUTLASS must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, None, "FUSED_RESNET_CUTLASS=0"
    if not with_cuda:
        if mode == "1":
            sys.exit("fused_resnet: FUSED_RESNET_CUTLASS=1 but the CUDA kernels are not being built (the CUTLASS "
                     "convolutions are part of the CUDA build; see the FUSED_RESNET_CUDA message above)")
        return False, None, "no CUDA build"
    include, reason = find()
    if include is None and mode == "1":
        sys.exit(f"fused_resnet: FUSED_RESNET_CUTLASS=1 but {reason}")
    return include is not None, include, reason


def _extension():
    with_cuda, reason = _cuda_build_decision()
    with_cutlass, cutlass_inc, cutlass_reason = cutlass_build_decision(with_cuda)
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    print(f"fused_resnet: building CUDA kernels: {with_cuda} ({reason})", file=sys.stderr)
    print(f"fused_resnet: building CUTLASS convolutions: {with_cutlass} ({cutlass_reason})", file=sys.stderr)
    if not with_cuda:
        return CppExtension(
            "fused_resnet._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    defines = ["-DFUSED_RESNET_WITH_CUDA"]
    nvcc_flags = ["-O3", "-lineinfo"]
    if with_cutlass:
        # One .cu per CUTLASS instantiation (csrc/cuda/conv/), so that MAX_JOBS compiles them in parallel.
        # -isystem: CUTLASS's own headers warn under -Wall; --expt-relaxed-constexpr: they call constexpr
        # host functions from host-device code.
        sources += sorted(glob.glob("csrc/cuda/conv/*.cu")) + sorted(glob.glob("csrc/cuda/conv/*.cpp"))
        defines.append("-DFUSED_RESNET_WITH_CUTLASS")
        nvcc_flags += ["-isystem", cutlass_inc, "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "fused_resnet._C", sources, include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx_flags + defines,
            "nvcc": nvcc_flags + defines,
        },
        extra_link_args=["-fopenmp"],
    )


class BuildExtensionRecordingTorch(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, which also writes fused_resnet/_torch_build.py wherever _C goes: the build
    directory (what a wheel packs) and, for in-place and editable builds, the source package."""

    def run(self):
        super().run()
        targets = {os.path.join(self.build_lib, "fused_resnet")}
        if self.inplace:  # setuptools builds into build_lib, then copies _C into the source package
            targets.add(os.path.abspath(self.get_finalized_command("build_py").get_package_dir("fused_resnet")))
        for target in targets:
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, TORCH_RECORD), "w") as f:
                f.write("# Written by setup.py when it compiled fused_resnet._C (not tracked): the torch it was compiled\n"
                        "# against. fused_resnet.backends loads _C only when the running torch has this version.\n"
                        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
                        f"TORCH_CUDA = {torch.version.cuda!r}\n")


if __name__ == "__main__":  # pip, `python -m build` and `python setup.py` all run it as __main__
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    setup(
        ext_modules=[_extension()],
        install_requires=[torch_requirement(torch.__version__), "numpy"],
        cmdclass={"build_ext": BuildExtensionRecordingTorch},
    )
