#!/usr/bin/env bash
# CI compile check of the CUDA sources, on a machine without a GPU (and with the CPU torch wheel):
#   (a) nvcc -c every csrc/cuda/*.cu for sm_90 (device code: no torch headers), with the half/bfloat16
#       flags torch's CUDAExtension uses, warnings as errors;
#   (b) nvcc -c every csrc/cuda/conv/*.cu (the CUTLASS fused convolutions, one instantiation per file) for all
#       of CUTLASS_ARCHS (default "sm_80 sm_90") in one call, with the CUTLASS headers of the pinned
#       nvidia-cutlass wheel (found by setup.py's cutlass_include()); skipped with a note when the wheel is
#       missing, unless FUSED_RESNET_CUTLASS=1 (then an error); FUSED_RESNET_CUTLASS=0 skips it. Prints each
#       file's time, registers and spills (a spill fails the check), then checks the SASS (check_sass below).
#   (c) g++ -fsyntax-only every csrc/cuda/*.cpp and csrc/cuda/conv/*.cpp (the torch bindings) against the CPU
#       wheel's headers plus the CUDA toolkit's, with a stub for the one generated c10/cuda header the CPU
#       wheel lacks, and -DFUSED_RESNET_WITH_CUTLASS: the CUTLASS bindings include only the torch-free
#       launcher header, so they are checked whether or not (b) ran.
# Exits non-zero when any file fails. Environment: CUDA_HOME (default /usr/local/cuda, or nvcc's parent
# directory), NVCC, CXX (default g++), PYTHON (default python3), CUDA_ARCH (default sm_90), CUTLASS_ARCHS,
# FUSED_RESNET_CUTLASS (auto|0|1, as for setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"
CUDA_ARCH="${CUDA_ARCH:-sm_90}"
CUTLASS_ARCHS="${CUTLASS_ARCHS:-sm_80 sm_90}"
CUTLASS_MODE="$(echo "${FUSED_RESNET_CUTLASS:-auto}" | tr '[:upper:]' '[:lower:]')"

if [[ -z "${NVCC:-}" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
    NVCC="${CUDA_HOME}/bin/nvcc"
  elif command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "${NVCC:-}" ]] || ! command -v "${NVCC}" >/dev/null 2>&1; then
  echo "check_cuda_compile: ERROR: nvcc not found (install the CUDA toolkit, or set CUDA_HOME or NVCC)" >&2
  exit 1
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -d /usr/local/cuda/include ]]; then
    CUDA_HOME=/usr/local/cuda
  else
    CUDA_HOME="$(cd "$(dirname "$(readlink -f "$(command -v "${NVCC}")")")/.." && pwd)"
  fi
fi
if [[ ! -f "${CUDA_HOME}/include/cuda_runtime_api.h" ]]; then
  echo "check_cuda_compile: ERROR: ${CUDA_HOME}/include/cuda_runtime_api.h not found (set CUDA_HOME)" >&2
  exit 1
fi

