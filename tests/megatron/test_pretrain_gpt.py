"""pretrain_gpt --fmoefy with real megatron-core over gloo, on each layout of the issue:
2 processes EP=2; 4 processes TP=2 with sequence parallel x EP=2; PP=2 x EP=2; DP=4 with EP=2
(expert-data-parallel replicas). Each trains a few iterations and checks the loss, the experts,
the dense weights and the gradient norm across ranks (ptg_workers.py)."""
import json
import re

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

from tests.dist_utils import run_workers  # noqa: E402
from tests.megatron import ptg_workers as w  # noqa: E402

LAYOUTS = {
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "tp2-sp-ep2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--expert-model-parallel-size", "2"]),
    "pp2-ep2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                    "--global-batch-size", "8"]),
    "dp4-ep2": (4, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_trains_and_stays_consistent(layout):
    world, extra = LAYOUTS[layout]
    out = run_workers(w.train_and_check, world, timeout=420, args=(extra, 8), threads_per_worker=1)
    assert len({o["norm"] for o in out}) == 1


def test_sequence_parallel_keeps_the_gate_loss_gradient():
    """TP=2 with sequence parallel trains as TP=2 without it: each rank's gate loss (here the
    router z-loss at weight 1, large enough to dominate the gradient norm) is its shard's, and the
    gate's gradients are summed over TP, so the loss counts 1 / TP on each rank. It once counted
    fully, and the norms were twice those without sequence parallel."""
    extra = ["--tensor-model-parallel-size", "2", "--balance-strategy", "naive",
             "--fmoe-z-loss-weight", "1.0", "--balance-loss-weight", "1.0",
             "--global-batch-size", "8", "--clip-grad", "1e9"]
    runs = {sp: run_workers(w.losses_and_norms, 2, timeout=420, threads_per_worker=1,
                            args=(extra + (["--sequence-parallel"] if sp else []), 3))[0]
            for sp in (False, True)}
    for key in ("losses", "norms"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-4), (key, runs)


def test_grad_norms_and_losses_match_the_one_process_run():
    """The gradient norm used for clipping (and the losses) of multi-rank layouts against one
    process holding the whole model and batch, where no norm needs de-duplicating: expert replicas
    (EP 1 < DP 2) and TP=2 x EP=2, both with the distributed optimizer. The model is the same at
    every layout (per-expert seeds; the vocabulary padded to the same size), the naive gate and a
    z-loss (which the aux-loss gradient path carries) route alike everywhere."""
    base = ["--balance-strategy", "naive", "--fmoe-z-loss-weight", "0.1",
            "--balance-loss-weight", "1.0", "--global-batch-size", "8",
            "--use-distributed-optimizer"]
    layouts = {
        "one": (1, ["--make-vocab-size-divisible-by", "128"]),
        "dp2-ep1": (2, ["--expert-model-parallel-size", "1",
                        "--make-vocab-size-divisible-by", "128"]),
        "tp2-ep2": (2, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                        "--make-vocab-size-divisible-by", "64"]),
    }
    runs = {name: run_workers(w.losses_and_norms, world, timeout=420, threads_per_worker=1,
                              args=(base + extra, 2))
            for name, (world, extra) in layouts.items()}
    ref = runs["one"][0]
    for name, out in runs.items():
        for rank_out in out:
            for key in ("losses", "norms"):
                assert rank_out[key] == pytest.approx(ref[key], rel=2e-6), (name, key, rank_out, ref)


@pytest.mark.parametrize("world,extra", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),  # and DP=2
])
def test_megatron_core_moe_under_tensor_parallel_keeps_its_copies_equal(world, extra):
    """megatron-core's own MoE (the e2e baseline) at TP=2 with sequence parallel: every copy of
    every parameter agrees after training (megatron_core_moe checks). With expert TP 1 its experts
    were whole on each TP rank but reduced over data parallel only, so the TP copies drifted
    apart (and a checkpoint kept TP rank 0's); expert TP is now TP, as megatron-core assumes."""
    out = run_workers(w.megatron_core_moe, world, timeout=420, threads_per_worker=1,
                      args=(extra, 4))
    assert len({tuple(o["losses"]) for o in out}) == 1


