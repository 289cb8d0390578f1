#!/usr/bin/env bash
# Packaging check (CI runs it after the test suite): what users install works on its own.
#   1. sdist from the checkout's files (copied to a temp folder, as a clean clone would have them), then a
#      wheel built from the unpacked sdist: `python -m build --no-isolation` does both, in that order. Without
#      isolation the build sees the installed torch, which _C is compiled against (on a CPU machine, the C++
#      CPU kernels only: a few minutes on 2 cores).
#   2. a fresh virtualenv (no system site packages): the torch the wheel pins (or $FUSED_RESNET_PKG_TORCH, e.g.
#      a local wheel file) and numpy, then the wheel itself (not editable); `pip check` then proves that the
#      wheel's torch pin accepts the torch it runs with.
#   3. from a folder outside the source tree: fused_resnet resolves into the venv, _C loads, and
#      `fused-resnet check --device cpu` passes.
# Everything happens under one temp folder, removed at the end (kept when FUSED_RESNET_PKG_KEEP=1).
#   bash scripts/check_package.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fused_resnet_pkg.XXXXXX")"
case "$WORK/" in "$ROOT"/*) echo "check_package: temp folder $WORK is inside the source tree"; exit 1 ;; esac
if [ "${FUSED_RESNET_PKG_KEEP:-0}" = "1" ]; then
  trap 'echo "check_package: kept $WORK"' EXIT
else
  trap 'rm -rf "$WORK"' EXIT
fi
unset PYTHONPATH  # the installed package alone, never the checkout
t_all=$SECONDS
step() { echo "[check_package] $* ($((SECONDS - t_all)) s)"; }
fail() { echo "check_package: FAILED: $*"; exit 1; }

step "copying the checkout's files to $WORK/src"
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked files plus new ones not ignored (what a commit of the working tree would hold).
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do if [ -e "$f" ]; then cp --parents -- "$f" "$WORK/src/"; fi; done)
else
  cp -r "$ROOT/." "$WORK/src/"
fi
[ -f "$WORK/src/setup.py" ] || fail "no setup.py copied"

step "building the sdist, then the wheel from the unpacked sdist (python -m build --no-isolation)"
t0=$SECONDS
if ! (cd "$WORK" && "$PYTHON" -m build --no-isolation --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1); then
  tail -n 40 "$WORK/build.log"
  fail "python -m build (log above)"
fi
build_s=$((SECONDS - t0))
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "  $(basename "$SDIST"), $(basename "$WHEEL") in $build_s s"

# The wheel holds _C and the record of its torch, no sources; it pins the torch it was compiled against.
TORCH_REQ=$("$PYTHON" - "$WHEEL" <<'PY'
import sys, zipfile
import torch
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("fused_resnet/_C") and n.endswith(".so") for n in names), "no fused_resnet/_C*.so in the wheel"
record = zipfile.ZipFile(sys.argv[1]).read("fused_resnet/_torch_build.py").decode()
assert f"TORCH_VERSION = {str(torch.__version__)!r}" in record, record
assert not [n for n in names if n.startswith(("csrc/", "tests/"))], "sources or tests in the wheel"
meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
reqs = [l.split(":", 1)[1].strip() for l in zipfile.ZipFile(sys.argv[1]).read(meta).decode().splitlines()
        if l.startswith("Requires-Dist: torch")]
expected = "torch==" + str(torch.__version__).split("+")[0]
assert reqs == [expected], f"wheel requires {reqs}, expected [{expected!r}]"
print(expected)
PY
) || fail "wheel contents"
echo "  wheel requires $TORCH_REQ"

step "fresh virtualenv with ${FUSED_RESNET_PKG_TORCH:-$TORCH_REQ} and numpy, then the wheel"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet "${FUSED_RESNET_PKG_TORCH:-$TORCH_REQ}" numpy >"$WORK/pip.log" 2>&1 \
  || { tail -n 20 "$WORK/pip.log"; fail "installing torch into the venv"; }
# --no-deps: the dependencies are in already; pip check below verifies that the wheel accepts them (an
# unsatisfied pin would otherwise send pip off to download another torch).
"$VPY" -m pip install --quiet --no-deps "$WHEEL" >>"$WORK/pip.log" 2>&1 \
  || { tail -n 20 "$WORK/pip.log"; fail "installing the wheel"; }
"$VPY" -m pip check || fail "pip check: the wheel's requirements do not match the venv"

step "from $WORK/run (outside the source tree): import, then fused-resnet check --device cpu"
mkdir -p "$WORK/run"
cd "$WORK/run"
where=$("$VPY" -c "import fused_resnet, os; print(fused_resnet.__file__)")
echo "  fused_resnet imported from $where"
case "$where" in "$WORK/venv/"*) ;; *) fail "fused_resnet resolved to $where, not into the venv" ;; esac
"$VPY" -c "
import json, torch, fused_resnet
info = fused_resnet.build_info()
assert info['extension'], info['extension_error']
assert info['extension_built_with_torch'] == torch.__version__, info
assert 'cpu' in info['available']['cpu'], info['available']
print('  extension loaded, built with torch', info['extension_built_with_torch'], '| cpu backends', info['available']['cpu'])
" || fail "the installed package does not load its extension"
t0=$SECONDS
"$WORK/venv/bin/fused-resnet" check --device cpu --out "$WORK/run/check" --quiet || fail "fused-resnet check"
[ -f "$WORK/run/check/check.json" ] || fail "fused-resnet check wrote no check.json"
echo "  fused-resnet check passed in $((SECONDS - t0)) s"
echo "check_package: OK (wheel build $build_s s, total $((SECONDS - t_all)) s)"
