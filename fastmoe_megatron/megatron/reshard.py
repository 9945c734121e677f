"""Checkpoint tools: reshard to another expert-parallel size, merge into one file, verify.

    python -m fastmoe_megatron.megatron.reshard reshard --load CKPT --save OUT \\
        --expert-model-parallel-size 4 [--ckpt-format torch|torch_dist] [--world-size W] \\
        [--timeout S] [--force]
    python -m fastmoe_megatron.megatron.reshard merge --load CKPT --output merged.pt
    python -m fastmoe_megatron.megatron.reshard verify --load CKPT
    python -m fastmoe_megatron.megatron.reshard info --load CKPT

``CKPT`` is a checkpoint root (its latest checkpoint is used) or one ``iter_XXXXXXX`` folder.

- ``reshard`` writes a new checkpoint (model, optimizer, scheduler, iteration) for another
  expert-parallel size and format. It starts ``W`` local CPU processes (gloo; default: pipeline
  size x lcm(tensor-parallel size, EP)) that build the model of a pretrain_gpt checkpoint at the
  new layout, load the checkpoint (resharding it) and save it: ``pretrain_gpt --skip-train``.
  A ``torch_dist`` checkpoint needs no resharding at all: pretrain_gpt loads it at any EP size.
  RNG states belong to the old ranks and are not carried over: the new checkpoint holds none
  (``"rng": false``), and a resume keeps its own. The learning-rate schedule is carried over
  (``--skip-train`` keeps the checkpoint's). ``OUT`` must hold no checkpoint (``iter_*``
  folders, a latest file) unless ``--force`` is given: a checkpoint of the same iteration there
  is replaced, the latest file names the new one, and the processes' warnings are repeated.
  Past ``--timeout`` (3600 s) the processes are killed. Other flags go to pretrain_gpt:
  ``--no-load-optim`` (needed for a distributed optimizer's state, which does not reshard over
  EP) writes a checkpoint without optimizer state, and its manifest says so.
- ``merge`` writes one ``torch.save`` file with every tensor whole (experts over the global
  expert axis), for one process and for plain ``FMoETransformerMLP`` modules. It needs no model
  and no process group, and works for checkpoints written through ``save_fmoe`` too::

      {"format": "fastmoe_megatron.merged", "version": 1, "iteration": int, "source": str,
       "fmoe": {num_experts, top_k, gate, hidden_size, capacity_factor, z_loss_weight,
                expert_bias_update_rate, balance_loss_weight, activation, d_model, d_hidden,
                gated_linear_unit, bias},
       "moe_layers": {"decoder.layers.<i>.mlp": FMoETransformerMLP state_dict
                      (gate.gate.weight, experts.htoh4.weight [E, d_hidden, d_model], ...)},
       "model": {checkpoint key, one layer per key: tensor}}

  The ``model`` keys are the checkpoint's (``sharded_state_dict``) keys with the layer number put
  back (``decoder.layers.<i>.self_attention.linear_qkv.weight``); they equal the module's
  state-dict keys except where megatron-core renames a tensor in checkpoints (its local spec
  stores ``pre_mlp_layernorm.weight`` as ``mlp.linear_fc1.layer_norm_weight``).

  Load it with ``torch.load(path, weights_only=True)``; ``build_fmoe_layers(merged)`` makes the
  ``FMoETransformerMLP`` modules with the saved gate and activation (``activation`` is its
  name, see ``checkpointing.activation_name``) and loads their weights.
- ``verify`` checks every file against the manifest (size, CRC32) and the pickles against their
  allowlists; ``info`` prints the manifest's summary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import checkpointing as ckpt

MERGED_FORMAT = "fastmoe_megatron.merged"

# pretrain_gpt flags not carried from the source checkpoint into the resharding run.
_NOT_CARRIED = {"help", "load", "save", "expert_model_parallel_size", "global_batch_size",
                "exit_interval", "save_interval", "tensorboard_dir", "threads", "skip_train",
                "no_load_optim", "no_load_rng", "ckpt_format", "log_interval",
                "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler"}


def argv_from_args(saved: dict) -> list[str]:
    """pretrain_gpt flags that rebuild the model of a checkpoint from its saved arguments."""
    from .pretrain_gpt import _CORE_MOE_FLAGS, build_parser

    argv = []
    for action in build_parser()._actions:
        dest = action.dest
        if dest in _NOT_CARRIED or dest not in saved or not action.option_strings:
            continue
        if dest in _CORE_MOE_FLAGS and saved.get("num_experts") is None:
            continue  # ignored by the run that saved it, refused now (a flag error)
        value = saved[dest]
        flag = action.option_strings[0]
        if action.nargs == 0:  # store_true
            if value:
                argv.append(flag)
        elif value is not None and value != action.default:
            argv += [flag, str(value)]
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_lines(output: str, n: int = 8) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:]) if lines else "(no output)"


class ReshardFailed(RuntimeError):
    """A process of the new layout failed; ``output`` is its whole log."""

    def __init__(self, rank: int, code: int | None, output: str, what: str | None = None):
        self.rank, self.code, self.output = rank, code, output
        what = what or f"rank {rank} exited with {code}"
        super().__init__(f"reshard: {what}; its last lines:\n{_last_lines(output)}")


class ReshardTimeout(ReshardFailed):
    """A process of the new layout ran past ``--timeout`` (all of them were killed)."""

    def __init__(self, rank: int, timeout: float, output: str):
        super().__init__(rank, None, output,
                         f"rank {rank} did not finish within --timeout {timeout:g} s (killed)")


#: Lines of the new layout's processes that reshard repeats when they succeed: pretrain_gpt's
#: and the checkpoint code's warnings (e.g. that --save held a newer iteration).
_WARNING_LINE = re.compile(r"^(\w+: )?warning: ")


def _saved_checkpoints(save: Path) -> list[str]:
    """What in ``save`` a new checkpoint could replace or hide: checkpoint folders, the latest
    file."""
    if not save.is_dir():
        return []
    return sorted(p.name for p in save.iterdir()
                  if ckpt.checkpoint_name(p.name) or p.name == ckpt.LATEST)


def _existing_folder(load) -> Path:
    """``--load`` as a Path; a ValueError naming --load when it is missing or not a folder (the
    checkpoint code would say "holds no checkpoint", which hides a typo)."""
    path = Path(load)
    if not path.exists():
        raise ValueError(f"--load {load} does not exist")
    if not path.is_dir():
        raise ValueError(f"--load {load} is not a folder (a checkpoint root or an iter_* folder)")
    return path


def _pretrain_args(argv: list[str]):
    """pretrain_gpt's parse of ``argv``, whose flag errors (an unknown flag passed on to it, a bad
    value) raise a one-line ValueError instead of printing pretrain_gpt's whole usage."""
    from .pretrain_gpt import build_parser

    parser = build_parser()

    def error(message):
        raise ValueError(f"{message} (flags that reshard does not know go to pretrain_gpt)")

    parser.error = error
    return parser.parse_args(argv)


