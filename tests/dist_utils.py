"""Run a function in gloo worker processes and fail loudly.

``run_workers(fn, world_size)`` starts ``world_size`` fresh Python processes (``spawn``), joins
them into one gloo process group over 127.0.0.1 and calls ``fn(rank, world_size, *args)`` in each.
It returns the list of per-rank return values, or raises ``WorkerFailure`` when a worker raised,
died (signal, ``os._exit``) or did not finish within ``timeout`` seconds. The error carries the
worker's traceback; for a hung worker it carries the Python stacks of all its threads, dumped by
``faulthandler`` just before the worker is killed.

Rendezvous uses a ``TCPStore`` hosted by the calling process on a port the OS picks, so there is no
window in which another process can take a "free" port. Every worker that returns from ``fn`` ends
with ``barrier()`` and ``destroy_process_group()`` (a gloo worker that exits without them was seen
to abort now and then). Each worker runs in its own process group; whatever it started and left
behind (a checkpoint writer, a multiprocessing manager) is killed with it at the end.

``fn`` must be importable by the workers (a module-level function); ``args`` and the return value
must be picklable.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch.multiprocessing as mp

__all__ = ["WorkerFailure", "run_workers"]

# Seconds the other workers get to finish after one worker failed, before they are killed: they
# are usually stuck in a collective waiting for the dead one.
_GRACE_AFTER_FAILURE = 3.0


class WorkerFailure(RuntimeError):
    """A worker raised, died, or ran past the timeout."""


def _worker_main(fn, rank, world_size, store_port, timeout, args, result_q, stack_file,
                 threads, init_process_group):
    # Own process group, so that the parent can also end what this worker starts (checkpoint
    # writers, multiprocessing managers) when it fails or hangs.
    os.setpgid(0, 0)
    # Stack dump on SIGUSR1: the parent sends it to a hung worker before killing it.
    dump = open(stack_file, "w")
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store_port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    })
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if init_process_group:
            store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False,
                                  timeout=datetime.timedelta(seconds=timeout))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world_size, *args)
        if init_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        result_q.put((rank, False, traceback.format_exc()))
        result_q.close()
        result_q.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: a process group with a dead peer can hang in destructors.
        os._exit(1)
    result_q.put((rank, True, result))
    result_q.close()
    result_q.join_thread()


def _kill_process_group(pgid: Optional[int]) -> None:
    """SIGKILL whatever is left in a worker's process group (its own children)."""
    if pgid is None:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    timeout: float = 120.0,
    args: Sequence[Any] = (),
    threads_per_worker: Optional[int] = None,
    init_process_group: bool = True,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo workers; see the module doc.

    ``timeout`` bounds the whole run (start-up included) in seconds. ``threads_per_worker``
    defaults to the CPU count split evenly between the workers (at least 1). With
    ``init_process_group=False`` the workers get only the ``MASTER_ADDR``/``MASTER_PORT``/
    ``RANK``/``WORLD_SIZE`` environment and set up torch.distributed themselves.
    """
    import torch.distributed as dist

    if threads_per_worker is None:
        threads_per_worker = max(1, (os.cpu_count() or 1) // world_size)
    # The parent hosts the rendezvous store: port 0 lets the OS pick a free port, race-free.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    tmpdir = tempfile.TemporaryDirectory(prefix="dist_workers_")
    stack_files = [os.path.join(tmpdir.name, f"stack{r}.txt") for r in range(world_size)]
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker_main,
                args=(fn, rank, world_size, store.port, timeout, tuple(args), result_q,
                      stack_files[rank], threads_per_worker, init_process_group),
                name=f"{getattr(fn, '__name__', 'worker')}-rank{rank}",
            )
            p.start()
            procs.append(p)

        results: dict = {}
        errors: dict = {}
        deadline = time.monotonic() + timeout
        failed_at = None
        while len(results) + len(errors) < world_size:
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + _GRACE_AFTER_FAILURE):
                break
            try:
                rank, ok, payload = result_q.get(timeout=0.1)
            except queue.Empty:
                # A worker that died without reporting (signal, os._exit, segfault).
                for rank, p in enumerate(procs):
                    if (p.exitcode is not None and p.exitcode != 0
                            and rank not in results and rank not in errors):
                        # Its report may still be in the pipe: give it one more look.
                        try:
                            r2, ok2, pl2 = result_q.get(timeout=0.5)
                            (results if ok2 else errors)[r2] = pl2
                            if not ok2 and failed_at is None:
                                failed_at = time.monotonic()
                        except queue.Empty:
                            pass
                        if rank not in results and rank not in errors:
                            errors[rank] = (
                                f"worker died with exit code {p.exitcode} without reporting "
                                "(negative: killed by that signal; 1 before any report: see its "
                                "stderr, e.g. fn or args could not be unpickled in the worker)")
                            if failed_at is None:
                                failed_at = time.monotonic()
                continue
            if ok:
                results[rank] = payload
            else:
                errors[rank] = payload
                if failed_at is None:
                    failed_at = time.monotonic()

        hung = [r for r in range(world_size) if r not in results and r not in errors]
        for r in hung:
            if procs[r].is_alive():
                os.kill(procs[r].pid, signal.SIGUSR1)
        if hung:
            time.sleep(0.5)  # let faulthandler write the stacks
        for p in procs:
            # Workers that reported success get until the deadline (at least a few seconds) to
            # exit; the others are killed now.
            clean = not hung and not errors
            p.join(timeout=max(5.0, deadline - time.monotonic()) if clean else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)

        if errors or hung:
            lines = [f"{len(errors)} of {world_size} workers failed"
                     + (f", {len(hung)} did not finish" if hung else "")
                     + f" (timeout {timeout:.0f} s)"]
            for i, r in enumerate(errors):  # in the order the failures arrived
                first = " first" if i == 0 else ""
                lines.append(f"--- rank {r} failed{first}:\n{errors[r]}")
            for r in hung:
                why = ("ran past the timeout" if failed_at is None
                       else "was killed after another rank failed")
                lines.append(f"--- rank {r} {why}; its stacks:\n"
                             f"{_read(stack_files[r]) or '(no stack dump)'}")
            raise WorkerFailure("\n".join(lines))
        for r, p in enumerate(procs):
            if p.exitcode != 0:
                raise WorkerFailure(f"rank {r} reported success but exited with {p.exitcode}"
                                    + (" (killed: it did not exit before the timeout)"
                                       if p.exitcode == -signal.SIGKILL else ""))
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
            _kill_process_group(p.pid)
        result_q.close()
        result_q.cancel_join_thread()
        tmpdir.cleanup()
        del store
