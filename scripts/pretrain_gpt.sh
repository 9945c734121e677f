#!/usr/bin/env bash
# Single node: torchrun with NPROC processes (default 2) of pretrain_gpt; arguments go to
# pretrain_gpt (e.g. @configs/tiny-cpu.args --save runs/tiny).
#   NPROC        processes on this node (GPUs, or CPU processes)
#   FMOE_VENV    the virtual environment made by scripts/setup.sh (default .venv)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FMOE_VENV:-$ROOT/.venv}
cd "$ROOT"
exec "$VENV/bin/torchrun" --standalone --nproc-per-node "${NPROC:-2}" \
  -m fastmoe_megatron.megatron.pretrain_gpt "$@"
