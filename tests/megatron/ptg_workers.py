"""Worker bodies of the pretrain_gpt layout tests (gloo processes, see tests/dist_utils.py).

Each trains a few iterations of a tiny GPT-MoE with real megatron-core through
``fastmoe_megatron.megatron.pretrain_gpt.run`` and then checks the result across ranks.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2",
        "--lr", "5e-3", "--lr-decay-style", "constant", "--log-interval", "100",
        "--default-corpus-bytes", "300000", "--fmoefy", "--fmoe-num-experts", "4",
        "--balance-strategy", "gshard", "--balance-loss-weight", "0.01", "--clip-grad", "1e9"]


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _same_over(t: torch.Tensor, group, what: str) -> None:
    """``t`` is bitwise the same on every rank of ``group``."""
    for r, other in enumerate(_gather(t.detach(), group)):
        assert torch.equal(other, t.detach()), f"{what} differs from group rank {r}"


def _inner(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _manual_grad_norm(model) -> float:
    """The gradient norm counting every parameter once over all ranks, from the reduced grads."""
    from megatron.core import parallel_state as ps

    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is None or getattr(p, "shared", False):
            continue
        if getattr(p, "allreduce", True) is False:  # an expert: count one replica
            owner = ps.get_expert_data_parallel_rank() == 0
        else:
            owner = ps.get_data_parallel_rank() == 0 and (
                getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0)
        if owner:
            sq += g.double().pow(2).sum()
    dist.all_reduce(sq)
    return math.sqrt(float(sq))


def train_and_check(rank, world, extra, iters):
    from megatron.core import parallel_state as ps

    from fastmoe_megatron.megatron.fmoefy import moe_modules
    from fastmoe_megatron.megatron.pretrain_gpt import run

    argv = TINY + ["--train-iters", str(iters), "--seed", "7", "--threads", "1"] + list(extra)
    res = run(argv)
    model = _inner(res.model)
    losses = res.losses
    assert len(losses) == iters
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < first, f"loss did not decrease: {losses}"

    # The gradient norm used for clipping is the same on every rank, and counts each parameter
    # (each expert) exactly once.
    norms = torch.tensor(res.grad_norms, dtype=torch.float64)
    for r, other in enumerate(_gather(norms, None)):
        assert torch.equal(other, norms), f"grad norms differ between rank {rank} and {r}"
    if "--use-distributed-optimizer" not in extra:
        # Without the distributed optimizer every rank still holds the fully reduced gradients
        # of the last step (clipping is off: --clip-grad 1e9), so the norm can be recounted.
        manual = _manual_grad_norm(res.model)
        assert math.isclose(manual, res.grad_norms[-1], rel_tol=1e-5), (manual, res.grad_norms[-1])

    moes = moe_modules(model)
    assert moes, "no MoE layer in the model"
    ep_group, edp_group = ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group()
    for m in moes:
        for name, p in m.moe.experts.named_parameters():
            assert getattr(p, "allreduce", True) is False, name
            # Expert replicas (expert-data-parallel) are identical after the steps...
            _same_over(p, edp_group, f"expert {name}: its replica")
            # ...and the expert-parallel ranks hold different experts.
            if dist.get_world_size(ep_group) > 1 and name.endswith("weight"):
                pieces = _gather(p.detach(), ep_group)
                assert not torch.equal(pieces[0], pieces[1]), f"EP ranks hold the same {name}"
    # Dense weights are identical over data parallel, and over tensor parallel unless TP-sharded.
    for name, p in model.named_parameters():
        if getattr(p, "allreduce", True) is False:
            continue
        groups = [ps.get_data_parallel_group()]
        if not getattr(p, "tensor_model_parallel", False):
            groups.append(ps.get_tensor_model_parallel_group())
        for g in groups:
            _same_over(p, g, f"dense {name}")
    return {"losses": losses, "norm": res.grad_norms[-1]}


def losses_and_norms(rank, world, extra, iters):
    """Trains ``iters`` iterations of TINY with ``extra`` and returns the losses and the gradient
    norms of every iteration."""
    from fastmoe_megatron.megatron.pretrain_gpt import run

    argv = TINY + ["--train-iters", str(iters), "--seed", "7", "--threads", "1"] + list(extra)
    res = run(argv)
    return {"losses": list(res.losses), "norms": list(res.grad_norms)}


def node_local_caches(rank, world, root):
    """Each rank plays the first process of its own node, with a cache folder only it sees: the
    default corpus is made on every node and its indices in memory, so every rank trains. (Only
    global rank 0 used to make them, and the other nodes found no corpus.)"""
    import os

    from fastmoe_megatron.megatron.pretrain_gpt import run

    os.environ["LOCAL_RANK"] = "0"
    res = run(TINY + ["--train-iters", "2", "--threads", "1", "--expert-model-parallel-size", "2",
                      "--default-corpus-bytes", "200000", "--cache-dir", f"{root}/node{rank}"])
    return {"losses": res.losses, "files": sorted(os.listdir(f"{root}/node{rank}/data"))}


def evaluation(rank, world):
    """--eval-interval: the valid lm loss at every interval and at the end, of the model in eval
    mode, on the same valid samples each time; training is bitwise the same as without it (noisy
    gate and dropout: an evaluation draws no random numbers). The last valid loss against the
    final model's cross entropy computed here sample by sample on the valid split."""
    import torch.nn.functional as F

    from fastmoe_megatron.megatron.data import build_datasets, default_data_prefix
    from fastmoe_megatron.megatron.pretrain_gpt import run
    from fastmoe_megatron.megatron.tokenizer import build_tokenizer

    base = TINY + ["--train-iters", "5", "--seed", "7", "--threads", "1",
                   "--expert-model-parallel-size", "2", "--split", "80,20,0",
                   "--balance-strategy", "noisy", "--hidden-dropout", "0.1"]
    plain = run(base)
    evaluated = run(base + ["--eval-interval", "2", "--eval-iters", "2"])
    # An --exit-interval that falls on --train-iters used to skip the evaluation after the last.
    at_end = run(base + ["--eval-interval", "3", "--eval-iters", "1", "--exit-interval", "5"])
    out = {"same_training": plain.losses == evaluated.losses,
           "iterations": [i for i, _ in evaluated.valid_losses],
           "exit_interval_at_end": [i for i, _ in at_end.valid_losses]}
    args, model = evaluated.args, evaluated.model
    prefix = default_data_prefix(args.cache_dir, args.default_corpus_bytes)
    n = args.eval_iters * args.global_batch_size
    _, valid, _ = build_datasets(prefix, build_tokenizer(), args.seq_length, args.seed, args.split,
                                 [0, n, 0])
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(n):  # every rank runs every sample (the experts need both ranks)
            s = valid[i]
            logits = model(torch.as_tensor(s["tokens"])[None],
                           torch.as_tensor(s["position_ids"])[None],
                           torch.as_tensor(s["attention_mask"])[None])
            ce = F.cross_entropy(logits[0].float(), torch.as_tensor(s["labels"]), reduction="none")
            mask = torch.as_tensor(s["loss_mask"]).float()
            total += float((ce * mask).sum())
            count += float(mask.sum())
    out["valid"] = [v for _, v in evaluated.valid_losses]
    out["brute_force"] = total / count
    # The forwards above ran in eval mode: the logged balance loss and load stay training's.
    from fastmoe_megatron.megatron import stats

    out["recorded_in_eval"] = stats.collect(args.num_layers, args.fmoe.num_experts)
    return out


