"""Checkpoints for pretrain_gpt and for fmoefy'd models in a user's own training loop.

Layout under a checkpoint root (``--save`` / ``--load``)::

    <root>/latest_checkpointed_iteration.txt     the iteration of the newest complete checkpoint
    <root>/iter_0000100/                          one checkpoint (a root may have any other
                                                  name, iter_run included)
        fmoe_checkpoint.json                      manifest: format, layout, model shapes, files
        ...                                       the format's own files (below)

Two formats (``--ckpt-format``):

- ``torch_dist`` (default): megatron-core's ``dist_checkpointing`` (PyTorch distributed
  checkpoint files, ``common.pt``, ``metadata.json``). Every tensor is stored by its global
  key and offset: expert tensors carry a global expert axis (``MegatronMLP.sharded_state_dict``),
  so the checkpoint loads at any expert-parallel size (and any data-parallel size), the optimizer
  state included, except the distributed optimizer's, which megatron-core reshards over data
  parallel only (at another TP, PP or EP size, load the model with ``--no-load-optim``).
- ``torch``: one ``torch.save`` file per rank,
  ``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt`` (Megatron-LM's folder names;
  further data-parallel replicas of the same folder write ``model_optim_rng_dp{i:03d}.pt``). A
  file holds the rank's own (main-replica) shards of the same sharded state dict, each with its
  global key and offset, so this format also reshards when the layout changes.

What a checkpoint holds: the model, the optimizer state (megatron-core's, or a torch optimizer's
per rank), the lr scheduler, the iteration and the samples consumed (the data position:
pretrain_gpt's ``BatchIterator`` resumes at that sample, whatever the global batch size is now),
every rank's RNG states (Python, NumPy, torch CPU
and CUDA generators, megatron-core's tensor-parallel RNG tracker) and the aux-loss-free balancing
state (the gates' ``expert_bias`` buffers, part of the model). Resuming at the same layout
continues bitwise as if the run had not stopped. At another layout the RNG states are not
restored (they belong to ranks that no longer exist); a warning says so. A run that saves
without a step after such a load (a ``--skip-train`` conversion, ``reshard``) saves no RNG
states (``"rng": false`` in the manifest's contents): a load of it keeps its own, and says so.

Failure handling:

- Atomic saves: a checkpoint is written into ``iter_XXXXXXX.tmp``; after every rank has written
  its part, rank 0 writes the manifest (size and CRC32 of every file), renames the folder and
  then replaces the ``latest`` file (write + ``os.replace``). A process killed at any point
  leaves the previous checkpoint as the latest one (or, killed after committing the first one
  but before writing ``latest``, that one); leftover ``.tmp`` folders are removed by the
  next save. Saving an iteration that already has a checkpoint moves the old folder to
  ``iter_XXXXXXX.old`` until the new one is committed (a load falls back to it if killed in
  between).
- Loads check the manifest first: a missing, truncated or altered file raises
  ``CheckpointError`` naming the file. Nothing is unpickled without an allowlist: torch files
  (``common.pt``, the per-rank files, the objects inside the distributed checkpoint files) are
  read with ``torch.load(weights_only=True)``; PyTorch's ``.metadata`` file (a plain pickle) is
  read with an unpickler that accepts only the checkpoint metadata classes.
- A model whose shapes differ from the checkpoint's raises ``CheckpointError`` listing the
  differing tensors (and the differing flags, when both sides come from pretrain_gpt) before
  anything is loaded; so does one whose shapes fit but whose architecture differs (another
  number of attention heads, activation, position embedding, ...: ``ARCH_CONFIG_FIELDS``, which
  the manifest records), naming each setting.
- ``--load`` of a folder that does not exist or holds no checkpoint starts from scratch (and
  says so); a checkpoint folder without its manifest, or a root with checkpoints but no
  ``latest`` file, raises ``CheckpointError`` (a fresh start would overwrite them). The one
  exception is a root whose only ``iter_*`` folder (unfinished ``.tmp`` ones aside) is one
  complete checkpoint, as a run killed between committing its first checkpoint and writing
  ``latest`` leaves it: that checkpoint is loaded (with a warning).

Fault injection (tests and ``scripts/soak_test.py``): ``FMOE_FAULT_INJECT`` holds comma-separated
``point:iteration[:rank[:action]]`` entries; ``point`` is ``step`` (pretrain_gpt, between the
backward pass and the optimizer step), ``save`` (after this rank wrote its files, before the
checkpoint is committed) or ``commit`` (rank 0, after the folder rename, before ``latest`` is
updated); ``action`` is ``kill`` (SIGKILL itself, the default), ``exit`` (``os._exit(17)``) or
``term`` (SIGTERM itself, as a scheduler's preemption does) or ``sleepN`` (sleep N seconds).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .fmoefy import moe_modules, unwrap

LATEST = "latest_checkpointed_iteration.txt"
MANIFEST = "fmoe_checkpoint.json"
FORMATS = ("torch_dist", "torch")
TORCH_FILE = "model_optim_rng.pt"
VERSION = 1
FAULT_ENV = "FMOE_FAULT_INJECT"
#: How megatron-core's distributed optimizer lays out its state in checkpoints: in canonical
#: per-parameter tensors, which load at any data-parallel size (megatron-core's
#: default in 0.16, "fully_sharded_model_space", saves flattened tensors that 0.16 itself
#: rejects). The price: the save gathers each parameter's optimizer state on its data-parallel
#: rank 0. Other megatron-core optimizers ignore it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}

#: pretrain_gpt flags that decide the shapes of the model's tensors (named in mismatch errors).
SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "max_position_embeddings", "make_vocab_size_divisible_by", "fmoefy",
               "fmoe_num_experts", "hidden_hidden_size", "balance_strategy",
               "fmoe_expert_bias_update_rate", "untie_embeddings_and_output_weights",
               "position_embedding_type", "vocab_file", "disable_bias_linear", "swiglu")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, partial, corrupt, unsafe, or for another
    model. The message names the file or the tensors concerned."""