def test_default_corpus_with_a_cache_per_node(tmp_path):
    out = run_workers(w.node_local_caches, 2, timeout=300, args=(str(tmp_path),),
                      threads_per_worker=1)
    assert out[0]["losses"] == out[1]["losses"] and len(out[0]["losses"]) == 2
    assert out[0]["files"] == out[1]["files"] == [
        "stdlib_bytes_200000.bin", "stdlib_bytes_200000.idx", "stdlib_bytes_200000.tokenizer.json"]


def test_masked_softmax_fusion_only_with_its_kernels(monkeypatch, tmp_path):
    """On a GPU the config asks megatron-core for the fused masked softmax only where its kernels
    (Megatron-LM's fused_kernels, or apex) import: megatron-core imports them in the first bf16
    attention forward, and without them training died there with ImportError."""
    import importlib
    import importlib.util
    import sys

    from fastmoe_megatron.megatron import pretrain_gpt as ptg

    names = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
             "scaled_softmax_cuda")
    args = ptg.build_parser().parse_args(["--num-layers", "2", "--hidden-size", "64",
                                          "--num-attention-heads", "4", "--seq-length", "32",
                                          "--micro-batch-size", "2", "--bf16"])
    assert ptg.transformer_config(args, use_cuda=False).masked_softmax_fusion is False
    # Kernels that import; then one that is there but fails to load (a build for another torch).
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in names:
        (tmp_path / f"{m}.py").write_text("")
        monkeypatch.delitem(sys.modules, m, raising=False)
    importlib.invalidate_caches()
    assert ptg.fused_softmax_available()
    assert ptg.transformer_config(args, use_cuda=True).masked_softmax_fusion is True
    (tmp_path / f"{names[1]}.py").write_text("raise ImportError('undefined symbol')")
    monkeypatch.delitem(sys.modules, names[1], raising=False)
    assert not ptg.fused_softmax_available()
    assert ptg.transformer_config(args, use_cuda=True).masked_softmax_fusion is False
    (tmp_path / f"{names[1]}.py").unlink()
    monkeypatch.delitem(sys.modules, names[1], raising=False)
    importlib.invalidate_caches()
    if importlib.util.find_spec(names[1]) is None:  # not installed on this machine either
        assert not ptg.fused_softmax_available()
    for m in names:
        monkeypatch.delitem(sys.modules, m, raising=False)


@pytest.mark.parametrize("no_bias", [False, True])
def test_gpu_config_fuses_bias_gelu_only_with_biases(no_bias):
    """megatron-core refuses bias_activation_fusion without linear biases (ValueError in
    TransformerConfig); on a GPU --disable-bias-linear (the e2e benchmark's runs, and any
    --num-experts run) died there before training."""
    from fastmoe_megatron.megatron import pretrain_gpt as ptg

    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2"] + (["--disable-bias-linear"] if no_bias else [])
    config = ptg.transformer_config(ptg.build_parser().parse_args(argv), use_cuda=True)
    assert config.bias_activation_fusion is (not no_bias)
    assert config.add_bias_linear is (not no_bias)


def test_evaluation_on_the_valid_split():
    out = run_workers(w.evaluation, 2, timeout=420, threads_per_worker=1)
    for o in out:
        assert o["same_training"], "evaluating changed the training"
        assert o["iterations"] == [2, 4, 5], o  # every --eval-interval, and at the end
        assert o["exit_interval_at_end"] == [3, 5], o
        assert abs(o["valid"][-1] - o["brute_force"]) <= 1e-5 * o["brute_force"], o
        assert o["recorded_in_eval"] == {}, o
    assert out[0]["valid"] == out[1]["valid"]


