#!/usr/bin/env python
"""Trains a small byte-level Transformer-XL language model, with MoE feed-forward blocks, on the CPU.

The model is Hugging Face transformers' TransfoXLLMHeadModel (the ``transformerxl`` extra pins
the release); ``--moe`` turns every PositionwiseFF into an MoE block with
``fastmoe_megatron.transformer_xl.moefy_transformer_xl``. Training follows Transformer-XL: the
corpus (the Python standard library's source, so nothing is downloaded) is cut into
``batch-size`` parallel streams read segment after segment, and each segment attends to the
cached hidden states (``mems``) of the previous ones. The loss is the cross-entropy in nats per
byte; a held-out part of the corpus is evaluated (with memory) before and after training.

    .venv/bin/python scripts/train_transformer_xl.py --moe --moe-num-expert 4 --moe-top-k 2

Expert parallel over gloo: ``--distributed`` starts ``--world-size`` local processes (or launch
under ``torchrun --nproc-per-node 2``); each holds ``--moe-num-expert`` experts, the gate picks
among all of them, and the other parameters are data parallel (DistributedGroupedDataParallel).
Each rank reads its own streams. The flags follow FastMoE's Transformer-XL example (--moe,
--moe-num-expert, --moe-top-k).
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a plain checkout too

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastmoe_megatron.demo import stdlib_corpus  # noqa: E402
from fastmoe_megatron.distributed import DistributedGroupedDataParallel, clip_grad_norm_  # noqa: E402
from fastmoe_megatron.gates import GShardGate, NaiveGate, NoisyGate, SwitchGate  # noqa: E402
from fastmoe_megatron.moefy import gate_loss, moe_layers  # noqa: E402
from fastmoe_megatron.transformer_xl import byte_level_config, moefy_transformer_xl  # noqa: E402

GATES = {"naive": NaiveGate, "noisy": NoisyGate, "gshard": GShardGate, "switch": SwitchGate}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    moe = p.add_argument_group("MoE (FastMoE's Transformer-XL flags)")
    moe.add_argument("--moe", action="store_true", help="replace every PositionwiseFF with an MoE block")
    moe.add_argument("--moe-num-expert", "--moe_num_expert", type=int, default=4,
                     help="experts per process")
    moe.add_argument("--moe-top-k", "--moe-top_k", "--moe_top_k", dest="moe_top_k", type=int,
                     default=None, help="experts per token (default 2; 1 with --moe-gate switch)")
    moe.add_argument("--moe-gate", choices=sorted(GATES), default="naive")
    moe.add_argument("--balance-loss-weight", type=float, default=0.01)
    m = p.add_argument_group("model")
    m.add_argument("--n-layer", type=int, default=2)
    m.add_argument("--d-model", type=int, default=128)
    m.add_argument("--n-head", type=int, default=4)
    m.add_argument("--d-inner", type=int, default=256)
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--pre-lnorm", action="store_true")
    m.add_argument("--tgt-len", type=int, default=64, help="tokens per segment")
    m.add_argument("--mem-len", type=int, default=64, help="cached tokens per layer")
    t = p.add_argument_group("training")
    t.add_argument("--iters", type=int, default=500)
    t.add_argument("--batch-size", type=int, default=16, help="streams per process")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=20, help="iterations of linear warm-up, then cosine")
    t.add_argument("--clip", type=float, default=0.25, help="gradient norm clip")
    t.add_argument("--log-interval", type=int, default=50)
    t.add_argument("--eval-segments", type=int, default=8, help="held-out segments per evaluation")
    t.add_argument("--corpus-bytes", type=int, default=2_000_000)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per process (the model is small: more threads gain "
                        "little, and on a busy machine they cost much)")
    d = p.add_argument_group("distributed")
    d.add_argument("--distributed", action="store_true",
                   help="expert parallel over gloo: start --world-size local processes "
                        "(implied when launched by torchrun)")
    d.add_argument("--world-size", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("moe_num_expert", "n_layer", "d_model", "n_head", "d_inner", "tgt_len", "iters",
                 "batch_size", "log_interval", "eval_segments", "corpus_bytes", "threads",
                 "world_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.mem_len < 0 or args.warmup < 0:
        p.error("--mem-len and --warmup must be at least 0")
    if args.d_model % args.n_head:
        p.error(f"--d-model {args.d_model} must be a multiple of --n-head {args.n_head}")
    if args.moe_top_k is None:
        args.moe_top_k = 1 if args.moe_gate == "switch" else 2
    if args.moe_gate == "switch" and args.moe_top_k != 1:
        p.error(f"--moe-gate switch routes each token to one expert: --moe-top-k must be 1, "
                f"got {args.moe_top_k}")
    world = _world_size(args)
    experts = args.moe_num_expert * world
    if args.moe and not 1 <= args.moe_top_k <= experts:
        p.error(f"--moe-top-k must be between 1 and the experts of all processes (--moe-num-expert "
                f"{args.moe_num_expert} x {world} process(es) = {experts}), got {args.moe_top_k}")
    if args.moe_top_k < 1:
        p.error(f"--moe-top-k must be at least 1, got {args.moe_top_k}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be at least 0 and below 1, got {args.dropout}")
    for name in ("lr", "clip"):
        if not 0 < getattr(args, name) < math.inf:
            p.error(f"--{name} must be a positive finite number, got {getattr(args, name)}")
    if not 0 <= args.balance_loss_weight < math.inf:
        p.error(f"--balance-loss-weight must be at least 0, got {args.balance_loss_weight}")
    short = corpus_too_short(stdlib_corpus(args.corpus_bytes).numel(), world, args)
    if short:
        p.error(short)
    return args


def _world_size(args) -> int:
    """Processes of the run: torchrun's WORLD_SIZE, else --world-size with --distributed."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:
        return launched
    return args.world_size if args.distributed else 1