# ------------------------------------------------------------------------------------- helpers

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank0() -> bool:
    return _rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _warn0(msg: str):
    if _rank0():
        print(f"checkpoint: warning: {msg}", file=sys.stderr, flush=True)


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fault_point(point: str, iteration: int) -> None:
    """Fault injection for tests (see the module doc, ``FMOE_FAULT_INJECT``)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank = _rank()
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) < 2 or parts[0] != point or int(parts[1]) != iteration:
            continue
        if len(parts) > 2 and parts[2] not in ("", "*") and int(parts[2]) != rank:
            continue
        action = parts[3] if len(parts) > 3 else "kill"
        print(f"fault injection: {action} on rank {rank} at '{point}' of iteration {iteration}",
              file=sys.stderr, flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "exit":
            os._exit(17)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action.startswith("sleep"):
            time.sleep(float(action[5:] or 3600))
        else:
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} in {item!r}")


def checkpoint_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


_CHECKPOINT_NAME = re.compile(r"iter_(\d+)(\.old|\.tmp)?")


def checkpoint_name(name: str) -> Optional[tuple[int, str]]:
    """``(iteration, suffix)`` when ``name`` is one that saves give a checkpoint folder:
    ``iter_<digits>``, with suffix ``""``, ``".old"`` (set aside by a re-save of its iteration) or
    ``".tmp"`` (being written); else None. Exact, not a prefix test: a checkpoint root that its
    user named ``iter_run`` is a root, and its checkpoints must load."""
    m = _CHECKPOINT_NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2) or "") if m else None


def _consumed_samples(manifest: dict, iteration: int) -> Optional[int]:
    consumed = manifest.get("consumed_samples")
    saved_batch = (manifest.get("args") or {}).get("global_batch_size")
    if consumed is None and saved_batch:  # written before consumed_samples was recorded
        consumed = iteration * int(saved_batch)
    return consumed


def latest_iteration(root) -> int | None:
    """The iteration the ``latest`` file of the root ``root`` names; None without one, except
    after an interrupted first save (see ``_first_save_committed``)."""
    path = Path(root) / LATEST
    if not path.is_file():
        return _first_save_committed(Path(root))
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} is corrupt: expected an iteration number, found {text!r}")
    return int(text)


def _first_save_committed(root: Path) -> int | None:
    """A run killed between committing its first checkpoint and writing ``latest`` leaves a root
    whose only ``iter_*`` folder (unfinished ``.tmp`` ones aside) is that complete checkpoint: its
    iteration is then the latest, so that the restart resumes from it (as after a kill during any
    later save) instead of stopping. Any other root without ``latest`` gives None."""
    if not root.is_dir() or (root / MANIFEST).is_file():
        return None
    found = [(p.name, checkpoint_name(p.name)) for p in root.iterdir()]
    found = [(name, parsed) for name, parsed in found if parsed and parsed[1] != ".tmp"]
    if len(found) == 1 and found[0][1][1] == "" and (root / found[0][0] / MANIFEST).is_file():
        return found[0][1][0]
    return None


def resolve(path) -> Path:
    """The checkpoint folder for ``path``: itself when it is one (it holds a manifest), else the
    latest checkpoint under the root ``path``."""
    path = Path(path)
    if (path / MANIFEST).is_file() or checkpoint_name(path.name):
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        raise CheckpointError(f"{path} holds no checkpoint ({path / LATEST} is missing)")
    found = checkpoint_dir(path, iteration)
    if not found.is_dir():
        old = found.with_name(found.name + ".old")
        if (old / MANIFEST).is_file():  # a re-save of this iteration was killed mid-swap
            return old
        raise CheckpointError(f"{path / LATEST} names iteration {iteration}, but {found} is missing")
    return found


# ----------------------------------------------------------------------------------- RNG state

def get_rng_state() -> dict:
    """This process's RNG states, as plain types and tensors (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "random": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _rng_tracker()
    if tracker is not None:
        state["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["random"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = _rng_tracker()
    if tracker is not None and state.get("tracker"):
        tracker.set_states({k: v.clone() for k, v in state["tracker"].items()})


def _rng_tracker():
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    except ImportError:
        return None
    tracker = get_cuda_rng_tracker()
    return tracker if hasattr(tracker, "get_states") else None


# ------------------------------------------------------------------------------- layout, state

def current_layout() -> dict:
    """World size and parallel sizes; a checkpoint's RNG states (and the torch format's per-rank
    optimizer state of a torch optimizer) are restored only at the same layout."""
    layout = {"world_size": _world()}
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            layout.update(tp=ps.get_tensor_model_parallel_world_size(),
                          pp=ps.get_pipeline_model_parallel_world_size(),
                          ep=ps.get_expert_model_parallel_world_size(),
                          dp=ps.get_data_parallel_world_size())
    except ImportError:
        pass
    return layout


def describe_layout(layout: Optional[dict]) -> str:
    if not layout:
        return "an unknown layout"
    parts = " ".join(f"{k.upper()}={layout[k]}" for k in ("tp", "pp", "ep", "dp") if k in layout)
    return f"{layout.get('world_size', '?')} processes" + (f" ({parts})" if parts else "")


def _coords() -> tuple[int, int, int, int, int]:
    """(tp rank, pp rank, ep rank, pp size, ep size) of this process."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                    ps.get_expert_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                    ps.get_expert_model_parallel_world_size())
    except ImportError:
        pass
    return _rank(), 0, 0, 1, 1


def _sharded_state(model, optimizer, scheduler, iteration, loading: bool, rng: bool,
                   with_optimizer: bool = True):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = unwrap(model).sharded_state_dict()
    state: dict = {"model": model_sd, "iteration": iteration, "fmoe_checkpoint_version": VERSION}
    if optimizer is not None and with_optimizer:
        if hasattr(optimizer, "sharded_state_dict"):
            with _cpu_scope():
                state["optimizer"] = optimizer.sharded_state_dict(
                    model_sd, is_loading=loading, metadata=OPTIMIZER_METADATA)
        else:  # a torch optimizer: its state, per rank
            state["optimizer_torch"] = ShardedObject(
                "optimizer_torch", None if loading else optimizer.state_dict(), (_world(),),
                (_rank(),), replica_id=0)
    if scheduler is not None:
        state["opt_param_scheduler"] = None if loading else scheduler.state_dict()
    if rng:
        state["rng_state"] = ShardedObject("rng_state", None if loading else get_rng_state(),
                                           (_world(),), (_rank(),), replica_id=0)
    return state


def _cpu_scope():
    """On a machine without CUDA (cpu_compat applied): megatron-core's distributed optimizer
    gathers and scatters its checkpoint state in tensors on torch.cuda.current_device()
    (DistributedOptimizer.get_parameter_state_dp_zero / load_parameter_state_from_dp_zero);
    cpu_compat's scope makes those CPU tensors."""
    import contextlib

    if torch.cuda.is_available():
        return contextlib.nullcontext()
    from . import cpu_compat

    return cpu_compat.cuda_means_cpu() if cpu_compat.is_applied() else contextlib.nullcontext()


def _model_meta(model_sd) -> dict:
    """{global key: {shape, dtype}} of the model's sharded tensors."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    meta = {}
    for sh in nested_values(model_sd):
        if isinstance(sh, ShardedTensor):
            meta[sh.key] = {"shape": list(sh.global_shape), "dtype": str(sh.dtype).replace("torch.", "")}
    return meta


def _activation_modules() -> list:
    """Where a bare activation name comes from, in this order (``activation_by_name``)."""
    import torch.nn.functional as F

    modules = [F]
    try:
        from megatron.core import activations

        modules.append(activations)
    except ImportError:
        pass
    return modules + [torch]


def activation_name(fn) -> str:
    """How manifests (and merges) name an activation function: its bare name (``gelu``,
    ``squared_relu``) when it is that function of torch.nn.functional, megatron.core.activations
    or torch, which ``activation_by_name`` gives back; else a name that resolves to nothing, so
    that a merge stops instead of building other experts: ``module.qualname`` (a function of your
    own), ``functools.partial(gelu, approximate='tanh')``, or a module's class (its arguments
    are not recorded)."""
    if isinstance(fn, functools.partial):
        inner = [activation_name(fn.func), *map(repr, fn.args),
                 *(f"{k}={v!r}" for k, v in fn.keywords.items())]
        return f"functools.partial({', '.join(inner)})"
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and any(getattr(m, name, None) is fn for m in _activation_modules()):
        return name
    if isinstance(name, str) and not isinstance(fn, torch.nn.Module):
        return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', name)}"
    return f"{type(fn).__module__}.{type(fn).__qualname__}"


def activation_by_name(name: str):
    """The activation function that ``activation_name`` named ``name``, or None when it names
    none of torch.nn.functional's, megatron.core.activations' or torch's functions."""
    if not isinstance(name, str) or not name.isidentifier():
        return None
    for module in _activation_modules():
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def _fmoe_meta(model) -> Optional[dict]:
    mods = moe_modules(unwrap(model))
    if not mods:
        return None
    m = mods[0]
    act = getattr(m.config, "activation_func", None)
    cfg = dataclasses.asdict(m.fmoe_config)
    cfg["activation"] = activation_name(act)
    return cfg


