"""Pure-PyTorch implementations of the dispatch ops: the fallback when the native ops are not
built, and the second implementation that the tests hold the native one against.

Same contracts as ``csrc/fmoe_ops.h``. Everything here is differentiable through ordinary torch
ops and deterministic (no ``index_add_`` on CUDA, no atomics).
"""
from __future__ import annotations

import torch


def expert_count(idx: torch.Tensor, num_expert: int) -> torch.Tensor:
    _check_index(idx, "idx")
    flat = idx.reshape(-1)
    kept = flat[flat >= 0]
    if kept.numel() and int(kept.max()) >= num_expert:
        raise RuntimeError(f"expert_count: expert id {int(kept.max())} out of range [0, {num_expert})")
    return torch.bincount(kept, minlength=num_expert).to(torch.int64)


def _check_index(t: torch.Tensor, name: str):
    if t.dtype != torch.int64:
        raise RuntimeError(f"{name} must be int64, got {t.dtype}")


def assign_pos(idx: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_index(idx, "idx")
    flat = idx.reshape(-1)
    n = flat.numel()
    total = int(counts.sum())
    actual = expert_count(flat, counts.numel()).to(counts.device)  # also checks the id range
    if not torch.equal(actual, counts.to(torch.int64)):
        raise RuntimeError(f"assign_pos: counts {counts.tolist()} do not match the slots routed "
                           f"to each expert {actual.tolist()}")
    # Dropped slots sort last; torch.sort(stable=True) keeps slot order inside each expert.
    key = torch.where(flat < 0, torch.full_like(flat, counts.numel()), flat)
    order = torch.sort(key, stable=True).indices
    pos = torch.where(torch.arange(n, device=flat.device) < total, order, torch.full_like(order, -1))
    inv = torch.full_like(flat, -1)
    inv[order[:total]] = torch.arange(total, device=flat.device)
    return pos, inv


def _rows(t: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``t[index]`` where ``valid``, else zeros. Invalid rows read row 0 and are then replaced
    with ``torch.where``, not multiplied by a 0/1 mask: a NaN or Inf in row 0 must not reach
    them, in either pass (the native kernels skip dropped slots)."""
    if t.shape[0] == 0:
        return t.new_zeros((index.numel(),) + tuple(t.shape[1:]))
    rows = t.index_select(0, torch.where(valid, index, torch.zeros_like(index)))
    return torch.where(valid.unsqueeze(1), rows, 0)


def _check_weight(weight: torch.Tensor | None, slots: int, op: str):
    if weight is not None and weight.numel() != slots:
        raise RuntimeError(f"{op}: weight must have T*top_k elements ({slots}), got "
                           f"{weight.numel()}")


def _check_integral(t: torch.Tensor, op: str, name: str):
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise RuntimeError(f"{op}: {name} must have an integer dtype, got {t.dtype}")


def scatter_rows(x: torch.Tensor, pos: torch.Tensor, top_k: int,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    _check_weight(weight, x.shape[0] * top_k, "scatter_rows")
    valid = pos >= 0
    rows = _rows(x, torch.div(pos, top_k, rounding_mode="floor"), valid)
    if weight is None:
        return rows
    acc = torch.promote_types(x.dtype, torch.float32)  # the weight is not rounded to x's dtype
    return (rows.to(acc) * _rows(weight.reshape(-1, 1).to(acc), pos, valid)).to(x.dtype)


def gather_rows(buf: torch.Tensor, inv: torch.Tensor, top_k: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    _check_weight(weight, inv.numel(), "gather_rows")
    valid = inv >= 0
    acc = torch.promote_types(buf.dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
    rows = _rows(buf, inv, valid).to(acc)
    if weight is not None:
        rows = rows * torch.where(valid, weight.reshape(-1).to(acc), 0).unsqueeze(1)
    return rows.view(inv.numel() // top_k, top_k, buf.shape[1]).sum(1).to(buf.dtype)


def gather_weight_grad(grad_out: torch.Tensor, buf: torch.Tensor, inv: torch.Tensor,
                       top_k: int) -> torch.Tensor:
    valid = inv >= 0
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    rows = _rows(buf, inv, valid).to(acc)
    g = grad_out.to(acc).repeat_interleave(top_k, dim=0)
    return torch.where(valid, (rows * g).sum(1), 0).to(grad_out.dtype)


def limit_by_capacity(gec: torch.Tensor, capacity: torch.Tensor, num_expert: int,
                      world_size: int) -> torch.Tensor:
    _check_integral(capacity, "limit_by_capacity", "capacity")
    counts = gec.reshape(world_size, num_expert)
    granted_before = torch.cumsum(counts, 0) - counts  # rows granted to lower ranks, uncapped
    left = (capacity.to(counts).reshape(1, -1).clamp(min=0) - granted_before).clamp(min=0)
    return torch.minimum(counts, left).reshape(-1)


def prune_gate_by_capacity(idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    _check_index(idx, "idx")
    _check_integral(keep, "prune_gate_by_capacity", "keep")
    T, K = idx.shape
    E = keep.numel()
    prio = idx.t().reshape(-1)  # priority order: all j=0 slots by token, then j=1, ...
    valid = prio >= 0
    if valid.any() and int(prio.max()) >= E:
        raise RuntimeError(f"prune_gate_by_capacity: expert id {int(prio.max())} out of range "
                           f"[0, {E})")
    # Each slot's rank among the earlier slots of its expert: a stable sort by expert (dropped
    # slots last, as expert E) keeps the priority order inside each expert.
    e = torch.where(valid, prio, torch.full_like(prio, E))
    order = torch.sort(e, stable=True).indices
    sizes = torch.bincount(e, minlength=E + 1)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(prio)
    rank[order] = torch.arange(prio.numel(), device=prio.device) - starts.index_select(0, e[order])
    keep = keep.to(prio.device, torch.int64)
    limit = torch.cat([keep, keep.new_zeros(1)])  # none kept for the dropped slots' "expert E"
    kept = valid & (rank < limit.index_select(0, e))
    out = torch.where(kept, prio, torch.full_like(prio, -1))
    return out.view(K, T).t().contiguous()


def _check_blocks(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, op: str) -> list[int]:
    _check_index(counts, "counts")
    if weight.dim() != 3 or counts.numel() != weight.shape[0]:
        raise RuntimeError(f"{op}: counts has {counts.numel()} experts but weight has shape "
                           f"{tuple(weight.shape)}")
    if x.dim() != 2 or x.shape[1] != weight.shape[2]:
        raise RuntimeError(f"{op}: x has shape {tuple(x.shape)}, weight expects {weight.shape[2]} features")
    sizes = [int(c) for c in counts.tolist()]
    if min(sizes, default=0) < 0 or sum(sizes) > x.shape[0]:
        raise RuntimeError(f"{op}: counts {sizes} do not fit {x.shape[0]} rows")
    return sizes


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    sizes = _check_blocks(x, weight, counts, "grouped_mm")
    total = sum(sizes)
    outs = []
    for e, (xe) in enumerate(torch.split(x[:total], sizes)):
        y = xe @ weight[e].t()
        outs.append(y + bias[e].to(y.dtype) if bias is not None else y)
    pad = x.new_zeros(x.shape[0] - total, weight.shape[1])
    return torch.cat(outs + [pad], 0) if outs else pad


def grouped_mm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        counts: torch.Tensor, mask: list[bool],
                        grad_weight_out: torch.Tensor | None = None):
    sizes = _check_blocks(x, weight, counts, "grouped_mm_backward")
    total = sum(sizes)
    none = x.new_empty(0)
    gx = torch.zeros_like(x) if mask[0] else none
    into_out = bool(mask[1]) and grad_weight_out is not None
    if into_out:
        _check_out(grad_weight_out, weight, weight.shape, "grad_weight_out",
                   "grouped_mm_backward")
        gw = grad_weight_out.zero_()
    else:
        gw = torch.zeros_like(weight) if mask[1] else none
    gb = weight.new_zeros(weight.shape[:2]) if mask[2] else none
    start = 0
    for e, n in enumerate(sizes):
        g, xe = grad_out[start:start + n], x[start:start + n]
        if mask[0]:
            gx[start:start + n] = g @ weight[e]
        if mask[1]:
            gw[e] = g.t() @ xe
        if mask[2]:
            gb[e] = g.sum(0)
        start += n
    assert start == total
    return gx, (none if into_out else gw), gb


ACTIVATIONS = {
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


def activation_fn(name: str, op: str = "expert_mlp"):
    """The torch function behind an ``expert_mlp`` activation name."""
    if name not in ACTIVATIONS:
        raise RuntimeError(f"{op}: activation {name!r} is not supported; allowed values: "
                           f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def expert_mlp(x, counts, w1, b1, w2, b2, activation):
    act = activation_fn(activation)
    if w2.dim() != 3 or w1.dim() != 3 or w2.shape != (w1.shape[0], w1.shape[2], w1.shape[1]):
        raise RuntimeError(f"expert_mlp: fc2 weight {tuple(w2.shape)} does not match fc1 weight "
                           f"{tuple(w1.shape)}")
    hidden = grouped_mm(x, w1, counts, b1)
    return grouped_mm(act(hidden), w2, counts, b2), hidden


def expert_mlp_backward(grad_out, x, hidden, counts, w1, w2, activation, mask, grad_w1_out=None,
                        grad_w2_out=None, grad_b1_out=None, grad_b2_out=None, accumulate=False):
    act = activation_fn(activation, "expert_mlp_backward")
    outs = (grad_w1_out, grad_b1_out, grad_w2_out, grad_b2_out)
    names = ("grad_w1_out", "grad_b1_out", "grad_w2_out", "grad_b2_out")
    for i, (param, out) in enumerate(zip((w1, w1, w2, w2), outs)):
        if accumulate and mask[i + 1] and out is None:
            raise RuntimeError(f"expert_mlp_backward: accumulate=True adds into the gradient "
                               f"buffers, but {names[i]} is missing")
        if mask[i + 1] and out is not None:
            shape = param.shape if i % 2 == 0 else param.shape[:2]
            _check_out(out, param, shape, names[i], "expert_mlp_backward")
    need_dh = bool(mask[0] or mask[1] or mask[2])
    d_act, gw2, gb2 = grouped_mm_backward(grad_out, act(hidden), w2, counts,
                                          [need_dh, mask[3], mask[4]])
    if need_dh:
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            (dh,) = torch.autograd.grad(act(h), h, d_act)
        gx, gw1, gb1 = grouped_mm_backward(dh, x, w1, counts, list(mask[:3]))
    else:
        gx = gw1 = gb1 = x.new_empty(0)
    grads = [gx, gw1, gb1, gw2, gb2]
    for i, out in enumerate(outs):  # into the buffers: added, or written
        if mask[i + 1] and out is not None:
            if accumulate:
                out.add_(grads[i + 1])
            else:
                out.copy_(grads[i + 1])
            grads[i + 1] = x.new_empty(0)
    return tuple(grads)


def _check_out(out: torch.Tensor, param: torch.Tensor, shape, name: str, op: str):
    """A gradient buffer must have the gradient's shape, and the parameter's dtype and device."""
    if out.shape != shape or out.dtype != param.dtype or out.device != param.device:
        raise RuntimeError(f"{op}: {name} is {tuple(out.shape)} {out.dtype} on {out.device} but "
                           f"needs {tuple(shape)} {param.dtype} on {param.device}")
    if not out.is_contiguous():
        raise RuntimeError(f"{op}: {name} must be contiguous")
