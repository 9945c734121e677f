"""pretrain_gpt: train a megatron-core GPT, with ``--fmoefy`` an expert-parallel MoE GPT.

    torchrun --nproc-per-node 2 -m fastmoe_megatron.megatron.pretrain_gpt \\
        @configs/tiny-cpu.args --fmoefy --fmoe-num-experts 4 --expert-model-parallel-size 2

Built from megatron-core's parts: ``GPTModel``, ``parallel_state``, the forward-backward schedules
(pipeline parallel included), ``DistributedDataParallel``, ``get_megatron_optimizer`` (with the
distributed optimizer on request), ``OptimizerParamScheduler``, ``dist_checkpointing`` and the
indexed-dataset ``GPTDataset``. Flags keep Megatron-LM's names; ``@FILE`` reads flags from a file
(one or more per line, ``#`` starts a comment). One code path: on GPUs it runs with NCCL, on CPUs
with gloo and the CPU compatibility layer (``cpu_compat``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import random
import re
import shlex
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .arguments import (add_fmoe_args, check_unused_fmoe_flags, finite_float,
                        fmoe_config_from_args)


class _ArgParser(argparse.ArgumentParser):
    def convert_arg_line_to_args(self, line):
        return shlex.split(line, comments=True)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="pretrain_gpt", fromfile_prefix_chars="@", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--num-layers", type=int, default=2)
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    m.add_argument("--num-attention-heads", type=int, default=4)
    m.add_argument("--seq-length", type=int, default=64)
    m.add_argument("--max-position-embeddings", type=int, default=None, help="default: seq length")
    m.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope"])
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    m.add_argument("--hidden-dropout", type=finite_float, default=0.0)
    m.add_argument("--attention-dropout", type=finite_float, default=0.0)
    m.add_argument("--init-method-std", type=finite_float, default=0.02)
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    m.add_argument("--bf16", action="store_true", help="bf16 parameters and compute")
    m.add_argument("--disable-bias-linear", action="store_true",
                   help="no biases in the linear layers (needed by --num-experts); the experts of "
                        "--fmoefy have none either")
    m.add_argument("--swiglu", action="store_true",
                   help="gated SiLU MLPs (SwiGLU, as Megatron-LM's --swiglu): the dense MLPs, and "
                        "the experts of --fmoefy and --num-experts")

    moe = p.add_argument_group("megatron-core's own MoE (the alternative to --fmoefy)")
    moe.add_argument("--num-experts", type=int, default=None,
                     help="megatron-core MoE layers (MoELayer) with this many experts, no expert "
                          "parallelism; cannot be combined with --fmoefy")
    moe.add_argument("--moe-router-topk", type=int, default=2)
    moe.add_argument("--moe-token-dispatcher-type", default="alltoall",
                     choices=["allgather", "alltoall"])
    moe.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                     choices=["aux_loss", "seq_aux_loss", "sinkhorn", "none"])
    moe.add_argument("--moe-aux-loss-coeff", type=finite_float, default=0.0)

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--expert-model-parallel-size", type=int, default=None,
                     help="ranks the experts are spread over (default with --fmoefy: the whole "
                          "data-parallel group; must divide tensor x data parallel size)")
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--distributed-timeout-minutes", type=finite_float, default=10)

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=4)
    t.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch size x data-parallel size")
    t.add_argument("--train-iters", type=int, default=100)
    t.add_argument("--lr", type=finite_float, default=1e-3)
    t.add_argument("--min-lr", type=finite_float, default=0.0)
    t.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine"])
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-decay-iters", type=int, default=None, help="default: train iters")
    t.add_argument("--weight-decay", type=finite_float, default=0.01)
    t.add_argument("--adam-beta1", type=finite_float, default=0.9)
    t.add_argument("--adam-beta2", type=finite_float, default=0.95)
    t.add_argument("--clip-grad", type=finite_float, default=1.0)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: the CPUs this process may use, e.g. "
                        "under taskset or a Slurm binding, / local processes)")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", default=None,
                   help="prefix of a .bin/.idx dataset (default: the Python standard library's "
                        "source, tokenized on first use)")
    d.add_argument("--split", default="100,0,0",
                   help="train,valid,test shares of the documents (valid: for --eval-interval; "
                        "test: unused)")
    d.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (with --merge-file)")
    d.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (with --vocab-file)")
    d.add_argument("--default-corpus-bytes", type=int, default=4_000_000,
                   help="how much stdlib source the default corpus holds")
    d.add_argument("--cache-dir", default=None,
                   help="where the tokenized default corpus goes, under data/ (default: "
                        "$FMOE_CACHE_DIR, else ~/.cache/fastmoe_megatron)")
    d.add_argument("--data-cache-path", default=None,
                   help="where the dataset indices of --data-path are cached (default: index_cache/ "
                        "beside the data); global rank 0 writes them and every rank reads them, so "
                        "all ranks must see it")

    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--save", default=None, help="checkpoint folder")
    c.add_argument("--save-interval", type=int, default=None, help="default: only at the end")
    c.add_argument("--load", default=None, help="resume from the latest checkpoint in this folder")
    c.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist", "torch"],
                   help="torch_dist: megatron-core dist_checkpointing (default; loads at any "
                        "expert-parallel size); torch: one torch file per rank")
    c.add_argument("--no-load-optim", action="store_true",
                   help="load the model (and lr scheduler) only, not the optimizer state")
    c.add_argument("--no-load-rng", action="store_true", help="do not restore the RNG states")
    sched = c.add_mutually_exclusive_group()
    sched.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                       dest="override_opt_param_scheduler", action="store_true",
                       help="on --load, follow this run's learning-rate schedule (--lr, --min-lr, "
                            "--lr-warmup-iters, --lr-decay-iters, --lr-decay-style, "
                            "--weight-decay), from the samples consumed so far, instead of the "
                            "checkpoint's: to extend a run or change its schedule")
    sched.add_argument("--use-checkpoint-opt-param-scheduler",
                       "--use-checkpoint-opt_param-scheduler",
                       dest="use_checkpoint_opt_param_scheduler", action="store_true",
                       help="on --load, keep the checkpoint's learning-rate schedule, whatever "
                            "these flags say (the default of --skip-train; otherwise a resume "
                            "whose schedule differs stops with an error)")
    c.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after a checkpoint, with --save) when the iteration is a multiple "
                        "of this")
    c.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (a scheduler's preemption or time limit), finish the iteration, "
                        "save a checkpoint (with --save) and exit 0")
    c.add_argument("--exit-duration-in-mins", type=finite_float, default=None,
                   help="stop (after a checkpoint, with --save) once the run has trained this long")
    c.add_argument("--skip-train", action="store_true",
                   help="load (--load), save (--save) and exit without training: converts a "
                        "checkpoint to this run's layout and --ckpt-format")
    c.add_argument("--log-interval", type=int, default=10)
    c.add_argument("--eval-interval", type=int, default=None,
                   help="every this many iterations and at the end, the lm loss on --eval-iters "
                        "global batches of the valid split (the same samples every time; "
                        "default: no evaluation)")
    c.add_argument("--eval-iters", type=int, default=100,
                   help="global batches per evaluation (default 100)")
    c.add_argument("--tensorboard-dir", default=None)
    add_fmoe_args(p)
    return p


def _check_split(split: str, skip_train: bool, evaluate: bool = False) -> None:
    """``--split`` as megatron-core reads it: up to three shares (train, valid, test), e.g.
    ``969,30,1`` or ``98/2``; training needs a train share, evaluation a valid one."""
    try:  # megatron-core takes every run of digits and dots as a share
        shares = [float(x) for x in re.findall(r"[.0-9]+", str(split))]
    except ValueError:
        shares = None
    if shares is None or len(shares) > 3 or any(not x >= 0 for x in shares) or not sum(shares) > 0:
        raise ValueError(f"--split {split!r}: expected up to three shares >= 0 (train,valid,test), "
                         "e.g. 969,30,1")
    if shares[0] == 0 and not skip_train:
        raise ValueError(f"--split {split}: the train share (the first) is 0, so there is nothing "
                         "to train on")
    if evaluate and not skip_train and (len(shares) < 2 or shares[1] == 0):
        raise ValueError(f"--split {split}: --eval-interval evaluates on the valid split, whose "
                         "share (the second) is 0; e.g. --split 969,30,1")


#: The flags of megatron-core's own MoE, which only --num-experts uses.
_CORE_MOE_FLAGS = ("moe_router_topk", "moe_token_dispatcher_type",
                   "moe_router_load_balancing_type", "moe_aux_loss_coeff")


def _no_checkpoint_in(load) -> str | None:
    """Why ``load`` (a checkpoint root or folder) holds nothing that a load would read, or None
    (then the load itself checks what it finds)."""
    from .checkpointing import LATEST, MANIFEST, checkpoint_name

    root = Path(load)
    if checkpoint_name(root.name) and root.is_dir():
        return None  # a checkpoint folder: the load names what it lacks
    if not root.exists():
        return "no such folder"
    if not root.is_dir():
        return "not a folder"
    if (root / MANIFEST).is_file() or (root / LATEST).exists():
        return None
    if any((checkpoint_name(p.name) or (0, ".tmp"))[1] != ".tmp" for p in root.iterdir()):
        return None
    return "no checkpoint in it"


def validate_args(args, world_size: int):
    """Derives defaults and rejects bad combinations with the flag to fix."""
    for flag in ("hidden_size", "ffn_hidden_size", "hidden_hidden_size", "num_layers",
                 "num_attention_heads", "seq_length", "micro_batch_size", "global_batch_size",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "train_iters", "lr_decay_iters", "log_interval",
                 "threads", "make_vocab_size_divisible_by", "max_position_embeddings",
                 "init_method_std", "eval_interval", "eval_iters", "default_corpus_bytes"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if args.lr_warmup_iters < 0:
        raise ValueError(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.skip_train and not args.override_opt_param_scheduler:
        args.use_checkpoint_opt_param_scheduler = True  # a conversion keeps the schedule
    if args.skip_train and args.load:
        # A training run starts from scratch on a --load that holds nothing yet; a conversion
        # would save the fresh model as the converted checkpoint (and exit 0).
        missing = _no_checkpoint_in(args.load)
        if missing:
            raise ValueError(f"--load {args.load}: {missing}; --skip-train converts a checkpoint "
                             "and would save a freshly initialised model instead")
    for flag in ("hidden_dropout", "attention_dropout", "adam_beta1", "adam_beta2"):
        value = getattr(args, flag)
        if not 0 <= value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    if args.clip_grad < 0:
        raise ValueError(f"--clip-grad must be >= 0 (0: no clipping), got {args.clip_grad}")
    if not 0 <= args.seed < 2 ** 31:
        raise ValueError(f"--seed must be in [0, 2^31), got {args.seed}")
    if not args.distributed_timeout_minutes > 0:
        raise ValueError("--distributed-timeout-minutes must be > 0, got "
                         f"{args.distributed_timeout_minutes}")
    check_unused_fmoe_flags(args)
    if args.num_experts is None:  # megatron-core's MoE flags would be silently ignored
        defaults = build_parser()
        unused = [f"--{dest.replace('_', '-')}" for dest in _CORE_MOE_FLAGS
                  if getattr(args, dest) != defaults.get_default(dest)]
        if unused:
            raise ValueError(f"{', '.join(unused)} without --num-experts: megatron-core's MoE flags "
                             "take effect only with --num-experts (fastmoe's MoE: --fmoefy, with "
                             "--fmoe-top-k, --balance-strategy, --balance-loss-weight)")
    _check_split(args.split, args.skip_train, bool(args.eval_interval))
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                         f"{tp} x --pipeline-model-parallel-size {pp}")
    args.data_parallel_size = dp = world_size // (tp * pp)
    if args.expert_model_parallel_size is None:
        args.expert_model_parallel_size = dp if args.fmoefy else 1
    ep = args.expert_model_parallel_size
    if args.num_experts is not None:
        if args.fmoefy:
            raise ValueError("--num-experts (megatron-core's MoE) and --fmoefy exclude each other")
        if args.num_experts < 1 or not 1 <= args.moe_router_topk <= args.num_experts:
            raise ValueError("--num-experts must be >= 1 and --moe-router-topk in [1, num experts]")
        if not args.disable_bias_linear:
            # megatron-core 0.16's expert MLP adds its bias in place to the output of a custom
            # autograd function (_ReduceFromModelParallelRegion), which autograd forbids.
            raise ValueError("--num-experts needs --disable-bias-linear (megatron-core's expert "
                             "biases fail in its backward)")
    if ep > 1 and not args.fmoefy:
        raise ValueError("--expert-model-parallel-size > 1 needs --fmoefy (fastmoe experts)")
    if (tp * dp) % ep:
        raise ValueError(f"--expert-model-parallel-size {ep} must divide tensor x data parallel "
                         f"size {tp * dp} (experts are spread over data-parallel ranks)")
    if args.sequence_parallel and tp == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.sequence_parallel and args.seq_length % tp:
        raise ValueError(f"--seq-length {args.seq_length} is not divisible by "
                         f"--tensor-model-parallel-size {tp} (--sequence-parallel splits it)")
    if args.num_experts is not None and tp > 1 and not args.sequence_parallel \
            and not args.skip_train:
        raise ValueError("--num-experts (megatron-core's MoE) with --tensor-model-parallel-size > 1 "
                         "needs --sequence-parallel")
    if args.num_attention_heads % tp:
        raise ValueError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size {args.hidden_size} is not divisible by "
                         f"--num-attention-heads {args.num_attention_heads}")
    if args.num_layers % pp:
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by "
                         f"--pipeline-model-parallel-size {pp}")
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    if args.ffn_hidden_size % tp:
        raise ValueError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if (args.position_embedding_type == "learned_absolute"
            and args.max_position_embeddings < args.seq_length):
        raise ValueError(f"--max-position-embeddings {args.max_position_embeddings} is below "
                         f"--seq-length {args.seq_length}: learned positions need one per token")
    args.global_batch_size = args.global_batch_size or args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if pp > 1 and args.num_microbatches < pp:
        print(f"warning: {args.num_microbatches} microbatches for {pp} pipeline stages leaves "
              "stages idle; raise --global-batch-size", file=sys.stderr)
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
                         f"(default: --train-iters) {args.lr_decay_iters}")
    if args.fmoefy:
        args.fmoe = fmoe_config_from_args(args)
        args.fmoe.validate(ep)
    if args.save_interval is not None and args.save_interval <= 0:
        raise ValueError("--save-interval must be > 0")
    if args.save_interval is not None and not args.save and os.environ.get("RANK", "0") == "0":
        print(f"warning: --save-interval {args.save_interval} without --save: no checkpoints will "
              "be written", file=sys.stderr)
    if args.exit_interval is not None and args.exit_interval <= 0:
        raise ValueError("--exit-interval must be > 0")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise ValueError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if (args.vocab_file is None) != (args.merge_file is None):
        raise ValueError("--vocab-file and --merge-file go together (GPT-2 BPE); without both the "
                         "tokenizer is byte-level")
    for flag in ("vocab_file", "merge_file"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.data_path:
        prefix = str(args.data_path)
        if prefix.endswith((".bin", ".idx")):
            prefix = prefix[:-4]
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing and not args.skip_train:  # --skip-train reads no data
            raise ValueError(
                f"--data-path {args.data_path}: {' and '.join(missing)} not found (a dataset is "
                "PREFIX.bin and PREFIX.idx, as python -m fastmoe_megatron.megatron.preprocess_data "
                "writes them)")
        args.data_path = prefix
    cache = Path(args.cache_dir) if args.cache_dir else Path(
        os.environ.get("FMOE_CACHE_DIR", Path.home() / ".cache" / "fastmoe_megatron"))
    args.cache_dir = cache
    return args


def diverged(iteration: int, what: str, args, before_step: bool, holder) -> str:
    """The error of a non-finite loss or gradient norm: the run stops there, saving nothing.
    ``holder``: the checkpoint that holds the weights which gave it (of the iteration before)."""
    if holder:
        where = f" {holder} holds the weights that gave it: resume from an earlier one."
    elif args.save:
        where = f" The checkpoints in --save {args.save} are from before it."
    else:
        where = ""
    return (f"training diverged at iteration {iteration}: {what}; stopped "
            + ("before the optimizer step" if before_step else "after the optimizer step")
            + f", saving nothing.{where} Lower --lr, or set --clip-grad.")


def log0(*msg):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*msg, flush=True)


def initialize(args, use_cuda: bool):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():  # a second run in the same process
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        # fastmoe experts live whole on a rank (expert TP 1); megatron-core's own MoE keeps its
        # default, expert TP = TP (as its TransformerConfig assumes): with expert TP 1 its
        # experts are whole on every TP rank, yet their gradients are reduced over the dense
        # data-parallel group only (EP 1 marks them allreduce), so the TP copies drift apart.
        expert_tensor_parallel_size=args.tensor_model_parallel_size if args.num_experts else 1,
        # megatron's groups carry the training collectives: they get the same timeout
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def fused_softmax_available() -> bool:
    """Whether the fused masked-softmax kernels (Megatron-LM's ``fused_kernels`` or apex's build of
    them) import. megatron-core imports them only when a bf16/fp16 attention fits their sizes, so
    asking for the fusion without them (or with a build for another torch, which fails to load)
    fails in the first forward with ImportError."""
    import importlib

    try:
        for name in ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
                     "scaled_softmax_cuda"):
            importlib.import_module(name)
    except (ImportError, OSError):
        return False
    return True


def transformer_config(args, use_cuda: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    moe = {} if args.num_experts is None else dict(
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type, moe_grouped_gemm=False,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_ffn_hidden_size=args.ffn_hidden_size)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        # The expert-parallel size lives in parallel_state only: TransformerConfig ties it to
        # megatron-core's own MoE (num_moe_experts), which --fmoefy does not use.
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not use_cuda,
        gradient_accumulation_fusion=False,
        # megatron-core's fused bias-GeLU needs a bias: it refuses the fusion without one
        # (its fused bias-SwiGLU does not)
        bias_activation_fusion=use_cuda and (args.swiglu or not args.disable_bias_linear),
        gated_linear_unit=args.swiglu,
        **({"activation_func": torch.nn.functional.silu} if args.swiglu else {}),
        bias_dropout_fusion=use_cuda,
        masked_softmax_fusion=use_cuda and fused_softmax_available(),
        apply_rope_fusion=False,
        persist_layer_norm=False,
        add_bias_linear=not args.disable_bias_linear,
        **moe,
    )


def build_model(args, config, vocab_size: int):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .fmoefy import fmoefy

    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=args.num_experts,
                                                        moe_grouped_gemm=False),
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )
    if args.fmoefy:
        cfg = args.fmoe
        fmoefy(model, cfg.num_experts, top_k=cfg.top_k, gate=cfg.gate,
               hidden_hidden_size=cfg.hidden_size, capacity_factor=cfg.capacity_factor,
               z_loss_weight=cfg.z_loss_weight, expert_bias_update_rate=cfg.expert_bias_update_rate,
               balance_loss_weight=cfg.balance_loss_weight)
    return model


def padded_vocab_size(vocab: int, args) -> int:
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab / multiple) * multiple)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), mask.sum().detach()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


@dataclasses.dataclass
class TrainResult:
    """What a run leaves behind (for tests and callers that train in-process)."""

    model: object
    optimizer: object
    args: argparse.Namespace
    losses: list  # lm loss of every iteration (the same on every rank)
    grad_norms: list  # gradient norm used for clipping, every iteration
    consumed_samples: int = 0  # training samples read, from the start of the run it resumed
    lrs: list = dataclasses.field(default_factory=list)  # learning rate of every iteration's step
    valid_losses: list = dataclasses.field(default_factory=list)  # (iteration, valid lm loss)


def param_scheduler(args, optimizer):
    """megatron-core's ``OptimizerParamScheduler`` for the flags: LR warm-up and decay in samples,
    constant weight decay. On --load, as with Megatron-LM's flags, a schedule that differs from
    the checkpoint's stops the load unless --override-opt-param-scheduler or
    --use-checkpoint-opt-param-scheduler says which to follow (checkpointing.load names both).
    The weight-decay increment steps (``train_iters x global batch``, as Megatron-LM sets them)
    are not compared: they have no effect on a constant weight decay, and an extended run
    changes them."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class ParamScheduler(OptimizerParamScheduler):
        def load_state_dict(self, state_dict):
            state_dict = dict(state_dict)
            if "wd_incr_steps" in state_dict and state_dict.get("start_wd") == state_dict.get(
                    "end_wd") and self.start_wd == self.end_wd:
                state_dict["wd_incr_steps"] = self.wd_incr_steps
            super().load_state_dict(state_dict)

    gbs = args.global_batch_size
    return ParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler)


