#!/usr/bin/env python
"""Soak test of checkpoint/resume: kill ranks at random points, restart, compare with a run that
never stopped.

    python scripts/soak_test.py                       # 40 iterations, 6 kills, 2 processes
    python scripts/soak_test.py --iters 12 --save-interval 3 --kills 3 --report out.json

It trains the tiny pretrain_gpt config (dropout, GShard random routing and aux-loss-free expert
bias on, so the RNG and balancing state matter) under ``torchrun`` on the CPU:

1. once without interruption (the reference);
2. again, with ``--kills`` injected faults (``FMOE_FAULT_INJECT``, see
   ``fastmoe_megatron/megatron/checkpointing.py``): a random rank SIGKILLs itself at a random
   point, ``step`` (between the backward pass and the optimizer step of a random iteration),
   ``save`` (after it wrote its part of a checkpoint, before the commit) or ``commit`` (rank 0,
   after the checkpoint folder was renamed, before ``latest`` names it). The first kills cover
   each point once. After each kill the script checks that the job ended, that ``latest`` names
   the checkpoint expected (the one before the interrupted save), that this checkpoint verifies
   (every file, size and checksum), and then restarts with ``--load``, checking that the run
   resumed from that iteration;
3. compares the final model weights of both runs, bitwise.

Exit status 0 when every check passed; ``--report`` writes what happened as JSON, however the
script ends. A launch that runs past ``--timeout`` is ended whole (torchrun and its workers) and
counts as a failure. Not part of CI; ``tests/megatron/test_checkpoints.py`` runs a short setting
(3 kills).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2",
        "--lr", "5e-3", "--log-interval", "1000", "--default-corpus-bytes", "300000",
        "--fmoefy", "--fmoe-num-experts", "4", "--balance-strategy", "gshard",
        "--balance-loss-weight", "0.01", "--fmoe-expert-bias-update-rate", "0.01",
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--seed", "1234",
        "--threads", "1"]
POINTS = ("step", "save", "commit")


TIMED_OUT = -9999  # launch()'s exit code for a job that ran past its timeout


def launch(nproc: int, argv: list[str], fault: str | None, timeout: float, log: Path) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("FMOE_FAULT_INJECT", None)
    if fault:
        env["FMOE_FAULT_INJECT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "--max-restarts=0", "-m",
           "fastmoe_megatron.megatron.pretrain_gpt", *argv]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun's workers run in sessions of their own: killing torchrun alone left them
            # training, and writing into the folder of the next launch. On SIGTERM its agent
            # ends them first.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = TIMED_OUT
    return code, log.read_text(errors="replace")


def _exit_text(code: int, timeout: float) -> str:
    return f"ran past --timeout {timeout:g} s" if code == TIMED_OUT else f"exited with {code}"


def plan_kills(n: int, iters: int, save_interval: int, nproc: int, rng: random.Random) -> list:
    """(point, iteration, rank, latest checkpoint left) of each kill; each kill comes after the
    checkpoint the previous one left."""
    saves = [s for s in range(save_interval, iters + 1, save_interval)] + \
        ([iters] if iters % save_interval else [])
    order = list(POINTS)
    rng.shuffle(order)
    kills, latest, pos = [], 0, 0
    for i in range(n):
        if latest >= iters:
            break
        point = order[i] if i < len(order) else rng.choice(POINTS)
        # spread the kills: this one falls in the next 1/(kills left) of the rest of the run
        lo = max(latest + 1, pos + 1)
        hi = max(lo + 1, pos + -(-(iters - pos) // (n - i)))
        if point == "step":
            # at iteration > latest + 1 when possible, so that the restart redoes some steps
            it = rng.randint(min(max(lo, latest + 2), iters), min(hi, iters))
            rank = rng.randrange(nproc)
            latest = max([s for s in saves if s < it] + [latest])
        else:
            later = [s for s in saves if s > latest]
            choices = [s for s in later if lo <= s <= hi] or [s for s in later if s >= lo][:1] \
                or later[-1:]
            it = rng.choice(choices)
            rank = 0 if point == "commit" else rng.randrange(nproc)
            # the interrupted save is lost; the run saved the ones before it
            latest = max([s for s in saves if s < it] + [latest])
        kills.append((point, it, rank, latest))
        pos = it
    return kills


def final_weights(root: Path) -> dict:
    from fastmoe_megatron.megatron.checkpointing import load_model_tensors

    tensors, _ = load_model_tensors(root)
    return tensors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--save-interval", type=int, default=4)
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--seed", type=int, default=None, help="kill schedule seed (default: random)")
    p.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist", "torch"])
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    p.add_argument("--report", default=None, help="write the report here (JSON)")
    p.add_argument("extra", nargs="*", help="more pretrain_gpt flags (after --)")
    args = p.parse_args(argv)
    for flag, least in (("nproc", 1), ("iters", 1), ("save_interval", 1), ("kills", 0)):
        if getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    if not args.timeout > 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fmoe_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    base = TINY + ["--train-iters", str(args.iters), "--save-interval", str(args.save_interval),
                   "--ckpt-format", args.ckpt_format, *args.extra]
    report = {"seed": seed, "iters": args.iters, "save_interval": args.save_interval,
              "nproc": args.nproc, "format": args.ckpt_format, "segments": [], "ok": False}
    failures = []

    def say(msg):
        print(f"soak: {msg}", flush=True)

    t0 = time.time()
    try:
        _soak(args, base, work, rng, report, failures, say)
    except BaseException as exc:
        failures.append(f"stopped by {type(exc).__name__}: {exc}")
        raise
    finally:  # the report, however it ended (a failed launch, an exception, ^C)
        report["failures"] = failures
        report["ok"] = not failures and report.get("final_weights_equal", False)
        report["seconds"] = round(time.time() - t0, 1)
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1))
    say(("PASS" if report["ok"] else "FAIL") + f" in {report['seconds']:.0f} s"
        + "".join(f"\n  - {f}" for f in failures))
    if args.workdir is None and report["ok"]:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


def _soak(args, base, work: Path, rng, report: dict, failures: list, say) -> None:
    """The reference run, the interrupted segments and the comparison; what goes wrong is added
    to ``failures``, what happened to ``report``."""
    t0 = time.time()
    ref_root, run_root = work / "reference", work / "interrupted"
    for d in (ref_root, run_root):
        shutil.rmtree(d, ignore_errors=True)
    code, _ = launch(args.nproc, base + ["--save", str(ref_root)], None, args.timeout,
                     work / "reference.log")
    if code != 0:
        failures.append(f"the uninterrupted run {_exit_text(code, args.timeout)}; see "
                        f"{work / 'reference.log'}")
        return
    say(f"reference run done in {time.time() - t0:.0f} s")

    from fastmoe_megatron.megatron import checkpointing as ckpt

    kills = plan_kills(args.kills, args.iters, args.save_interval, args.nproc, rng)
    report["kills"] = len(kills)
    say(f"kill schedule (seed {report['seed']}): "
        + ", ".join(f"{p}@{i} rank {r}" for p, i, r, _ in kills))
    expected_resume = 0
    for n, fault in enumerate(kills + [None]):
        t = time.time()
        spec = None if fault is None else f"{fault[0]}:{fault[1]}:{fault[2]}:kill"
        code, out = launch(args.nproc, base + ["--save", str(run_root), "--load", str(run_root)],
                           spec, args.timeout, work / f"segment{n}.log")
        seg = {"fault": spec, "returncode": code, "seconds": round(time.time() - t, 1)}
        report["segments"].append(seg)
        if code == TIMED_OUT:
            failures.append(f"segment {n} {_exit_text(code, args.timeout)}; see "
                            f"{work / f'segment{n}.log'}")
            return
        m = re.search(r"checkpoint: resumed from .+ \(iteration (\d+), ", out)  # (paths: spaces)
        seg["resumed_from"] = int(m.group(1)) if m else 0
        if seg["resumed_from"] != expected_resume:
            failures.append(f"segment {n}: resumed from {seg['resumed_from']}, expected {expected_resume}")
        if fault is None:
            if code != 0:
                failures.append(f"segment {n} (no fault) exited with {code}")
        else:
            point, it, rank, expected = fault
            injected = f"fault injection: kill on rank {rank} at '{point}' of iteration {it}" in out
            seg["injected"] = injected
            if not injected or code == 0:
                failures.append(f"segment {n}: the fault {spec} did not end the job (exit {code})")
            latest = ckpt.latest_iteration(run_root) or 0
            seg.update(latest=latest, expected_latest=expected)
            if latest != expected:
                failures.append(f"segment {n}: latest is {latest} after {spec}, expected {expected}")
            if latest:
                try:
                    ckpt.verify(ckpt.checkpoint_dir(run_root, latest), distributed=False)
                    seg["latest_verifies"] = True
                except ckpt.CheckpointError as exc:
                    seg["latest_verifies"] = False
                    failures.append(f"segment {n}: the latest checkpoint does not verify: {exc}")
            if point == "save":
                seg["partial_left"] = (run_root / f"iter_{it:07d}.tmp").is_dir()
            if point == "commit":
                seg["committed_but_not_latest"] = ckpt.checkpoint_dir(run_root, it).is_dir()
            expected_resume = latest
        say(f"segment {n}: {json.dumps(seg)}")

    try:
        a, b = final_weights(ref_root), final_weights(run_root)
    except ckpt.CheckpointError as exc:
        failures.append(f"the final weights cannot be compared: {exc}")
        return
    diff = [k for k in a if k not in b or not (a[k].shape == b[k].shape and bool((a[k] == b[k]).all()))]
    report["final_weights_equal"] = not diff and a.keys() == b.keys()
    report["tensors_compared"] = len(a)
    if not report["final_weights_equal"]:
        failures.append(f"final weights differ from the uninterrupted run: {diff[:5]}")
    say(f"{len(kills)} kills; final weights "
        + ("equal" if report["final_weights_equal"] else "DIFFERENT") + f" ({len(a)} tensors)")


if __name__ == "__main__":
    sys.exit(main())