def split_sizes(n_bytes: int, world: int, args) -> tuple:
    """(held-out bytes, bytes per training stream, bytes per held-out stream) of the corpus: the
    held-out part is the last twentieth, or ``eval_segments`` segments per stream if that is
    more; the rest makes ``batch_size`` streams per process."""
    n_eval = max(args.batch_size * (args.eval_segments * args.tgt_len + 1), n_bytes // 20)
    train_len = max(0, n_bytes - n_eval) // (args.batch_size * world)
    return n_eval, train_len, min(n_eval, n_bytes) // args.batch_size


def corpus_too_short(n_bytes: int, world: int, args):
    """Why ``n_bytes`` of corpus cannot feed this run (a message naming --corpus-bytes), or None:
    every training stream needs a segment and its next byte (``tgt_len + 1``), every held-out
    stream ``eval_segments * tgt_len + 1`` bytes (a shorter stream would read its segments
    over and over)."""
    def fits(n):
        _, train_len, eval_len = split_sizes(n, world, args)
        return (train_len >= args.tgt_len + 1
                and eval_len >= args.eval_segments * args.tgt_len + 1)

    if fits(n_bytes):
        return None
    need = (args.batch_size * (args.eval_segments * args.tgt_len + 1)
            + args.batch_size * world * (args.tgt_len + 1))
    while not fits(need):
        need += max(1, need // 100)
    got = (f"{args.corpus_bytes}" if n_bytes == args.corpus_bytes
           else f"{args.corpus_bytes} ({n_bytes} bytes of stdlib source found)")
    return (f"--corpus-bytes {got} is too small for --batch-size {args.batch_size} x {world} "
            f"process(es) of --tgt-len {args.tgt_len} and --eval-segments {args.eval_segments}: "
            f"give at least {need}")


def streams(data: torch.Tensor, n: int) -> torch.Tensor:
    """``data`` cut into ``n`` contiguous streams: [n, len]."""
    length = data.numel() // n
    return data[: n * length].view(n, length)


def evaluate(model, data: torch.Tensor, args) -> float:
    """Mean cross-entropy (nats/byte) over ``eval_segments`` consecutive segments, with memory."""
    model.eval()
    total, count, mems = 0.0, 0, None
    with torch.no_grad():
        for s in range(args.eval_segments):
            seg = data[:, s * args.tgt_len: (s + 1) * args.tgt_len + 1]
            out = model(seg[:, :-1], mems=mems)
            mems = out.mems
            nll = F.nll_loss(out.prediction_scores.reshape(-1, 256), seg[:, 1:].reshape(-1),
                             reduction="sum")
            total += float(nll)
            count += seg[:, 1:].numel()
    model.train()
    return total / count


def train(rank: int, world: int, args) -> int:
    warnings.filterwarnings("ignore", message=".*TransfoXL.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers import TransfoXLLMHeadModel, __version__ as tf_version

    log = print if rank == 0 else (lambda *a, **k: None)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)  # experts differ between ranks; the rest is broadcast
    data = stdlib_corpus(args.corpus_bytes)
    short = corpus_too_short(data.numel(), world, args)
    if short:
        raise ValueError(short)
    n_eval = split_sizes(data.numel(), world, args)[0]
    train_data = streams(data[:-n_eval], args.batch_size * world)[rank * args.batch_size:
                                                                  (rank + 1) * args.batch_size]
    eval_data = streams(data[-n_eval:], args.batch_size)

    config = byte_level_config(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                               d_inner=args.d_inner, tgt_len=args.tgt_len, mem_len=args.mem_len,
                               dropout=args.dropout, pre_lnorm=args.pre_lnorm)
    model = TransfoXLLMHeadModel(config)
    if args.moe:
        moefy_transformer_xl(model, num_expert=args.moe_num_expert, top_k=args.moe_top_k,
                             gate=GATES[args.moe_gate], world_size=world)
    if world > 1:
        model = DistributedGroupedDataParallel(model)  # broadcasts every non-expert parameter
    n_params = sum(p.numel() for p in model.parameters())
    what = (f"MoE: {len(moe_layers(model))} layers x {args.moe_num_expert * world} experts "
            f"({args.moe_num_expert} per process), top-{args.moe_top_k}, {args.moe_gate} gate"
            if args.moe else "dense")
    log(f"Transformer-XL (transformers {tf_version}), {args.n_layer} layers, d_model "
        f"{args.d_model}, d_inner {args.d_inner}, segment {args.tgt_len} + memory {args.mem_len}; "
        f"{what}; {n_params:,} parameters per process; {world} process(es); "
        f"{data.numel():,} bytes of stdlib source, {args.iters} iterations", flush=True)

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: min(
        (it + 1) / max(1, args.warmup),
        0.5 * (1 + math.cos(math.pi * min(1.0, it / max(1, args.iters))))))
    eval_before = evaluate(model, eval_data, args)
    log(f"eval before training | loss {eval_before:.4f} | {eval_before / math.log(2):.3f} "
        f"bits/byte", flush=True)

    span = train_data.shape[1] - 1
    mems, offset, window, first, last = None, 0, [], None, None
    t0 = time.time()
    for it in range(1, args.iters + 1):
        if offset + args.tgt_len > span:  # end of the streams: start again, with empty memory
            mems, offset = None, 0
        seg = train_data[:, offset: offset + args.tgt_len + 1]
        offset += args.tgt_len
        out = model(seg[:, :-1], mems=mems)
        mems = out.mems  # detached by the model: no backpropagation into past segments
        lm_loss = F.nll_loss(out.prediction_scores.reshape(-1, 256), seg[:, 1:].reshape(-1))
        loss = lm_loss
        balance = gate_loss(model) if args.moe else None
        if balance is not None:
            loss = loss + args.balance_loss_weight * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            model.allreduce_gradients()
        clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        value = float(lm_loss.detach())
        if world > 1:
            t = torch.tensor([value])
            dist.all_reduce(t)
            value = float(t) / world
        window.append(value)
        if it == 1 or it % args.log_interval == 0 or it == args.iters:
            mean = sum(window) / len(window)
            first = mean if first is None else first
            last = mean
            bal = f" | balance loss {float(balance.detach()):.4f}" if balance is not None else ""
            log(f"iter {it:5d} | loss {mean:.4f} | lr {sched.get_last_lr()[0]:.2e}{bal} | "
                f"{(time.time() - t0) / it * 1000:.0f} ms/iter", flush=True)
            window = []
    eval_after = evaluate(model, eval_data, args)
    log(f"eval after training  | loss {eval_after:.4f} | {eval_after / math.log(2):.3f} bits/byte",
        flush=True)
    log(f"train loss {first:.4f} -> {last:.4f}; held-out loss {eval_before:.4f} -> {eval_after:.4f} "
        f"({(1 - eval_after / eval_before) * 100:.1f}% lower) in {time.time() - t0:.0f} s",
        flush=True)
    if args.iters > 1 and not last < first:  # one iteration has one loss
        return 1
    return 0 if eval_after < eval_before else 1


def _worker(rank: int, world: int, port: int, args, codes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    codes[rank] = _run_distributed(args)


def _run_distributed(args) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        code = train(rank, world, args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        return _run_distributed(args)
    if args.distributed:
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        codes = mp.get_context("spawn").Manager().dict()
        mp.spawn(_worker, args=(args.world_size, port, args, codes), nprocs=args.world_size)
        return max(codes.values())
    return train(0, 1, args)


if __name__ == "__main__":
    sys.exit(main())
