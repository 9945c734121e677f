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
import sys
import threading
import weakref

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
        origin = ("use_backend('native')" if getattr(_local, "backend", None) == "native"
                  else "FMOE_BACKEND=native")
        raise RuntimeError(f"{origin}: the native fmoe ops are not available for {t.device} "
                           f"tensors ({_unavailable_reason(t.device)}); use FMOE_BACKEND=auto or "
                           "torch, or see `python -m fastmoe_megatron info`")
    return reference


def _unavailable_reason(device: torch.device) -> str:
    """Why the native kernels do not run on ``device`` (what the build recorded)."""
    from .. import _native

    if device.type not in ("cpu", "cuda"):
        return f"there are native kernels for cpu and cuda only, not {device.type}"
    state = _native.status()
    for kind in ("cpu", "cuda") if device.type == "cuda" else ("cpu",):
        if state.get(kind) is not True:
            return f"{kind} ops: {state.get(kind, 'not loaded')}"
    return "unknown"


def backend_name(device: str | torch.device = "cpu") -> str:
    """``native`` or ``torch``: the path that tensors on ``device`` take."""
    return "native" if kernels_for(torch.empty(0, device=device)) is native else "torch"


def builds_graph() -> bool:
    """Inside an autograd Function's backward: whether this backward pass builds a graph
    (``create_graph=True``, for double backward). Never under torch.compile, which does not
    support double backward."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _backward_kernels(ctx):
    """The kernels of a backward pass: the forward pass's, but the pure-PyTorch ones when the
    backward pass builds a graph. Autograd has no derivatives of the native kernels (it would
    return zeros for them, with a warning); the pure-PyTorch backward formulas are
    differentiable."""
    return reference if ctx.k is native and builds_graph() else ctx.k


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
    """Drops (-1) the slots of each expert beyond ``keep[e]``, first choices first. ``idx`` is
    ``[T, top_k]``, or FastMoE's flat ``[T * top_k]`` (then the slots count in their order)."""
    if idx.dim() == 1:
        return kernels_for(idx).prune_gate_by_capacity(idx.view(-1, 1), keep).view(-1)
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
        k = _backward_kernels(ctx)
        return k.gather_rows(grad_buf.contiguous(), inv, ctx.top_k, None), None, None, None


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
        k = _backward_kernels(ctx)
        grad_out = grad_out.contiguous()
        grad_buf = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_buf = k.scatter_rows(grad_out, pos, ctx.top_k, weight)
        if weight is not None and ctx.needs_input_grad[3]:
            grad_w = k.gather_weight_grad(grad_out, buf, inv, ctx.top_k)
            grad_w = grad_w.to(weight.dtype).view(weight.shape)
        return grad_buf, None, None, grad_w, None


class _WeightGradBuffers:
    """One reusable buffer per expert weight for its gradient (CPU only).

    A fresh weight gradient every backward pass is, for large weights, fresh pages from the
    kernel: glibc serves allocations of 32 MiB and more (a stacked expert weight quickly is) with
    ``mmap`` and gives them back on free, and the first touch of each page then faults. On the
    CPU this costs as much as a large share of the expert GEMMs (measured: 27 ms of a 220 ms
    step). The kernels write the gradient into a kept buffer instead, handed out again only when
    nothing but this cache references its storage any more: when ``zero_grad()`` has dropped the
    ``.grad`` that autograd made of it, or when autograd added it into an existing ``.grad``. The
    cost is that the buffer stays allocated between steps, as ``.grad`` would with
    ``zero_grad(set_to_none=False)``. ``FMOE_REUSE_GRAD_BUFFERS=0`` turns it off; CUDA tensors
    never use it (the caching allocator does the same there).
    """

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary

        # weight -> (buffer, weak reference to its storage, its use count when only the buffer
        # holds it, the Python reference count of its storage object then). The use count
        # includes torch's own references, e.g. a kept Python storage object; a user who keeps
        # only ``grad.untyped_storage()`` holds that same object, which does not raise the use
        # count but does raise the object's Python reference count.
        self._bufs = WeakIdKeyDictionary()

    @staticmethod
    def enabled(weight: torch.Tensor) -> bool:
        return (env_switch("FMOE_REUSE_GRAD_BUFFERS") and weight.device.type == "cpu"
                and hasattr(torch._C, "_storage_Use_Count") and not torch.compiler.is_compiling())

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        from torch.multiprocessing.reductions import StorageWeakRef

        entry = self._bufs.get(weight)
        if entry is not None:
            buf, ref, alone, py_alone = entry
            if (buf.shape == weight.shape and buf.dtype == weight.dtype
                    and torch._C._storage_Use_Count(ref.cdata) == alone
                    and sys.getrefcount(buf.untyped_storage()) == py_alone):
                return buf
        buf = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        ref = StorageWeakRef(buf.untyped_storage())
        self._bufs[weight] = (buf, ref, torch._C._storage_Use_Count(ref.cdata),
                              sys.getrefcount(buf.untyped_storage()))
        return buf


