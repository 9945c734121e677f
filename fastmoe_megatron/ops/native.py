"""The native ops (``torch.ops.fmoe``) behind the same function names as ``reference``, plus
their fake (meta) kernels so that ``torch.compile`` can trace them. Importing this module builds
or loads the CPU library; callers check ``available()`` first."""
from __future__ import annotations

import torch

from .. import _native

_registered = False


def available() -> bool:
    return _native.load("cpu") and _register_fakes()


def cuda_available() -> bool:
    return available() and _native.load("cuda")


def _register_fakes() -> bool:
    global _registered
    if _registered:
        return True
    with _native._lock:  # two threads' first calls must not both register (the second raises)
        if not _registered:
            _register_fake_kernels()
            _registered = True
    return True


def _register_fake_kernels():
    lib = "fmoe::"

    def fake(name):
        return torch.library.register_fake(lib + name)

    @fake("expert_count")
    def _(idx, num_expert):
        return idx.new_empty((num_expert,), dtype=torch.int64)

    @fake("assign_pos")
    def _(idx, counts):
        n = idx.numel()
        return idx.new_empty((n,), dtype=torch.int64), idx.new_empty((n,), dtype=torch.int64)

    @fake("scatter_rows")
    def _(x, pos, top_k, weight=None):
        return x.new_empty((pos.numel(), x.shape[1]))

    @fake("gather_rows")
    def _(buf, inv, top_k, weight=None):
        return buf.new_empty((inv.numel() // top_k, buf.shape[1]))

    @fake("gather_weight_grad")
    def _(grad_out, buf, inv, top_k):
        return grad_out.new_empty((inv.numel(),))

    @fake("limit_by_capacity")
    def _(expert_count, capacity, num_expert, world_size):
        return expert_count.new_empty(expert_count.shape)

    @fake("prune_gate_by_capacity")
    def _(idx, keep):
        return idx.new_empty(idx.shape)

    @fake("grouped_mm")
    def _(x, weight, counts, bias=None):
        return x.new_empty((x.shape[0], weight.shape[1]))

    @fake("grouped_mm_backward")
    def _(grad_out, x, weight, counts, mask, grad_weight_out=None):
        def none():  # one empty tensor per slot: outputs must not alias
            return x.new_empty((0,))

        return (
            x.new_empty(x.shape) if mask[0] else none(),
            weight.new_empty(weight.shape) if mask[1] and grad_weight_out is None else none(),
            weight.new_empty(weight.shape[:2]) if mask[2] else none(),
        )

    @fake("expert_mlp")
    def _(x, counts, w1, b1, w2, b2, activation):
        return x.new_empty((x.shape[0], w2.shape[1])), x.new_empty((x.shape[0], w1.shape[1]))

    @fake("expert_mlp_backward")
    def _(grad_out, x, hidden, counts, w1, w2, activation, mask, grad_w1_out=None, grad_w2_out=None,
          grad_b1_out=None, grad_b2_out=None, accumulate=False):
        def none():
            return x.new_empty((0,))

        return (
            x.new_empty(x.shape) if mask[0] else none(),
            w1.new_empty(w1.shape) if mask[1] and grad_w1_out is None else none(),
            w1.new_empty(w1.shape[:2]) if mask[2] and grad_b1_out is None else none(),
            w2.new_empty(w2.shape) if mask[3] and grad_w2_out is None else none(),
            w2.new_empty(w2.shape[:2]) if mask[4] and grad_b2_out is None else none(),
        )


def expert_count(idx, num_expert):
    return torch.ops.fmoe.expert_count(idx, num_expert)


def assign_pos(idx, counts):
    return torch.ops.fmoe.assign_pos(idx.reshape(-1), counts)


def scatter_rows(x, pos, top_k, weight=None):
    return torch.ops.fmoe.scatter_rows(x, pos, top_k, weight)


def gather_rows(buf, inv, top_k, weight=None):
    return torch.ops.fmoe.gather_rows(buf, inv, top_k, weight)


def gather_weight_grad(grad_out, buf, inv, top_k):
    return torch.ops.fmoe.gather_weight_grad(grad_out, buf, inv, top_k)


def limit_by_capacity(gec, capacity, num_expert, world_size):
    return torch.ops.fmoe.limit_by_capacity(gec, capacity, num_expert, world_size)


def prune_gate_by_capacity(idx, keep):
    return torch.ops.fmoe.prune_gate_by_capacity(idx, keep)


def grouped_mm(x, weight, counts, bias=None):
    return torch.ops.fmoe.grouped_mm(x, weight, counts, bias)


def grouped_mm_backward(grad_out, x, weight, counts, mask, grad_weight_out=None):
    return torch.ops.fmoe.grouped_mm_backward(grad_out, x, weight, counts, list(mask),
                                              grad_weight_out)


def expert_mlp(x, counts, w1, b1, w2, b2, activation):
    if x.is_cuda:
        raise NotImplementedError("expert_mlp has no CUDA kernel (ops.expert_mlp runs the three "
                                  "ops on CUDA tensors instead)")
    return torch.ops.fmoe.expert_mlp(x, counts, w1, b1, w2, b2, activation)


def expert_mlp_backward(grad_out, x, hidden, counts, w1, w2, activation, mask, grad_w1_out=None,
                        grad_w2_out=None, grad_b1_out=None, grad_b2_out=None, accumulate=False):
    return torch.ops.fmoe.expert_mlp_backward(grad_out, x, hidden, counts, w1, w2, activation,
                                              list(mask), grad_w1_out, grad_w2_out, grad_b1_out,
                                              grad_b2_out, accumulate)
