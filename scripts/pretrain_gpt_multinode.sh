#!/usr/bin/env bash
# Multi-node: run this on every node with the same settings and its own NODE_RANK.
#   NNODES          number of nodes (default 2; 1 runs --standalone)
#   NODE_RANK       this node's rank, 0..NNODES-1 (static rendezvous), or unset with RDZV_ENDPOINT
#   NPROC_PER_NODE  processes per node (default: GPUs on the node, else 1)
#   MASTER_ADDR     node 0's address (required on the other nodes; default 127.0.0.1 on node 0)
#                   and MASTER_PORT (default 29500)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous instead of the static master (elastic launch)
#   RDZV_ID         job id for the rendezvous (default fmoe)
# Arguments go to pretrain_gpt.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FMOE_VENV:-$ROOT/.venv}
# No cd: relative paths in the arguments (@FILE, --save, --data-path, ...) are the caller's.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NNODES=${NNODES:-2}
source "$ROOT/scripts/torchrun_nodes.sh"
torchrun_nodes pretrain_gpt_multinode.sh
exec "$VENV/bin/torchrun" "${launch[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  -m fastmoe_megatron.megatron.pretrain_gpt "$@"
