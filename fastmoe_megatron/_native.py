"""Build and load the native ops in ``csrc/``.

The ops are compiled on first use with ``torch.utils.cpp_extension`` and cached; the cache key is a
hash of the sources, the torch version and the flags, so a changed source or torch rebuilds and an
unchanged one loads in milliseconds. Two libraries are built:

- ``cpu``: the op schemas and the CPU kernels (C++ only);
- ``cuda``: the CUDA kernels and the NCCL communicator, built when CUDA is usable (or forced).

Environment variables:

- ``FMOE_NATIVE``: ``auto`` (default: build, and fall back to pure PyTorch with one warning if that
  fails), ``1`` (native ops are required: failure raises), ``0`` (never build; pure PyTorch).
- ``FMOE_CUDA_OPS``: ``auto`` (default: build when ``torch.cuda.is_available()``), ``1`` (build
  even without a GPU, e.g. to check that the sources compile), ``0`` (never).
- ``FMOE_CACHE_DIR``: where builds are cached (default ``~/.cache/fastmoe_megatron``).
- ``FMOE_BUILD_VERBOSE=1``: show the compiler's output.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

_VALID = ("auto", "0", "1")
_lock = threading.Lock()
_state: dict[str, object] = {}  # kind -> True | error message

_PKG_DIR = Path(__file__).resolve().parent


def csrc_dir() -> Path:
    """The ``csrc/`` folder: beside the package in a checkout (editable install)."""
    for cand in (_PKG_DIR.parent / "csrc", _PKG_DIR / "csrc"):
        if (cand / "fmoe_ops.h").is_file():
            return cand
    raise FileNotFoundError(
        "fastmoe_megatron: csrc/ not found next to the package; install the package from a "
        "checkout with `pip install -e .`"
    )


def _env(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in _VALID:
        raise ValueError(f"{name}={value!r} is not valid; allowed values: auto, 1, 0")
    return value


def cache_dir() -> Path:
    return Path(os.environ.get("FMOE_CACHE_DIR", Path.home() / ".cache" / "fastmoe_megatron"))


def _sources(kind: str) -> list[Path]:
    root = csrc_dir()
    if kind == "cpu":
        return [root / "registration.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    return sorted((root / "cuda").glob("*.cpp")) + sorted((root / "cuda").glob("*.cu"))


def _headers() -> list[Path]:
    root = csrc_dir()
    return sorted(root.rglob("*.h")) + sorted(root.rglob("*.cuh"))


def nccl_paths() -> tuple[list[str], list[str]]:
    """Include and library folders of the NCCL wheel that torch itself depends on."""
    incs, libs = [], []
    for base in sys.path:
        nccl = Path(base) / "nvidia" / "nccl"
        if (nccl / "include" / "nccl.h").is_file():
            incs.append(str(nccl / "include"))
            libs.append(str(nccl / "lib"))
            break
    return incs, libs


def _cuda_flags() -> tuple[list[str], list[str], list[str]]:
    site_incs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cublas/include"):
            p = Path(base) / sub
            if p.is_dir():
                site_incs.append(str(p))
    nccl_inc, nccl_lib = nccl_paths()
    ldflags = []
    for lib in nccl_lib:
        so = sorted(glob.glob(os.path.join(lib, "libnccl.so*")))
        if so:
            ldflags += [so[0], f"-Wl,-rpath,{lib}"]
    cflags = ["-O3", "-DFMOE_WITH_NCCL"] if ldflags else ["-O3"]
    return site_incs + nccl_inc, cflags, ldflags


def _build_key(kind: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for p in _sources(kind) + _headers():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(flags).encode())
    if kind == "cuda":
        h.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    return h.hexdigest()[:16]


def _compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _build(kind: str) -> None:
    from torch.utils import cpp_extension

    sources = _sources(kind)
    if not sources:
        raise RuntimeError(f"no {kind} sources in {csrc_dir()}")
    extra_include = [str(csrc_dir())]
    cflags = ["-O3"]
    cuda_cflags: list[str] = []
    ldflags: list[str] = []
    if kind == "cuda":
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("CUDA_HOME is not set and nvcc was not found")
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Nothing to detect: build for Hopper only, to keep the compile-only check short.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        incs, cuda_only, ldflags = _cuda_flags()
        extra_include += incs
        cflags += [f for f in cuda_only if f != "-O3"]
        cuda_cflags = cuda_only + ["--expt-relaxed-constexpr"]
    key = _build_key(kind, cflags + cuda_cflags + ldflags)
    name = f"fmoe_{kind}_{key}"
    build_dir = cache_dir() / name
    lib = build_dir / f"{name}.so"
    if not lib.is_file():
        build_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"fastmoe_megatron: building the native {kind} ops (first use; about "
            f"{'1' if kind == 'cpu' else '5'}+ min on 2 cores), cached in {build_dir}",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.time()
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_ldflags=ldflags,
            extra_include_paths=extra_include,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=os.environ.get("FMOE_BUILD_VERBOSE") == "1",
        )
        print(f"fastmoe_megatron: built the native {kind} ops in {time.time() - t0:.0f} s",
              file=sys.stderr, flush=True)
    else:
        torch.ops.load_library(str(lib))
    _state[f"{kind}_path"] = str(lib)


def load(kind: str = "cpu") -> bool:
    """Loads (building if needed) the native ``kind`` ops; returns whether they are usable.

    With ``FMOE_NATIVE=auto`` a failure warns once and returns False; with ``1`` it raises.
    """
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        return _load_locked(kind)


def _load_locked(kind: str) -> bool:
    if kind in _state:
        return _state[kind] is True
    mode = _env("FMOE_NATIVE")
    if mode == "0":
        _state[kind] = "disabled by FMOE_NATIVE=0"
        return False
    required = mode == "1"
    if kind == "cuda":
        cuda_mode = _env("FMOE_CUDA_OPS")
        if cuda_mode == "0" or (cuda_mode == "auto" and not torch.cuda.is_available()):
            _state[kind] = "not built: " + (
                "FMOE_CUDA_OPS=0" if cuda_mode == "0" else "CUDA is not available")
            return False
        required = required or cuda_mode == "1"
        # The CUDA kernels register for the schemas that the CPU library defines.
        if not _load_locked("cpu"):
            _state[kind] = "needs the cpu ops, which are not available"
            return False
    try:
        if not _compiler_available():
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        _build(kind)
        _state[kind] = True
    except Exception as exc:  # noqa: BLE001 - reported to the user below
        _state[kind] = f"{type(exc).__name__}: {exc}"
        if required:
            raise RuntimeError(f"fastmoe_megatron: building the native {kind} ops failed") from exc
        warnings.warn(
            f"fastmoe_megatron: native {kind} ops unavailable ({_state[kind]}); using the "
            "pure-PyTorch fallback. Set FMOE_NATIVE=0 to silence this, or FMOE_BUILD_VERBOSE=1 "
            "to see the compiler output.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _state[kind] is True


def status() -> dict[str, object]:
    """What was built and loaded, for ``python -m fastmoe_megatron info``."""
    return dict(_state)