#: TransformerConfig fields (then GPTModel attributes) that leave every tensor's shape alone but
#: change what the weights compute: the manifest records them ("arch") and a load with other
#: values is refused, as a shape mismatch is (the model would load, and answer wrongly).
ARCH_CONFIG_FIELDS = ("num_attention_heads", "num_query_groups", "kv_channels", "normalization",
                      "layernorm_zero_centered_gamma", "apply_residual_connection_post_layernorm",
                      "qk_layernorm", "softmax_scale", "window_size", "gated_linear_unit",
                      "activation_func")
ARCH_MODEL_FIELDS = ("position_embedding_type", "rotary_percent", "rotary_base")
#: How errors name them: pretrain_gpt's flag where it has one, else the field.
_ARCH_NAMES = {"num_attention_heads": "--num-attention-heads",
               "gated_linear_unit": "gated_linear_unit (--swiglu)",
               "activation_func": "the activation",
               "position_embedding_type": "--position-embedding-type"}
#: Fields whose default follows other fields (megatron-core's TransformerConfig.__post_init__):
#: a change of those is named by them alone (another --num-attention-heads, not the kv channels).
_ARCH_DEFAULTS = {"kv_channels": lambda a: a["hidden_size"] // a["num_attention_heads"],
                  "num_query_groups": lambda a: a["num_attention_heads"]}
#: For manifests written before "arch" was recorded: the pretrain_gpt flags among their
#: arguments that change what the weights compute.
ARCH_FLAGS = ("num_attention_heads", "position_embedding_type", "swiglu")