def reshard(load, save, ep: int, fmt: str = "torch_dist", world_size: int | None = None,
            extra: list[str] | None = None, timeout: float = 3600, log=print,
            force: bool = False) -> Path:
    """Writes the checkpoint ``load`` for expert-parallel size ``ep`` under ``save`` (see the
    module doc); returns the new checkpoint folder. ``save`` must hold no checkpoint unless
    ``force``: the new one would replace a checkpoint of its iteration there, and the latest
    file would name it."""
    folder = ckpt.resolve(_existing_folder(load))
    manifest = ckpt.verify(folder, distributed=False)
    saved = manifest.get("args")
    if not saved:
        raise ckpt.CheckpointError(
            f"{folder} was not written by pretrain_gpt (no saved arguments), so the model cannot "
            "be rebuilt here; load it at the new expert-parallel size directly (torch_dist and "
            "torch formats reshard at load) or merge it")
    real = folder.resolve()  # through symlinks: the folder the source files are in
    source_root = real.parent if ckpt.checkpoint_name(real.name) else real
    target = Path(save).resolve()
    if target == source_root or real in (target, *target.parents):
        # The new checkpoint (same iteration) would replace the one it is made from, or land
        # inside it.
        raise ValueError(f"--save {save} would write over --load {load}: reshard into another "
                         "folder")
    held = _saved_checkpoints(target)
    if held and not force:
        raise ValueError(
            f"--save {save} already holds checkpoints ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}): reshard into a new or empty folder, or pass "
            "--force to write into it anyway (a checkpoint of the same iteration is replaced, and "
            f"{ckpt.LATEST} then names the new one)")
    if ep < 1:
        raise ValueError(f"--expert-model-parallel-size must be >= 1, got {ep}")
    if world_size is not None and world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    tp = int(saved.get("tensor_model_parallel_size") or 1)
    pp = int(saved.get("pipeline_model_parallel_size") or 1)
    world = world_size or pp * math.lcm(tp, ep)
    argv = argv_from_args(saved) + [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--expert-model-parallel-size", str(ep), "--load", str(folder), "--save", str(save),
        "--ckpt-format", fmt, "--skip-train", "--no-load-rng", "--threads", "1",
        "--log-interval", "1000000"] + list(extra or [])
    from .pretrain_gpt import validate_args

    # A layout the model does not allow (experts that EP does not divide, ...) fails here, naming
    # the flag, before any process starts; a --world-size that does not fit the layout, naming
    # --world-size too (the default one would).
    args = _pretrain_args(argv)
    try:
        validate_args(args, world)
    except ValueError as exc:
        if world_size is None:
            raise
        default = pp * math.lcm(tp, ep)
        # (parsed anew: validate_args fills in args) raises when the layout itself is wrong
        validate_args(_pretrain_args(argv), default)
        raise ValueError(f"--world-size {world_size} does not fit TP={tp} PP={pp} EP={ep} "
                         f"(the default, {default}, does): {exc}") from exc
    port = _free_port()
    # Unbuffered: the last lines of a process killed at --timeout are in its output.
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), CUDA_VISIBLE_DEVICES="",
               PYTHONUNBUFFERED="1")
    env.pop(ckpt.FAULT_ENV, None)
    log(f"reshard: {folder} ({ckpt.describe_layout(manifest.get('layout'))}) -> {save} at EP={ep} "
        f"on {world} local CPU processes ({fmt})")
    procs = []
    try:
        for rank in range(world):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fastmoe_megatron.megatron.pretrain_gpt", *argv],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout
        outputs = []
        for rank, p in enumerate(procs):
            try:
                outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
                raise ReshardTimeout(rank, timeout, p.communicate()[0]) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        rank, code = failed[0]
        raise ReshardFailed(rank, code, outputs[rank])
    # Their warnings (a --force into a --save holding a newer iteration, routing changes, ...)
    # would be lost with their logs: repeat each once.
    warnings = dict.fromkeys(line for output in outputs for line in output.splitlines()
                             if _WARNING_LINE.match(line))
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    out = ckpt.resolve(save)
    log(f"reshard: wrote {out}")
    return out


