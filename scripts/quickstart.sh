#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job: a small MoE model trained on the CPU.
# Extra arguments go to the trainer.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FMOE_VENV:-$ROOT/.venv}
cd "$ROOT"
bash scripts/setup.sh
exec "$VENV/bin/python" -m fastmoe_megatron demo "$@"