def _arch_meta(model) -> Optional[dict]:
    """The model's ``ARCH_*_FIELDS`` (and hidden_size, the default kv channels' other factor),
    as JSON stores them; None for a model without a megatron-core config."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None:
        return None
    arch = {"hidden_size": getattr(config, "hidden_size", None)}
    for field in ARCH_CONFIG_FIELDS:
        if hasattr(config, field):
            value = getattr(config, field)
            arch[field] = activation_name(value) if field == "activation_func" else value
    for field in ARCH_MODEL_FIELDS:
        if hasattr(inner, field):
            arch[field] = getattr(inner, field)
    if arch.get("position_embedding_type") != "rope":  # unused without rotary embeddings
        arch.pop("rotary_percent", None)
        arch.pop("rotary_base", None)
    return json.loads(json.dumps(arch, default=str))  # tuples as lists, as a manifest has them


def _flag_changes(manifest: dict, args, names) -> list[str]:
    """The pretrain_gpt flags among ``names`` whose saved value (the manifest's arguments) differs
    from ``args``', each as "--flag saved in the checkpoint, current now"."""
    saved, now = manifest.get("args") or {}, vars(args) if args is not None else {}
    return [f"--{name.replace('_', '-')} {saved[name]} in the checkpoint, {now[name]} now"
            for name in names if name in saved and name in now and saved[name] != now[name]]


def _arch_changes(manifest: dict, arch: Optional[dict], args, fmoe: Optional[dict]) -> list[str]:
    """What differs between the checkpoint's architecture and this model's (``_arch_meta``):
    from the manifest's "arch" record; for older manifests, from the saved pretrain_gpt arguments
    (``ARCH_FLAGS``) and the experts' activation."""
    saved = manifest.get("arch")
    if saved is not None and arch is not None:
        changes = []
        for field in (*ARCH_CONFIG_FIELDS, *ARCH_MODEL_FIELDS):
            if field not in saved or field not in arch or saved[field] == arch[field]:
                continue
            default = _ARCH_DEFAULTS.get(field)
            try:
                if default and saved[field] == default(saved) and arch[field] == default(arch):
                    continue
            except (KeyError, TypeError, ZeroDivisionError):
                pass
            changes.append(f"{_ARCH_NAMES.get(field, f'the config field {field}')} "
                           f"{saved[field]} in the checkpoint, {arch[field]} now")
        return changes
    changes = _flag_changes(manifest, args, ARCH_FLAGS)
    act = (manifest.get("fmoe") or {}).get("activation")
    if act and fmoe and activation_by_name(act) and act != fmoe.get("activation"):
        changes.append(f"the activation {act} in the checkpoint, {fmoe.get('activation')} now")
    return changes


def _jsonable_args(args) -> Optional[dict]:
    if args is None:
        return None
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------- save

def save(root, iteration: int, model, optimizer=None, scheduler=None, args=None,
         fmt: Optional[str] = None, rng: bool = True, with_optimizer: bool = True,
         consumed_samples: Optional[int] = None) -> Path:
    """Saves ``<root>/iter_<iteration>`` atomically (see the module doc) and points ``latest``
    at it. Collective: every rank calls it. ``fmt``: ``torch_dist`` (default, or
    ``args.ckpt_format``) or ``torch``. ``with_optimizer=False`` leaves the optimizer's state out
    (and the manifest says so), e.g. when it was not loaded and no step has run since: a fresh
    optimizer's state saved as if it were the run's would reset Adam silently on the next load.
    ``consumed_samples``: the training samples read so far (the data position, which a run with
    another global batch size resumes from)."""
    from megatron.core import dist_checkpointing

    fmt = fmt or getattr(args, "ckpt_format", None) or "torch_dist"
    if fmt not in FORMATS:
        raise ValueError(f"--ckpt-format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    root = Path(root)
    final = checkpoint_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        newer = latest_iteration(root)
        if newer is not None and newer > iteration:
            print(f"warning: --save {root} holds iteration {newer}, newer than this save's "
                  f"{iteration}; its latest checkpoint will be iteration {iteration}",
                  file=sys.stderr, flush=True)
        for left in root.glob("iter_*"):
            _, suffix = checkpoint_name(left.name) or (None, None)
            # .tmp: left by a run killed while saving; .old: replaced by a re-save that was not
            # cleaned up
            if suffix == ".tmp" or suffix == ".old" and left.with_suffix("").is_dir():
                shutil.rmtree(left, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    with_optimizer = optimizer is not None and with_optimizer
    state = _sharded_state(model, optimizer, scheduler, iteration, loading=False, rng=rng,
                           with_optimizer=with_optimizer)
    meta = _model_meta(state["model"])
    try:
        if fmt == "torch_dist":
            _in_process_results_queue()
            dist_checkpointing.save(state, str(tmp))
            mine = None
        else:
            mine = _save_torch(state, tmp)
    except (Exception, _TorchCheckpointException) as exc:  # noqa: BLE001 - a full disk gives
        # torch's own opaque errors (torch.distributed.checkpoint's is a BaseException)
        raise CheckpointError(_write_failure(f"writing iteration {iteration} into {tmp}", root,
                                             exc)) from exc
    fault_point("save", iteration)
    _barrier()
    files = _checksums(tmp)
    gathered = _all_gather_object({"model": meta, "torch": mine, "fmoe": _fmoe_meta(model)})
    if _rank0():
        try:
            final = _commit(root, tmp, final, iteration, fmt, gathered, meta_of={
                "consumed_samples": consumed_samples, "args": _jsonable_args(args),
                "arch": _arch_meta(model),
                "contents": {"optimizer": with_optimizer, "scheduler": scheduler is not None,
                             "rng": rng,
                             "distributed_optimizer": with_optimizer and _is_distributed(optimizer)},
                "files": files})
        except OSError as exc:  # the manifest, the renames, the latest file: a full disk too
            raise CheckpointError(_write_failure(f"committing iteration {iteration} in {root}",
                                                 root, exc)) from exc
        print(f"checkpoint: saved iteration {iteration} to {final} ({fmt})", flush=True)
    _barrier()
    return final


def _commit(root: Path, tmp: Path, final: Path, iteration: int, fmt: str, gathered: list,
            meta_of: dict) -> Path:
    """Rank 0's part of ``save`` once every rank has written its files: the manifest (``meta_of``
    holds its run-dependent entries), the rename of ``tmp`` to ``final`` (an older save of the
    same iteration set aside until then), and the ``latest`` file."""
    model_meta: dict = {}
    for g in gathered:
        model_meta.update(g["model"])
    manifest = {
        "format": fmt, "version": VERSION, "iteration": iteration,
        "layout": current_layout(), "saved_at": time.time(),
        "model": model_meta,
        "fmoe": next((g["fmoe"] for g in gathered if g["fmoe"]), None),
        **meta_of,
    }
    if fmt == "torch":
        manifest["ranks"] = [g["torch"] for g in gathered]
    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    old = final.with_name(final.name + ".old")
    if final.exists():  # an earlier save of the same iteration: set aside until committed
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    fault_point("commit", iteration)
    _write_atomic(root / LATEST, str(iteration))
    shutil.rmtree(old, ignore_errors=True)
    return final


try:
    from torch.distributed.checkpoint.api import CheckpointException as _TorchCheckpointException
except ImportError:  # pragma: no cover - torch without distributed checkpointing
    class _TorchCheckpointException(Exception):
        pass


def _write_failure(what: str, root: Path, exc: BaseException) -> str:
    """What a failed checkpoint write says: what failed where, the room left on that disk, the
    error, and which checkpoint is still the latest."""
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    try:
        latest = latest_iteration(root)
    except CheckpointError:
        latest = None
    kept = (f"the latest checkpoint is still iteration {latest}" if latest is not None
            else "no earlier checkpoint there")
    return f"{what} failed ({free}): {_short(exc)}; {kept}"  # (_short names the error's type)


def _in_process_results_queue():
    """megatron-core's torch_dist writer reports its results through a queue of a spawned
    multiprocessing Manager (made for asynchronous saves, started at the first save). Our saves
    are synchronous, so an ordinary queue does; and a Manager process outlives a rank that is
    killed (SIGKILL, OOM killer), holding its stdout open and its memory until someone kills it.
    Sets megatron's cached queue (``filesystem_async._results_queue``) before the first save.

    A thread queue, not ``multiprocessing.Queue``: the writer puts its results in this process
    and megatron reads them at once with ``get_nowait()``, which a multiprocessing queue can
    answer with "empty" while its feeder thread is still flushing the item (a failed save,
    "results_queue should not be empty", seen under load)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", False) is None:
        import queue

        filesystem_async._results_queue = queue.Queue()


def _is_distributed(optimizer) -> bool:
    try:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    except ImportError:
        return False
    return any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _short(exc: BaseException, limit: int = 800) -> str:
    """A one-line account of an error (PyTorch's CheckpointException carries every rank's
    traceback: keep the last error line)."""
    text = str(exc)
    lines = [l.strip() for l in text.splitlines()
             if re.match(r"^[\w.]+(Error|Exception): ", l.strip())]
    msg = lines[-1] if lines else text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {msg}"[:limit]


def _checksums(folder: Path) -> dict:
    """{relative path: {size, crc32}} of every file under ``folder``; the ranks share the work
    (and fsync what they read)."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    mine = {}
    for i, name in enumerate(names):
        if i % _world() == _rank():
            mine[name] = _file_info(folder / name, sync=True)
    out: dict = {}
    for part in _all_gather_object(mine):
        out.update(part)
    return out


def _file_info(path: Path, sync: bool = False) -> dict:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
        if sync:
            try:
                os.fsync(f.fileno())
            except OSError:
                pass
    return {"size": size, "crc32": crc}


# ----------------------------------------------------------------------- the per-rank torch format

def _torch_file_name(tp_rank, pp_rank, ep_rank, pp, ep, replica) -> str:
    folder = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") \
        + (f"_{ep_rank:03d}" if ep > 1 else "")
    return f"{folder}/{TORCH_FILE if replica == 0 else f'model_optim_rng_dp{replica:03d}.pt'}"


def _my_torch_file() -> str:
    tp_rank, pp_rank, ep_rank, pp, ep = _coords()
    folder = _torch_file_name(tp_rank, pp_rank, ep_rank, pp, ep, 0).split("/")[0]
    folders = _all_gather_object(folder)
    replica = sum(1 for r in range(_rank()) if folders[r] == folder)
    return _torch_file_name(tp_rank, pp_rank, ep_rank, pp, ep, replica)


def _save_torch(state, folder: Path) -> dict:
    """Writes this rank's file; returns its index entry for the manifest."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    sharded, common = save_preprocess(state, validate_access_integrity=False)
    tensors, objects, index_t, index_o = [], [], [], []
    for sh in nested_values(sharded):
        if not is_main_replica(sh.replica_id):
            continue
        if isinstance(sh, ShardedTensor):
            frange = None if sh.flattened_range is None else [sh.flattened_range.start,
                                                               sh.flattened_range.stop]
            entry = [sh.key, list(sh.global_offset), list(sh.local_shape), frange,
                     sh.prepend_axis_num]
            # clone: parameters are views of one flat buffer, which torch.save would store whole
            tensors.append(entry + [sh.data.detach().cpu().clone()])
            index_t.append(entry)
        elif isinstance(sh, ShardedObject):
            objects.append([sh.unique_key, sh.data])
            index_o.append(sh.unique_key)
        else:
            raise TypeError(f"cannot save {type(sh).__name__} {getattr(sh, 'key', '')} in the torch format")
    name = _my_torch_file()
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "fastmoe_megatron.torch", "version": VERSION, "rank": _rank(),
                "common": common, "tensors": tensors, "objects": objects}, path)
    return {"file": name, "rank": _rank(), "tensors": index_t, "objects": index_o}


def _torch_load(path: Path, mmap: bool = True):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: the checkpoint is partial") from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds objects outside the weights_only allowlist, or is "
                              f"corrupt; refusing to load it: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad header, ...
        raise CheckpointError(f"{path} is corrupt or truncated: {type(exc).__name__}: {exc}") from exc


class _ShardReader:
    """Finds shards of the torch format by global key and offset, across the rank files."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.files: dict[str, Any] = {}
        self.tensors: dict[str, list] = {}
        self.objects: dict[str, str] = {}
        for entry in manifest["ranks"]:
            for i, (key, offset, shape, frange, prepend) in enumerate(entry["tensors"]):
                self.tensors.setdefault(key, []).append(
                    (tuple(offset), tuple(shape), None if frange is None else tuple(frange),
                     prepend, entry["file"], i))
            for i, ukey in enumerate(entry["objects"]):
                self.objects[ukey] = (entry["file"], i)

    def _file(self, name):
        if name not in self.files:
            self.files[name] = _torch_load(self.folder / name)
        return self.files[name]

    def _data(self, name, i, kind):
        return self._file(name)[kind][i][-1]

    def common(self, name):
        return self._file(name)["common"]

    def obj(self, sh):
        if sh.unique_key not in self.objects:
            raise CheckpointError(f"{self.folder}: object {sh.unique_key} is not in the checkpoint")
        name, i = self.objects[sh.unique_key]
        return self._data(name, i, "objects")

    def tensor(self, sh):
        pieces = self.tensors.get(sh.key)
        if not pieces:
            raise CheckpointError(f"{self.folder}: tensor {sh.key} is not in the checkpoint")
        offset, shape = tuple(sh.global_offset), tuple(sh.local_shape)
        frange = None if sh.flattened_range is None else (sh.flattened_range.start,
                                                          sh.flattened_range.stop)
        dtype = sh.data.dtype if sh.data is not None else None
        for off, shp, fr, _, name, i in pieces:
            if off == offset and shp == shape and fr == frange:  # same layout: the very shard
                data = self._data(name, i, "tensors")  # (memory-mapped: copy it out)
                return data.to(dtype=dtype or data.dtype, copy=True)
        # Another layout: assemble the region from the saved chunks.
        region = self._region(sh.key, offset, shape, sh.prepend_axis_num, dtype)
        if frange is not None:
            region = region.reshape(-1)[frange[0]:frange[1]]
        return region

    def _chunks(self, key):
        """(offset, full chunk tensor) of every saved chunk of ``key``, flattened pieces joined."""
        chunks: dict = {}
        for off, shp, fr, prepend, name, i in self.tensors[key]:
            data = self._data(name, i, "tensors")
            if fr is None:
                chunks[off] = (shp, prepend, data)
                continue
            if off not in chunks:
                chunks[off] = (shp, prepend, torch.empty(math.prod(shp), dtype=data.dtype))
            chunks[off][2][fr[0]:fr[1]] = data
        return [(off, shp, prepend, t.reshape(shp)) for off, (shp, prepend, t) in chunks.items()]

    def _region(self, key, offset, shape, prepend, dtype):
        out, filled = None, 0
        for c_off, c_shape, c_prepend, data in self._chunks(key):
            # Offsets cover the prepended axes (size 1 each) and then the tensor's own axes.
            full_c = (1,) * c_prepend + tuple(c_shape)
            full_t = (1,) * prepend + tuple(shape)
            lo = [max(a, b) for a, b in zip(offset, c_off)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offset, full_t, c_off, full_c)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            if out is None:
                out = torch.empty(full_t, dtype=dtype or data.dtype)
            src = data.reshape(full_c)[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, c_off))]
            out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offset))] = src
            filled += src.numel()
        if out is None or filled != out.numel():
            raise CheckpointError(f"{self.folder}: the saved shards of {key} do not cover the "
                                  f"region at offset {list(offset)} of shape {list(shape)}")
        return out.reshape(shape)


