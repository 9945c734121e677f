"""Checkpoints of pretrain_gpt in megatron-core's dist_checkpointing format.

Layout: ``<save>/iter_0000100/`` (one dist_checkpointing folder: model, optimizer, scheduler,
iteration) and ``<save>/latest_checkpointed_iteration.txt``. A checkpoint is written into
``iter_XXXXXXX.tmp`` and renamed only after every rank finished, and the ``latest`` file is
replaced atomically after that, so a run killed while saving leaves the previous checkpoint as
the latest one. Expert tensors carry a global expert axis (MegatronMLP.sharded_state_dict), so
every rank's experts are saved and restored, and a checkpoint can be loaded at another
expert-parallel size.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from .fmoefy import unwrap

LATEST = "latest_checkpointed_iteration.txt"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root) -> int | None:
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise RuntimeError(f"{path} is corrupt: expected an iteration number, found {text!r}")
    return int(text)


def _state(model, optimizer, loading: bool):
    model_sd = unwrap(model).sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading)}


def save(root, iteration: int, model, optimizer, scheduler, args=None) -> Path:
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = checkpoint_dir(root, iteration), Path(str(checkpoint_dir(root, iteration)) + ".tmp")
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = _state(model, optimizer, loading=False)
    state["iteration"] = iteration
    state["opt_param_scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank0():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / (LATEST + ".tmp")
        latest_tmp.write_text(str(iteration))
        os.replace(latest_tmp, root / LATEST)
        print(f"checkpoint: saved iteration {iteration} to {final}", flush=True)
    _barrier()
    return final


def load(root, model, optimizer, scheduler, args=None) -> int:
    """Loads the latest checkpoint under ``root``; returns its iteration (0 if there is none)."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        if _rank0():
            print(f"checkpoint: nothing to load in {root}; starting from scratch", flush=True)
        return 0
    path = checkpoint_dir(root, iteration)
    if not path.is_dir():
        raise RuntimeError(f"{Path(root) / LATEST} names iteration {iteration}, but {path} is missing")
    state = _state(model, optimizer, loading=True)
    state["iteration"] = None
    state["opt_param_scheduler"] = None
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:
        raise RuntimeError(f"could not load the checkpoint {path}: {exc}") from exc
    unwrap(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    if loaded.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if _rank0():
        print(f"checkpoint: resumed from {path} (iteration {iteration})", flush=True)
    return int(loaded["iteration"])
