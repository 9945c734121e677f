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
import socket
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
    """The ``csrc/`` folder: beside the package in a checkout (editable install), or inside it
    (a built wheel, which ``setup.py`` gives a copy)."""
    for cand in (_PKG_DIR.parent / "csrc", _PKG_DIR / "csrc"):
        if (cand / "fmoe_ops.h").is_file():
            return cand
    raise FileNotFoundError(
        "fastmoe_megatron: csrc/ not found next to or inside the package; install the package "
        "from a checkout with `pip install .` or `pip install -e .`"
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


def _is_cuda_home(path) -> bool:
    """A CUDA toolkit root: has ``bin/nvcc`` and the runtime headers."""
    if not path:
        return False
    p = Path(path)
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime_api.h").is_file()


def _find_cuda_home() -> str | None:
    """The CUDA toolkit to build with: ``CUDA_HOME`` / ``CUDA_PATH`` when set, else the toolkit of
    the ``nvcc`` on PATH (following symlinks), else ``/usr/local/cuda`` or the newest
    ``/usr/local/cuda-X.Y``. torch's own guess (the parent of the ``bin/`` that holds ``nvcc``) is
    wrong when ``nvcc`` is a wrapper script, e.g. ``/usr/local/bin/nvcc``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands += [Path(nvcc).parent.parent, Path(os.path.realpath(nvcc)).parent.parent]
    cands.append(Path("/usr/local/cuda"))

    def version(p: Path):
        try:
            return tuple(int(x) for x in p.name.split("-", 1)[1].split("."))
        except ValueError:
            return ()

    cands += sorted(Path("/usr/local").glob("cuda-*"), key=version, reverse=True)
    for cand in cands:
        if _is_cuda_home(cand):
            return str(cand)
    return None


def _ensure_cuda_home() -> None:
    """Sets ``CUDA_HOME`` (when the user did not) before ``torch.utils.cpp_extension`` reads it,
    and corrects the module's guess when it was imported earlier with a wrong one."""
    found = _find_cuda_home()
    if found is None:
        return
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        os.environ["CUDA_HOME"] = found
    mod = sys.modules.get("torch.utils.cpp_extension")
    if mod is not None and getattr(mod, "CUDA_HOME", None) != found and _is_cuda_home(found):
        mod.CUDA_HOME = found


def _cuda_flags(cuda_home: str | None = None) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(include_dirs, cxx_flags, nvcc_flags, ldflags)`` for the cuda library.

    - cuBLAS / cuSPARSE / cuSOLVER headers (pulled in by ATen's CUDA headers in the C++ sources)
      come from the CUDA wheels that torch depends on (``nvidia/cu13/include``, or the cu12-era
      ``nvidia/*/include`` folders) when the toolkit lacks them. They are added with
      ``-idirafter`` for the C++ compiler only, so the toolkit's own headers always win and nvcc
      never mixes two header versions (the .cu sources need only the CUDA runtime headers).
    - NCCL: the ``nvidia/nccl`` wheel's header, and its ``libnccl.so.2`` linked by path with an
      rpath; ``FMOE_WITH_NCCL`` is defined only when both are found.
    """
    cuda_home = cuda_home or _find_cuda_home()
    toolkit_has_cublas = bool(cuda_home) and (Path(cuda_home) / "include" / "cublas_v2.h").is_file()
    after_dirs: list[str] = []
    if not toolkit_has_cublas:
        for base in sys.path:
            for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include",
                        "nvidia/cublas/include", "nvidia/cusparse/include",
                        "nvidia/cusolver/include"):
                p = Path(base) / sub
                if p.is_dir() and str(p) not in after_dirs:
                    after_dirs.append(str(p))
    nccl_inc, nccl_lib = nccl_paths()
    ldflags: list[str] = []
    for lib in nccl_lib:
        so = sorted(glob.glob(os.path.join(lib, "libnccl.so*")))
        if so:
            ldflags += [so[0], f"-Wl,-rpath,{lib}"]
            break
    defines = ["-DFMOE_WITH_NCCL"] if ldflags and nccl_inc else []
    cxx_flags = defines + [f for d in after_dirs for f in ("-idirafter", d)]
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"] + defines
    return (nccl_inc if defines else []), cxx_flags, nvcc_flags, ldflags


def _build_key(kind: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for p in _sources(kind) + _headers():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(flags).encode())
    if kind == "cuda":
        h.update(_cuda_arch_key().encode())
    return h.hexdigest()[:16]


def _cuda_arch_key() -> str:
    """The GPU architectures a CUDA build targets: ``TORCH_CUDA_ARCH_LIST`` when set, else (as
    ``cpp_extension`` does) the compute capabilities of the visible GPUs. Part of the cache key, so
    that a cache shared by nodes with different GPUs holds one library per architecture set."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        return arch
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return "detected:" + ";".join(f"{a}.{b}" for a, b in caps)
    return ""


def _compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _plan(kind: str) -> dict:
    """Sources, flags and the cached library path of ``kind``'s build (nothing is compiled)."""
    _ensure_cuda_home()  # torch reads CUDA_HOME once, when cpp_extension is first imported
    from torch.utils import cpp_extension

    sources = _sources(kind)
    if not sources:
        raise RuntimeError(f"no {kind} sources in {csrc_dir()}")
    extra_include = [str(csrc_dir())]
    cflags = ["-O3"]
    cuda_cflags: list[str] = []
    ldflags: list[str] = []
    if kind == "cpu" and sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is a header template: without OpenMP in *this* build its `omp parallel`
        # is compiled out and every parallel loop of the kernels runs on one thread. The library
        # then links the libgomp.so.1 that torch has already loaded (same soname).
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if kind == "cuda":
        _ensure_cuda_home()  # in case cpp_extension was imported before with a wrong guess
        if not _is_cuda_home(cpp_extension.CUDA_HOME):
            raise RuntimeError(
                f"no CUDA toolkit found (CUDA_HOME={cpp_extension.CUDA_HOME!r}); set CUDA_HOME to "
                "the folder that holds bin/nvcc")
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Nothing to detect: build for Hopper only, to keep the compile-only check short.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        incs, cxx_only, cuda_cflags, ldflags = _cuda_flags(cpp_extension.CUDA_HOME)
        extra_include += incs
        cflags += cxx_only
    name = f"fmoe_{kind}_{_build_key(kind, cflags + cuda_cflags + ldflags)}"
    build_dir = cache_dir() / name
    return dict(name=name, build_dir=build_dir, lib=build_dir / f"{name}.so",
                done=build_dir / "built", sources=sources, cflags=cflags,
                cuda_cflags=cuda_cflags, ldflags=ldflags, include=extra_include)


def cached_library(kind: str) -> Path | None:
    """The built library of ``kind`` for the current sources, if its build finished."""
    try:
        plan = _plan(kind)
    except (RuntimeError, FileNotFoundError):
        return None
    return plan["lib"] if plan["done"].is_file() and plan["lib"].is_file() else None


def _build(kind: str) -> None:
    """Loads ``kind``'s library from the cache, building it first unless a finished build is
    there. A build is finished once its ``built`` marker exists: the linker writes the library in
    place, so a library without the marker may be half written (by another process that is
    building it now, or one that died). Such a library goes through ``cpp_extension.load``,
    which waits for the other process's lock, or rebuilds what is missing."""
    from torch.utils import cpp_extension

    plan = _plan(kind)
    lib, build_dir, done = plan["lib"], plan["build_dir"], plan["done"]
    if done.is_file() and lib.is_file():
        torch.ops.load_library(str(lib))
    else:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not lib.is_file():
            print(
                f"fastmoe_megatron: building the native {kind} ops (first use; about "
                f"{'15 s' if kind == 'cpu' else '2 min'} on 2 cores), cached in {build_dir}",
                file=sys.stderr,
                flush=True,
            )
        t0 = time.time()
        cpp_extension.load(
            name=plan["name"],
            sources=[str(s) for s in plan["sources"]],
            extra_cflags=plan["cflags"],
            extra_cuda_cflags=plan["cuda_cflags"],
            extra_ldflags=plan["ldflags"],
            extra_include_paths=plan["include"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=os.environ.get("FMOE_BUILD_VERBOSE") == "1",
        )
        tmp = done.with_name(f"built.{socket.gethostname()}.{os.getpid()}")  # unique on shared disks
        tmp.write_text(f"{lib.name}\n")
        os.replace(tmp, done)  # atomic: the marker is there whole, or not at all
        if time.time() - t0 > 1:
            print(f"fastmoe_megatron: built the native {kind} ops in {time.time() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    _state[f"{kind}_path"] = str(lib)


def load(kind: str = "cpu") -> bool:
    """Loads (building if needed) the native ``kind`` ops; returns whether they are usable.

    With ``FMOE_NATIVE=auto`` a failure warns once and returns False; with ``1`` it raises.
    """
    state = _state.get(kind)
    if state is not None:  # fast path, lock-free, so that torch.compile can trace the op calls
        return state is True
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
            _state[kind] = "skipped: " + (
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
