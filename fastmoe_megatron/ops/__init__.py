"""Dispatch ops with autograd: the one place that picks native or pure-PyTorch kernels.

Kernels come from ``native`` (the ``torch.ops.fmoe`` library built from ``csrc/``) when it is
available for the tensors' device, else from ``reference`` (pure PyTorch). Both implement the
contracts in ``csrc/fmoe_ops.h``; the autograd formulas below are shared, so the two paths differ
only in their kernels. ``use_backend("torch")`` forces the fallback, for tests and debugging.

Names: T tokens, K top_k, S = T*K slots, N buffer rows, E experts.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

from . import native, reference

_BACKENDS = ("auto", "native", "torch")
_local = threading.local()


def _forced() -> str:
    value = getattr(_local, "backend", None) or os.environ.get("FMOE_BACKEND", "auto")
    if value not in _BACKENDS:
        raise ValueError(f"FMOE_BACKEND={value!r} is not valid; allowed values: {', '.join(_BACKENDS)}")
    return value


@contextlib.contextmanager
def use_backend(name: str):
    """Forces the kernels used inside the block: ``native``, ``torch`` or ``auto``."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    old = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = old


def kernels_for(t: torch.Tensor):
    """The kernel module (``native`` or ``reference``) used for tensors on ``t``'s device."""
    forced = _forced()
    if forced == "torch":
        return reference
    ok = native.cuda_available() if t.is_cuda else (t.device.type == "cpu" and native.available())
    if ok:
        return native
    if forced == "native":
        raise RuntimeError(f"native fmoe ops are not available for {t.device} tensors "
                           "(see `python -m fastmoe_megatron info`)")
    return reference


def backend_name(device: str | torch.device = "cpu") -> str:
    """``native`` or ``torch``: the path that tensors on ``device`` take."""
    return "native" if kernels_for(torch.empty(0, device=device)) is native else "torch"


# ---------------------------------------------------------------------------- routing plans

def expert_count(idx: torch.Tensor, num_expert: int) -> torch.Tensor:
    """Slots routed to each of ``num_expert`` experts (ids of -1 are skipped); int64 [E]."""
    return kernels_for(idx).expert_count(idx, num_expert)


def assign_pos(idx: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, inv)``: slots grouped by expert (stable), and each slot's row (-1: dropped)."""
    return kernels_for(idx).assign_pos(idx.reshape(-1), counts)


def limit_by_capacity(gec: torch.Tensor, capacity: torch.Tensor, num_expert: int,
                      world_size: int) -> torch.Tensor:
    """Grants each local expert's capacity to the sending workers in rank order."""
    return kernels_for(gec).limit_by_capacity(gec, capacity, num_expert, world_size)


def prune_gate_by_capacity(idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Drops (-1) the slots of each expert beyond ``keep[e]``, first choices first."""
    return kernels_for(idx).prune_gate_by_capacity(idx, keep)


# ---------------------------------------------------------------------------- autograd ops

class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, inv, top_k):
        k = kernels_for(x)
        ctx.k, ctx.top_k = k, top_k
        ctx.save_for_backward(inv)
        return k.scatter_rows(x, pos, top_k, None)

    @staticmethod
    def backward(ctx, grad_buf):
        (inv,) = ctx.saved_tensors
        return ctx.k.gather_rows(grad_buf.contiguous(), inv, ctx.top_k, None), None, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, pos, inv, weight, top_k):
        k = kernels_for(buf)
        ctx.k, ctx.top_k = k, top_k
        ctx.save_for_backward(buf, pos, inv, weight)
        return k.gather_rows(buf, inv, top_k, weight)

    @staticmethod
    def backward(ctx, grad_out):
        buf, pos, inv, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_buf = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_buf = ctx.k.scatter_rows(grad_out, pos, ctx.top_k, weight)
        if weight is not None and ctx.needs_input_grad[3]:
            grad_w = ctx.k.gather_weight_grad(grad_out, buf, inv, ctx.top_k)
            grad_w = grad_w.to(weight.dtype).view(weight.shape)
        return grad_buf, None, None, grad_w, None


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts, bias):
        k = kernels_for(x)
        ctx.k, ctx.has_bias = k, bias is not None
        ctx.save_for_backward(x, weight, counts)
        return k.grouped_mm(x, weight, counts, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, counts = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[3]]
        gx, gw, gb = ctx.k.grouped_mm_backward(grad_out.contiguous(), x, weight, counts, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, None,
                gb if mask[2] else None)


def scatter_rows(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """``x`` [T, D] -> buffer [S, D] whose rows are grouped by expert (row r = x[pos[r] // K])."""
    return _ScatterRows.apply(x.contiguous(), pos, inv, top_k)


def gather_rows(buf: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor, top_k: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Buffer [S, D] -> [T, D]: each token's K rows combined, weighted by ``weight`` [T, K]."""
    if buf.shape[0] != pos.numel():
        raise ValueError(f"gather_rows: buffer has {buf.shape[0]} rows, expected {pos.numel()}")
    if weight is not None:
        weight = weight.reshape(-1)
    return _GatherRows.apply(buf.contiguous(), pos, inv, weight, top_k)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x`` [N, in] grouped by expert (``counts`` [E] rows each) times ``weight``
    [E, out, in]^T, plus ``bias`` [E, out]; rows past ``sum(counts)`` give zeros."""
    return _GroupedMM.apply(x.contiguous(), weight, counts.to("cpu", torch.int64), bias)


__all__ = [
    "use_backend", "backend_name", "kernels_for", "expert_count", "assign_pos",
    "limit_by_capacity", "prune_gate_by_capacity", "scatter_rows", "gather_rows",
    "grouped_linear",
]