shopt -s nullglob
CU_FILES=(csrc/cuda/*.cu)
CONV_FILES=(csrc/cuda/conv/*.cu)
CPP_FILES=(csrc/cuda/*.cpp csrc/cuda/conv/*.cpp)
shopt -u nullglob
if (( ${#CU_FILES[@]} == 0 && ${#CPP_FILES[@]} == 0 )); then
  echo "check_cuda_compile: ERROR: no sources under csrc/cuda/" >&2
  exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "${TMP}"' EXIT

echo "check_cuda_compile: nvcc: ${NVCC} ($("${NVCC}" --version | tail -n 1))"

# (a) Device code. The defines match torch.utils.cpp_extension's nvcc flags: no implicit half/bf16
# conversions or operators, so the kernels must compile with explicit intrinsics.
NVCC_FLAGS=(-std=c++17 -arch="${CUDA_ARCH}" -O2 -Icsrc -DFUSED_RESNET_WITH_CUDA
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler=-Wall)
# Warnings as errors, if this nvcc's own system headers compile cleanly that way.
printf '#include <cuda_runtime.h>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n__global__ void k(float* p) { p[0] = 1.f; }\n' \
  >"${TMP}/probe.cu"
if "${NVCC}" "${NVCC_FLAGS[@]}" -Werror all-warnings -c "${TMP}/probe.cu" -o "${TMP}/probe.o" >/dev/null 2>&1; then
  NVCC_FLAGS+=(-Werror all-warnings)
else
  echo "check_cuda_compile: note: -Werror all-warnings breaks on system headers; failing on errors only"
fi

status=0
for f in "${CU_FILES[@]}"; do
  echo "check_cuda_compile: nvcc ${f}"
  if ! "${NVCC}" "${NVCC_FLAGS[@]}" -c "${f}" -o "${TMP}/$(basename "${f}").o"; then
    echo "check_cuda_compile: FAILED: ${f}" >&2
    status=1
  fi
done

# SASS checks of the CUTLASS objects, with cuobjdump (the CUDA toolkit's, else the one in the triton wheel;
# skipped with a note when neither exists). They check what the source cannot say by itself:
#   - the tensor-core instruction of the element type (HMMA.16816.F32 on fp16, HMMA.16816.F32.BF16 on bf16);
#   - in the bf16 prologue kernels, that our transform (bf16_scale_bias_relu.cuh) was the one instantiated:
#     its fp32 -> bf16 pack (F2FP.BF16.F32.PACK) present and no HFMA2 (the fp16 transform, fma.rn.f16x2.relu,
#     on bf16 data would be garbage, silently).
CUOBJDUMP="${CUOBJDUMP:-}"
if [[ -z "${CUOBJDUMP}" ]]; then
  if [[ -x "${CUDA_HOME}/bin/cuobjdump" ]]; then
    CUOBJDUMP="${CUDA_HOME}/bin/cuobjdump"
  else
    CUOBJDUMP="$("${PYTHON}" -c 'import os, triton; p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"); print(p if os.access(p, os.X_OK) else "")' 2>/dev/null || true)"
  fi
fi

[[ -n "${CUOBJDUMP}" ]] || echo "check_cuda_compile: note: no cuobjdump (CUDA toolkit or triton wheel): SASS checks skipped"

# SASS check of the BatchNorm kernels: the elementwise kernels' 16-bit, 8-channel instantiations (bn_act,
# bn_backward_elemt: the memory-bound ones) store each row's 16 bytes as one STG.E.128. nvcc once split
# them into 2-byte stores (an offset form it could not prove aligned: batch_norm_kernels.cuh).
check_bn_stores() {  # check_bn_stores OBJECT
  local sass="${TMP}/bn_sass.txt"
  "${CUOBJDUMP}" -sass "$1" >"${sass}" || { echo "check_cuda_compile: FAILED: cuobjdump $1" >&2; return 1; }
  awk '
    /Function : / { f = $3; watched = f ~ /(bn_act_kernel|bn_backward_elemt_kernel)I(6__half|13__nv_bfloat16)fLi8E/
                    if (watched) seen[f] = 0 }
    watched && /STG/ { if ($0 ~ /STG\.E\.128/) seen[f]++; else { narrow[f]++ } }
    END {
      n = 0; bad = 0
      for (f in seen) { n++; if (seen[f] == 0 || narrow[f] > 0) { bad = 1; print "check_cuda_compile: FAILED: " f ": " seen[f] " 128-bit and " narrow[f] + 0 " narrower stores" > "/dev/stderr" } }
      if (n != 4) { bad = 1; print "check_cuda_compile: FAILED: expected 4 watched BatchNorm kernels in the SASS, found " n > "/dev/stderr" }
      exit bad
    }' "${sass}"
}
if [[ -n "${CUOBJDUMP}" ]]; then
  check_bn_stores "${TMP}/batch_norm_launch.cu.o" && echo "check_cuda_compile: BatchNorm elementwise kernels: 128-bit stores" \
    || status=1
fi

check_sass() {  # check_sass SOURCE OBJECT
  local f="$1" obj="$2" sass="${TMP}/sass.txt" ok=0
  "${CUOBJDUMP}" -sass "${obj}" >"${sass}" || { echo "check_cuda_compile: FAILED: cuobjdump ${obj}" >&2; return 1; }
  case "${f}" in
    *_bf16.cu)
      grep -q 'HMMA\.16816\.F32\.BF16' "${sass}" || { echo "check_cuda_compile: FAILED: ${f}: no bf16 HMMA" >&2; ok=1; }
      case "${f}" in
        *bn_relu_bf16.cu)
          grep -q 'F2FP\.BF16\.F32\.PACK' "${sass}" \
            || { echo "check_cuda_compile: FAILED: ${f}: the bf16 prologue transform is not in the code" >&2; ok=1; }
          if grep -q 'HFMA2' "${sass}"; then
            echo "check_cuda_compile: FAILED: ${f}: HFMA2 in a bf16 kernel (CUTLASS's fp16 transform instantiated?)" >&2
            ok=1
          fi ;;
      esac ;;
    *_f16.cu)
      grep -q 'HMMA\.16816\.F32 ' "${sass}" || { echo "check_cuda_compile: FAILED: ${f}: no fp16 HMMA" >&2; ok=1; } ;;
  esac
  return "${ok}"
}

# (b) The CUTLASS instantiations. CUTLASS's headers come in with -isystem (they warn under -Wall; our own
# files keep -Werror) and need --expt-relaxed-constexpr (constexpr host functions called from host-device
# code), as in setup.py.
n_conv=0
case "${CUTLASS_MODE}" in
  auto|1) ;;
  0) echo "check_cuda_compile: note: FUSED_RESNET_CUTLASS=0: CUTLASS convolutions not compiled" ;;
  *) echo "check_cuda_compile: ERROR: FUSED_RESNET_CUTLASS must be auto, 0 or 1" >&2; exit 1 ;;
esac
if [[ "${CUTLASS_MODE}" != 0 && ${#CONV_FILES[@]} -gt 0 ]]; then
  # setup.py's cutlass_include() is the one place that knows the pinned version and where the wheel keeps
  # the headers; setup.py runs nothing on import (setup() is under __main__).
  cutlass_probe="$("${PYTHON}" -c '
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fused_resnet_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
include, why = setup.cutlass_include()
print(include or "")
print(why)
' 2>&1)" || { echo "check_cuda_compile: ERROR: cannot evaluate setup.py: ${cutlass_probe}" >&2; exit 1; }
  CUTLASS_INC="$(sed -n 1p <<<"${cutlass_probe}")"
  CUTLASS_WHY="$(sed -n 2p <<<"${cutlass_probe}")"
  if [[ -z "${CUTLASS_INC}" ]]; then
    if [[ "${CUTLASS_MODE}" == 1 ]]; then
      echo "check_cuda_compile: ERROR: FUSED_RESNET_CUTLASS=1 but ${CUTLASS_WHY}" >&2
      exit 1
    fi
    echo "check_cuda_compile: note: CUTLASS convolutions NOT compiled: ${CUTLASS_WHY}"
  else
    echo "check_cuda_compile: ${CUTLASS_WHY}"
    # One nvcc call per file for all of CUTLASS_ARCHS (-gencode each): the host side and the front end run
    # once, not once per architecture.
    flags=()
    for flag in "${NVCC_FLAGS[@]}"; do [[ "${flag}" == -arch=* ]] || flags+=("${flag}"); done
    for arch in ${CUTLASS_ARCHS}; do
      flags+=(-gencode "arch=compute_${arch#sm_},code=${arch}")
    done
    for f in "${CONV_FILES[@]}"; do
      obj="${TMP}/$(basename "${f}").o"
      t_start=${SECONDS}
      if ! "${NVCC}" "${flags[@]}" -DFUSED_RESNET_WITH_CUTLASS -isystem "${CUTLASS_INC}" \
          --expt-relaxed-constexpr -Xptxas -v -c "${f}" -o "${obj}" 2>"${TMP}/ptxas.log"; then
        cat "${TMP}/ptxas.log" >&2
        echo "check_cuda_compile: FAILED: ${f}" >&2
        status=1
        continue
      fi
      # ptxas -v: one "Used N registers" and one "spill stores" line per kernel and architecture.
      regs="$(grep -o 'Used [0-9]* registers' "${TMP}/ptxas.log" | awk '{print $2}' | sort -n | tail -n 1)"
      spills="$(grep -o '[0-9]* bytes spill stores' "${TMP}/ptxas.log" | awk '{s += $1} END {print s + 0}')"
      echo "check_cuda_compile: nvcc ${f} (${CUTLASS_ARCHS}): $(( SECONDS - t_start )) s, ${regs:-?} registers, ${spills} bytes spilled"
      n_conv=$(( n_conv + 1 ))
      if (( spills > 0 )); then
        echo "check_cuda_compile: FAILED: ${f} spills registers to local memory" >&2
        status=1
      fi
      if [[ -n "${CUOBJDUMP}" ]]; then
        check_sass "${f}" "${obj}" || status=1
      fi
    done
  fi
fi

# (c) Host bindings against the torch headers.
if (( ${#CPP_FILES[@]} > 0 )); then
  if ! TORCH_DIR="$("${PYTHON}" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)"; then
    echo "check_cuda_compile: ERROR: cannot import torch with ${PYTHON}" >&2
    exit 1
  fi
  PY_INC="$("${PYTHON}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  # The CPU wheel ships the c10/cuda headers but not this generated one.
  mkdir -p "${TMP}/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"${TMP}/stub/c10/cuda/impl/cuda_cmake_macros.h"
  CXX_FLAGS=(-std=c++20 -fsyntax-only -Wall -DFUSED_RESNET_WITH_CUDA -DFUSED_RESNET_WITH_CUTLASS -Icsrc
    -I"${TORCH_DIR}/include" -I"${TORCH_DIR}/include/torch/csrc/api/include" -I"${CUDA_HOME}/include"
    -I"${PY_INC}" -I"${TMP}/stub")
  # Torch's own headers are included with -I (not -isystem); add -Werror only if they pass it.
  printf '#include <ATen/ATen.h>\n#include <c10/cuda/CUDAGuard.h>\n#include <c10/cuda/CUDAStream.h>\n#include <torch/library.h>\n' \
    >"${TMP}/probe.cpp"
  if "${CXX}" "${CXX_FLAGS[@]}" -Werror "${TMP}/probe.cpp" >/dev/null 2>&1; then
    CXX_FLAGS+=(-Werror)
  else
    echo "check_cuda_compile: note: torch headers warn under -Wall -Werror; failing on errors only"
  fi
  for f in "${CPP_FILES[@]}"; do
    echo "check_cuda_compile: ${CXX} -fsyntax-only ${f}"
    if ! "${CXX}" "${CXX_FLAGS[@]}" "${f}"; then
      echo "check_cuda_compile: FAILED: ${f}" >&2
      status=1
    fi
  done
fi

if (( status != 0 )); then
  echo "check_cuda_compile: FAILED" >&2
  exit 1
fi
echo "check_cuda_compile: OK (${#CU_FILES[@]} .cu, ${n_conv} CUTLASS .cu for ${CUTLASS_ARCHS}, ${#CPP_FILES[@]} .cpp)"
