#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), compiles the CUDA ops when nvcc is present (a compile and
# link check on machines without a GPU), and runs the test suite. Extra arguments go to pytest,
# which runs in the checkout: test paths are relative to it (scripts/test.sh tests/test_scripts.py
# -k usage); without any, pyproject.toml's testpaths runs the whole suite.
#   FMOE_SKIP_CUDA_BUILD=1   skip the CUDA compile check
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FMOE_VENV:-$ROOT/.venv}
# A relative FMOE_VENV is read from where this runs (as setup.sh does), not from the checkout.
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
export FMOE_VENV=$VENV
cd "$ROOT"
bash scripts/setup.sh

if [ "${FMOE_SKIP_CUDA_BUILD:-0}" != 1 ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  start=$(date +%s)
  "$VENV/bin/python" -m fastmoe_megatron build --cuda
  echo "test: CUDA ops compiled and linked in $(( $(date +%s) - start )) s (cached builds load at once)"
  export FMOE_TEST_CUDA_BUILD=1
else
  echo "test: no nvcc (or FMOE_SKIP_CUDA_BUILD=1): skipping the CUDA compile check"
fi

"$VENV/bin/python" -m fastmoe_megatron info
exec "$VENV/bin/python" -m pytest -q -ra "$@"
