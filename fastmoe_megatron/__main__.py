"""``python -m fastmoe_megatron <command>``: ``info`` (versions and which ops are in use),
``build`` (compile the native ops ahead of time), ``demo`` (train a small MoE model on CPU)."""
from __future__ import annotations

import argparse
import re
import sys


def _nccl_versions() -> tuple[str, str]:
    import importlib.metadata as md

    import torch

    torch_nccl = "n/a (CPU build of torch)"
    if torch.version.cuda:
        try:
            v = torch.cuda.nccl.version()
            torch_nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as exc:  # noqa: BLE001
            torch_nccl = f"unknown ({exc})"
    wheel = "not installed"
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-nccl"):
            wheel = f"{dist.metadata['Name']} {dist.version}"
    return torch_nccl, wheel


def cmd_info(args) -> int:
    """Prints versions and the ops in use; a bad ``FMOE_*`` variable (which the ops check as they
    load) is one line on stderr and status 2, not a traceback. So is ``FMOE_BACKEND=native``
    where the native ops are unavailable, after the rest of the report (which says why)."""
    try:
        return _info()
    except ValueError as exc:
        if not re.match(r"FMOE_\w+=.* is not valid", str(exc)):
            raise
        print(f"python -m fastmoe_megatron info: {exc}", file=sys.stderr)
        return 2


def _info() -> int:
    import torch

    from . import __version__, _native, ops

    cpu_ok = _native.load("cpu")
    cuda_ok = _native.load("cuda")
    torch_nccl, wheel = _nccl_versions()
    status = _native.status()
    ops._forced()  # before any output: a bad FMOE_BACKEND is one line (cmd_info)
    paths, unusable = [], []
    for kind, device in (("CPU", "cpu"), ("GPU", "cuda")):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        try:
            paths.append((kind, ops.backend_name(device)))
        except RuntimeError as exc:  # FMOE_BACKEND=native without native ops: say why, and go on
            paths.append((kind, "none (FMOE_BACKEND=native, native ops unavailable)"))
            unusable.append(str(exc))
    print(f"fastmoe_megatron {__version__}")
    print(f"python            {sys.version.split()[0]}")
    print(f"torch             {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
          f"GPU available: {torch.cuda.is_available()})")
    print(f"NCCL (torch)      {torch_nccl}")
    print(f"NCCL wheel        {wheel}")
    for kind, ok in (("CPU", cpu_ok), ("CUDA", cuda_ok)):
        cached = _native.cached_library(kind.lower())
        if ok:
            line = "built and loaded"
        elif cached is not None:
            line = f"built, not loaded ({status.get(kind.lower())})"
        else:
            line = f"not built ({status.get(kind.lower())})"
        print(f"native {kind + ' ops':<11}{line}")
    for kind, path in paths:
        print(f"path in use ({kind}) {path}")
    for kind in ("cpu", "cuda"):
        path = status.get(f"{kind}_path") or _native.cached_library(kind)
        if path:
            print(f"{kind} library{' ' * (8 - len(kind))}{path}")
    for message in unusable:
        print(f"python -m fastmoe_megatron info: {message}", file=sys.stderr)
    return 2 if unusable else 0


def cmd_build(args) -> int:
    import os

    from . import _native

    os.environ["FMOE_NATIVE"] = "1"
    if args.cuda:
        os.environ["FMOE_CUDA_OPS"] = "1"
    try:
        _native.load("cpu")
        if args.cuda:
            _native.load("cuda")
    except RuntimeError as exc:  # the compiler's message, not a traceback through torch's build
        cause = exc.__cause__
        print(f"{exc}: " + (f"{type(cause).__name__}: {cause}" if cause is not None else "")
              + "\n(FMOE_BUILD_VERBOSE=1 shows the compiler's commands and output)",
              file=sys.stderr)
        return 1
    print("fastmoe_megatron: native ops ready:", ", ".join(
        k for k, v in _native.status().items() if v is True))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmoe_megatron")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which native ops are built and in use")
    b = sub.add_parser("build", help="compile the native ops now (they are cached)")
    b.add_argument("--cuda", action="store_true",
                   help="also compile the CUDA ops, even without a GPU (a compile check)")
    d = sub.add_parser("demo", help="train a small FMoETransformerMLP model on CPU")
    from .demo import add_args

    add_args(d)
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "build":
        return cmd_build(args)
    from .demo import check_args, run

    check_args(d, args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
