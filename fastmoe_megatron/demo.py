"""A small byte-level MoE language model trained on the CPU: the demo behind
``python -m fastmoe_megatron demo``. The corpus is the Python standard library's own source, so
nothing is downloaded."""
from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gates import GShardGate, NaiveGate, SwitchGate
from .layers import FMoETransformerMLP

GATES = {"naive": NaiveGate, "gshard": GShardGate, "switch": SwitchGate}
HEADS = 4


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-hidden", type=int, default=256)
    p.add_argument("--num-expert", type=int, default=8)
    p.add_argument("--top-k", type=int, default=None,
                   help="experts per token (default: 2; 1 with --gate switch, which routes to one)")
    p.add_argument("--gate", choices=sorted(GATES), default="naive")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--balance-loss-weight", type=float, default=1e-2)
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000,
                   help="bytes of standard-library source to train on")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuses a bad configuration through ``parser.error`` (status 2), naming the flag; fills in
    the default top-k."""
    for name in ("iters", "layers", "d_model", "d_hidden", "num_expert", "seq_len", "batch_size",
                 "log_interval", "corpus_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.d_model % HEADS:
        parser.error(f"--d-model must be a multiple of {HEADS} (the attention heads), got {args.d_model}")
    if args.top_k is None:
        args.top_k = 1 if args.gate == "switch" else 2
    if args.gate == "switch" and args.top_k != 1:
        parser.error(f"--gate switch routes each token to one expert: --top-k must be 1, got {args.top_k}")
    if not 1 <= args.top_k <= args.num_expert:
        parser.error(f"--top-k must be between 1 and --num-expert ({args.num_expert}), got {args.top_k}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not args.balance_loss_weight >= 0:
        parser.error(f"--balance-loss-weight must be at least 0, got {args.balance_loss_weight}")
    if args.corpus_bytes < args.seq_len + 2:
        parser.error(f"--corpus-bytes ({args.corpus_bytes}) must exceed --seq-len + 1 ({args.seq_len + 1})")


def stdlib_corpus(limit: int) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if not chunks:
        raise FileNotFoundError(f"no .py files under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.ln1 = nn.LayerNorm(args.d_model)
        self.attn = nn.MultiheadAttention(args.d_model, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(args.d_model)
        self.moe = FMoETransformerMLP(num_expert=args.num_expert, d_model=args.d_model,
                                      d_hidden=args.d_hidden, gate=GATES[args.gate],
                                      top_k=args.top_k)

    def forward(self, x, causal):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.moe(self.ln2(x))


class TinyMoELM(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.embed = nn.Embedding(256, args.d_model)
        self.pos = nn.Parameter(torch.zeros(args.seq_len, args.d_model))
        self.blocks = nn.ModuleList([Block(args) for _ in range(args.layers)])
        self.ln = nn.LayerNorm(args.d_model)
        self.head = nn.Linear(args.d_model, 256)

    def forward(self, tokens):
        s = tokens.shape[1]
        causal = torch.triu(torch.full((s, s), float("-inf")), 1)
        x = self.embed(tokens) + self.pos[:s]
        for b in self.blocks:
            x = b(x, causal)
        return self.head(self.ln(x))


def run(args) -> int:
    torch.manual_seed(args.seed)
    data = stdlib_corpus(args.corpus_bytes)
    if data.numel() < args.seq_len + 2:
        raise ValueError(f"the standard library holds only {data.numel()} bytes of source, too few "
                         f"for --seq-len {args.seq_len}")
    model = TinyMoELM(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"demo: {args.layers} layers, {args.num_expert} experts, top-{args.top_k}, "
          f"{args.gate} gate; {data.numel()} bytes of stdlib source; {args.iters} iterations",
          flush=True)
    first = last = None
    t0 = time.time()
    for it in range(1, args.iters + 1):
        starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([data[s:s + args.seq_len + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        lm_loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        balance = sum(b.moe.gate.get_loss() for b in model.blocks)
        loss = lm_loss + args.balance_loss_weight * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = lm_loss.item()
        first = value if first is None else first
        last = value
        if it == 1 or it % args.log_interval == 0 or it == args.iters:
            print(f"iter {it:5d} | lm loss {value:.4f} | balance loss {float(balance):.4f} | "
                  f"ppl {math.exp(value):8.2f} | {(time.time() - t0) / it * 1000:.0f} ms/iter",
                  flush=True)
    print(f"demo: loss {first:.4f} -> {last:.4f} ({(1 - last / first) * 100:.1f}% lower) in "
          f"{time.time() - t0:.0f} s", flush=True)
    if args.iters > 1 and not last < first:
        print("demo: the loss did not fall", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args()
    check_args(parser, args)
    sys.exit(run(args))
