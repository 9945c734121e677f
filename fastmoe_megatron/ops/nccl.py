"""A native NCCL communicator for expert parallelism (``csrc/cuda/nccl_comm.cpp``).

It owns its own ``ncclComm_t`` per process group (created from a unique id that rank 0 of the group
makes and broadcasts over the group with ``torch.distributed``); it never touches the internals of
torch's ``ProcessGroupNCCL``. The methods are raw exchanges on the current CUDA stream, without
autograd (``fastmoe_megatron.comm`` adds that).

Layouts (W ranks in the group, E local experts each, global expert g = w * E + e):

- ``local_count`` [W*E], laid out [dest rank w, local expert e]: rows this rank sends to g;
- ``global_count`` [W*E], laid out [source rank j, local expert e]: rows this rank receives;
- ``global_scatter``: rows grouped by global expert -> rows grouped by (local expert, source rank);
- ``global_gather``: the exact inverse.

Importing this module needs no GPU; constructing a communicator needs CUDA, an initialized
``torch.distributed`` and the cuda library built with NCCL (``python -m fastmoe_megatron info``).
"""
from __future__ import annotations

import torch

__all__ = ["NcclCommunicator", "available"]


def available() -> bool:
    """Whether the native NCCL ops can be used here (CUDA present and the ops built)."""
    if not torch.cuda.is_available():
        return False
    from .. import _native

    return _native.load("cpu") and _native.load("cuda") and hasattr(torch.ops.fmoe, "nccl_unique_id")


class NcclCommunicator:
    """An NCCL communicator over the ranks of ``group`` (a ``torch.distributed`` process group, or
    ``None`` for the default group), on the current CUDA device.

    Construction is collective over ``group``, and so is ``close()``.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not torch.cuda.is_available():
            raise RuntimeError("NcclCommunicator needs CUDA")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("NcclCommunicator needs an initialized torch.distributed")
        if not available():
            raise RuntimeError("the native NCCL ops are not built (see `python -m fastmoe_megatron info`)")
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise RuntimeError("this process is not a member of the group")
        self.device = torch.device("cuda", torch.cuda.current_device())
        obj = [bytes(torch.ops.fmoe.nccl_unique_id().numpy().tobytes()) if self.rank == 0 else None]
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(obj, src=src, group=group)
        uid = torch.frombuffer(bytearray(obj[0]), dtype=torch.uint8)
        self.handle: int | None = torch.ops.fmoe.nccl_comm_create(uid, self.world_size, self.rank)

    def _handle(self) -> int:
        if self.handle is None:
            raise RuntimeError("NcclCommunicator is closed")
        return self.handle

    def exchange_counts(self, local_count: torch.Tensor) -> torch.Tensor:
        """``local_count`` [W*E] ([dest rank, local expert]) -> ``global_count`` [W*E]
        ([source rank, local expert]), int64 on this communicator's GPU."""
        t = local_count.to(device=self.device, dtype=torch.int64).contiguous().view(-1)
        return torch.ops.fmoe.nccl_exchange_counts(t, self._handle())

    @staticmethod
    def _host(count: torch.Tensor) -> torch.Tensor:
        return count.to(device="cpu", dtype=torch.int64).contiguous().view(-1)

    def global_scatter(self, buf: torch.Tensor, local_count: torch.Tensor,
                       global_count: torch.Tensor) -> torch.Tensor:
        """Rows of ``buf`` grouped by global expert (``local_count`` rows each; extra trailing rows
        are ignored) -> ``sum(global_count)`` rows grouped by (local expert, source rank)."""
        lc, gc = self._host(local_count), self._host(global_count)
        return torch.ops.fmoe.nccl_global_scatter(buf.contiguous(), lc, gc, int(gc.sum()),
                                                  self._handle())

    def global_gather(self, buf: torch.Tensor, local_count: torch.Tensor,
                      global_count: torch.Tensor) -> torch.Tensor:
        """Inverse of ``global_scatter``: rows grouped by (local expert, source rank) ->
        ``sum(local_count)`` rows grouped by global expert."""
        lc, gc = self._host(local_count), self._host(global_count)
        return torch.ops.fmoe.nccl_global_gather(buf.contiguous(), lc, gc, int(lc.sum()),
                                                 self._handle())

    def close(self) -> None:
        """Destroys the communicator (collective; idempotent)."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            torch.ops.fmoe.nccl_comm_destroy(handle)

    def __enter__(self) -> "NcclCommunicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
