"""The native NCCL communicator (csrc/cuda/nccl_comm.cpp, fastmoe_megatron/ops/nccl.py):
exchange_counts, global_scatter and global_gather against a brute-force reference built from the
all_gather'ed counts and rows of every rank.

On 2 GPUs, and the exchange also on one (a group of one rank); each worker process takes one GPU
and joins an NCCL process group (the reference data travels over it too). Skipped without CUDA,
and each test where fewer GPUs exist than it needs.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from tests.dist_utils import run_workers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gpus(n: int):
    """Skips a test (or a parameter set) where fewer than ``n`` CUDA devices exist."""
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA devices")


def _init_nccl(rank: int, world: int, timeout: float = 120.0):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout),
                            device_id=torch.device("cuda", rank))


def _all_gather_rows(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's ``t`` (rows may differ in number), via padded all_gather."""
    import torch.distributed as dist

    n = torch.tensor([t.shape[0]], device=t.device)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n)
    longest = max(int(x) for x in ns)
    padded = t.new_zeros((longest,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [p[: int(k)] for p, k in zip(parts, ns)]


def nccl_exchange_worker(rank: int, world: int, num_expert: int, width: tuple, dtype_name: str,
                         use_subgroup: bool):
    import torch.distributed as dist

    from fastmoe_megatron import _native
    from fastmoe_megatron.ops.nccl import NcclCommunicator

    _init_nccl(rank, world)
    # A failure raises straight to run_workers, which reports it and ends the process.
    assert _native.load("cuda"), _native.status()
    dev = torch.device("cuda", rank)
    dtype = getattr(torch, dtype_name)
    E, W = num_expert, world
    group = dist.new_group(list(range(world))) if use_subgroup else None
    comm = NcclCommunicator(group)

    for trial in range(4):
        gen = torch.Generator().manual_seed(100 * trial + rank)
        local_count = torch.randint(0, 5, (W * E,), generator=gen, dtype=torch.int64)
        if trial == 1:
            local_count.zero_()  # this rank sends nothing
        if trial == 2 and rank == 0:
            local_count[: E] = 0  # nothing to itself
        extra = 3 if trial == 3 else 0  # trailing rows that global_scatter must ignore
        rows = int(local_count.sum())
        buf = torch.randn((rows + extra,) + width, generator=gen).to(dtype).to(dev)

        # counts: [dest w, e] here -> [source j, e] there
        global_count = comm.exchange_counts(local_count.to(dev))
        assert global_count.device == dev and global_count.dtype == torch.int64
        all_lc = _all_gather_rows(local_count.to(dev), W)
        want_gc = torch.stack([all_lc[j][rank * E:(rank + 1) * E] for j in range(W)]).reshape(-1)
        assert torch.equal(global_count, want_gc), (global_count, want_gc)
        global_count = global_count.cpu()

        # brute force: the rows rank j sends to global expert (rank, e), in j's buffer order
        all_buf = _all_gather_rows(buf[:rows], W)
        blocks = {}
        for j in range(W):
            lc_j = all_lc[j].cpu()
            starts = torch.cumsum(lc_j, 0) - lc_j
            for e in range(E):
                g = rank * E + e
                blocks[(e, j)] = all_buf[j][int(starts[g]): int(starts[g]) + int(lc_j[g])]
        want = torch.cat([blocks[(e, j)] for e in range(E) for j in range(W)])

        got = comm.global_scatter(buf, local_count, global_count)
        assert got.dtype == dtype and got.shape == (int(global_count.sum()),) + width
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "global_scatter"

        back = comm.global_gather(got, local_count, global_count)
        assert back.shape == (rows,) + width
        assert torch.equal(back.view(torch.uint8), buf[:rows].view(torch.uint8)), "global_gather"

        # the raw ops pad the result with zero rows up to out_rows
        padded = torch.ops.fmoe.nccl_global_gather(got.contiguous(), local_count, global_count,
                                                   rows + 2, comm.handle)
        assert torch.equal(padded[:rows], back) and (padded[rows:] == 0).all()
    torch.cuda.synchronize()
    comm.close()
    comm.close()  # idempotent
    dist.barrier()
    dist.destroy_process_group()
    return True


def _require_native_nccl():
    from fastmoe_megatron.ops import nccl

    for var in ("FMOE_NATIVE", "FMOE_CUDA_OPS"):
        if os.environ.get(var, "auto").strip().lower() == "0":
            pytest.skip(f"native CUDA ops disabled by {var}=0")
    if not nccl.available():
        pytest.fail("the native NCCL ops are not built (FMOE_WITH_NCCL): see "
                    "`python -m fastmoe_megatron info`")


@pytest.mark.parametrize("world", [pytest.param(1, marks=gpus(1)), pytest.param(2, marks=gpus(2))])
@pytest.mark.parametrize("num_expert,width,dtype_name,use_subgroup", [
    (1, (8,), "float32", False),
    (3, (16,), "bfloat16", False),
    (2, (4, 5), "float16", True),
    (4, (1,), "float64", False),
])
def test_nccl_scatter_gather_match_brute_force(num_expert, width, dtype_name, use_subgroup, world):
    """On 2 GPUs; and on one (a group of one rank: the communicator's set-up, the send to itself,
    the padding and the stream order, where a machine has a single GPU)."""
    _require_native_nccl()
    out = run_workers(nccl_exchange_worker, world, timeout=300,
                      args=(num_expert, width, dtype_name, use_subgroup),
                      init_process_group=False)
    assert out == [True] * world


def exchange_path_worker(rank: int, world: int, cuda_ops_off_on_last_rank: bool):
    """``comm``'s choice of back end on real GPUs: the native communicator on every rank, or, when
    one rank has no CUDA library (``FMOE_CUDA_OPS=0`` there, as after a failed build),
    torch.distributed on every rank (not a hang)."""
    if cuda_ops_off_on_last_rank and rank == world - 1:
        os.environ["FMOE_CUDA_OPS"] = "0"  # before the first load of the library
    import torch.distributed as dist

    from fastmoe_megatron import comm
    from fastmoe_megatron.ops.nccl import NcclCommunicator

    _init_nccl(rank, world)
    dev = torch.device("cuda", rank)
    chosen = comm._native_comm(None, torch.zeros(1, device=dev))
    if cuda_ops_off_on_last_rank:
        assert chosen is None, chosen
    else:
        assert isinstance(chosen, NcclCommunicator), chosen
    E = 2
    local_count = torch.arange(world * E, dtype=torch.int64) + rank
    global_count = comm.exchange_counts(local_count.to(dev), E)
    all_lc = _all_gather_rows(local_count.to(dev), world)
    want = torch.stack([all_lc[j][rank * E:(rank + 1) * E] for j in range(world)]).reshape(-1)
    assert torch.equal(global_count, want.cpu()), (global_count, want)
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()
    return True


@gpus(2)
@pytest.mark.parametrize("cuda_ops_off_on_last_rank", [False, True])
def test_every_rank_takes_the_same_exchange_path(cuda_ops_off_on_last_rank):
    _require_native_nccl()
    out = run_workers(exchange_path_worker, 2, timeout=300, args=(cuda_ops_off_on_last_rank,),
                      init_process_group=False)
    assert out == [True, True]
