"""Expert-parallel exchange: counts, rows and slices between workers.

Layouts (W workers in the MoE group, E local experts each, global expert g = w * E + e):

- ``local_count`` [W*E]: rows this worker sends to each global expert, laid out [dest w, e];
- ``global_count`` [W*E]: rows this worker's experts receive, laid out [source j, e];
- the send buffer holds rows grouped by global expert (so by destination, then local expert);
- the receive buffer holds rows grouped by (local expert e, source j), as in FastMoE, so each
  local expert's rows are one contiguous block for the grouped GEMM.

Back ends: the native NCCL communicator (``ops.nccl``) for CUDA tensors when every rank of the
group has it built, else ``torch.distributed.all_to_all_single`` with split sizes (gloo on the CPU,
NCCL on GPUs). The ranks agree on it at the group's first exchange (``_native_comm``).
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

# Communicators by process group, held weakly: a destroyed group's entry goes with it, so a
# later init_process_group never meets a stale communicator.
_native_comms: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agreed(usable: bool, group) -> bool:
    """Whether ``usable`` holds on every rank of ``group`` (a collective over the group). The ranks
    of a group must all take the same exchange path: a rank on the native communicator and one
    on ``torch.distributed`` would each wait for messages the other never sends."""
    flag = torch.tensor([1 if usable else 0], dtype=torch.int32, device=_comm_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _native_comm(group, t: torch.Tensor):
    """The native NCCL communicator for ``group`` when ``t`` is a CUDA tensor and every rank of the
    group has it built; else None, and the exchanges go through ``torch.distributed``. None as
    well while the torch kernels are forced (``FMOE_BACKEND=torch`` or ``ops.use_backend``, which
    must then be alike on every rank). The first call for a group is collective over it."""
    if not t.is_cuda:
        return None
    from . import ops

    if ops._forced() == "torch":
        return None
    key = group if group is not None else dist.group.WORLD
    if key not in _native_comms:
        _native_comms[key] = _make_native_comm(group)
    return _native_comms[key]


def _make_native_comm(group):
    from .ops.nccl import NcclCommunicator, available

    # Agreed first: a rank whose CUDA library failed to build (or was turned off with
    # FMOE_CUDA_OPS=0) takes the whole group onto torch.distributed with it.
    return NcclCommunicator(group) if _agreed(available(), group) else None


def exchange_counts(local_count: torch.Tensor, num_expert: int, group=None) -> torch.Tensor:
    """All-to-all of per-expert counts: [dest w, e] here -> [source j, e] there. CPU int64."""
    return exchange_counts_async(local_count, num_expert, group).wait()


_side_streams: dict = {}


class PendingCounts:
    """A count exchange under way; ``wait()`` returns what ``exchange_counts`` returns. When the
    exchange carried a flag, ``flags`` then holds every peer's ([source rank], CPU int64)."""

    def __init__(self, finish, num_expert: int, with_flag: bool):
        self._finish = finish
        self._num_expert, self._with_flag = num_expert, with_flag
        self._result = None
        self.flags: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            got = self._finish()
            if self._with_flag:
                got = got.view(-1, self._num_expert + 1)
                self.flags = got[:, -1].clone()
                got = got[:, :-1].reshape(-1)
            self._result = got
        return self._result


def exchange_counts_async(local_count: torch.Tensor, num_expert: int, group=None,
                          flag: torch.Tensor | None = None) -> PendingCounts:
    """Starts the all-to-all of counts and returns at once, so that the caller's next work (the
    local scatter) overlaps the exchange: gloo runs it on its own thread, torch's NCCL on its own
    stream, the native NCCL communicator on a side stream here. ``local_count`` may live on the
    CPU or the GPU; the result of ``wait()`` is on the CPU.

    ``flag`` (a 0-d integer or bool tensor, on any device) travels with the counts to every peer,
    in the same message (no extra collective, no host synchronisation here); ``flags`` of the
    result then holds the peers' flags. The MoE layer sends whether its input is finite, so that
    every rank stops together instead of waiting for rows from a rank that has raised."""
    local_count = local_count.to(torch.int64)
    if flag is not None:
        per_dest = local_count.view(-1, num_expert)
        mark = flag.to(device=local_count.device, dtype=torch.int64).reshape(1, 1)
        local_count = torch.cat([per_dest, mark.expand(per_dest.shape[0], 1)], 1).reshape(-1)
    device = _comm_device(group)
    comm = _native_comm(group, local_count.to(device)) if device.type == "cuda" else None
    if comm is not None:
        send = local_count.to(device)
        current = torch.cuda.current_stream(device)
        side = _side_streams.get(device.index)
        if side is None:
            side = _side_streams[device.index] = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            recv = comm.exchange_counts(send)
        send.record_stream(side)

        def finish():
            now = torch.cuda.current_stream(device)
            now.wait_stream(side)
            recv.record_stream(now)
            return recv.cpu()

        return PendingCounts(finish, num_expert, flag is not None)
    send = local_count.to(device).contiguous()
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)

    def finish():
        work.wait()
        return recv.cpu()

    return PendingCounts(finish, num_expert, flag is not None)