_weight_grad_buffers = _WeightGradBuffers()


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts, bias):
        k = kernels_for(x)
        ctx.k, ctx.has_bias = k, bias is not None
        # The weight-gradient buffer belongs to this weight object (saved_tensors hands back
        # another Python object for it in backward, which would make a new buffer every time).
        ctx.weight_ref = weakref.ref(weight)
        ctx.save_for_backward(x, weight, counts)
        return k.grouped_mm(x, weight, counts, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, counts = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[3]]
        out = _grad_buffer(ctx.weight_ref, weight, mask[1])
        gx, gw, gb = _backward_kernels(ctx).grouped_mm_backward(grad_out.contiguous(), x, weight,
                                                                counts, mask, out)
        if out is not None:
            gw = out.detach()  # a new tensor on the buffer (autograd may keep it as .grad)
        return (gx if mask[0] else None, gw if mask[1] else None, None,
                gb if mask[2] else None)


def _grad_buffer(weight_ref, weight: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """The kept buffer for the gradient of the weight that ``weight_ref`` (a weak reference taken
    in the forward pass) points to, or None when it gets a fresh tensor."""
    if not needed or builds_graph():  # a double-backward graph needs a fresh tensor
        return None
    owner = weight_ref()
    return (_weight_grad_buffers.get(owner)
            if owner is not None and _WeightGradBuffers.enabled(weight) else None)


class _ExpertMLP(torch.autograd.Function):
    """fc1 -> activation -> fc2 of every expert in one op; keeps only the fc1 output (the
    activation is recomputed in the backward pass)."""

    @staticmethod
    def forward(ctx, x, counts, w1, b1, w2, b2, activation):
        k = kernels_for(x)
        ctx.k, ctx.activation = k, activation
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.weight_refs = (weakref.ref(w1), weakref.ref(w2))  # see _GroupedMM
        y, hidden = k.expert_mlp(x, counts, w1, b1, w2, b2, activation)
        ctx.save_for_backward(x, hidden, counts, w1, b1, w2, b2)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, hidden, counts, w1, b1, w2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, counts, w1, b1, w2, b2, activation
        mask = [need[0], need[2], ctx.has_bias[0] and need[3], need[4], ctx.has_bias[1] and need[5]]
        if builds_graph():
            # Double backward: the saved fc1 output has no graph back to x and w1, so the
            # pure-PyTorch MLP runs again under autograd and is differentiated with a graph.
            inputs = (x, w1, b1, w2, b2)
            with torch.enable_grad():
                y = reference.expert_mlp(x, counts, w1, b1, w2, b2, ctx.activation)[0]
                wanted = [t for t, m in zip(inputs, mask) if m]
                got = iter(torch.autograd.grad(y, wanted, grad_out, create_graph=True,
                                               allow_unused=True))
            grads = [next(got) if m else None for m in mask]
            grads = [torch.zeros_like(t) if m and g is None else g
                     for t, g, m in zip(inputs, grads, mask)]
            gx, gw1, gb1, gw2, gb2 = grads
            return gx, None, gw1, gb1, gw2, gb2, None
        out1 = _grad_buffer(ctx.weight_refs[0], w1, mask[1])
        out2 = _grad_buffer(ctx.weight_refs[1], w2, mask[3])
        grads = list(ctx.k.expert_mlp_backward(grad_out.contiguous(), x, hidden, counts, w1, w2,
                                               ctx.activation, mask, out1, out2))
        if out1 is not None:
            grads[1] = out1.detach()
        if out2 is not None:
            grads[3] = out2.detach()
        gx, gw1, gb1, gw2, gb2 = (g if m else None for g, m in zip(grads, mask))
        return gx, None, gw1, gb1, gw2, gb2, None


def scatter_rows(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """``x`` [T, D] -> buffer [S, D] whose rows are grouped by expert (row r = x[pos[r] // K])."""
    if x.dim() < 1 or inv.numel() != x.shape[0] * top_k:
        # Another top_k than the positions were made for read the wrong tokens' rows silently.
        raise ValueError(f"scatter_rows: x has {x.shape[0] if x.dim() else 0} tokens and "
                         f"top_k={top_k}, but the positions (inv) are for {inv.numel()} slots")
    return _ScatterRows.apply(x.contiguous(), pos, inv, top_k)


class _Recompute:
    """What autograd keeps instead of a tensor that ``recompute_when_saved`` makes again."""


@contextlib.contextmanager
def recompute_when_saved(t: torch.Tensor, remake, depends_on: torch.Tensor):
    """Inside the block, autograd keeps no copy of ``t`` for the backward pass: wherever an op
    saves ``t``, ``remake()`` (which must return the same values) makes it again when the
    backward pass needs it, without autograd unless the backward pass builds a graph
    (``create_graph=True``: the remade ``t`` then has its graph back to ``depends_on``). For
    the scattered buffer [T*K, d] of the local path, which the first expert GEMM saves for its
    weight gradient: the backward pass then re-scatters it (one pass over memory) instead of
    keeping T*K*d elements from the forward pass to the backward one. ``depends_on`` is what
    ``remake`` reads: modifying it in place in between is an error, as for a saved tensor. The code in the block must not modify ``t`` in place after
    saving it (an in-place change before is seen, and ``t`` is then saved as usual).

    Off (the block saves ``t`` as usual) under torch.compile, without grad mode, and when other
    saved-tensor hooks are active (e.g. ``torch.utils.checkpoint``), which this one would shadow.
    """
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or top_hooks is None
            or top_hooks(False) is not None):
        yield
        return
    version = depends_on._version
    # t's identity, not t: the hooks live as long as the graph, and must not keep t alive. A
    # version of t other than the current one (t modified in place since) is saved as usual.
    key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version)

    def pack(s):
        same = (s.data_ptr(), s.shape, s.stride(), s.dtype, s.device, s._version) == key
        return _Recompute() if same else s

    def unpack(p):
        if not isinstance(p, _Recompute):
            return p
        if depends_on._version != version:
            raise RuntimeError("fastmoe_megatron: the MoE layer's input was modified in place "
                               "after the forward pass; its backward pass needs it unchanged")
        if builds_graph():  # a backward pass with create_graph: keep the graph to x
            return remake()
        with torch.no_grad():
            return remake()

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


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


