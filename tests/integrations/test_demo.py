"""``python -m fastmoe_megatron demo``: a short run trains (the loss falls, exit 0) and a bad flag
is refused with status 2 and a message that names it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--layers", "1", "--d-model", "32", "--d-hidden", "64", "--num-expert", "4",
         "--seq-len", "32", "--batch-size", "8", "--corpus-bytes", "200000", "--lr", "1e-2"]


def demo(*flags, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastmoe_megatron", "demo", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("gate,top_k", [("gshard", "2"), ("switch", "1")])
def test_demo_trains(gate, top_k):
    out = demo(*SMALL, "--iters", "40", "--log-interval", "20", "--gate", gate)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"top-{top_k}, {gate} gate" in out.stdout
    assert len(re.findall(r"^iter ", out.stdout, re.M)) == 3  # 1, 20, 40
    first, last = map(float, re.search(r"demo: loss (\S+) -> (\S+)", out.stdout).groups())
    assert last < first - 0.5, out.stdout


@pytest.mark.parametrize("flags,named", [
    (["--iters", "0"], "--iters"),
    (["--log-interval", "0"], "--log-interval"),
    (["--d-model", "30"], "--d-model"),
    (["--gate", "switch", "--top-k", "2"], "--top-k"),
    (["--top-k", "5", "--num-expert", "4"], "--top-k"),
    (["--corpus-bytes", "10"], "--corpus-bytes"),
    (["--lr", "-1"], "--lr"),
])
def test_demo_refuses_bad_flags(flags, named):
    out = demo(*flags, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "error:" in last and named in last, out.stderr
