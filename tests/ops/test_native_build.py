"""How the native libraries are cached: a library whose build did not finish is never loaded, and
the CUDA library's cache key follows the GPUs it is built for; and that a built wheel carries the
sources they are built from."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from fastmoe_megatron import _native

ROOT = Path(__file__).resolve().parents[2]

LOAD = textwrap.dedent("""
    import torch
    from fastmoe_megatron import _native
    assert _native.load("cpu") is True, _native.status()
    counts = torch.ops.fmoe.expert_count(torch.tensor([[0, 2], [2, -1]]), 3)
    assert counts.tolist() == [1, 0, 2], counts
    print("LOADED", _native.status()["cpu_path"])
""")


@pytest.mark.timeout(600)
def test_half_written_library_is_not_loaded(tmp_path):
    """The linker writes the library in place, so a process that starts while another one links
    (or after one died linking) finds a truncated file at the cached path. It used to load it and
    die of SIGBUS; now it waits for the builder's lock or rebuilds, here in two processes at once."""
    if not _native.load("cpu"):
        pytest.skip(f"native CPU ops unavailable: {_native.status()}")
    real = Path(_native.status()["cpu_path"]).read_bytes()
    env = dict(os.environ, FMOE_CACHE_DIR=str(tmp_path), FMOE_NATIVE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    plan = subprocess.run(
        [sys.executable, "-c", "from fastmoe_megatron import _native; p = _native._plan('cpu'); "
         "print(p['lib']); print(p['done'])"], env=env, capture_output=True, text=True, check=True)
    lib, done = map(Path, plan.stdout.split())
    lib.parent.mkdir(parents=True)
    lib.write_bytes(real[:4096])  # a valid ELF header, then nothing
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=500)
        assert p.returncode == 0 and "LOADED" in out, f"exit {p.returncode}\n{out}\n{err[-3000:]}"
    assert done.is_file() and lib.stat().st_size > 4096
    assert _native.cached_library("cpu") is not None


def test_cuda_cache_key_follows_the_detected_gpus(monkeypatch):
    """Without TORCH_CUDA_ARCH_LIST, cpp_extension builds for the visible GPUs: a cache shared by
    nodes with different GPUs must not hand one node's library to the other. (No GPU here: the
    devices torch reports are stand-ins.)"""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    keys = {}
    for caps in ([(9, 0), (9, 0)], [(8, 0), (8, 0)], [(8, 0), (9, 0)]):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, caps=caps: caps[i])
        keys[tuple(caps)] = _native._build_key("cuda", ["-O3"])
    assert len(set(keys.values())) == 3, keys
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _native._build_key("cuda", ["-O3"]) not in keys.values()


INSTALLED = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import fastmoe_megatron
    from fastmoe_megatron import _native
    pkg = Path(fastmoe_megatron.__file__).resolve().parent
    assert pkg.parent == Path(sys.argv[1]).resolve(), pkg
    assert _native.csrc_dir() == pkg / "csrc", _native.csrc_dir()
    assert (pkg / "patches" / "megatron-lm-core_v0.16.1.patch").is_file()
    assert _native.load("cpu") is True, _native.status()
    counts = torch.ops.fmoe.expert_count(torch.tensor([[0, 2], [2, -1]]), 3)
    assert counts.tolist() == [1, 0, 2], counts
    print("INSTALLED", _native.status()["cpu_path"])
""")


@pytest.mark.timeout(600)
def test_a_built_wheel_carries_the_native_sources_and_the_patch(tmp_path):
    """A non-editable install (``pip install .``, or a wheel) used to hold the Python package only:
    without ``csrc/`` the native ops could not build (``FMOE_NATIVE=1`` raised, ``auto`` fell back
    to pure PyTorch), and the Megatron-LM patch was missing. The wheel is built from a copy of the
    checkout and unpacked outside it, where nothing can be found beside the package."""
    setuptools = pytest.importorskip("setuptools")
    version = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {setuptools.__version__} builds wheels only with the wheel package")
    if not _native.load("cpu"):
        pytest.skip(f"native CPU ops unavailable: {_native.status()}")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("fastmoe_megatron", "csrc", "patches"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = wheels.glob("fastmoe_megatron-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    expected = {f"fastmoe_megatron/csrc/{p.relative_to(ROOT / 'csrc').as_posix()}"
                for p in (ROOT / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    expected |= {f"fastmoe_megatron/patches/{p.name}" for p in (ROOT / "patches").iterdir()}
    assert expected <= names, sorted(expected - names)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FMOE_NATIVE="1", PYTHONPATH=str(tmp_path / "site"))
    run = subprocess.run([sys.executable, "-c", INSTALLED, str(tmp_path / "site")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0 and "INSTALLED" in run.stdout, run.stdout + run.stderr[-3000:]
