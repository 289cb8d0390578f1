#!/usr/bin/env bash
# The main job (README's first command): set up what is missing, then build a small fused network, check it
# against eager PyTorch and compare time and saved activation memory on this machine's device.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PYTHON" -m fused_resnet "$@"