def _load_torch(state, folder: Path, manifest: dict, own_file: Optional[str]):
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    reader = _ShardReader(folder, manifest)
    sharded, nonpersistent, factories = load_preprocess(state)
    common = reader.common(own_file or manifest["ranks"][0]["file"])
    merge(common, nonpersistent)
    sharded, _ = extract_sharded_base(sharded)
    loaded = dict_list_map_inplace(
        lambda sh: reader.obj(sh) if isinstance(sh, ShardedObject) else reader.tensor(sh), sharded)
    merge(common, loaded)
    return apply_factory_merges(common, factories)


# ------------------------------------------------------------------------------ verification

#: Globals PyTorch's distributed-checkpoint ``.metadata`` pickle may name (everything else is
#: refused: the file is a plain pickle, which could otherwise run arbitrary code).
_METADATA_ALLOWLIST = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to the layout
    ("torch", "Size"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_ALLOWLIST:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is a partial checkpoint, or was not "
                              "written by fastmoe_megatron")
    try:
        manifest = json.loads(path.read_text())
        manifest["format"], manifest["files"], manifest["model"]  # noqa: B018 - required keys
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if manifest["format"] not in FORMATS:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest['format']!r}")
    return manifest


def verify(path, distributed: bool = True) -> dict:
    """Checks a checkpoint before anything is unpickled: every file of the manifest is present
    with its size and CRC32, and every pickle in it passes its allowlist. Returns the manifest;
    raises CheckpointError naming the first bad file. With ``distributed`` (and torch.distributed
    initialised) the ranks share the CRC work; every rank gets the same verdict."""
    folder = resolve(path)
    manifest = read_manifest(folder)
    share = distributed and dist.is_initialized()
    rank, world = (_rank(), _world()) if share else (0, 1)
    problems = []
    for i, (name, want) in enumerate(sorted(manifest["files"].items())):
        file = folder / name
        if not file.is_file():
            problems.append(f"{file} is missing")
            continue
        size = file.stat().st_size
        if size != want["size"]:
            problems.append(f"{file} is truncated or altered: {size} bytes, the manifest says "
                            f"{want['size']}")
            continue
        if i % world == rank and _file_info(file)["crc32"] != want["crc32"]:
            problems.append(f"{file} is corrupt: its CRC32 differs from the manifest's")
    if not problems:
        try:
            if manifest["format"] == "torch_dist":
                _check_dist_pickles(folder, rank, world)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            problems.append(str(exc) if isinstance(exc, CheckpointError)
                            else f"{folder}: {type(exc).__name__}: {exc}")
    if share:
        problems = sorted({p for part in _all_gather_object(problems) for p in part})
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {folder} cannot be loaded: {problems[0]}{more}")
    return manifest


