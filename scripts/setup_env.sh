#!/usr/bin/env bash
# Idempotent environment setup, sourced by scripts/demo.sh and scripts/test.sh:
#   - torch: kept if importable (a GPU machine keeps its CUDA build); else the CPU pin torch==2.13.0
#     (an unpinned torch pulls the multi-GB CUDA build);
#   - the other dependencies, only those missing;
#   - fused_resnet._C, built without build isolation (the build must see the installed torch), and only
#     when it is missing, older than its sources or compiled against another torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi

missing=$("$PYTHON" - <<'PY'
import importlib.util
wanted = {"numpy": "numpy", "triton": "triton", "ninja": "ninja", "pybind11": "pybind11",
          "pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "wheel": "wheel",
          "build.__main__": "build"}
# build: scripts/check_package.sh makes the sdist and the wheel with it (build.__main__, since the setuptools
# output folder ./build would pass for a namespace package named build).
def absent(mod):
    try:
        return importlib.util.find_spec(mod) is None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return True
missing = [pkg for mod, pkg in wanted.items() if absent(mod)]
# Without build isolation the build uses the installed setuptools: pyproject.toml's SPDX license needs >= 77.
import setuptools
if int(setuptools.__version__.split(".")[0]) < 77:
    missing.append("setuptools>=77")
print(" ".join(missing))
PY
)
if [ -n "$missing" ]; then
  echo "[setup] installing: $missing"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install --quiet --upgrade $missing
fi

# The CLI's charts and its default training dataset (README says why these two). Optional: without them the
# CLI writes its JSON and says what is missing, so a machine with no package registry still works.
optional=$("$PYTHON" -c "
import importlib.util
print(' '.join(p for m, p in {'matplotlib': 'matplotlib', 'sklearn': 'scikit-learn'}.items()
               if importlib.util.find_spec(m) is None))")
if [ -n "$optional" ]; then
  echo "[setup] installing (optional, for the CLI): $optional"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install --quiet $optional || echo "[setup] warning: could not install $optional; charts or the default dataset will be unavailable"
fi

# The CUTLASS headers of the CUDA fused convolutions (csrc/cuda/conv/), at setup.py's pinned CUTLASS_VERSION.
# Optional: without them the CUDA build skips those convolutions (FUSED_RESNET_CUTLASS=auto) and
# scripts/check_cuda_compile.sh says so, so a machine with no package registry still sets up. --no-deps: the
# build needs only the headers, not the wheel's Python generator and its dependencies (cuda-python, ...).
cutlass_pin="$(sed -n 's/^CUTLASS_VERSION = "\(.*\)"$/\1/p' setup.py)"
if [ -n "$cutlass_pin" ] && ! "$PYTHON" -c "
import importlib.metadata, sys
try:
    sys.exit(importlib.metadata.version('nvidia-cutlass') != sys.argv[1])
except importlib.metadata.PackageNotFoundError:
    sys.exit(1)" "$cutlass_pin" 2>/dev/null; then
  echo "[setup] installing (optional, CUTLASS headers for the CUDA convolutions): nvidia-cutlass==$cutlass_pin"
  "$PYTHON" -m pip install --quiet --no-deps "nvidia-cutlass==$cutlass_pin" || echo "[setup] warning: could not install nvidia-cutlass==$cutlass_pin; the CUDA build will skip the CUTLASS convolutions"
fi

needs_build=$("$PYTHON" - "$ROOT" <<'PY'
import glob, os, subprocess, sys
root = sys.argv[1]
libs = glob.glob(os.path.join(root, "fused_resnet", "_C*.so"))
sources = glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True) + [
    os.path.join(root, "setup.py"), os.path.join(root, "pyproject.toml")]
stale = not libs or max(map(os.path.getmtime, sources)) > min(map(os.path.getmtime, libs))
# _C runs only with the torch it was compiled against (recorded by the build beside it): rebuild after a torch
# change, or when the build left no record.
import ast, torch
record = os.path.join(root, "fused_resnet", "_torch_build.py")
try:
    built = {t.id: ast.literal_eval(node.value) for node in ast.parse(open(record).read()).body
             if isinstance(node, ast.Assign) for t in node.targets}.get("TORCH_VERSION")
except (OSError, SyntaxError, ValueError):
    built = None
stale = stale or built != str(torch.__version__)
# The package must also resolve to this checkout (an editable install of it), from any directory.
where = subprocess.run([sys.executable, "-c", "import fused_resnet, os; print(os.path.dirname(fused_resnet.__file__))"],
                       capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONWARNINGS": "ignore"})
installed_here = where.returncode == 0 and os.path.samefile(where.stdout.strip().splitlines()[-1],
                                                             os.path.join(root, "fused_resnet"))
print("yes" if stale or not installed_here else "no")
PY
)
if [ "$needs_build" = "yes" ]; then
  echo "[setup] building fused_resnet._C (pip install --no-build-isolation --no-deps -e .)"
  "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps -e .
else
  echo "[setup] fused_resnet._C is up to date"
fi
