#!/usr/bin/env bash
# The one prepared call of a session with a lent GPU (device time is scarce: one call of at most ~8 minutes).
# Steps run in priority order, each under its own timeout, so that a slow step cannot eat the ones after it;
# each writes its log (and JSON) to $OUT as soon as it finishes; the summary table comes last.
#
#   bash scripts/gpu_session.sh                 # build warmup test conv bn e2e summary (~8 min in all)
#   bash scripts/gpu_session.sh test conv       # chosen steps (build first if the extension is not built)
#
#   build    CUDA build of fused_resnet._C (sm_90), with the CUTLASS convolutions when the nvidia-cutlass
#            wheel travels along in .whl/ (the machine has no registry; here, in the repository root:
#            echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl
#            and name .whl in the call's carry)                                     <= 150 s
#   warmup   Triton kernels for ResNet-50 compiled in parallel into Triton's cache    <=  60 s
#            (python -m fused_resnet.kernels.warmup: the later steps would compile them one by one)
#   test     the GPU-only tests: bf16 and the cuda / triton backends (models, fused convolutions, BN ops)
#                                                                                     <= 130 s
#   conv     convolution microbenchmarks, every ResNet-50 conv shape, batch 256 bf16: cuDNN, cuDNN + fused
#            BN, Triton fused, CUTLASS fused (when built; fallbacks to ATen marked)    <=  75 s
#   bn       BatchNorm microbenchmarks (module forward/backward per backend)          <=  30 s
#   e2e      fused-resnet bench: ResNet-50 training + inference, eager vs fused       <=  90 s
#   compile  fused-resnet bench with torch.compile variants (not in the default list: compiling takes minutes)
#   e2e-conv the e2e step per convolution implementation, interleaved in one run: eager, the triton backend
#            with its convolutions on cuDNN + fused BN (conv=aten), Triton (conv=triton), CUTLASS (conv=cuda;
#            calls it does not take run ATen, counted in the output) and the measured per-shape selection
#            among all three (conv=auto+cuda), and the cuda backend on CUTLASS (not in the default list;
#            E2E_CONV_VARIANTS to change the list, e.g. add compile,fused-compile)      <= 150 s
#   summary  the tables of the steps that ran
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(build warmup test conv bn e2e summary)

run_step() {  # name timeout_s command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] exit $rc after $((SECONDS - t0)) s (limit $limit s; log $OUT/$name.log)" | tee -a "$OUT/steps.txt"
  tail -n 8 "$OUT/$name.log"
  return $rc
}

for step in "${steps[@]}"; do
  case "$step" in
    build)
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
        nvcc --version | tail -n 1
        "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)"; } | tee "$OUT/versions.txt"
      # pyproject.toml's SPDX license string needs setuptools >= 77 and this machine has no registry: with an
      # older one, this copy of the tree declares the same license in the older table form.
      if ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
        sed -i -e 's/^license = "BSD-3-Clause"/license = { text = "BSD-3-Clause" }/' -e '/^license-files/d' pyproject.toml
        echo "setuptools < 77: pyproject.toml's license rewritten to the table form for this build" | tee -a "$OUT/versions.txt"
      fi
      cutlass=0
      if compgen -G ".whl/nvidia_cutlass-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
          .whl/nvidia_cutlass-*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && cutlass=1
      fi
      echo "CUTLASS convolutions: FUSED_RESNET_CUTLASS=$cutlass" | tee -a "$OUT/versions.txt"
      FUSED_RESNET_CUTLASS=$cutlass FUSED_RESNET_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        MAX_JOBS="${MAX_JOBS:-16}" \
        run_step build 150 "$PY" -m pip install --no-build-isolation --no-deps -e . \
        || { echo "BUILD FAILED"; grep -n "error" "$OUT/build.log" | head -40; exit 1; }
      "$PY" -c "import fused_resnet, json; print(json.dumps(fused_resnet.build_info(), indent=1))" >"$OUT/build_info.json"
      ;;
    warmup)
      run_step warmup 60 "$PY" -m fused_resnet.kernels.warmup --dtypes bf16 --jobs "${WARMUP_JOBS:-15}"
      ;;
    test)
      # GPU-only cases: the cuda-parametrised ones (BN parity incl. bf16, fused convolutions, opcheck, compile)
      # and the CUDA-only model tests.
      # Order: the model tests first (ResNet-50 bf16 parity, CUDA graphs, torchvision; their kernels are the
      # warmed-up ones), then the convolutions (each test compiles its own small-shape variants), then BN.
      # Then the CUTLASS kernels (tests/test_conv_compiled.py: *_on_cuda_*, skipped without the CUTLASS build).
      run_step test 130 "$PY" -m pytest tests/test_models_cuda.py tests/test_conv.py tests/test_batch_norm_parity.py \
        tests/test_op_registration.py tests/test_conv_compiled.py -q -p no:cacheprovider -rfs -k "cuda" \
        --maxfail=30 --junitxml="$OUT/tests.xml"
      ;;
    conv)
      run_step conv 75 "$PY" benchmarks/bench_conv.py --out "$OUT"
      ;;
    bn)
      run_step bn 30 "$PY" -m fused_resnet micro --no-kernels --rounds 10 --out "$OUT/bn" --quiet
      ;;
    e2e)
      run_step e2e 90 "$PY" -m fused_resnet bench --variants "${E2E_VARIANTS:-eager,fused-triton}" --out "$OUT/e2e" --quiet
      ;;
    e2e-conv)
      run_step e2e-conv 150 "$PY" -m fused_resnet bench --variants "${E2E_CONV_VARIANTS:-eager,fused-triton:conv=aten,fused-triton:conv=triton,fused-triton:conv=cuda,fused-triton:conv=auto+cuda,fused-cuda:conv=cuda}" \
        --out "$OUT/e2e-conv" --quiet
      ;;
    compile)
      run_step compile 300 "$PY" -m fused_resnet bench --variants eager,compile,fused-triton,fused-compile --out "$OUT/compile" --quiet
      ;;
    summary)
      echo "== steps"; cat "$OUT/steps.txt" 2>/dev/null
      echo "== versions"; cat "$OUT/versions.txt" 2>/dev/null
      grep -E "passed|failed" "$OUT/test.log" 2>/dev/null | tail -n 1
      [[ -f "$OUT/conv.log" ]] && { echo "== convolutions (us / TFLOP/s)"; grep -E "^\|" "$OUT/conv.log"; }
      [[ -f "$OUT/bn.log" ]] && { echo "== BatchNorm"; grep -E "^\|" "$OUT/bn.log" | head -40; }
      [[ -f "$OUT/e2e.log" ]] && { echo "== end to end"; grep -E "^\|" "$OUT/e2e.log"; }
      [[ -f "$OUT/e2e-conv.log" ]] && { echo "== end to end, per convolution implementation"
                                        grep -E "^\||^convolution implementation" "$OUT/e2e-conv.log"; }
      ;;
    *)
      echo "unknown step $step (build warmup test conv bn e2e e2e-conv compile summary)"; exit 2
      ;;
  esac
done