def activation_name(activation) -> str | None:
    """The ``expert_mlp`` name of an activation module or function (``nn.GELU``, ``F.gelu``,
    ``nn.ReLU``, ``torch.relu``, ``nn.SiLU``, ...), or None when it has none."""
    F = torch.nn.functional
    kind = type(activation)
    if kind is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(activation.approximate)
    if kind is torch.nn.ReLU:
        return "relu"
    if kind is torch.nn.SiLU:
        return "silu"
    for fns, name in (((F.gelu,), "gelu"), ((F.relu, torch.relu), "relu"),
                      ((F.silu,), "silu")):
        if any(activation is f for f in fns):
            return name
    return None


def env_switch(name: str) -> bool:
    """An on/off environment variable: ``1`` (the default) or ``0``; any other value is an error
    that names the variable and the allowed values."""
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r} is not valid; allowed values: 0, 1")
    return value == "1"


def fused_experts_enabled() -> bool:
    """False when ``FMOE_FUSED_EXPERTS=0``: the layer's experts then run as three ops."""
    return env_switch("FMOE_FUSED_EXPERTS")


def expert_mlp(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
               w2: torch.Tensor, b2: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Every expert's MLP on its rows of ``x`` [N, d] (grouped by expert, ``counts`` [E] rows
    each): ``act(x_e @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e]``, with ``w1`` [E, h, d], ``w2``
    [E, d, h] and ``activation`` one of ``gelu``, ``gelu_tanh``, ``relu``, ``silu``. The same
    as ``grouped_linear`` -> activation -> ``grouped_linear``, in one pass over each expert's rows
    on the CPU; on CUDA it runs as those three ops."""
    counts = counts.to("cpu", torch.int64)
    if x.is_cuda and kernels_for(x) is native:  # no fused CUDA kernel
        hidden = grouped_linear(x, w1, counts, b1)
        return grouped_linear(reference.activation_fn(activation)(hidden), w2, counts, b2)
    return _ExpertMLP.apply(x.contiguous(), counts, w1, b1, w2, b2, activation)


__all__ = [
    "use_backend", "backend_name", "kernels_for", "expert_count", "assign_pos",
    "limit_by_capacity", "prune_gate_by_capacity", "scatter_rows", "gather_rows",
    "grouped_linear", "expert_mlp", "activation_name", "fused_experts_enabled",
    "recompute_when_saved",
]
