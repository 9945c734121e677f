#!/usr/bin/env bash
# Creates .venv with torch, this package (editable, with its megatron, megatron-lm, test and
# transformerxl extras), and builds the native CPU ops. Safe to re-run: it reinstalls only when the requirements changed.
#   FMOE_VENV     where the virtual environment goes (default: .venv in the checkout)
#   FMOE_TORCH    the torch requirement (default: torch==2.14.1, the CUDA 13.0 build, which also
#                 runs on CPUs and lets CI compile the CUDA ops; a CPU-only build is a 200 MB
#                 install instead of 5.5 GB: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
#                 FMOE_TORCH=torch==2.13.0+cpu)
#   PYTHON        the interpreter to create the venv with (default: python3)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FMOE_VENV:-$ROOT/.venv}
TORCH_SPEC=${FMOE_TORCH:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  # A venv made without pip, or one whose creation stopped before ensurepip ran.
  echo "setup: $VENV has no pip; installing it with ensurepip"
  "$VENV/bin/python" -m ensurepip --upgrade >/dev/null \
    || { echo "setup: ensurepip failed in $VENV (on Debian/Ubuntu: apt install python3-venv), or remove $VENV" >&2; exit 1; }
fi
stamp="$VENV/.fastmoe-megatron-setup"
want="$TORCH_SPEC $ROOT $(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing $TORCH_SPEC and fastmoe-megatron[megatron,megatron-lm,test,transformerxl] (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" 2> >(grep -v "is ignored: it is neither" >&2)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[megatron,megatron-lm,test,transformerxl]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -m fastmoe_megatron build