def test_logged_learning_rate_is_the_steps():
    """Each log line's lr is the one its iteration's optimizer step used, as its loss and grad
    norm are that iteration's. It used to be read after the scheduler's step, i.e. the next
    iteration's: iteration 1 of a warm-up logged 5e-4 though it stepped with 0, and the last
    iteration logged a rate no step used."""
    (out,) = run_workers(w.logged_learning_rate, 1, timeout=300, threads_per_worker=1)
    # megatron-core's schedule, counted in samples: linear warm-up from 0 over 2 iterations, then
    # linear decay to --min-lr at iteration 5; iteration k + 1 steps with the rate after k.
    lr, min_lr = 1e-3, 1e-4
    expected = [lr * k / 2 for k in range(3)] + [lr - (lr - min_lr) * (k - 2) / 3 for k in (3, 4)]
    assert out["lrs"] == pytest.approx(expected, rel=1e-6, abs=1e-12), out
    assert out["logged"] == pytest.approx(expected, rel=1e-2, abs=1e-12), out
    # A run that stops between two progress lines (--exit-interval 3, --log-interval 4; a signal
    # or the time limit alike) shows the iterations since the last line before it exits: they
    # were dropped, and a preempted run's log ended up to --log-interval iterations early.
    assert len(out["stopped_losses"]) == 3, out
    assert [i for i, _ in out["stopped_logged"]] == [1, 3], out
    assert out["stopped_logged"][-1][1] == pytest.approx(out["stopped_losses"][-1], abs=1e-4)


@pytest.mark.parametrize("iters,extra", [(4, ["--save-interval", "2"]), (2, [])])
def test_a_checkpoint_due_is_saved_before_its_evaluation(tmp_path, iters, extra):
    """An evaluation that fails (here the valid split holds token ids beyond the vocabulary,
    read only when evaluating; a GPU's memory at the eval capacity fails the same way) used to
    come before the checkpoint of its iteration, periodic or the last: the run stopped and lost
    everything since the previous save. The checkpoint now comes first."""
    from fastmoe_megatron.megatron import checkpointing as ckpt

    proc = _run_with_a_bad_valid_split(
        tmp_path, ["--train-iters", str(iters), "--eval-interval", "2", "--eval-iters", "2",
                   "--save", "ck"] + extra)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "holds token id 300, beyond this run's vocabulary" in proc.stderr, proc.stderr[-3000:]
    assert "validation at iter" not in proc.stdout
    assert ckpt.latest_iteration(tmp_path / "ck") == 2, proc.stdout[-2000:]
    ckpt.verify(tmp_path / "ck", distributed=False)


