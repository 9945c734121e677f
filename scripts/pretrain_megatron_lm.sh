#!/usr/bin/env bash
# A Megatron-LM checkout's own pretrain_gpt.py with --fmoefy, through the launcher
# (python -m fastmoe_megatron.launch: runtime patches, the checkout stays unmodified), under torchrun.
#
#   scripts/pretrain_megatron_lm.sh CHECKOUT [Megatron-LM flags] --fmoefy --fmoe-num-experts N ...
#
#   CHECKOUT        a Megatron-LM checkout at a checked tag (core_v0.16.1), or its pretrain_*.py
#   NPROC_PER_NODE  processes per node (default: GPUs on the node, else 1)
#   NNODES          nodes (default 1: --standalone); with NNODES > 1 also NODE_RANK, MASTER_ADDR,
#                   MASTER_PORT (default 29500), or RDZV_ENDPOINT (c10d rendezvous, RDZV_ID)
#   FMOE_VENV       the virtual environment with torch and fastmoe_megatron (default .venv)
# Megatron-LM's launch scripts set CUDA_DEVICE_MAX_CONNECTIONS=1 (needed with tensor or
# context parallelism before Blackwell); it is set here too unless already set.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FMOE_VENV:-$ROOT/.venv}
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  # The comment above, without its "# ".
  sed -n '2,/^set /{/^#/{s/^# \{0,1\}//;p}}' "${BASH_SOURCE[0]}"
  echo "The launcher's own flags and the --fmoefy flags: python -m fastmoe_megatron.launch --help"
  exit 0
fi
if [ $# -lt 1 ]; then
  echo "usage: $0 CHECKOUT|SCRIPT [flags ...]   (see python -m fastmoe_megatron.launch --help)" >&2
  exit 2
fi
TARGET=$1; shift
if [ -d "$TARGET" ]; then SCRIPT=$TARGET/pretrain_gpt.py; else SCRIPT=$TARGET; fi
if [ ! -f "$SCRIPT" ]; then
  echo "pretrain_megatron_lm.sh: no such script: $SCRIPT" >&2
  exit 2
fi
SCRIPT=$(cd "$(dirname "$SCRIPT")" && pwd)/$(basename "$SCRIPT")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
NNODES=${NNODES:-1}
source "$ROOT/scripts/torchrun_nodes.sh"
torchrun_nodes pretrain_megatron_lm.sh
exec "$VENV/bin/torchrun" "${launch[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  -m fastmoe_megatron.launch "$SCRIPT" "$@"
