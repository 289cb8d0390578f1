#!/usr/bin/env bash
# What a session with a lent GPU runs, in few full calls (device time is scarce). Logs and JSON go to $OUT
# (the device tool's output folder; ./out elsewhere), the summary table is printed last.
#
#   bash scripts/gpu_session.sh build   # CUDA build of fused_resnet._C (sm_90), ~2 min on 16 cores
#   bash scripts/gpu_session.sh test    # the whole suite on the GPU: cuda + triton backends, bf16 included
#   bash scripts/gpu_session.sh bench   # microbenchmarks at ResNet-50 shapes, batch 256, bf16, channels_last
#   bash scripts/gpu_session.sh e2e     # ResNet-50 training/inference: eager, compile, fused, fused+compile
#   bash scripts/gpu_session.sh cli     # fused-resnet check + memory (charts and JSON under $OUT/cli)
#   bash scripts/gpu_session.sh all     # the five in order
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step="${1:-all}"
PY="${PYTHON:-python3}"

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version | tail -n 1
}

if [[ "$step" == build || "$step" == all ]]; then
  versions | tee "$OUT/versions.txt"
  FUSED_RESNET_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
  rc=$?
  tail -n 5 "$OUT/build.log"
  [[ $rc -eq 0 ]] || { echo "BUILD FAILED (see $OUT/build.log)"; grep -n "error" "$OUT/build.log" | head -40; exit 1; }
  "$PY" -c "import fused_resnet, json; print(json.dumps(fused_resnet.build_info(), indent=1))" | tee "$OUT/build_info.json"
fi

if [[ "$step" == test || "$step" == all ]]; then
  "$PY" -m pytest tests -q -p no:cacheprovider -rfs --maxfail=100 --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
  echo "tests exit code: $?"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -60
  tail -n 3 "$OUT/tests.log"
fi

if [[ "$step" == bench || "$step" == all ]]; then
  "$PY" -m pytest benchmarks/bench_batch_norm.py -q -p no:cacheprovider --providers "${PROVIDERS:-triton,cuda,eager}" \
    --results-json "$OUT/bench.json" --benchmark-json "$OUT/pytest_benchmark.json" \
    --benchmark-columns=median >"$OUT/bench.log" 2>&1
  echo "benchmarks exit code: $?"
  grep -A80 "fused BatchNorm microbenchmarks" "$OUT/bench.log" | grep -v "^---" | head -90
fi

if [[ "$step" == e2e || "$step" == all ]]; then
  "$PY" -m fused_resnet bench --out "$OUT/e2e" ${E2E_ARGS:-} >"$OUT/e2e.log" 2>&1
  echo "end-to-end exit code: $?"
  tail -n 12 "$OUT/e2e.log"
fi

if [[ "$step" == cli || "$step" == all ]]; then
  "$PY" -m fused_resnet check --out "$OUT/cli" >"$OUT/check.log" 2>&1
  echo "check exit code: $?"
  tail -n 14 "$OUT/check.log"
  "$PY" -m fused_resnet memory --out "$OUT/cli" >"$OUT/memory.log" 2>&1
  echo "memory exit code: $?"
  tail -n 14 "$OUT/memory.log"
fi
