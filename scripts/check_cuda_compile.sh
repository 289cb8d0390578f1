#!/usr/bin/env bash
# CI compile check of the CUDA sources, on a machine without a GPU (and with the CPU torch wheel):
#   (a) nvcc -c every csrc/cuda/*.cu for sm_90 (device code: no torch headers), with the half/bfloat16
#       flags torch's CUDAExtension uses, warnings as errors;
#   (b) g++ -fsyntax-only every csrc/cuda/*.cpp (the torch bindings) against the CPU wheel's headers plus the
#       CUDA toolkit's, with a stub for the one generated c10/cuda header the CPU wheel lacks.
# Exits non-zero on the first failure. Environment: CUDA_HOME (default /usr/local/cuda, or nvcc's parent
# directory), NVCC, CXX (default g++), PYTHON (default python3), CUDA_ARCH (default sm_90).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"
CUDA_ARCH="${CUDA_ARCH:-sm_90}"

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
CPP_FILES=(csrc/cuda/*.cpp)
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

# (b) Host bindings against the torch headers.
if (( ${#CPP_FILES[@]} > 0 )); then
  if ! TORCH_DIR="$("${PYTHON}" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)"; then
    echo "check_cuda_compile: ERROR: cannot import torch with ${PYTHON}" >&2
    exit 1
  fi
  PY_INC="$("${PYTHON}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  # The CPU wheel ships the c10/cuda headers but not this generated one.
  mkdir -p "${TMP}/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"${TMP}/stub/c10/cuda/impl/cuda_cmake_macros.h"
  CXX_FLAGS=(-std=c++20 -fsyntax-only -Wall -DFUSED_RESNET_WITH_CUDA -Icsrc
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
echo "check_cuda_compile: OK (${#CU_FILES[@]} .cu, ${#CPP_FILES[@]} .cpp)"