# ----------------------------------------------------------------------------------------- merge

_STACKED = re.compile(r"^(?P<pre>.*\.layers)\.(?P<rest>.+)$")


def _unstack(tensors: dict, num_layers: int | None) -> dict:
    """megatron-core's dist-checkpoint keys stack the layers (``decoder.layers.x`` with the
    layer on axis 0); returns one key per layer (``decoder.layers.<i>.x``)."""
    out = {}
    for key, t in tensors.items():
        m = _STACKED.match(key)
        if m and not m.group("rest").split(".")[0].isdigit() and t.dim() > 0 \
                and (num_layers is None or t.shape[0] == num_layers):
            for i in range(t.shape[0]):
                out[f"{m.group('pre')}.{i}.{m.group('rest')}"] = t[i].clone()
        else:
            out[key] = t
    return out


def merge(load, output) -> dict:
    """Writes the single-process file of the module doc; returns what it wrote."""
    tensors, manifest = ckpt.load_model_tensors(load)
    args = manifest.get("args") or {}
    stacked = [t.shape[0] for k, t in tensors.items() if k.endswith(".mlp.moe.experts.htoh4.weight")
               and _STACKED.match(k) and not _STACKED.match(k).group("rest").split(".")[0].isdigit()]
    num_layers = args.get("num_layers") or (stacked[0] if stacked else None)
    model = _unstack(tensors, num_layers)
    layers: dict = {}
    for key, t in model.items():
        if ".mlp.moe." in key:
            prefix, rest = key.split(".moe.", 1)
            layers.setdefault(prefix, {})[rest] = t
    if not layers:
        raise ckpt.CheckpointError(f"{ckpt.resolve(load)} holds no fastmoe MoE layer")
    fmoe = dict(manifest.get("fmoe") or {})
    some = next(iter(layers.values()))
    w1, w2 = some["experts.htoh4.weight"], some["experts.h4toh.weight"]  # [E, H or 2H, D], [E, D, H]
    d_hidden = int(w2.shape[2])
    fmoe.update(num_experts=int(w1.shape[0]), d_hidden=d_hidden, d_model=int(w1.shape[2]),
                gated_linear_unit=int(w1.shape[1]) == 2 * d_hidden,
                bias="experts.htoh4.bias" in some)
    merged = {"format": MERGED_FORMAT, "version": 1, "iteration": int(manifest["iteration"]),
              "source": str(ckpt.resolve(load)), "fmoe": fmoe,
              "moe_layers": dict(sorted(layers.items(), key=lambda kv: _natural(kv[0]))),
              "model": model}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.save(merged, tmp)
    os.replace(tmp, output)
    return merged


