#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job: pretrain_gpt --fmoefy on the tiny
# CPU config, 2 processes over gloo with the experts spread over both (EP=2). It prints the loss
# and the expert load as it trains and saves a checkpoint in runs/quickstart. Extra arguments go
# to pretrain_gpt (e.g. --train-iters 400).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# No cd: relative paths in the extra arguments are the caller's; the checkpoint goes under the checkout.
bash "$ROOT/scripts/setup.sh"
NPROC=2 exec bash "$ROOT/scripts/pretrain_gpt.sh" "@$ROOT/configs/tiny-cpu.args" \
  --expert-model-parallel-size 2 --save "$ROOT/runs/quickstart" "$@"
