"""fmoefy against megatron-core: equality with megatron-core's own MoELayer, wrappers, tags, the
layer spec, EP-aware dist_checkpointing, flag validation, and the multi-node launch script."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

from tests.dist_utils import run_workers  # noqa: E402
from tests.megatron import fmoefy_workers as w  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_matches_megatron_core_moelayer(gated):
    (diff,) = run_workers(w.matches_megatron_moelayer, 1, timeout=240, args=(gated,))
    assert diff < 1e-5


def test_version_check_and_its_override(monkeypatch):
    """fmoefy refuses an unchecked megatron-core, naming both ways to try anyway: an explicit
    megatron_version, or FMOE_MEGATRON_UNCHECKED=1 (which cpu_compat and the launcher honour too:
    pretrain_gpt --fmoefy used to stop here even with it set)."""
    from fastmoe_megatron.megatron import fmoefy as f

    assert f.check_version() == f.megatron_core_version()  # the installed, checked one
    monkeypatch.setattr(f, "megatron_core_version", lambda: "0.99.0")
    monkeypatch.delenv("FMOE_MEGATRON_UNCHECKED", raising=False)
    with pytest.raises(RuntimeError, match=r"found 0\.99\.0; pass megatron_version='0\.16' "
                                           r"\(or set FMOE_MEGATRON_UNCHECKED=1\)"):
        f.check_version()
    assert f.check_version("0.16") == "0.16"
    monkeypatch.setenv("FMOE_MEGATRON_UNCHECKED", "1")
    with pytest.warns(UserWarning, match="megatron-core 0.99.0 was not checked"):
        assert f.check_version() == "0.99.0"


def test_expert_init_reseeds_no_gpu_generator():
    run_workers(w.init_leaves_gpu_generators_alone, 1, timeout=240)


def test_glu_options_the_experts_lack_are_refused():
    (errors,) = run_workers(w.refuses_glu_options_it_lacks, 1, timeout=240)
    for field in ("glu_linear_offset", "activation_func_clamp_value"):
        assert f"do not implement the config's {field}" in errors[field], errors


def test_every_gate_matrix_gets_its_own_init():
    (stds,) = run_workers(w.gate_matrices_draw_their_own_numbers, 1, timeout=240)
    assert len(stds["noisy"]) == 2, stds  # w_gate and w_noise, told apart in the worker
    for gate, values in stds.items():
        assert values and all(abs(v - 0.02) < 0.005 for v in values), (gate, values)


def test_wrappers_tags_and_layer_spec():
    run_workers(w.fmoefy_wrappers_and_spec, 1, timeout=240)


def test_layer_spec_keeps_a_pre_mlp_norm_fused_into_the_dense_mlp():
    """A base spec with the pre-MLP norm fused into the dense MLP (Transformer Engine's) gets a
    standalone one, so the experts see normalised tokens (the spec once fed them raw)."""
    (out,) = run_workers(w.spec_keeps_a_fused_pre_mlp_norm, 1, timeout=240)
    for name in ("te_like", "local"):
        assert out[name]["norm"] != "IdentityOp", out
        assert out[name]["mean"] < 1e-4, out  # LayerNorm at init: zero mean, unit std per token
        assert all(abs(s - 1.0) < 0.05 for s in out[name]["std"]), out  # (up to eps)
    assert out["no_norm"]["norm"] == "IdentityOp", out


def test_moe_layers_take_the_models_dtype_and_ddp_wrapped_models_are_refused():
    (out,) = run_workers(w.fmoefy_matches_the_models_dtype_and_refuses_ddp, 1, timeout=240)
    for name in ("float16module",):
        assert out[name]["dtypes"] == ["torch.bfloat16"], out
        assert out[name]["finite"] and out[name]["expert_grads"], out
    assert "call fmoefy before wrapping the model in data parallel" in out["ddp"], out
    assert "DistributedDataParallel" in out["ddp"], out
    assert out["ddp_mlps"] == ["MLP", "MLP"], out  # refused before any layer was replaced
    assert "megatron-core's own MoELayer" in out["own_moe"], out
    assert out["own_moe_mlps"] == ["MoELayer", "MoELayer"], out


def test_layer_spec_moe_layers_know_their_layer_number():
    (out,) = run_workers(w.spec_layers_take_their_layer_numbers, 1, timeout=240)
    assert out["numbers"] == [1, 2] and out["layers"] == [1, 2], out
    assert out["load_sums"] == [1.0, 1.0], out


def test_group_counting_gates_refuse_tp_ranks_of_one_batch_in_the_ep_group():
    """Without sequence parallel the TP ranks share a batch; at TP=2 x EP=2 their experts'
    group is those ranks, and the switch / dc / swipe gates counted each token twice (capacity
    granted in rank order: routing unlike EP=1's; measured: other losses than EP=1)."""
    out = run_workers(w.group_counting_gates_under_tp_without_sp, 2, timeout=240,
                      threads_per_worker=1)[0]
    for gate in ("switch", "dc", "swipe"):
        msg = out[f"{gate}/False"]
        for part in (f"--balance-strategy {gate}", "--tensor-model-parallel-size 2 without "
                     "--sequence-parallel", "--expert-model-parallel-size 2",
                     "Add --sequence-parallel"):
            assert part in msg, (gate, msg)
        assert out[f"{gate}/True"] == "built", out
    for gate in ("gshard", "naive"):
        assert out[f"{gate}/False"] == out[f"{gate}/True"] == "built", out


def test_dist_checkpoint_ep2_restores_every_ranks_experts(tmp_path):
    run_workers(w.checkpoint_restores_experts, 2, timeout=420, args=(str(tmp_path / "ckpt"),),
                threads_per_worker=1)


@pytest.mark.parametrize("argv,flag", [
    (["--fmoefy"], "--fmoe-num-experts"),
    (["--fmoefy", "--fmoe-num-experts", "3", "--expert-model-parallel-size", "2"], "--fmoe-num-experts"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--balance-strategy", "switch"], "--fmoe-top-k 1"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--top-k", "5"], "--fmoe-top-k"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--balance-strategy", "gshard",
      "--fmoe-capacity-factor", "0"], "--fmoe-capacity-factor"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--fmoe-capacity-factor", "1.0"], "--balance-strategy"),
    (["--expert-model-parallel-size", "2"], "--fmoefy"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--expert-model-parallel-size", "3"],
     "--expert-model-parallel-size"),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size"),
    (["--sequence-parallel"], "--sequence-parallel"),
    (["--num-experts", "4"], "--disable-bias-linear"),
    (["--num-experts", "4", "--disable-bias-linear", "--fmoefy", "--fmoe-num-experts", "4"],
     "--fmoefy"),
    (["--num-experts", "4", "--disable-bias-linear", "--moe-router-topk", "5"],
     "--moe-router-topk"),
    (["--expert-model-parallel-size", "0"], "--expert-model-parallel-size"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size"),
    (["--pipeline-model-parallel-size", "-1"], "--pipeline-model-parallel-size"),
    (["--global-batch-size", "-4"], "--global-batch-size"),
    (["--log-interval", "0"], "--log-interval"),
    (["--train-iters", "0"], "--train-iters"),
    (["--lr-warmup-iters", "100", "--train-iters", "100"], "--lr-warmup-iters"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr"),
])
def test_bad_flags_name_the_flag(argv, flag):
    from fastmoe_megatron.megatron.pretrain_gpt import build_parser, validate_args

    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=re.escape(flag)):
        validate_args(args, 2)


def test_a_bad_flag_ends_the_command_with_its_message(capsys, monkeypatch):
    """The command line (``main``, what torchrun runs) prints the message once, on rank 0, with
    no traceback, and exits with argparse's status 2."""
    from fastmoe_megatron.megatron.pretrain_gpt import main

    monkeypatch.setenv("RANK", "0")
    assert main(["--fmoefy", "--fmoe-num-experts", "4", "--fmoe-top-k", "5"]) == 2
    err = capsys.readouterr().err
    assert "pretrain_gpt: error: --fmoe-top-k 5 must be between 1 and --fmoe-num-experts 4" in err
    assert "Traceback" not in err
    monkeypatch.setenv("RANK", "1")
    assert main(["--log-interval", "0"]) == 2
    assert "error" not in capsys.readouterr().err


def test_an_unwritable_save_folder_stops_before_training(tmp_path, capsys, monkeypatch):
    """--save under a file: the first save failed after all the training; now start-up fails."""
    from fastmoe_megatron.megatron.pretrain_gpt import main

    monkeypatch.setenv("RANK", "0")
    (tmp_path / "afile").write_text("")
    assert main(["--save", str(tmp_path / "afile" / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert f"pretrain_gpt: error: --save {tmp_path / 'afile' / 'ckpt'}: cannot write there" in err
    assert "Traceback" not in err


def test_default_threads_follow_the_cpu_affinity():
    """--threads defaults to the CPUs this process may use (taskset, cgroups, Slurm), shared by
    the local ranks, not to all of the machine's."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity here")
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from fastmoe_megatron.megatron.pretrain_gpt import usable_cpus; print(usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert out.stdout.strip() == "1", out.stderr[-2000:]


def run_tiny_dense(tmp_path, *extra):
    """``pretrain_gpt`` on a one-layer dense GPT in a fresh process (one thread)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FMOE_CACHE_DIR=os.environ.get(
        "FMOE_CACHE_DIR", str(tmp_path)))
    argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "1",
            "--default-corpus-bytes", "300000", "--threads", "1", *extra]
    return subprocess.run([sys.executable, "-m", "fastmoe_megatron.megatron.pretrain_gpt", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_divergence_stops_before_the_step_and_saves_nothing(tmp_path):
    """A dense run at LR 1e30 without clipping: its loss is NaN at iteration 2. It used to train
    on, save NaN checkpoints every --save-interval and move `latest` to them; now it stops at
    iteration 2 with a message, exit status 1, and nothing saved."""
    proc = run_tiny_dense(tmp_path, "--train-iters", "6", "--lr", "1e30", "--clip-grad", "0",
                          "--save", str(tmp_path / "ckpt"), "--save-interval", "1")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "training diverged at iteration 2: lm loss nan; stopped before the optimizer step" \
        in proc.stderr, proc.stderr[-4000:]
    # Iteration 1's weights gave the NaN: the message says its checkpoint holds them.
    assert (f"The checkpoint of iteration 1 in --save {tmp_path / 'ckpt'} holds the weights that "
            "gave it: resume from an earlier one") in proc.stderr, proc.stderr[-4000:]
    from fastmoe_megatron.megatron.checkpointing import latest_iteration

    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*"))
    assert saved == ["iter_0000001"], saved  # iteration 1's loss was finite
    assert latest_iteration(tmp_path / "ckpt") == 1


def test_a_save_folder_of_a_longer_run_is_announced_at_start(tmp_path):
    """A fresh run (a typo in --load, or none) into a --save folder holding a run up to iteration
    30 replaces its checkpoints and moves `latest` back: said before training, not only at the
    first save."""
    from fastmoe_megatron.megatron.checkpointing import LATEST

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / LATEST).write_text("30")
    proc = run_tiny_dense(tmp_path, "--train-iters", "1", "--save", str(tmp_path / "ckpt"),
                          "--load", str(tmp_path / "typo"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (f"warning: --save {tmp_path / 'ckpt'} holds a run up to iteration 30, and this run "
            f"starts at iteration 0 (from --load {tmp_path / 'typo'})") in proc.stderr, proc.stderr


def test_a_finished_run_started_again_says_so(tmp_path):
    """Resuming a run that already reached --train-iters trains nothing; it used to end without a
    word, as if it had trained."""
    ckpt = str(tmp_path / "ckpt")
    first = run_tiny_dense(tmp_path, "--train-iters", "1", "--save", ckpt)
    assert first.returncode == 0, first.stderr[-4000:]
    again = run_tiny_dense(tmp_path, "--train-iters", "1", "--save", ckpt, "--load", ckpt)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (f"pretrain_gpt: the checkpoint of --load {ckpt} is at iteration 1, and --train-iters "
            "is 1: nothing to train") in again.stdout, again.stdout
    assert "iter " not in again.stdout


def test_swiglu_without_biases_reaches_the_experts(tmp_path):
    """--swiglu --disable-bias-linear --fmoefy: the experts are gated (htoh4 of 2 x ffn rows) and
    have no biases, as the dense MLP they replace; as saved in the checkpoint's manifest."""
    proc = run_tiny_dense(tmp_path, "--ffn-hidden-size", "64", "--train-iters", "2", "--swiglu",
                          "--disable-bias-linear", "--fmoefy", "--fmoe-num-experts", "4",
                          "--save", str(tmp_path / "ckpt"), "--ckpt-format", "torch")
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((tmp_path / "ckpt" / "iter_0000002" / "fmoe_checkpoint.json").read_text())
    experts = {k.split("experts.")[1]: v["shape"] for k, v in manifest["model"].items()
               if ".mlp.moe.experts." in k}
    assert experts == {"htoh4.weight": [1, 4, 128, 32], "h4toh.weight": [1, 4, 32, 64]}, experts
    # merge -> plain FMoETransformerMLP layers of the same kind (it took 2 x ffn for the width and
    # built biased, ungated layers, which then failed to load).
    import torch

    from fastmoe_megatron.megatron import reshard

    merged = reshard.merge(tmp_path / "ckpt", tmp_path / "merged.pt")
    assert merged["fmoe"]["d_hidden"] == 64 and merged["fmoe"]["gated_linear_unit"] is True
    assert merged["fmoe"]["bias"] is False
    (layer,) = reshard.build_fmoe_layers(reshard.load_merged(tmp_path / "merged.pt")).values()
    assert layer.experts.gated_linear_unit and layer.experts.htoh4.bias is None
    # Numerically the model's MoE layer: pretrain_gpt's model, loaded from the checkpoint, on the
    # same input (a shape check passed with any activation).
    from tests.megatron import ckpt_workers

    argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--default-corpus-bytes", "300000",
            "--threads", "1", "--ffn-hidden-size", "64", "--train-iters", "2", "--swiglu",
            "--disable-bias-linear", "--fmoefy", "--fmoe-num-experts", "4", "--ckpt-format",
            "torch", "--load", str(tmp_path / "ckpt"), "--skip-train"]
    (want,) = run_workers(ckpt_workers.moe_outputs_of, 1, timeout=300, threads_per_worker=1,
                          args=(argv,))[0]
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(9))
    layer.eval()
    with torch.no_grad():
        got = layer(x)
    assert float((got - torch.from_numpy(want)).abs().max()) <= 1e-6
    assert float(got.abs().max()) > 0


def test_megatron_core_moe_flag_trains(tmp_path):
    """--num-experts: the same GPT with megatron-core's own MoELayer (the benchmark's e2e
    baseline) trains in one process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FMOE_CACHE_DIR=os.environ.get(
        "FMOE_CACHE_DIR", str(tmp_path)))
    argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
            "--ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2",
            "--train-iters", "3", "--log-interval", "1", "--default-corpus-bytes", "300000",
            "--threads", "1", "--disable-bias-linear", "--num-experts", "4",
            "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall"]
    proc = subprocess.run([sys.executable, "-m", "fastmoe_megatron.megatron.pretrain_gpt", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "megatron-core MoE: 4 experts top-2, alltoall dispatcher" in proc.stdout, proc.stdout
    assert "iter      3/3" in proc.stdout
    # Its aux loss is megatron-core's own: no "balance loss 0.0000" of fastmoe's gates.
    assert "balance loss" not in proc.stdout, proc.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", ["pretrain_gpt_multinode.sh", "pretrain_megatron_lm.sh"])
def test_launch_scripts_need_a_node_rank_or_a_rendezvous(script, tmp_path):
    """Both scripts take torchrun's node options from scripts/torchrun_nodes.sh: several nodes
    without NODE_RANK or RDZV_ENDPOINT stop before torchrun starts, naming the script."""
    target = tmp_path / "pretrain_gpt.py"
    target.write_text("raise SystemExit('must not run')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "RDZV_ENDPOINT")}
    env.update(NNODES="3", NPROC_PER_NODE="1", FMOE_VENV=sys.prefix)
    args = [str(target)] if script == "pretrain_megatron_lm.sh" else []
    out = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{script}: with NNODES=3 set NODE_RANK (0..2) or RDZV_ENDPOINT" in out.stderr


@pytest.mark.parametrize("nnodes,node_rank,message", [
    ("2", "2", "NODE_RANK must be one of 0..1 (NNODES=2), got '2'"),
    ("2", "-1", "NODE_RANK must be one of 0..1 (NNODES=2), got '-1'"),
    ("2", "one", "NODE_RANK must be one of 0..1 (NNODES=2), got 'one'"),
    ("0", "0", "NNODES must be a positive integer with NODE_RANK (MIN:MAX needs RDZV_ENDPOINT), got '0'"),
    ("two", "0", "NNODES must be a positive integer with NODE_RANK (MIN:MAX needs RDZV_ENDPOINT), got 'two'"),
])
def test_launch_scripts_refuse_node_ranks_out_of_range(nnodes, node_rank, message, tmp_path):
    """A NODE_RANK outside 0..NNODES-1 used to start torchrun, which then waited out its
    rendezvous timeout (minutes) for nodes that never come."""
    env = {k: v for k, v in os.environ.items() if k != "RDZV_ENDPOINT"}
    env.update(NNODES=nnodes, NODE_RANK=node_rank, NPROC_PER_NODE="1", FMOE_VENV=sys.prefix)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "pretrain_gpt_multinode.sh")], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"pretrain_gpt_multinode.sh: {message}" in out.stderr


def test_multinode_script_two_nodes_on_localhost(tmp_path):
    """scripts/pretrain_gpt_multinode.sh as 2 nodes x 1 process on 127.0.0.1 (static rendezvous),
    started from another folder: relative paths in the arguments (an @file, --save) are the
    caller's, not the checkout's."""
    env = dict(os.environ, NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), FMOE_VENV=sys.prefix)
    env.pop("PYTHONPATH", None)  # the script makes the checkout importable itself
    (tmp_path / "tiny.args").write_text("\n".join(w.TINY) + "\n")
    args = ["@tiny.args", "--train-iters", "4", "--threads", "1", "--log-interval", "2",
            "--save", "ckpt", "--save-interval", "4"]
    procs = [subprocess.Popen(["bash", str(ROOT / "scripts" / "pretrain_gpt_multinode.sh"), *args],
                              cwd=tmp_path, env=dict(env, NODE_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {r} exited with {p.returncode}:\n{out[-3000:]}"
    assert "2 processes" in outs[0] and "EP=2" in outs[0], outs[0][-2000:]
    assert re.search(r"lm loss [0-9.]+ -> [0-9.]+", outs[0]), outs[0][-2000:]
    assert (tmp_path / "ckpt").is_dir() and not (ROOT / "ckpt").exists()