def _check_dist_pickles(folder: Path, rank: int = 0, world: int = 1):
    """Allowlist checks of a torch_dist checkpoint's pickles (see _METADATA_ALLOWLIST)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = folder / ".metadata"
    try:
        with open(meta_path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{meta_path} is missing: the checkpoint is partial") from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{meta_path} is corrupt or not allowed: {exc}") from exc
    if rank == 0:
        _torch_load(folder / "common.pt", mmap=False)
    # Objects stored inside the .distcp files (RNG states, torch optimizer states) are unpickled
    # by PyTorch without weights_only: check each with weights_only first.
    byte_keys = {k for k, v in metadata.state_dict_metadata.items()
                 if isinstance(v, BytesStorageMetadata)}
    items = [(idx, info) for idx, info in metadata.storage_data.items() if idx.fqn in byte_keys]
    for i, (idx, info) in enumerate(sorted(items, key=lambda x: x[0].fqn)):
        if i % world != rank:
            continue
        path = folder / info.relative_path
        with open(path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        if len(blob) != info.length:
            raise CheckpointError(f"{path} is truncated: object {idx.fqn} is cut short")
        try:
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: object {idx.fqn} is corrupt or holds objects "
                                  f"outside the weights_only allowlist: {exc}") from exc


# ---------------------------------------------------------------------------------------- load

def _check_model(folder: Path, manifest: dict, model_sd, args, model=None) -> None:
    """Raises CheckpointError when the model's tensors differ from the checkpoint's, or its
    architecture does where the shapes do not tell (``_arch_changes``)."""
    changed = [] if model is None else _arch_changes(manifest, _arch_meta(model), args,
                                                     _fmoe_meta(model))
    mine = _model_meta(model_sd)
    saved = manifest["model"]
    problems = []
    for key, m in sorted(mine.items()):
        s = saved.get(key)
        if s is None:
            problems.append(f"{key} is not in the checkpoint")
        elif s["shape"] != m["shape"]:
            problems.append(f"{key} is {s['shape']} in the checkpoint, {m['shape']} in this model")
    present = set()
    for part in _all_gather_object(sorted(mine)):
        present.update(part)
    problems += [f"{key} is in the checkpoint but not in this model"
                 for key in sorted(set(saved) - present)]
    problems = sorted({p for part in _all_gather_object(problems) for p in part})
    if not problems and changed:  # (the same on every rank: one config)
        raise CheckpointError(
            f"checkpoint {folder} is from another model architecture ({'; '.join(changed)}): its "
            "tensors fit this model's shapes but would compute something else here; load it "
            "with the checkpoint's settings")
    if not problems:
        return
    flags = _flag_changes(manifest, args, SHAPE_FLAGS)
    saved_args = manifest.get("args") or {}
    saved_tp = (manifest.get("layout") or {}).get("tp")
    tp = current_layout().get("tp")
    multiple = saved_args.get("make_vocab_size_divisible_by")
    if not flags and saved_tp and tp and saved_tp != tp and multiple and all(
            "word_embeddings" in p or "output_layer" in p for p in problems):
        # The padded vocabulary is a multiple of --make-vocab-size-divisible-by x TP.
        want = multiple * saved_tp
        fix = (f"--make-vocab-size-divisible-by {want // tp}" if want % tp == 0 else
               f"a --make-vocab-size-divisible-by that times TP={tp} makes {want}")
        flags.append(f"the vocabulary is padded to a multiple of --make-vocab-size-divisible-by "
                     f"x TP, {multiple} x {saved_tp} = {want} in the checkpoint: at TP={tp} pass "
                     f"{fix}")
    flags += [c for c in changed if c not in flags]
    raise CheckpointError(
        f"checkpoint {folder} is from another model shape"
        + (f" ({'; '.join(flags)})" if flags else "") + ": "
        + "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))


#: FMoEConfig fields that change how tokens are routed but not the tensors' shapes, and the
#: pretrain_gpt flag of each.
ROUTING_FLAGS = {"top_k": "--fmoe-top-k", "gate": "--balance-strategy",
                 "capacity_factor": "--fmoe-capacity-factor"}


def _warn_routing_changes(folder: Path, saved: Optional[dict], now: Optional[dict]) -> None:
    """Loading with another top-k, gate or capacity is allowed (the weights fit), but changes the
    model the weights were trained for: say so, naming the flags."""
    if not saved or not now:
        return
    changed = [f"{flag} {saved[k]} in the checkpoint, {now[k]} now"
               for k, flag in ROUTING_FLAGS.items()
               if k in saved and k in now and saved[k] != now[k]]
    if changed:
        _warn0(f"{folder} was trained with other routing: {'; '.join(changed)}")


def _nothing_to_load(root: Path) -> None:
    """``root`` holds neither a manifest nor a ``latest`` file: fine when it does not exist or
    holds no checkpoint (a first run with ``--load`` and ``--save`` on the same folder); an error
    when it is a checkpoint folder without its manifest, or a root whose ``latest`` file is gone
    while complete checkpoints remain (starting from scratch there would overwrite them)."""
    if root.is_file():
        raise CheckpointError(f"--load {root} is a file, not a checkpoint folder")
    if checkpoint_name(root.name):
        if not root.exists():
            raise CheckpointError(f"--load {root}: no such checkpoint folder")
        read_manifest(root)  # raises: its manifest is missing (a partial checkpoint)
    found = sorted(p.name for p in root.glob("iter_*")
                   if (checkpoint_name(p.name) or (None, ".tmp"))[1] != ".tmp"
                   and (p / MANIFEST).is_file())
    if found:
        raise CheckpointError(
            f"--load {root} holds checkpoints ({', '.join(found[-3:])}) but no {LATEST}: pass "
            f"one of them (--load {root / found[-1]}), or write its iteration into {root / LATEST}")
    if _rank0():
        why = "no such folder" if not root.exists() else "no checkpoint in it"
        print(f"checkpoint: nothing to load in --load {root} ({why}); starting from scratch",
              flush=True)


def load(root, model, optimizer=None, scheduler=None, args=None, load_optim: bool = True,
         load_rng: bool = True, report: Optional[dict] = None) -> int:
    """Loads the latest checkpoint under ``root`` (or the checkpoint folder ``root``) into the
    model, optimizer and scheduler and restores the RNG states; returns its iteration (0 when
    there is none). Collective. Works at any expert-parallel size (see the module doc);
    ``load_optim=False`` (``--no-load-optim``) loads the model and scheduler only. ``report``,
    when given, gets ``"optimizer"``: whether the optimizer's state was loaded,
    ``"consumed_samples"``: the training samples the run had read (None when not known), and
    ``"rng"``: whether the RNG states were restored (None when nothing was loaded)."""
    if report is not None:
        report["optimizer"] = False
        report["consumed_samples"] = None
        report["rng"] = None
    from megatron.core import dist_checkpointing

    root = Path(root)
    if not (root / MANIFEST).is_file() and latest_iteration(root) is None:
        _nothing_to_load(root)
        return 0
    folder = resolve(root)
    if folder != root and not (root / LATEST).is_file():
        _warn0(f"--load {root} has no {LATEST}, but its one checkpoint {folder.name} is complete "
               "(a run stopped right after committing it): resuming from it")
    manifest = verify(folder)
    contents = manifest.get("contents", {})
    layout = current_layout()
    same_layout = manifest.get("layout") == layout
    with_optim = optimizer is not None and load_optim
    if with_optim and not contents.get("optimizer", True):
        _warn0(f"{folder} holds no optimizer state; the optimizer starts fresh")
        with_optim = False
    if with_optim and not hasattr(optimizer, "sharded_state_dict") and not same_layout:
        raise CheckpointError(
            f"{folder} holds a torch optimizer's per-rank state saved at "
            f"{describe_layout(manifest.get('layout'))}, which cannot be resharded to "
            f"{describe_layout(layout)}: load with load_optim=False (--no-load-optim)")
    saved_dist = contents.get("distributed_optimizer")
    if with_optim and saved_dist is not None and bool(saved_dist) != _is_distributed(optimizer):
        raise CheckpointError(
            f"{folder}: its optimizer state was saved {'with' if saved_dist else 'without'} "
            f"--use-distributed-optimizer, and this run is {'without' if saved_dist else 'with'} "
            "it: load with the same setting, or the model only with --no-load-optim "
            "(load_optim=False)")
    saved_layout = manifest.get("layout") or {}
    moved = [k for k in ("tp", "pp", "ep") if saved_layout.get(k) != layout.get(k)]
    if with_optim and contents.get("distributed_optimizer") and moved:
        raise CheckpointError(
            f"{folder}: the distributed optimizer's state was saved at "
            f"{describe_layout(saved_layout)}; megatron-core reshards it over data parallel only, "
            f"not to {describe_layout(layout)} ({', '.join(m.upper() for m in moved)} changed): "
            "load the model only with --no-load-optim (load_optim=False)")
    _warn_routing_changes(folder, manifest.get("fmoe"), _fmoe_meta(model))
    rng = load_rng and contents.get("rng", False)
    if load_rng and not rng and _rank0():
        # Nothing to restore: a conversion (reshard, or any --skip-train run that did not restore
        # the states it loaded) saves none rather than its fresh processes' states as the run's.
        print(f"checkpoint: {folder} holds no RNG states; this run keeps its own (from --seed)",
              flush=True)
    if rng and not same_layout:
        _warn0(f"{folder} was saved at {describe_layout(manifest.get('layout'))}, this run has "
               f"{describe_layout(layout)}: RNG states are not restored")
        rng = False
    state = _sharded_state(model, optimizer, scheduler if contents.get("scheduler", True) else None,
                           None, loading=True, rng=rng, with_optimizer=with_optim)
    _check_model(folder, manifest, state["model"], args, model)
    try:
        if manifest["format"] == "torch_dist":
            loaded = dist_checkpointing.load(state, str(folder))
        else:
            own = None
            if same_layout:
                own = manifest["ranks"][_rank()]["file"]
            loaded = _load_torch(state, folder, manifest, own)
    except CheckpointError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - PyTorch's CheckpointException is a BaseException
        hint = ("; the layout changed since the save: retry with --no-load-optim (load_optim=False)"
                if with_optim and not same_layout else "")
        raise CheckpointError(f"could not load the checkpoint {folder}: {_short(exc)}{hint}") from exc
    unwrap(model).load_state_dict(loaded["model"])
    if with_optim:
        if "optimizer" in loaded:
            # no_grad: the distributed optimizer copies into its leaf main params
            # (load_parameter_state_from_dp_reshardable has no no_grad of its own)
            with torch.no_grad(), _cpu_scope():
                optimizer.load_state_dict(loaded["optimizer"])
        else:
            optimizer.load_state_dict(loaded["optimizer_torch"])
    elif optimizer is not None and hasattr(optimizer, "reload_model_params"):
        with torch.no_grad(), _cpu_scope():
            optimizer.reload_model_params()  # fp32 main copies (bf16, distributed) from the weights
    if report is not None:
        report["optimizer"] = with_optim
        report["consumed_samples"] = _consumed_samples(manifest, int(loaded["iteration"]))
        report["rng"] = rng
    if scheduler is not None and loaded.get("opt_param_scheduler") is not None:
        try:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        except AssertionError as exc:  # megatron-core's check of each value against the run's
            m = re.search(r"class input value (.*?) and checkpoint ?value (.*?) for (.*?) do not "
                          r"match", str(exc))
            what = f"{m[3]}: {m[1]} in this run, {m[2]} in the checkpoint" if m else _short(exc)
            raise CheckpointError(
                f"{folder}: this run's learning-rate schedule differs from the checkpoint's "
                f"({what}; steps count samples). Pass --override-opt-param-scheduler to follow "
                "this run's schedule from here on (e.g. a longer --train-iters), or "
                "--use-checkpoint-opt-param-scheduler to keep the checkpoint's") from exc
    if rng:
        set_rng_state(loaded["rng_state"])
    if _rank0():
        print(f"checkpoint: resumed from {folder} (iteration {manifest['iteration']}, "
              f"{manifest['format']}" + ("" if same_layout else f", resharded from "
                                         f"{describe_layout(manifest.get('layout'))} to "
                                         f"{describe_layout(layout)}") + ")", flush=True)
    return int(loaded["iteration"])


# ------------------------------------------------------------------- the fmoefy API (own loop)

def save_fmoe(root, iteration: int, model, optimizer=None, scheduler=None,
              fmt: str = "torch_dist") -> Path:
    """Checkpoints an fmoefy'd megatron-core model in your own training loop: the model (experts
    with their global expert axis), the optimizer (megatron-core's, or any torch optimizer, per
    rank), an optional scheduler with ``state_dict``, every rank's RNG states and ``iteration``.
    Collective; atomic like pretrain_gpt's saves. Load with :func:`load_fmoe`."""
    return save(root, iteration, model, optimizer, scheduler, fmt=fmt)


