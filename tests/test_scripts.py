"""scripts/test.sh and scripts/setup.sh on a stand-in virtual environment: relative paths; the
command lines' answers to bad input (python -m fastmoe_megatron info, the launch scripts)."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert re.search(r"^tests/test_scripts\.py: \d+$", text, re.M), text[-3000:]  # collected
    # No test path given: pyproject.toml's testpaths, the whole suite.
    assert re.search(r"^tests/integrations/test_moefy\.py: \d+$", text, re.M), text[-3000:]
    assert not (ROOT / "fv").exists()


def test_test_script_runs_only_the_tests_asked_for(tmp_path):
    """A test path (relative to the checkout, from wherever test.sh runs) runs that file alone:
    test.sh passed `tests` to pytest as well, so it ran the whole suite every time."""
    _stand_in_venv(tmp_path / "fv", "torch")
    env = dict(os.environ, FMOE_VENV="fv", FMOE_TORCH="torch", FMOE_SKIP_CUDA_BUILD="1")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "--collect-only", "-q",
                          "-p", "no:cacheprovider", "tests/test_scripts.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    collected = re.findall(r"^(tests/\S+\.py): \d+$", text, re.M)
    assert collected == ["tests/test_scripts.py"], text[-3000:]


@pytest.mark.parametrize("variable,value,allowed", [
    ("FMOE_NATIVE", "yes", "auto, 1, 0"),
    ("FMOE_BACKEND", "bogus", "auto, native, torch"),
])
def test_info_names_a_bad_variable_in_one_line(variable, value, allowed):
    """It was a traceback (from wherever the ops first read the variable)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FMOE_NATIVE="0")  # no build for FMOE_BACKEND
    env[variable] = value
    out = subprocess.run([sys.executable, "-m", "fastmoe_megatron", "info"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [l for l in out.stderr.splitlines() if "cpp_extension" not in l]  # torch's notice
    assert lines == [f"python -m fastmoe_megatron info: {variable}={value!r} is not valid; "
                     f"allowed values: {allowed}"], out.stderr
    assert out.stdout == ""


def test_info_says_why_a_forced_native_backend_has_no_kernels():
    """FMOE_BACKEND=native without native ops: the layers' error pointed at `info`, which then
    died of the same error in a traceback. It reports the build state, and says what is wrong."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FMOE_NATIVE="0", FMOE_BACKEND="native")
    out = subprocess.run([sys.executable, "-m", "fastmoe_megatron", "info"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "native CPU ops" in out.stdout and "disabled by FMOE_NATIVE=0" in out.stdout, out.stdout
    assert ("path in use (CPU) none (FMOE_BACKEND=native, native ops unavailable)"
            in out.stdout), out.stdout
    lines = [l for l in out.stderr.splitlines() if "cpp_extension" not in l]
    assert len(lines) == 1 and lines[0].startswith(
        "python -m fastmoe_megatron info: FMOE_BACKEND=native: the native fmoe ops are not "
        "available for cpu tensors (cpu ops: disabled by FMOE_NATIVE=0)"), out.stderr
    layer = subprocess.run(
        [sys.executable, "-c", "import torch; from fastmoe_megatron import FMoETransformerMLP; "
         "FMoETransformerMLP(num_expert=2, d_model=8, d_hidden=16)(torch.randn(3, 8))"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert layer.returncode == 1
    assert ("RuntimeError: FMOE_BACKEND=native: the native fmoe ops are not available for cpu "
            "tensors (cpu ops: disabled by FMOE_NATIVE=0)") in layer.stderr, layer.stderr


def test_build_failure_is_the_compilers_message_not_a_traceback(tmp_path):
    """`python -m fastmoe_megatron build` with a compiler that fails ended in a traceback through
    torch's extension builder; it says what failed and how to see the compiler's output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CXX="/bin/false", FMOE_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "fastmoe_megatron", "build"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert ("fastmoe_megatron: building the native cpu ops failed: CalledProcessError: Command "
            "'['/bin/false'") in out.stderr, out.stderr
    assert "FMOE_BUILD_VERBOSE=1 shows the compiler's commands and output" in out.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_pretrain_megatron_lm_script_prints_its_usage(flag):
    """It took --help for the checkout: "no such script: --help", status 2."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "pretrain_megatron_lm.sh"), flag],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "scripts/pretrain_megatron_lm.sh CHECKOUT [Megatron-LM flags] --fmoefy" in out.stdout
    assert "NNODES" in out.stdout and "python -m fastmoe_megatron.launch --help" in out.stdout
    assert not any(line.startswith("#") for line in out.stdout.splitlines())


def _fake_torchrun_venv(folder: Path) -> Path:
    """A virtual environment whose bin/torchrun prints its arguments instead of launching."""
    (folder / "bin").mkdir(parents=True)
    torchrun = folder / "bin" / "torchrun"
    torchrun.write_text('#!/bin/sh\necho "torchrun $*"\n')
    torchrun.chmod(0o755)
    return folder


@pytest.mark.parametrize("script", ["pretrain_gpt_multinode.sh", "pretrain_megatron_lm.sh"])
def test_other_nodes_need_the_master_address(script, tmp_path):
    """NODE_RANK > 0 without MASTER_ADDR used to rendezvous on 127.0.0.1, which is that node
    itself: it waited out torchrun's timeout for a master that never came. Node 0 may leave it
    unset (it is the master)."""
    venv = _fake_torchrun_venv(tmp_path / "venv")
    target = tmp_path / "pretrain_gpt.py"
    target.write_text("raise SystemExit('must not run')\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT")}
    env.update(NNODES="2", NPROC_PER_NODE="1", FMOE_VENV=str(venv))
    args = [str(target)] if script == "pretrain_megatron_lm.sh" else []

    def run(**extra):
        return subprocess.run(["bash", str(ROOT / "scripts" / script), *args],
                              env=dict(env, **extra), capture_output=True, text=True, timeout=60)

    out = run(NODE_RANK="1")
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr == (f"{script}: NODE_RANK=1 needs MASTER_ADDR, node 0's address "
                          "(or RDZV_ENDPOINT)\n")
    out = run(NODE_RANK="1", MASTER_ADDR="node0")
    assert out.returncode == 0, out.stderr
    assert "--node-rank 1 --master-addr node0 --master-port 29500" in out.stdout
    out = run(NODE_RANK="0")
    assert out.returncode == 0, out.stderr
    assert "--node-rank 0 --master-addr 127.0.0.1 --master-port 29500" in out.stdout


@pytest.mark.parametrize("script", ["pretrain_gpt.sh", "pretrain_gpt_multinode.sh",
                                    "pretrain_megatron_lm.sh"])
def test_launch_scripts_without_a_venv_say_to_set_up(script, tmp_path):
    """Before scripts/setup.sh (or with a mistyped FMOE_VENV), the launch scripts ended with
    bash's "No such file or directory" (status 127) for the venv's torchrun or python; now one
    line naming the folder and setup.sh (status 2)."""
    venv = tmp_path / "no-venv"
    (tmp_path / "checkout").mkdir()  # pretrain_megatron_lm.sh's first argument
    (tmp_path / "checkout" / "pretrain_gpt.py").write_text("")
    out = subprocess.run(["bash", str(ROOT / "scripts" / script), str(tmp_path / "checkout"),
                          "--train-iters", "1"],
                         env=dict(os.environ, FMOE_VENV=str(venv), NNODES="1"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"{script}: no torchrun in {venv}: run scripts/setup.sh first, or set FMOE_VENV to the "
        "virtual environment it made"], out.stderr
