"""Expert parallelism with the row exchange overlapped by the experts' own work (CPU, gloo).

The general expert-parallel path (``comm.global_scatter`` -> experts -> ``comm.global_gather``)
is three autograd steps, each waiting for the one before: a worker stands idle in every
all-to-all until the slowest worker reaches it (four times per step), and the receive buffer is
permuted from ``[source, expert]`` to ``[expert, source]`` order and back on each side of the
experts. For ``FMoETransformerMLP``'s fused experts (``ops.expert_mlp``) this module does the
exchange and the experts in one autograd Function instead. On worker r of W, with E local
experts split into two halves A = [0, E//2) and B = [E//2, E):

forward
  1. post the sends of the rows for every other worker and the receives of their rows for this
     one (point to point: gloo moves them on its own threads);
  2. run this worker's own rows for the experts of half A (they need no exchange);
  3. for each other worker j: wait for its rows, run them, and post the send of the outputs back.
     A source's rows arrive grouped by local expert, which is the layout ``expert_mlp`` takes: no
     permutation;
  4. run the own rows for half B, while the outputs travel;
  5. wait for this worker's outputs from the others.
backward
  the same schedule on the gradients. Each call of the kernel adds its parameter gradients into
  the ones before it (``expert_mlp_backward(accumulate=True)``); a remote chunk runs as two calls,
  one per half, so that every call either writes or adds for all its experts, and its input
  gradient goes back as two messages.

The waits then cost only what the own rows could not cover. Memory: the scattered buffer is kept
for the backward pass (its own rows are read again), ``(W - 1) / W`` of it more than the general
path keeps. ``FMOE_EP_OVERLAP=0`` turns this path off; it is never taken for CUDA tensors (the
NCCL path), under ``torch.compile``, or for other experts.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from . import ops

# Message tags, one per kind of message between two workers.
_TAG_ROWS, _TAG_OUT, _TAG_GRAD, _TAG_GX_A, _TAG_GX_B = 0x4D01, 0x4D02, 0x4D03, 0x4D04, 0x4D05


def enabled() -> bool:
    """False when ``FMOE_EP_OVERLAP=0``."""
    return ops.env_switch("FMOE_EP_OVERLAP")


def usable(buf: torch.Tensor, group) -> bool:
    """Whether the overlapped path can run the exchange of ``buf`` over ``group``."""
    return (enabled() and buf.device.type == "cpu" and not torch.compiler.is_compiling()
            and dist.get_backend(group) != "nccl")


def _wait(work) -> None:
    """Waits for one message (the benchmark times this: it is the exposed communication)."""
    work.wait()


class _Plan:
    """Row ranges of one step on this worker: ``seg[w]`` = (start, rows) of the rows this worker
    routes to worker w's experts in its scattered buffer; ``src[j]`` = rows worker j routes to
    this worker's experts; ``counts_to[w]`` / ``counts_from[j]`` the same per local expert."""

    def __init__(self, local_count: torch.Tensor, global_count: torch.Tensor, num_expert: int,
                 group):
        self.group = group
        self.W = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.E = num_expert
        self.half = num_expert // 2
        self.counts_to = local_count.reshape(self.W, num_expert)
        self.counts_from = global_count.reshape(self.W, num_expert)
        sizes = self.counts_to.sum(1).tolist()
        starts = [sum(sizes[:w]) for w in range(self.W)]
        self.seg = list(zip(starts, sizes))
        self.src = self.counts_from.sum(1).tolist()
        self.total = sum(sizes)
        # This worker's own rows (routed to its own experts): where they start, how many, their
        # counts per local expert, and how many belong to half A.
        self.own_start, self.own_rows = self.seg[self.rank]
        self.own_counts = self.counts_to[self.rank]
        self.own_cut = self.split(self.own_counts)
        # The other workers, nearest first after this one (each worker then starts on a
        # different source).
        self.peers = [(self.rank + i) % self.W for i in range(1, self.W)]

    def global_rank(self, w: int) -> int:
        return dist.get_global_rank(self.group, w) if self.group is not None else w

    def split(self, counts: torch.Tensor) -> int:
        """Rows of a chunk (``counts`` per local expert) that belong to half A."""
        return int(counts[: self.half].sum())

    def send(self, t: torch.Tensor, w: int, tag: int):
        return dist.isend(t, self.global_rank(w), group=self.group, tag=tag) if t.shape[0] else None

    def recv(self, t: torch.Tensor, w: int, tag: int):
        return dist.irecv(t, self.global_rank(w), group=self.group, tag=tag) if t.shape[0] else None