def load_fmoe(root, model, optimizer=None, scheduler=None, load_optim: bool = True,
              load_rng: bool = True) -> int:
    """Loads the latest checkpoint written by :func:`save_fmoe` (at any expert-parallel size with
    megatron-core optimizers; a torch optimizer's state needs the same layout); returns the
    iteration, 0 when there is none."""
    return load(root, model, optimizer, scheduler, load_optim=load_optim, load_rng=load_rng)


# ------------------------------------------------------------------------- offline (one process)

def load_model_tensors(path) -> tuple[dict, dict]:
    """Every model tensor of a checkpoint, whole (experts over the global expert axis):
    ``({key: tensor}, manifest)``. For offline tools; runs in one process (it initialises a
    one-process gloo group for the torch_dist format when torch.distributed is not set up)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    folder = resolve(path)
    manifest = verify(folder, distributed=False)
    template = {key: ShardedTensor.from_rank_offsets(
        key, torch.empty(m["shape"], dtype=getattr(torch, m["dtype"])), replica_id=0)
        for key, m in manifest["model"].items()}
    if manifest["format"] == "torch":
        reader = _ShardReader(folder, manifest)
        return {key: reader.tensor(sh) for key, sh in template.items()}, manifest
    if not dist.is_initialized():
        import datetime
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, 1, is_master=True,
                              timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("load_model_tensors runs in one process")
    try:
        loaded = dist_checkpointing.load({"model": template}, str(folder))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"could not read {folder}: {type(exc).__name__}: {exc}") from exc
    return loaded["model"], manifest