def local_gpu(local_rank: int) -> int:
    """The GPU of a node's ``local_rank``-th process: its local rank, modulo the GPUs it sees (a
    launcher that gives each process one GPU through CUDA_VISIBLE_DEVICES shows it as GPU 0)."""
    return local_rank % max(1, torch.cuda.device_count())


def run(argv=None) -> TrainResult:
    """Parses ``argv`` and trains, in a process where torch.distributed is initialised (or a
    single process: it is initialised here)."""
    args = build_parser().parse_args(argv)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():  # as main() does: each process of a node on its own GPU
            torch.cuda.set_device(local_gpu(int(os.environ.get("LOCAL_RANK", "0"))))
        if "WORLD_SIZE" in os.environ:  # launched by torchrun: env:// rendezvous
            dist.init_process_group(backend)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group(backend, rank=0, world_size=1)
    validate_args(args, dist.get_world_size())
    return train(args, torch.cuda.is_available())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    try:
        validate_args(args, world_size)
    except ValueError as exc:  # a bad flag: its message, once, without a traceback
        if rank == 0:
            print(f"pretrain_gpt: error: {exc}", file=sys.stderr, flush=True)
        return 2
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_gpu(local_rank))
    elif args.threads is None:
        args.threads = max(1, usable_cpus() // local_world)
    if args.save:
        problem = save_folder_problem(args.save, rank)
        if problem:  # before any training: a run that could not save its work would lose it
            print(f"pretrain_gpt: error: --save {args.save}: {problem}", file=sys.stderr, flush=True)
            return 2
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
    from .data import DataConfigError

    try:
        result = train(args, use_cuda)  # on failure: no barrier (a dead peer would make it wait)
    except DataConfigError as exc:
        if rank == 0 or not exc.every_rank:  # (a bad sample: only the ranks that read it)
            where = "" if exc.every_rank else f" (rank {rank})"
            print(f"pretrain_gpt: error{where}: {exc}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        return 2
    ok = not result.losses or result.losses[-1] == result.losses[-1]  # not NaN
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def _entry() -> None:
    """``python -m``/torchrun entry: a failing rank prints what failed and exits at once (no
    interpreter teardown, which can hang on a process group with a dead peer). The other ranks'
    next collective then fails (gloo: the peer closed the connection; NCCL: its watchdog, within
    --distributed-timeout-minutes), and torchrun ends the job."""
    try:
        code = main()
    except Exception as exc:  # noqa: BLE001 - report, then end the process
        import traceback

        import multiprocessing

        rank = os.environ.get("RANK", "0")
        traceback.print_exc()
        print(f"pretrain_gpt: rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        for child in multiprocessing.active_children():  # e.g. checkpoint writer processes
            child.kill()
        os._exit(1)
    sys.stdout.flush()
    sys.exit(code)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a cgroup, taskset or Slurm's binding),
    else all of the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def save_folder_problem(save, rank: int) -> str | None:
    """Why this rank could not write checkpoints into ``save`` (it is created if missing), or
    None: checked at start-up, not at the first save after hours of training."""
    root = Path(save)
    probe = root / f".write_test.{rank}.{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc})"
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, use_cuda: bool) -> TrainResult:
    """Builds the model and trains it (``_train``); then, also when training raised, closes the
    tensorboard writer (flushing what was logged) and restores the SIGTERM handler that
    ``--exit-signal-handler`` replaces, so that an in-process caller gets its own back."""
    previous = signal.getsignal(signal.SIGTERM)
    closers = []  # what _train opened that must be closed also when it raises (tensorboard)
    try:
        return _train(args, use_cuda, closers)
    finally:
        for close in closers:
            close()
        if args.exit_signal_handler and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _train(args, use_cuda: bool, closers: list) -> TrainResult:
    if not use_cuda:
        from . import cpu_compat

        cpu_compat.apply()
    else:
        from . import te_compat

        te_compat.apply()
    from megatron.core import parallel_state
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from . import checkpointing, stats
    from .data import BatchIterator, build_datasets, default_data_prefix, index_cache_for
    from .fmoefy import moe_modules
    from .layer import set_balance_loss_scale
    from .tokenizer import build_tokenizer

    stats.reset()  # an in-process caller's earlier run (one that raised) left its records
    t_start = time.time()
    if not use_cuda and args.threads:
        torch.set_num_threads(args.threads)
    initialize(args, use_cuda)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    config = transformer_config(args, use_cuda)
    tokenizer = build_tokenizer(args.vocab_file, args.merge_file)
    vocab = padded_vocab_size(tokenizer.vocab_size, args)
    model = build_model(args, config, vocab)
    moes = moe_modules(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for m in moes for p in m.moe.experts.parameters()) + sum(
        p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    if use_cuda:
        model.cuda(device)
    if args.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr,
                        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                        adam_beta2=args.adam_beta2, clip_grad=args.clip_grad, bf16=args.bf16,
                        params_dtype=config.params_dtype,
                        use_distributed_optimizer=args.use_distributed_optimizer),
        [model])
    scheduler = param_scheduler(args, optimizer)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync

    train_ds = valid_ds = None
    if not args.skip_train:
        if args.data_path:
            data_prefix = args.data_path
            index_cache = index_cache_for(data_prefix, args.data_cache_path)
        else:
            data_prefix = default_data_prefix(args.cache_dir, args.default_corpus_bytes,
                                              args.vocab_file, args.merge_file)
            index_cache = args.data_cache_path or ""  # in memory: the cache may be node-local
        # One epoch of training samples, which the BatchIterator reshuffles for each further
        # pass: the order does not depend on --train-iters or the global batch size.
        valid_samples = args.eval_iters * args.global_batch_size if args.eval_interval else 0
        train_ds, valid_ds, _ = build_datasets(data_prefix, tokenizer, args.seq_length, args.seed,
                                               args.split, [None, valid_samples, 0], index_cache)
    iteration, loaded = 0, {}
    if args.load:  # last before the loop: it restores the RNG states
        iteration = checkpointing.load(args.load, model, optimizer, scheduler, args,
                                       load_optim=not args.no_load_optim,
                                       load_rng=not args.no_load_rng, report=loaded)
    start_iteration = iteration
    if iteration >= args.train_iters and not args.skip_train:
        log0(f"pretrain_gpt: the checkpoint of --load {args.load} is at iteration {iteration}, and "
             f"--train-iters is {args.train_iters}: nothing to train (raise --train-iters to go on)")
    if args.save and not args.skip_train and dist.get_rank() == 0:
        newer = checkpointing.latest_iteration(args.save)
        if newer is not None and newer > iteration:  # said now, not at the first save hours later
            print(f"warning: --save {args.save} holds a run up to iteration {newer}, and this run "
                  f"starts at iteration {iteration}"
                  + (f" (from --load {args.load})" if args.load else "") + ": its saves will "
                  f"replace that run's checkpoints after iteration {iteration} and move "
                  f"'{checkpointing.LATEST}' back; pass --load {args.save} to resume that run "
                  "instead", file=sys.stderr, flush=True)
    # The data position: the samples consumed so far (a resumed run may have another global batch
    # size, e.g. after a change of the data-parallel size with the default --global-batch-size).
    consumed = loaded.get("consumed_samples")
    if consumed is None:
        consumed = iteration * args.global_batch_size
    elif consumed != iteration * args.global_batch_size:
        log0(f"pretrain_gpt: resuming at sample {consumed} of the data (iteration {iteration}; "
             f"the global batch is now {args.global_batch_size})")

    def optimizer_has_state() -> bool:
        """Whether the optimizer holds the run's state: loaded, or made by a step of this run (a
        --skip-train conversion with --no-load-optim saves no optimizer state)."""
        return loaded.get("optimizer", False) or iteration > start_iteration

    def rng_is_the_runs() -> bool:
        """Whether the RNG states are the run's: not when a checkpoint was loaded without them
        (--no-load-rng, another layout) and no step has run since, as in a reshard: its fresh
        processes' states, saved as the run's, would be "restored" by the next resume."""
        return loaded.get("rng") is not False or iteration > start_iteration

    data = None if train_ds is None else BatchIterator(
        train_ds, args.global_batch_size, args.micro_batch_size,
        parallel_state.get_data_parallel_rank(), args.data_parallel_size,
        start_sample=consumed, device=device, seed=args.seed, vocab_size=tokenizer.vocab_size,
        source=data_prefix)

    ep, dp = args.expert_model_parallel_size, args.data_parallel_size
    log0(f"pretrain_gpt: {dist.get_world_size()} processes ({'NCCL' if use_cuda else 'gloo, CPU'}): "
         f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} DP={dp}"
         + (f" EP={ep}, {args.fmoe.num_experts} experts top-{args.fmoe.top_k} "
            f"({args.fmoe.gate} gate)" if args.fmoefy else
            f" (megatron-core MoE: {args.num_experts} experts top-{args.moe_router_topk}, "
            f"{args.moe_token_dispatcher_type} dispatcher)" if args.num_experts else " (dense)")
         + f"; {n_params / 1e6:.2f}M parameters on rank 0 ({n_expert / 1e6:.2f}M in experts); "
         f"global batch {args.global_batch_size} x {args.seq_length} tokens")

    writer = None
    if args.tensorboard_dir and dist.get_rank() == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(args.tensorboard_dir)
            closers.append(writer.close)  # closed (its file, its thread) also when training raises
        except ImportError:
            print("warning: tensorboard is not installed; --tensorboard-dir ignored", file=sys.stderr)

    forward_backward = get_forward_backward_func()
    set_balance_loss_scale(1.0 / args.num_microbatches)

    def reduced_loss(reports) -> float:
        """The lm loss of ``reports`` over all data-parallel ranks (the same on every rank)."""
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for r in reports:
            total += r["lm loss"].to(total)
        # Each model replica's loss lives on its last stage; count it once (TP rank 0).
        if not (parallel_state.is_pipeline_last_stage()
                and parallel_state.get_tensor_model_parallel_rank() == 0):
            total.zero_()
        dist.all_reduce(total)
        return float(total[0] / total[1].clamp(min=1))

    def evaluate() -> float:
        """The lm loss of the model in eval mode (no dropout, no gate noise, the gates' eval
        capacity) on the first --eval-iters global batches of the valid split."""
        batches = BatchIterator(valid_ds, args.global_batch_size, args.micro_batch_size,
                                parallel_state.get_data_parallel_rank(), args.data_parallel_size,
                                start_sample=0, device=device, vocab_size=tokenizer.vocab_size,
                                source=data_prefix)
        model.eval()
        reports = []
        try:
            with torch.no_grad():
                for _ in range(args.eval_iters):
                    reports += forward_backward(
                        forward_step_func=forward_step, data_iterator=batches, model=[model],
                        num_microbatches=args.num_microbatches, seq_length=args.seq_length,
                        micro_batch_size=args.micro_batch_size, forward_only=True)
        finally:
            model.train()
        return reduced_loss(reports)

    tokens_per_iter = args.global_batch_size * args.seq_length
    first_loss = last_loss = None
    window_t, window_iters = time.time(), 0
    history, norms, lrs, valid_losses = [], [], [], []
    stop_early = False
    saved_at = None  # the iteration of this run's last periodic save
    stop_requested = None
    if args.exit_signal_handler or args.exit_duration_in_mins:
        stop_requested = {"signal": False}
        if args.exit_signal_handler and threading.current_thread() is not threading.main_thread():
            log0("pretrain_gpt: warning: --exit-signal-handler needs the main thread (Python "
                 "handles signals there only); SIGTERM is not handled in this run")
        elif args.exit_signal_handler:  # restored by train() when training ends
            def on_term(signum, frame):
                stop_requested["signal"] = True

            signal.signal(signal.SIGTERM, on_term)
    def checkpoint_of(iteration: int):
        """The checkpoint holding the weights of ``iteration``, if this run saved or loaded one."""
        if saved_at == iteration:
            return f"The checkpoint of iteration {iteration} in --save {args.save}"
        if args.load and iteration == start_iteration > 0:
            return f"The checkpoint of iteration {iteration} loaded from --load {args.load}"
        return None

    def stop_reason(iteration: int):
        """Why the run stops after ``iteration`` (the same on every rank), or None. A run that
        reaches --train-iters ends there anyway: --exit-interval does not cut its evaluation."""
        if args.exit_interval and iteration % args.exit_interval == 0 \
                and iteration < args.train_iters:
            return f"--exit-interval {args.exit_interval}"
        if stop_requested is None:
            return None
        # Every rank stops at the same iteration: a signal may reach only some of them.
        flags = torch.tensor([int(stop_requested["signal"]), int(
            bool(args.exit_duration_in_mins)
            and time.time() - t_start >= args.exit_duration_in_mins * 60)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return "SIGTERM (--exit-signal-handler)"
        if flags[1]:
            return f"--exit-duration-in-mins {args.exit_duration_in_mins}"
        return None

    def log_progress(iteration: int, loss: float, grad_norm) -> None:
        """The progress line of ``iteration`` (its lm loss, grad norm and lr; the balance loss,
        expert load and tokens/s of the iterations since the last line), then the next window."""
        nonlocal window_t, window_iters
        elapsed = time.time() - window_t
        tps = tokens_per_iter * window_iters / max(elapsed, 1e-9)
        layer_stats = stats.collect(args.num_layers, args.fmoe.num_experts, device=device) \
            if args.fmoefy else {}
        balance = (sum(s["balance_loss"] for s in layer_stats.values()) / len(layer_stats)
                   if layer_stats else 0.0)
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        # (megatron-core's own MoE keeps its aux loss to itself: no balance loss to show.)
        log0(f"iter {iteration:6d}/{args.train_iters} | lm loss {loss:.4f} | "
             + (f"balance loss {balance:.4f} | " if args.fmoefy else "")
             + f"grad norm {norm:.3f} | "
             f"lr {lrs[-1]:.2e} | {tps:8.0f} tokens/s | "
             f"{elapsed / window_iters * 1000:6.0f} ms/iter")
        for layer, s in sorted(layer_stats.items()):
            load = " ".join(f"{x:.2f}" for x in s["load"])
            log0(f"    layer {layer:3d} expert load [{load}]  balance {s['balance_loss']:.4f}")
        if writer is not None:
            writer.add_scalar("lm loss", loss, iteration)
            if args.fmoefy:
                writer.add_scalar("balance loss", balance, iteration)
            writer.add_scalar("grad norm", norm, iteration)
            writer.add_scalar("learning rate", lrs[-1], iteration)
            writer.add_scalar("tokens per second", tps, iteration)
            for layer, s in layer_stats.items():
                writer.add_scalar(f"layer {layer}/balance loss", s["balance_loss"], iteration)
                for e, x in enumerate(s["load"]):
                    writer.add_scalar(f"layer {layer}/expert {e} load", x, iteration)
        window_t, window_iters = time.time(), 0

    while iteration < args.train_iters and not args.skip_train:
        optimizer.zero_grad()
        model.zero_grad_buffer()
        reports = forward_backward(forward_step_func=forward_step, data_iterator=data, model=[model],
                                   num_microbatches=args.num_microbatches,
                                   seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                                   forward_only=False)
        checkpointing.fault_point("step", iteration + 1)
        loss = reduced_loss(reports)
        if not math.isfinite(loss):  # every rank sees the same reduced loss
            raise FloatingPointError(diverged(iteration + 1, f"lm loss {loss}", args, True,
                                              checkpoint_of(iteration)))
        # The learning rate of this iteration's step (the scheduler then sets the next one's):
        # the one logged with its loss and gradient norm.
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        ok, grad_norm, _ = optimizer.step()
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise FloatingPointError(diverged(iteration + 1, f"grad norm {float(grad_norm)}", args,
                                              False, checkpoint_of(iteration)))
        if ok:
            scheduler.step(increment=args.global_batch_size)
        for m in moes:
            m.moe.gate.update_expert_bias(parallel_state.get_tensor_and_data_parallel_group())
        iteration += 1
        consumed += args.global_batch_size
        window_iters += 1

        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        history.append(loss)
        norms.append(float(grad_norm) if grad_norm is not None else float("nan"))

        if iteration % args.log_interval == 0 or iteration == args.train_iters or iteration == 1:
            log_progress(iteration, loss, grad_norm)

        # A stop (--exit-interval, a signal, the time limit) comes before a save or an
        # evaluation, which it makes wait; and is asked again after them, for a signal that came
        # meanwhile (the final save below then saves this iteration, once). A checkpoint due at
        # this iteration (periodic, or the last one at --train-iters) is written before its
        # evaluation: an evaluation that fails (bad valid data, memory) then loses no training.
        why = stop_reason(iteration)
        if why is None and args.save and (iteration == args.train_iters or (
                args.save_interval and iteration % args.save_interval == 0)):
            t_save = time.time()
            checkpointing.save(args.save, iteration, model, optimizer, scheduler, args,
                               with_optimizer=optimizer_has_state(), consumed_samples=consumed,
                               rng=rng_is_the_runs())
            saved_at = iteration
            window_t += time.time() - t_save  # tokens/s and ms/iter count training only
            why = stop_reason(iteration)
        if why is None and args.eval_interval and (iteration % args.eval_interval == 0
                                                   or iteration == args.train_iters):
            t_eval = time.time()
            valid = evaluate()
            valid_losses.append((iteration, valid))
            log0(f"validation at iter {iteration:6d} | lm loss {valid:.4f} | ppl "
                 f"{math.exp(min(valid, 50.0)):10.3f} | {args.eval_iters} x "
                 f"{args.global_batch_size} samples | {time.time() - t_eval:.1f} s")
            if writer is not None:
                writer.add_scalar("validation lm loss", valid, iteration)
            window_t += time.time() - t_eval  # tokens/s and ms/iter count training only
            why = stop_reason(iteration)
        if why is not None:
            stop_early = True
            if window_iters:  # the iterations since the last progress line: shown, not dropped
                log_progress(iteration, loss, grad_norm)
            log0(f"pretrain_gpt: exiting at iteration {iteration} ({why})")
            break
    unchanged = (iteration == start_iteration and not args.skip_train and args.load
                 and Path(args.load).resolve() == Path(args.save or "").resolve())
    if args.save and (stop_early or iteration == args.train_iters or args.skip_train) \
            and not unchanged and saved_at != iteration:  # (a finished run started again: its checkpoint is the latest)
        checkpointing.save(args.save, iteration, model, optimizer, scheduler, args,
                           with_optimizer=optimizer_has_state(), consumed_samples=consumed,
                           rng=rng_is_the_runs())
    if writer is not None:
        writer.close()
    if first_loss is not None:
        change = (1 - last_loss / first_loss) * 100
        trend = f"{change:.1f}% lower" if change >= 0 else f"{-change:.1f}% higher"
        log0(f"pretrain_gpt: lm loss {first_loss:.4f} -> {last_loss:.4f} ({trend}) in "
             f"{time.time() - t_start:.0f} s")
    return TrainResult(model=model, optimizer=optimizer, args=args, losses=history, grad_norms=norms,
                       consumed_samples=consumed, lrs=lrs, valid_losses=valid_losses)


if __name__ == "__main__":
    _entry()