def _wait_all(works) -> None:
    for w in works:
        if w is not None:
            _wait(w)


class _Params:
    """The experts' parameters, or one half's slice of them (views: no copies)."""

    def __init__(self, w1, b1, w2, b2):
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2

    def part(self, e0: int, e1: int) -> "_Params":
        cut = (lambda t: None if t is None else t[e0:e1])
        return _Params(cut(self.w1), cut(self.b1), cut(self.w2), cut(self.b2))


class _OverlappedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, local_count, global_count, num_expert, group, out_rows, activation,
                w1, b1, w2, b2):
        k = ops.kernels_for(buf)
        plan = _Plan(local_count, global_count, num_expert, group)
        r, E, half = plan.rank, plan.E, plan.half
        full = _Params(w1, b1, w2, b2)
        parts = (full.part(0, half), full.part(half, E))
        d = buf.shape[1]
        out = buf.new_empty((out_rows, d))
        if plan.total < out_rows:  # dropped slots: zero rows
            out[plan.total:].zero_()

        def run(x, counts, p: _Params):
            if p.w1.shape[0] == 0:  # half A of a single local expert
                return x.new_empty((0, d)), x.new_empty((0, w1.shape[1]))
            return k.expert_mlp(x, counts, p.w1, p.b1, p.w2, p.b2, activation)

        # 1. the exchange of rows
        rows = {j: buf.new_empty((plan.src[j], d)) for j in plan.peers}
        recv_rows = {j: plan.recv(rows[j], j, _TAG_ROWS) for j in plan.peers}
        sends = [plan.send(buf[s:s + n], w, _TAG_ROWS) for w, (s, n) in enumerate(plan.seg)
                 if w != r]
        recv_out = [plan.recv(out[s:s + n], w, _TAG_OUT) for w, (s, n) in enumerate(plan.seg)
                    if w != r]
        # 2. own rows, half A
        s0, cut, own_counts = plan.own_start, plan.own_cut, plan.own_counts
        own = buf[s0:s0 + plan.own_rows]
        y_a, h_a = run(own[:cut], own_counts[:half], parts[0])
        out[s0:s0 + cut] = y_a
        # 3. the other workers' rows
        hidden = {}
        for j in plan.peers:
            if recv_rows[j] is not None:
                _wait(recv_rows[j])
            y, hidden[j] = run(rows[j], plan.counts_from[j], full)
            sends.append(plan.send(y, j, _TAG_OUT))
        # 4. own rows, half B
        y_b, h_b = run(own[cut:], own_counts[half:], parts[1])
        out[s0 + cut:s0 + plan.own_rows] = y_b
        # 5. this worker's outputs from the others
        _wait_all(recv_out)
        _wait_all(sends)

        ctx.plan, ctx.k, ctx.activation = plan, k, activation
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.weight_refs = (weakref.ref(w1), weakref.ref(w2))  # see ops._GroupedMM
        ctx.rows_shape = buf.shape
        ctx.save_for_backward(buf, h_a, h_b, w1, b1, w2, b2,
                              *(rows[j] for j in plan.peers), *(hidden[j] for j in plan.peers))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ops.builds_graph():
            raise RuntimeError("fastmoe_megatron: double backward (create_graph=True) through the "
                               "overlapped expert-parallel experts is not supported; with "
                               "FMOE_EP_OVERLAP=0 they run through all-to-alls, which support it")
        plan, k = ctx.plan, ctx.k
        r, E, half, W = plan.rank, plan.E, plan.half, plan.W
        buf, h_a, h_b, w1, b1, w2, b2, *rest = ctx.saved_tensors
        rows = dict(zip(plan.peers, rest[: W - 1]))
        hidden = dict(zip(plan.peers, rest[W - 1:]))
        # needs_input_grad: buf, 2 counts, num_expert, group, out_rows, activation, w1, b1, w2, b2.
        # The input gradient is always computed: the other workers wait for their rows' share.
        need = ctx.needs_input_grad
        mask = [True, need[7], ctx.has_bias[0] and need[8], need[9], ctx.has_bias[1] and need[10]]
        grad_out = grad_out.contiguous()
        d = grad_out.shape[1]

        # Parameter-gradient buffers: every kernel call writes or adds into them.
        def buffer(ref, param, needed):
            if not needed:
                return None
            kept = ops._grad_buffer(ref, param, True)
            return kept if kept is not None else torch.empty_like(param)

        g = _Params(buffer(ctx.weight_refs[0], w1, mask[1]),
                    torch.empty_like(b1) if mask[2] else None,
                    buffer(ctx.weight_refs[1], w2, mask[3]),
                    torch.empty_like(b2) if mask[4] else None)
        full = _Params(w1, b1, w2, b2)
        halves = ((0, half), (half, E))
        written = [False, False]  # whether each half's parameter gradients hold a sum already

        def run(h: int, gy, x, hid, counts):
            """The backward pass of half h's experts on one chunk; returns its input gradient."""
            e0, e1 = halves[h]
            if e0 == e1:
                return gy.new_empty((0, d))
            p, gp = full.part(e0, e1), g.part(e0, e1)
            gx, gw1, gb1, gw2, gb2 = k.expert_mlp_backward(
                gy, x, hid, counts, p.w1, p.w2, ctx.activation, mask, gp.w1, gp.w2, gp.b1, gp.b2,
                written[h])
            written[h] = True
            return gx

        gx_all = grad_out.new_empty(ctx.rows_shape)
        if plan.total < gx_all.shape[0]:
            gx_all[plan.total:].zero_()
        # 1. the exchange of output gradients; the input gradients come back in two parts
        grads = {j: grad_out.new_empty((plan.src[j], d)) for j in plan.peers}
        recv_grads = {j: plan.recv(grads[j], j, _TAG_GRAD) for j in plan.peers}
        sends = [plan.send(grad_out[s:s + n], w, _TAG_GRAD) for w, (s, n) in enumerate(plan.seg)
                 if w != r]
        recv_gx = []
        for w, (s, n) in enumerate(plan.seg):
            if w != r:
                a = plan.split(plan.counts_to[w])
                recv_gx += [plan.recv(gx_all[s:s + a], w, _TAG_GX_A),
                            plan.recv(gx_all[s + a:s + n], w, _TAG_GX_B)]
        # 2. own rows, half A
        s0, cut, own_counts = plan.own_start, plan.own_cut, plan.own_counts
        own = slice(s0, s0 + plan.own_rows)
        x_own, gy_own = buf[own], grad_out[own]
        gx_all[s0:s0 + cut] = run(0, gy_own[:cut], x_own[:cut], h_a, own_counts[:half])
        # 3. the other workers' rows
        for j in plan.peers:
            if recv_grads[j] is not None:
                _wait(recv_grads[j])
            c = plan.counts_from[j]
            a = plan.split(c)
            gx_a = run(0, grads[j][:a], rows[j][:a], hidden[j][:a], c[:half])
            sends.append(plan.send(gx_a, j, _TAG_GX_A))
            gx_b = run(1, grads[j][a:], rows[j][a:], hidden[j][a:], c[half:])
            sends.append(plan.send(gx_b, j, _TAG_GX_B))
        # 4. own rows, half B
        gx_all[s0 + cut:s0 + plan.own_rows] = run(1, gy_own[cut:], x_own[cut:], h_b,
                                                  own_counts[half:])
        # 5. this worker's input gradients from the others
        _wait_all(recv_gx)
        _wait_all(sends)

        params = (None if t is None else t.detach() for t in (g.w1, g.b1, g.w2, g.b2))
        return (gx_all if need[0] else None, None, None, None, None, None, None, *params)


def expert_parallel_mlp(buf: torch.Tensor, local_count: torch.Tensor, global_count: torch.Tensor,
                        num_expert: int, group, w1: torch.Tensor, b1: torch.Tensor | None,
                        w2: torch.Tensor, b2: torch.Tensor | None, activation: str,
                        out_rows: int | None = None) -> torch.Tensor:
    """``global_gather(expert_mlp(global_scatter(buf)))`` with the exchange overlapped (see the
    module's docstring). ``buf`` holds rows grouped by global expert (``local_count`` [W*E] rows
    each, laid out [dest w, e]), ``global_count`` [W*E] is laid out [source j, e]; the result has
    ``buf``'s layout, padded with zero rows to ``out_rows``."""
    out_rows = buf.shape[0] if out_rows is None else out_rows
    return _OverlappedExperts.apply(buf.contiguous(), local_count.to("cpu", torch.int64),
                                    global_count.to("cpu", torch.int64), num_expert, group,
                                    out_rows, activation, w1, b1, w2, b2)
