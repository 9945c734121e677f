#!/usr/bin/env bash
# Single node: torchrun with NPROC processes (default 2) of pretrain_gpt; arguments go to
# pretrain_gpt (e.g. @configs/tiny-cpu.args --save runs/tiny).
#   NPROC        processes on this node (GPUs, or CPU processes)
#   FMOE_VENV    the virtual environment made by scripts/setup.sh (default: .venv in the checkout)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FMOE_VENV:-$ROOT/.venv}
# No cd: relative paths in the arguments (@FILE, --save, --data-path, ...) are the caller's.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -x "$VENV/bin/torchrun" ]; then  # not set up: say so, not "No such file or directory"
  echo "pretrain_gpt.sh: no torchrun in $VENV: run scripts/setup.sh first, or set FMOE_VENV to the virtual environment it made" >&2
  exit 2
fi
exec "$VENV/bin/torchrun" --standalone --nproc-per-node "${NPROC:-2}" \
  -m fastmoe_megatron.megatron.pretrain_gpt "$@"