def megatron_core_moe(rank, world, extra, iters):
    """Trains ``iters`` iterations of TINY's GPT with megatron-core's own MoE (``--num-experts``)
    instead of --fmoefy; checks that every copy of a parameter agrees over the groups it is
    replicated on, and returns the losses."""
    from megatron.core import parallel_state as ps

    from fastmoe_megatron.megatron.pretrain_gpt import run

    dense = TINY[:TINY.index("--fmoefy")]
    argv = dense + ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear",
                    "--clip-grad", "1e9", "--train-iters", str(iters), "--seed", "7",
                    "--threads", "1"] + list(extra)
    res = run(argv)
    model = _inner(res.model)
    experts = 0
    for name, p in model.named_parameters():
        expert = ".experts." in name
        experts += expert
        groups = [ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()]
        if not getattr(p, "tensor_model_parallel", False):
            groups.append(ps.get_expert_tensor_parallel_group() if expert
                          else ps.get_tensor_model_parallel_group())
        for g in groups:
            _same_over(p, g, name)
    assert experts, "no megatron-core expert parameters"
    return {"losses": list(res.losses)}


def logged_learning_rate(rank, world):
    """The learning rates of the log lines (--log-interval 1) and of TrainResult.lrs, over a
    linear schedule with warm-up (5 iterations, 2 of warm-up)."""
    import contextlib
    import io
    import re

    from fastmoe_megatron.megatron.pretrain_gpt import run

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = run(TINY + ["--train-iters", "5", "--threads", "1", "--log-interval", "1",
                          "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
                          "--lr-decay-style", "linear"])
    logged = [float(x) for x in re.findall(r"^iter +\d+/5 \|.*\| lr ([^ ]+) \|", out.getvalue(),
                                           flags=re.M)]
    out_stop = io.StringIO()
    with contextlib.redirect_stdout(out_stop):  # a stop between two progress lines
        stopped = run(TINY + ["--train-iters", "6", "--threads", "1", "--log-interval", "4",
                              "--exit-interval", "3"])
    lines = re.findall(r"^iter +(\d+)/6 \| lm loss ([^ ]+) \|", out_stop.getvalue(), flags=re.M)
    return {"logged": logged, "lrs": res.lrs, "stopped_losses": stopped.losses,
            "stopped_logged": [(int(i), float(x)) for i, x in lines]}