def _natural(key: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", key)]


def load_merged(path) -> dict:
    """The merged file, read with ``weights_only=True``."""
    merged = ckpt._torch_load(Path(path), mmap=False)
    if not isinstance(merged, dict) or merged.get("format") != MERGED_FORMAT:
        raise ckpt.CheckpointError(f"{path} is not a merged fastmoe_megatron checkpoint")
    return merged


def build_fmoe_layers(merged: dict, activation=None) -> dict:
    """One plain ``FMoETransformerMLP`` (one process, all experts) per merged MoE layer, with the
    saved gate and weights; ``{layer prefix: module}``. The experts' activation is the one the
    merge names (a function of torch.nn.functional, megatron.core.activations or torch); any
    other (a function of your own, a partial) raises CheckpointError naming it, unless given as
    ``activation``: experts with another activation would load and compute something else."""
    from ..layers import FMoETransformerMLP
    from .layer import GATES

    cfg = merged["fmoe"]
    gate_cls = GATES[cfg.get("gate", "naive")]
    kwargs = {}
    if cfg.get("capacity_factor") is not None:
        kwargs["capacity"] = (cfg["capacity_factor"], 2 * cfg["capacity_factor"])
    if cfg.get("z_loss_weight"):
        kwargs["z_loss_weight"] = cfg["z_loss_weight"]
    if cfg.get("expert_bias_update_rate"):
        kwargs["expert_bias_update_rate"] = cfg["expert_bias_update_rate"]

    def gate(d_model, num_expert, world_size, top_k):
        return gate_cls(d_model, num_expert, world_size, top_k, **kwargs)

    if activation is None:
        activation = ckpt.activation_by_name(cfg.get("activation"))
        if activation is None:
            raise ckpt.CheckpointError(
                f"the merged MoE layers' activation {cfg.get('activation')!r} is none of "
                "torch.nn.functional's, megatron.core.activations' or torch's functions: pass "
                "it as build_fmoe_layers(merged, activation=...)")
    layers = {}
    for prefix, state in merged["moe_layers"].items():
        moe = FMoETransformerMLP(num_expert=cfg["num_experts"], d_model=cfg["d_model"],
                                 d_hidden=cfg["d_hidden"], activation=activation,
                                 top_k=cfg.get("top_k", 2), gate=gate,
                                 bias=cfg.get("bias", True),
                                 gated_linear_unit=cfg.get("gated_linear_unit", False))
        moe.load_state_dict(state)
        layers[prefix] = moe
    return layers


# ------------------------------------------------------------------------------------------ CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmoe_megatron.megatron.reshard",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reshard", help="write the checkpoint for another expert-parallel size")
    r.add_argument("--load", required=True)
    r.add_argument("--save", required=True)
    r.add_argument("--expert-model-parallel-size", type=int, required=True)
    r.add_argument("--ckpt-format", default="torch_dist", choices=list(ckpt.FORMATS))
    r.add_argument("--world-size", type=int, default=None,
                   help="processes of the new layout (default: PP x lcm(TP, EP))")
    r.add_argument("--timeout", type=float, default=3600,
                   help="seconds the new layout's processes may take (default: 3600)")
    r.add_argument("--force", action="store_true",
                   help="write into a --save that holds checkpoints already (a checkpoint of the "
                        "same iteration is replaced, and the latest file names the new one)")
    m = sub.add_parser("merge", help="write one file for one process / plain FMoETransformerMLP")
    m.add_argument("--load", required=True)
    m.add_argument("--output", required=True)
    v = sub.add_parser("verify", help="check files, sizes, checksums and pickles")
    v.add_argument("--load", required=True)
    i = sub.add_parser("info", help="print the manifest's summary")
    i.add_argument("--load", required=True)
    args, extra = p.parse_known_args(argv)
    if extra and args.command != "reshard":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _existing_folder(args.load)
        if args.command == "reshard":
            reshard(args.load, args.save, args.expert_model_parallel_size, args.ckpt_format,
                    args.world_size, extra, args.timeout, force=args.force)
        elif args.command == "merge":
            merged = merge(args.load, args.output)
            print(f"merge: wrote {args.output}: iteration {merged['iteration']}, "
                  f"{len(merged['moe_layers'])} MoE layers of {merged['fmoe']['num_experts']} "
                  f"experts, {len(merged['model'])} tensors")
        elif args.command == "verify":
            manifest = ckpt.verify(args.load, distributed=False)
            print(f"verify: {ckpt.resolve(args.load)} is complete ({len(manifest['files'])} files, "
                  f"format {manifest['format']}, iteration {manifest['iteration']})")
        else:
            folder = ckpt.resolve(args.load)
            manifest = ckpt.read_manifest(folder)
            print(json.dumps({k: manifest.get(k) for k in
                              ("format", "iteration", "layout", "contents", "fmoe")}, indent=1))
    except (ckpt.CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ReshardFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
