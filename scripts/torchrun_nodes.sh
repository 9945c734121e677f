# Sourced by the launch scripts (pretrain_gpt_multinode.sh, pretrain_megatron_lm.sh): torchrun's
# node options from the environment.
#   torchrun_nodes NAME   sets the array `launch` and NPROC_PER_NODE; NAME prefixes the errors
#                         (also when $VENV has no torchrun).
#   NNODES          nodes: 1 is --standalone
#   NODE_RANK       this node's rank, 0..NNODES-1 (static rendezvous on MASTER_ADDR, node 0's
#                   address: required on the other nodes, default 127.0.0.1 on node 0; and
#                   MASTER_PORT, default 29500), or unset with RDZV_ENDPOINT
#   RDZV_ENDPOINT   host:port of a c10d rendezvous instead of the static one (elastic launch);
#                   RDZV_ID is the job id (default fmoe)
#   NPROC_PER_NODE  processes per node (default: GPUs on the node, else 1; asks $VENV's torch)
torchrun_nodes() {
  local name=$1
  if [ ! -x "$VENV/bin/torchrun" ]; then  # not set up: say so, not "No such file or directory"
    echo "$name: no torchrun in $VENV: run scripts/setup.sh first, or set FMOE_VENV to the virtual environment it made" >&2
    exit 2
  fi
  if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$VENV/bin/python" -c "import torch; print(max(1, torch.cuda.device_count()))")
  fi
  if [ "$NNODES" = 1 ]; then
    launch=(--standalone)
  elif [ -n "${RDZV_ENDPOINT:-}" ]; then
    # torchrun checks NNODES here (N, or MIN:MAX for an elastic job); NODE_RANK is not used
    launch=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
            --rdzv-id "${RDZV_ID:-fmoe}")
  elif [ -n "${NODE_RANK:-}" ]; then
    # static rendezvous: a rank outside 0..NNODES-1 would wait out torchrun's timeout
    if ! [[ $NNODES =~ ^[1-9][0-9]*$ ]]; then
      echo "$name: NNODES must be a positive integer with NODE_RANK (MIN:MAX needs RDZV_ENDPOINT), got '$NNODES'" >&2
      exit 2
    fi
    if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
      echo "$name: NODE_RANK must be one of 0..$((NNODES - 1)) (NNODES=$NNODES), got '$NODE_RANK'" >&2
      exit 2
    fi
    if [ "$NODE_RANK" -gt 0 ] && [ -z "${MASTER_ADDR:-}" ]; then
      # 127.0.0.1 would be this node: it would wait out torchrun's timeout for a master never there
      echo "$name: NODE_RANK=$NODE_RANK needs MASTER_ADDR, node 0's address (or RDZV_ENDPOINT)" >&2
      exit 2
    fi
    launch=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
            --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}")
  else
    echo "$name: with NNODES=$NNODES set NODE_RANK (0..$((NNODES - 1))) or RDZV_ENDPOINT" >&2
    exit 2
  fi
}
