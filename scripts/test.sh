#!/usr/bin/env bash
# The whole test suite (README's test command; CI runs exactly this). Idempotent: sets up what is missing.
# Extra arguments go to pytest. Without CUDA, Triton kernels run in Triton's interpreter (tests/conftest.py).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
bash "$ROOT/scripts/setup_env.sh" || { echo "setup failed"; exit 1; }
cd "$ROOT"
"$PYTHON" -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure"
  exit 1
fi
exit "$rc"
