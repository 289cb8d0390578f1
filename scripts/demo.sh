#!/usr/bin/env bash
# The main job (README's first command): set up what is missing, then run the CLI's fast default path,
# `fused-resnet bench`: a first-step parity check against eager PyTorch, then training/inference throughput and
# memory, eager vs fused (CPU: ResNet-18 at small sizes, about 10 s; CUDA: ResNet-50, batch 256, bf16).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PYTHON" -m fused_resnet bench "$@"