def _block_perm(count: torch.Tensor, world_size: int, num_expert: int) -> torch.Tensor:
    """Row permutation that turns a [j, e]-blocked buffer (block sizes ``count`` laid out [j, e])
    into an [e, j]-blocked one: out[i] = in[perm[i]]."""
    c = count.reshape(world_size, num_expert)
    starts = (torch.cumsum(c.reshape(-1), 0) - c.reshape(-1)).reshape(world_size, num_expert)
    sizes_ej = c.t().reshape(-1)
    starts_ej = starts.t().reshape(-1)
    total = int(sizes_ej.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    block_first = torch.repeat_interleave(starts_ej, sizes_ej)
    block_begin = torch.repeat_interleave(torch.cumsum(sizes_ej, 0) - sizes_ej, sizes_ej)
    return block_first + (torch.arange(total) - block_begin)


def _all_to_all_rows(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                     group) -> torch.Tensor:
    device = _comm_device(group)
    send = rows.to(device).contiguous()
    recv = send.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    return recv.to(rows.device)


def _scatter_impl(buf, local_count, global_count, num_expert, group):
    W = group_size(group)
    comm = _native_comm(group, buf)
    if comm is not None:
        return comm.global_scatter(buf, local_count, global_count)
    send_splits = local_count.reshape(W, num_expert).sum(1).tolist()
    recv_splits = global_count.reshape(W, num_expert).sum(1).tolist()
    recv = _all_to_all_rows(buf[: sum(send_splits)], send_splits, recv_splits, group)
    return recv.index_select(0, _block_perm(global_count, W, num_expert).to(recv.device))


def _gather_impl(buf, local_count, global_count, num_expert, group):
    W = group_size(group)
    comm = _native_comm(group, buf)
    if comm is not None:
        return comm.global_gather(buf, local_count, global_count)
    perm = _block_perm(global_count, W, num_expert).to(buf.device)
    src_major = torch.empty_like(buf)
    src_major[perm] = buf  # undo the [e, j] ordering
    send_splits = global_count.reshape(W, num_expert).sum(1).tolist()
    recv_splits = local_count.reshape(W, num_expert).sum(1).tolist()
    return _all_to_all_rows(src_major, send_splits, recv_splits, group)


class _GlobalScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, local_count, global_count, num_expert, group):
        ctx.args = (local_count, global_count, num_expert, group)
        ctx.rows = buf.shape[0]
        return _scatter_impl(buf, local_count, global_count, num_expert, group)

    @staticmethod
    def backward(ctx, grad):
        # The adjoint is the gather, as an autograd op itself (differentiable again, for double
        # backward), padded back to the rows of the input.
        return _GlobalGather.apply(grad.contiguous(), *ctx.args, ctx.rows), None, None, None, None


class _GlobalGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, local_count, global_count, num_expert, group, out_rows):
        ctx.args = (local_count, global_count, num_expert, group)
        out = _gather_impl(buf, local_count, global_count, num_expert, group)
        if out.shape[0] < out_rows:  # pad back to the local buffer's size (dropped slots)
            out = torch.cat([out, out.new_zeros((out_rows - out.shape[0],) + out.shape[1:])])
        return out

    @staticmethod
    def backward(ctx, grad):
        local_count = ctx.args[0]
        grad = grad[: int(local_count.sum())].contiguous()
        return _GlobalScatter.apply(grad, *ctx.args), None, None, None, None, None


def global_scatter(buf, local_count, global_count, num_expert, group=None):
    """Rows grouped by global expert -> rows for this worker's experts, grouped (e, source)."""
    return _GlobalScatter.apply(buf, local_count, global_count, num_expert, group)


def global_gather(buf, local_count, global_count, num_expert, group=None, out_rows=None):
    """Inverse of ``global_scatter``; the result is padded with zero rows to ``out_rows``."""
    out_rows = int(local_count.sum()) if out_rows is None else out_rows
    return _GlobalGather.apply(buf, local_count, global_count, num_expert, group, out_rows)


# ---------------------------------------------------------------------------- slicing

def slice_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows [start, end) of ``n`` that slice ``rank`` of ``size`` routes (sizes differ by <= 1)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _TakeSlice(torch.autograd.Function):
    """This worker's slice of a batch that every worker of the slice group holds; the backward
    all-gathers the slices' gradients, so every worker gets the whole input gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.n, ctx.group = x.shape[0], group
        start, end = slice_bounds(x.shape[0], group_size(group), group_rank(group))
        return x[start:end]

    @staticmethod
    def backward(ctx, grad):
        return _SliceGather.apply(grad.contiguous(), ctx.n, ctx.group), None


def take_slice(x: torch.Tensor, group) -> torch.Tensor:
    return _TakeSlice.apply(x, group)


class _SliceGather(torch.autograd.Function):
    """All-gather of the slices' outputs. Every worker of the slice group then holds the same full
    output and runs the same computation on it, so the gradient of its own slice is its share."""

    @staticmethod
    def forward(ctx, part, n, group):
        size, rank = group_size(group), group_rank(group)
        ctx.bounds = slice_bounds(n, size, rank)
        longest = slice_bounds(n, size, 0)[1]
        device = _comm_device(group)
        padded = part.new_zeros((longest,) + part.shape[1:]).to(device)
        padded[: part.shape[0]] = part.to(device)
        pieces = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(pieces, padded, group=group)
        out = [p[: e - s] for p, (s, e) in zip(pieces, (slice_bounds(n, size, r) for r in range(size)))]
        return torch.cat(out).to(part.device)

    @staticmethod
    def backward(ctx, grad):
        start, end = ctx.bounds
        return grad[start:end], None, None


def slice_gather(part: torch.Tensor, n: int, group) -> torch.Tensor:
    return _SliceGather.apply(part, n, group)
