"""scripts/test.sh and scripts/setup.sh on a stand-in virtual environment: relative paths."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stand_in_venv(folder: Path, torch_spec: str) -> None:
    """A folder that setup.sh takes for a ready virtual environment: bin/python runs this
    interpreter, and the setup stamp matches, so nothing is installed."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (folder / ".fastmoe-megatron-setup").write_text(f"{torch_spec} {ROOT} {digest}\n")


def test_test_script_reads_a_relative_venv_from_where_it_runs(tmp_path):
    """FMOE_VENV=fv, run from another folder: test.sh uses that folder's fv (as setup.sh and the
    launch scripts do), not a new fv in the checkout (a second multi-GB install, before)."""
    _stand_in_venv(tmp_path / "fv", "torch")
    env = dict(os.environ, FMOE_VENV="fv", FMOE_TORCH="torch", FMOE_SKIP_CUDA_BUILD="1")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "--collect-only", "-q",
                          "-p", "no:cacheprovider"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "setup: creating" not in text and "setup: installing" not in text, text[-3000:]
    assert "tests/test_scripts.py: 1" in text, text[-3000:]  # pytest ran, collecting only
    assert not (ROOT / "fv").exists()