def _run_with_a_bad_valid_split(tmp_path, argv, code=None):
    """pretrain_gpt in a subprocess on a corpus whose valid split (split 80,20: its last 10
    documents) holds token id 300, beyond the byte-level vocabulary: an evaluation fails, and
    only an evaluation reads it. ``code``: Python run instead of the module, with ``argv`` in
    sys.argv[1:]."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = Path(__file__).resolve().parents[2]
    builder = IndexedDatasetBuilder(str(tmp_path / "corpus.bin"), dtype=np.uint16)
    rng = np.random.default_rng(0)
    for i in range(50):
        doc = [300] * 300 if i >= 40 else rng.integers(0, 256, 300).tolist()
        builder.add_document(torch.tensor(doc + [256]), [301])
    builder.finalize(str(tmp_path / "corpus.idx"))
    argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--threads", "1",
            "--data-path", "corpus", "--split", "80,20,0"] + argv
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    command = ["-m", "fastmoe_megatron.megatron.pretrain_gpt"] if code is None else ["-c", code]
    return subprocess.run([sys.executable, *command, *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _scalars(folder) -> dict:
    """{tag: [(step, value), ...]} of the tensorboard event files in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_each_logged_figure_also_from_a_run_that_fails(tmp_path):
    """--tensorboard-dir gets every figure of the progress lines at its iteration, with the
    printed values; a run that raises (here its evaluation at iteration 2 reads bad token ids)
    has written those logged before, read back in the same process, as an in-process caller
    would (train() closes the writer also when training raises)."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e .[test])")
    code = ("import sys, json\n"
            "from fastmoe_megatron.megatron.pretrain_gpt import run\n"
            "from tests.megatron.test_pretrain_gpt import _scalars\n"
            "try:\n    run(sys.argv[1:])\nexcept Exception as exc:\n"
            "    print('raised', type(exc).__name__, flush=True)\n"
            "print('SCALARS', json.dumps(_scalars('tb')), flush=True)\n")
    proc = _run_with_a_bad_valid_split(
        tmp_path, ["--fmoefy", "--fmoe-num-experts", "2", "--train-iters", "4",
                   "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
                   "--tensorboard-dir", "tb"], code=code)
    assert proc.returncode == 0 and "raised DataConfigError" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-3000:]
    scalars = json.loads(proc.stdout.split("SCALARS ", 1)[1])
    for tag in ("lm loss", "balance loss", "grad norm", "learning rate", "tokens per second",
                "layer 1/balance loss", "layer 1/expert 0 load", "layer 1/expert 1 load"):
        assert [step for step, _ in scalars.get(tag, [])] == [1, 2], (tag, sorted(scalars))
    logged = [float(x) for x in re.findall(r"lm loss ([0-9.]+)", proc.stdout)]
    assert [round(v, 4) for _, v in scalars["lm loss"]] == logged[:2], proc.stdout[-2000:]
    loads = [v for tag in ("layer 1/expert 0 load", "layer 1/expert 1 load")
             for _, v in scalars[tag]]
    assert abs(loads[0] + loads[2] - 1) < 1e-6 and abs(loads[1] + loads[3] - 1) < 1e-6, loads


def test_a_run_after_one_that_failed_logs_only_its_own_expert_load(tmp_path):
    """In one process (an in-process caller), a run that raised between two progress lines left
    its balance losses and expert loads in the accumulators, and the next run's first progress
    line included them. Here the next run's lines equal those of a third, identical run."""
    code = ("import sys\n"
            "from fastmoe_megatron.megatron.pretrain_gpt import run\n"
            "try:\n"
            "    run(sys.argv[1:] + ['--train-iters', '4', '--log-interval', '4',\n"
            "                        '--eval-interval', '2', '--eval-iters', '1'])\n"
            "except Exception as exc:\n"
            "    print('raised', type(exc).__name__, flush=True)\n"
            "for _ in range(2):\n"
            "    print('RUN', flush=True)\n"
            "    run(sys.argv[1:] + ['--train-iters', '2', '--log-interval', '2'])\n")
    proc = _run_with_a_bad_valid_split(
        tmp_path, ["--fmoefy", "--fmoe-num-experts", "4", "--balance-strategy", "gshard"], code=code)
    assert proc.returncode == 0 and "raised DataConfigError" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-3000:]
    after_failure, fresh = [
        [re.sub(r"\|[^|]*tokens/s.*", "", line) for line in run.splitlines()
         if "expert load" in line or "balance loss" in line]
        for run in proc.stdout.split("RUN\n")[1:]]
    assert len(fresh) == 4 and after_failure == fresh, (after_failure, fresh)


@pytest.mark.parametrize("config,world,experts_per_rank", [
    ("tiny-cpu.args", 2, 2), ("gpt-125m-8e.args", 8, 1), ("gpt-1.3b-64e.args", 64, 2)])
def test_configs_parse_for_the_world_they_name(config, world, experts_per_rank):
    """Each configs/*.args, as the README and quickstart run it (at the world size its comment
    names), passes pretrain_gpt's parser and start-up checks, with the experts per rank it
    describes."""
    from pathlib import Path

    from fastmoe_megatron.megatron.pretrain_gpt import build_parser, validate_args

    path = Path(__file__).resolve().parents[2] / "configs" / config
    args = validate_args(build_parser().parse_args([f"@{path}"]), world)
    assert args.fmoefy and args.fmoe.num_experts // args.expert_model_parallel_size \
        == experts_per_rank
