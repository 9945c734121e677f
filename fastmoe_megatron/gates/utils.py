"""Capacity helpers shared by the gates (FastMoE's ``fmoe.gates.utils`` names)."""
from __future__ import annotations

import math
import numbers
from fractions import Fraction

import torch

from .. import ops


def limit_by_capacity(topk_idx, num_expert, world_size, capacity, group=None):
    """Caps every expert at ``capacity`` slots in total over all workers.

    ``capacity`` is an int or a tensor of ``num_expert`` per-local-expert limits. Each expert
    grants its capacity to the sending workers in rank order, and each worker keeps its first
    choices before its second ones (see ``prune_gate_by_capacity``). Returns
    ``(new_local_expert_count [W*E], new_global_expert_count [W*E], idx with -1 for drops)``;
    the same on every rank, and deterministic.
    """
    from .. import comm

    with torch.no_grad():
        if not torch.is_tensor(capacity):
            capacity = torch.full((num_expert,), int(capacity), dtype=torch.int64)
        capacity = capacity.to("cpu", torch.int64)
        local_count = ops.expert_count(topk_idx, num_expert * world_size).cpu()
        if world_size > 1:
            global_count = comm.exchange_counts(local_count, num_expert, group)
        else:
            global_count = local_count
        new_gec = ops.limit_by_capacity(global_count, capacity, num_expert, world_size)
        if world_size > 1:
            new_lec = comm.exchange_counts(new_gec, num_expert, group)
        else:
            new_lec = new_gec
        new_idx = ops.prune_gate_by_capacity(topk_idx, new_lec.to(topk_idx.device))
    return new_lec, new_gec, new_idx


def prune_gate_by_capacity(topk_idx, expert_count, num_expert=None, world_size=None):
    """Keeps at most ``expert_count[e]`` slots per global expert ``e`` (first choices first)."""
    return ops.prune_gate_by_capacity(topk_idx, expert_count.to(topk_idx.device, torch.int64))


def expert_capacity(factor: float, slots: int, experts: int) -> int:
    """``ceil(factor * slots / experts)``, in exact arithmetic: a factor such as 1.2 is read as the
    decimal 6/5 (its shortest decimal form, not the binary float just above it), so
    ``1.2 * 10 / 3`` gives 4, not 5."""
    exact = Fraction(repr(float(factor))) * slots / experts
    return math.ceil(exact)


def tokens_over_workers(tokens: int, world_size: int, group=None) -> int:
    """The tokens of all ``world_size`` workers of ``group`` (a collective when there are several):
    capacities over all workers follow the mean load, not one worker's batch."""
    if world_size == 1:
        return tokens
    import torch.distributed as dist

    from .. import comm

    total = torch.tensor([tokens], dtype=torch.int64, device=comm._comm_device(group))
    dist.all_reduce(total, group=group)
    return int(total.item())


def check_capacity(capacity):
    """Validates a ``(train, eval)`` capacity-factor pair."""
    try:
        train, evaluate = capacity
    except (TypeError, ValueError):
        raise ValueError(f"capacity must be a (train, eval) pair of factors, got {capacity!r}") from None
    for name, value in (("train", train), ("eval", evaluate)):
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not 0 < value < math.inf):
            raise ValueError(f"capacity factor ({name}) must be a finite number > 0, "
                             f"got {value!r}")
    return (float(train), float(evaluate))
