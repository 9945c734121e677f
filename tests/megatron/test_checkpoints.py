"""Checkpoints that survive: bitwise resume (torch_dist and per-rank torch formats, pretrain_gpt
and the fmoefy API), resharding across expert-parallel sizes (at load, with the reshard command,
merged into one file for plain FMoETransformerMLP), atomic saves under kills, integrity and
weights_only checks, clear errors for bad input, a dying worker, and the soak script's short
setting. Workers: ckpt_workers.py."""
import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

import torch  # noqa: E402

from tests.dist_utils import run_workers  # noqa: E402
from tests.megatron import ckpt_workers as w  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-6


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def source(work):
    """EP=2, 2 processes: resume equality in both formats and the fmoefy API; the checkpoints at
    iteration 3 and the reference outputs are the sources of the reshard tests."""
    roots = {"dist": str(work / "dist"), "torch": str(work / "torch"), "own": str(work / "own")}
    (ref,) = run_workers(w.trained_checkpoints, 2, timeout=600, threads_per_worker=1,
                         args=(roots["dist"], roots["torch"], roots["own"]))[:1]
    return {"roots": roots, "ref": ref}


# --------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_resume_is_bitwise(source, fmt):
    """6 iterations vs 3 + save + resume 3 (EP=2, dropout, random routing, expert bias): the
    worker asserts bitwise-equal losses and final weights, and that --no-load-rng differs."""
    losses = source["ref"]["losses"][fmt]
    assert len(losses) == 6 and all(x == x for x in losses)
    from fastmoe_megatron.megatron import checkpointing as ckpt

    manifest = ckpt.verify(Path(source["roots"]["dist" if fmt == "torch_dist" else "torch"]),
                           distributed=False)
    assert manifest["format"] == fmt and manifest["iteration"] == 3
    assert manifest["contents"] == {"optimizer": True, "scheduler": True, "rng": True,
                                    "distributed_optimizer": False}
    # The aux-loss-free balancing state is part of the checkpoint.
    assert any(k.endswith("moe.gate.expert_bias") for k in manifest["model"])
    if fmt == "torch":
        files = sorted(manifest["files"])
        assert "mp_rank_00_000/model_optim_rng.pt" in files
        assert "mp_rank_00_001/model_optim_rng.pt" in files


def test_resume_is_bitwise_with_the_distributed_optimizer(source):
    """The same with megatron-core's distributed optimizer (EP=1, DP=2, torch_dist)."""
    from fastmoe_megatron.megatron import checkpointing as ckpt

    assert len(source["ref"]["losses"]["distributed_optimizer"]) == 6
    manifest = ckpt.verify(Path(source["roots"]["dist"] + "_distopt"), distributed=False)
    assert manifest["contents"]["distributed_optimizer"] is True


def test_fmoefy_api_save_fmoe_load_fmoe(source):
    """A user's own loop (megatron-core GPT fmoefy'd, torch Adam, EP=2): 4 steps vs 2 + save_fmoe
    + load_fmoe into a fresh model + 2, bitwise (asserted in the worker)."""
    assert len(source["ref"]["fmoefy"]) == 4


# ------------------------------------------------------------------------------ resharding

@pytest.fixture(scope="module")
def at_ep1(source, work):
    """The reshard command (torch format, EP=2 -> EP=1) and then one process at EP=1: loads of
    every source, the merge, and the bad loads."""
    roots = source["roots"]
    cli = work / "cli_ep1"
    t = time.time()
    out = subprocess.run([sys.executable, "-m", "fastmoe_megatron.megatron.reshard", "reshard",
                          "--load", roots["torch"], "--save", str(cli),
                          "--expert-model-parallel-size", "1", "--ckpt-format", "torch"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cli_seconds = time.time() - t
    corrupt = work / "corrupt"
    shutil.copytree(roots["dist"], corrupt)
    victim = sorted((corrupt / "iter_0000003").glob("*.distcp"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    # A root whose latest file is gone, and a checkpoint folder without its manifest.
    untracked = work / "untracked"
    shutil.copytree(roots["dist"], untracked)
    (untracked / "latest_checkpointed_iteration.txt").unlink()
    shutil.copytree(untracked / "iter_0000003", untracked / "iter_0000002")
    # A run killed between committing its first checkpoint and writing the latest file (with the
    # .tmp folder of a save that did not finish).
    first = work / "first_save_killed"
    shutil.copytree(roots["dist"], first)
    (first / "latest_checkpointed_iteration.txt").unlink()
    (first / "iter_0000005.tmp").mkdir()
    partial = work / "partial"
    shutil.copytree(roots["dist"], partial)
    (partial / "iter_0000003" / "fmoe_checkpoint.json").unlink()
    # A manifest as written before the architecture ("arch") was recorded in it.
    old_manifest = work / "old_manifest"
    shutil.copytree(roots["dist"], old_manifest)
    path = old_manifest / "iter_0000003" / "fmoe_checkpoint.json"
    manifest = json.loads(path.read_text())
    manifest.pop("arch", None)
    path.write_text(json.dumps(manifest))
    (result,) = run_workers(
        w.ep1_suite, 1, timeout=600, threads_per_worker=1,
        args=([roots["dist"], roots["torch"], str(cli)], source["ref"], str(work / "ep1"),
              str(work / "merged.pt"), str(corrupt)))
    result["cli_seconds"] = cli_seconds
    result["victim"] = str(victim)
    return result


def test_reshard_ep2_to_ep1_at_load(at_ep1, source):
    """Both formats load at EP=1 (automatic resharding; the worker also checks every weight and
    the experts' Adam state): the fixed-batch outputs equal the EP=2 model's."""
    diffs = at_ep1["diffs"]
    assert diffs[source["roots"]["dist"]] <= TOL, diffs
    assert diffs[source["roots"]["torch"]] <= TOL, diffs


def test_reshard_command_writes_a_checkpoint_for_another_ep_size(at_ep1, work):
    """python -m fastmoe_megatron.megatron.reshard reshard: torch format EP=2 -> EP=1 files."""
    from fastmoe_megatron.megatron import checkpointing as ckpt

    manifest = ckpt.verify(work / "cli_ep1", distributed=False)
    assert manifest["layout"]["ep"] == 1 and manifest["format"] == "torch"
    assert sorted(manifest["files"]) == ["mp_rank_00/model_optim_rng.pt"]
    assert at_ep1["diffs"][str(work / "cli_ep1")] <= TOL
    # Its RNG states would be the reshard processes' fresh ones (--no-load-rng): it holds none,
    # and a resume from it keeps its own, saying so (it used to "restore" those).
    assert manifest["contents"]["rng"] is False
    note = (f"checkpoint: {work / 'cli_ep1' / 'iter_0000003'} holds no RNG states; this run "
            "keeps its own (from --seed)")
    assert at_ep1["rng_note"] == [note], at_ep1["rng_note"]


def test_reshard_without_the_optimizer_says_so(source, work):
    """The distributed optimizer's state does not reshard over EP, so resharding its checkpoint
    takes --no-load-optim; the new checkpoint then holds no optimizer state, and its manifest says
    so (it once saved the fresh optimizer as if it were the run's, and the next load reset Adam
    without a warning)."""
    from fastmoe_megatron.megatron import checkpointing as ckpt

    src, out = source["roots"]["dist"] + "_distopt", work / "distopt_ep2"
    cmd = [sys.executable, "-m", "fastmoe_megatron.megatron.reshard", "reshard", "--load", src,
           "--save", str(out), "--expert-model-parallel-size", "2"]
    refused = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--no-load-optim" in refused.stdout + refused.stderr
    done = subprocess.run(cmd + ["--no-load-optim"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = ckpt.verify(out, distributed=False)
    assert manifest["layout"]["ep"] == 2
    assert manifest["contents"]["optimizer"] is False
    assert manifest["contents"]["distributed_optimizer"] is False
    assert manifest["contents"]["scheduler"] is True
    assert manifest["contents"]["rng"] is False


@pytest.mark.parametrize("ep,named", [("0", "--expert-model-parallel-size must be >= 1"),
                                      ("3", "--fmoe-num-experts 4")])
def test_reshard_to_a_bad_layout_fails_before_starting_processes(source, work, capsys, ep, named):
    """EP=0 started 0 processes and then reported no checkpoint; EP=3 (4 experts) started 3 that
    failed. Both are flag errors now, before any process starts."""
    from fastmoe_megatron.megatron import reshard

    out = work / f"bad_ep{ep}"
    assert reshard.main(["reshard", "--load", source["roots"]["torch"], "--save", str(out),
                         "--expert-model-parallel-size", ep]) == 2
    err = capsys.readouterr()
    assert named in err.err and "local CPU processes" not in err.out, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["ck", "iter_run"])  # a root named like a checkpoint folder
@pytest.mark.parametrize("load,save", [("", ""), ("", "iter_0000003"),
                                       ("iter_0000003", "iter_0000003"),
                                       ("iter_0000003", "iter_0000003/inner"),
                                       ("../link", "")])  # a symlink to the source folder
def test_reshard_refuses_to_write_over_its_input(source, tmp_path, capsys, load, save, name):
    """--save on the --load root replaced the source checkpoint (same iteration) with the new
    layout's; --save inside the source folder nested a checkpoint in it."""
    from fastmoe_megatron.megatron import reshard

    root = tmp_path / name
    shutil.copytree(source["roots"]["torch"], root)
    (tmp_path / "link").symlink_to(root / "iter_0000003")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert reshard.main(["reshard", "--load", str(root / load), "--save", str(root / save),
                         "--expert-model-parallel-size", "1"]) == 2
    assert "would write over --load" in capsys.readouterr().err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_a_root_named_like_a_checkpoint_folder_loads(source, tmp_path):
    """Any path named iter_* was taken for a checkpoint folder: a root named iter_run could be
    saved into, but never loaded ("fmoe_checkpoint.json is missing")."""
    from fastmoe_megatron.megatron import checkpointing as ckpt

    root = tmp_path / "iter_run"
    shutil.copytree(source["roots"]["torch"], root)
    assert ckpt.resolve(root) == root / "iter_0000003"
    assert ckpt.verify(root, distributed=False)["iteration"] == 3
    tensors, _ = ckpt.load_model_tensors(root)
    assert any(".mlp.moe.experts." in k for k in tensors)


@pytest.mark.parametrize("held", ["iter_0000007", "iter_0000003.old",
                                  "latest_checkpointed_iteration.txt"])
def test_reshard_refuses_a_save_holding_checkpoints(source, tmp_path, capsys, held):
    """A --save holding a run's checkpoints was written into without a word: the new checkpoint
    replaced one of the same iteration, and the latest file moved to it (the warning about a
    newer iteration stayed in the processes' logs). Now a flag error naming --save and --force,
    before any process starts."""
    from fastmoe_megatron.megatron import reshard

    out = tmp_path / "out"
    out.mkdir()
    if held.startswith("iter_"):
        shutil.copytree(Path(source["roots"]["torch"]) / "iter_0000003", out / held)
    else:
        (out / held).write_text("7")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert reshard.main(["reshard", "--load", source["roots"]["torch"], "--save", str(out),
                         "--expert-model-parallel-size", "1"]) == 2
    err = capsys.readouterr()
    assert err.err.startswith(f"error: --save {out} already holds checkpoints ({held}): ")
    assert "--force" in err.err and len(err.err.splitlines()) == 1, err.err
    assert "local CPU processes" not in err.out
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_reshard_force_writes_into_a_save_and_repeats_warnings(source, tmp_path):
    """--force writes into a --save that holds a newer checkpoint (iteration 5); the warning that
    its latest file moves back to iteration 3, printed by the process of the new layout, reaches
    reshard's own output (it was dropped with that process's log)."""
    from fastmoe_megatron.megatron import checkpointing as ckpt

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(Path(source["roots"]["torch"]) / "iter_0000003", out / "iter_0000005")
    (out / "latest_checkpointed_iteration.txt").write_text("5")
    done = subprocess.run([sys.executable, "-m", "fastmoe_megatron.megatron.reshard", "reshard",
                           "--load", source["roots"]["torch"], "--save", str(out), "--force",
                           "--expert-model-parallel-size", "1", "--ckpt-format", "torch"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (f"warning: --save {out} holds iteration 5, newer than this save's 3; its latest "
            "checkpoint will be iteration 3") in done.stderr.splitlines(), done.stderr[-3000:]
    assert ckpt.latest_iteration(out) == 3 and (out / "iter_0000005").is_dir()


def test_reshard_timeout_ends_with_a_short_message(source, tmp_path, capsys):
    """--timeout ran out with a traceback of subprocess.TimeoutExpired: now one line naming
    --timeout and the rank, and what that process had printed; exit status 1."""
    from fastmoe_megatron.megatron import reshard

    out = tmp_path / "out"
    code = reshard.main(["reshard", "--load", source["roots"]["torch"], "--save", str(out),
                         "--expert-model-parallel-size", "1", "--timeout", "0.5"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: reshard: rank 0 did not finish within --timeout 0.5 s (killed); "
                          "its last lines:\n"), err
    assert "Traceback" not in err and len(err) < 2500, err


@pytest.mark.parametrize("command,load,extra,want", [
    ("reshard", "nothing", [], "--load {nothing} does not exist"),
    ("reshard", "a_file", [], "--load {a_file} is not a folder"),
    ("merge", "nothing", [], "--load {nothing} does not exist"),
    ("verify", "a_file", [], "--load {a_file} is not a folder"),
    ("info", "nothing", [], "--load {nothing} does not exist"),
    ("reshard", "src", ["--bogus-flag", "3"], "unrecognized arguments: --bogus-flag 3"),
    ("reshard", "src", ["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    ("reshard", "src", ["--world-size", "3", "--expert-model-parallel-size", "2"],
     "--world-size 3 does not fit TP=1 PP=1 EP=2 (the default, 2, does): "
     "--expert-model-parallel-size")])
def test_reshard_cli_errors_name_the_flag(source, tmp_path, capsys, command, load, extra, want):
    """--load of a missing path or of a file said "holds no checkpoint"; a flag that neither
    reshard nor pretrain_gpt knows (or a bad value of pretrain_gpt's) printed pretrain_gpt's
    whole usage; --world-size 3 with EP=2 blamed --expert-model-parallel-size alone. Each is one
    line naming the flag, exit status 2, before any process starts."""
    from fastmoe_megatron.megatron import reshard

    (tmp_path / "a_file").write_text("x")
    paths = {"nothing": str(tmp_path / "nothing"), "a_file": str(tmp_path / "a_file"),
             "src": source["roots"]["torch"]}
    out = tmp_path / "out"
    argv = [command, "--load", paths[load]]
    argv += {"merge": ["--output", str(out)], "reshard": [
        "--save", str(out), "--expert-model-parallel-size", "1"]}.get(command, [])
    assert reshard.main(argv + extra) == 2
    err = capsys.readouterr()
    assert err.err.startswith("error: " + want.format(**paths)), err.err
    assert len(err.err.splitlines()) == 1 and "usage" not in err.err, err.err
    assert "local CPU processes" not in err.out and not out.exists()


def test_a_failed_reshard_process_ends_with_a_short_message(source, work, capsys):
    """A process of the new layout that fails: its last lines and exit 1, not a traceback of
    reshard itself carrying 4 KB of log."""
    from fastmoe_megatron.megatron import reshard

    blocker = work / "a_file"
    blocker.write_text("not a folder")
    code = reshard.main(["reshard", "--load", source["roots"]["torch"], "--save",
                         str(blocker / "ckpt"), "--expert-model-parallel-size", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: reshard: rank 0 exited with") and len(err) < 2500, err
    assert "--save" in err and "Traceback" not in err, err


def test_merge_loads_into_plain_fmoe_layers(at_ep1, work):
    """merge -> one weights_only file; plain FMoETransformerMLP layers built from it give the
    Megatron model's MoE-layer outputs (the worker also checks the merged model dict)."""
    merged = at_ep1["merged"]
    assert merged["layers"] == ["decoder.layers.0.mlp", "decoder.layers.1.mlp"]
    assert merged["num_experts"] == 4
    assert max(merged["diffs"]) <= TOL, merged["diffs"]
    # The CLI gives the same file from the torch-format checkpoint (no process group needed).
    from fastmoe_megatron.megatron import reshard

    out = work / "merged_cli.pt"
    assert reshard.main(["merge", "--load", str(work / "torch"), "--output", str(out)]) == 0
    a = torch.load(out, weights_only=True)
    b = torch.load(work / "merged.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys(), sorted(set(a["model"]) ^ set(b["model"]))
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["moe_layers"].keys() == b["moe_layers"].keys()
    for prefix, state in b["moe_layers"].items():
        assert state.keys() == a["moe_layers"][prefix].keys(), prefix
        for k, t in state.items():
            assert torch.equal(a["moe_layers"][prefix][k], t), (prefix, k)
    assert a["fmoe"] == b["fmoe"]


def test_reshard_ep2_to_ep4_and_back_to_ep2(at_ep1, source, work):
    """EP=2 -> EP=4 (4 processes, saved again at EP=4), then the EP=4 and EP=1 checkpoints
    back at EP=2: outputs, weights and expert Adam state equal the original's."""
    roots = source["roots"]
    diffs4 = run_workers(w.load_and_save, 4, timeout=600, threads_per_worker=1,
                         args=(4, [roots["dist"]], source["ref"], str(work / "ep4")))[0]
    assert diffs4[roots["dist"]] <= TOL, diffs4
    diffs2 = run_workers(w.load_and_save, 2, timeout=600, threads_per_worker=1,
                         args=(2, [str(work / "ep4"), str(work / "ep1")], source["ref"], None))[0]
    assert max(diffs2.values()) <= TOL, diffs2


# ------------------------------------------------------------------------------ bad input

def test_checkpoint_of_another_model_shape_is_a_clear_error(at_ep1):
    errors = at_ep1["errors"]
    assert errors["hidden_size"].startswith("CheckpointError"), errors["hidden_size"]
    assert "another model shape" in errors["hidden_size"]
    assert "--hidden-size 32 in the checkpoint, 64 now" in errors["hidden_size"]
    assert "--fmoe-num-experts 4 in the checkpoint, 8 now" in errors["num_experts"]
    assert "moe.experts.htoh4.weight is [2, 4, 64, 32] in the checkpoint, [2, 8, 64, 32]" \
        in errors["num_experts"]


def test_checkpoint_of_another_architecture_is_a_clear_error(at_ep1):
    """Another --num-attention-heads gives every tensor the same shape: the checkpoint loaded and
    the model answered wrongly, without a word. The manifest records the architecture now, and a
    load compares it; for older manifests the saved arguments say it."""
    errors = at_ep1["errors"]
    for case in ("heads", "old_manifest_heads"):
        assert errors[case].startswith("CheckpointError"), errors[case]
        assert "another model architecture (--num-attention-heads 4 in the checkpoint, 8 now)" \
            in errors[case], errors[case]
    assert errors["old_manifest"] == "no error"


def test_own_model_activations_merge_and_load(tmp_path):
    """save_fmoe in a user's own loop. The merge rebuilt every activation that is not a
    torch.nn.functional name as GELU: megatron-core's squared_relu now comes back as itself (the
    plain layers' outputs equal the model's), and an activation of the user's own is a
    CheckpointError naming it unless passed to build_fmoe_layers. A load into a model of another
    activation or residual placement (same shapes) is refused, naming the setting."""
    (out,) = run_workers(w.own_model_activations, 1, timeout=600, threads_per_worker=1,
                         args=(str(tmp_path),))
    assert out["squared_relu"]["recorded"] == "squared_relu"
    assert out["squared_relu"]["error"] == "no error"
    assert max(out["squared_relu"]["diffs"]) <= TOL, out
    own = "tests.megatron.ckpt_workers.my_activation"
    assert out["own"]["recorded"] == own
    assert out["own"]["error"].startswith(f"CheckpointError: the merged MoE layers' activation "
                                          f"'{own}' is none of"), out["own"]
    assert "build_fmoe_layers(merged, activation=...)" in out["own"]["error"]
    assert max(out["own"]["diffs"]) <= TOL, out
    assert "another model architecture (the activation squared_relu in the checkpoint, gelu " \
        "now)" in out["load_gelu"], out["load_gelu"]
    assert "(the config field apply_residual_connection_post_layernorm False in the checkpoint, " \
        "True now)" in out["load_post_layernorm"], out["load_post_layernorm"]
    assert out["load_same"] == "no error"


def test_write_failure_names_the_error_once(tmp_path):
    """A failed checkpoint write said "OSError: OSError: [Errno 5] ..."."""
    from fastmoe_megatron.megatron import checkpointing as ckpt

    msg = ckpt._write_failure("writing iteration 4 into x", tmp_path, OSError(5, "I/O error"))
    assert msg.startswith("writing iteration 4 into x failed (") and "MiB free there" in msg
    assert msg.endswith("): OSError: [Errno 5] I/O error; no earlier checkpoint there"), msg


def test_load_never_starts_from_scratch_beside_checkpoints(at_ep1, work):
    """--load of a root whose latest file is gone while checkpoints remain, or of a checkpoint
    folder without its manifest, used to start from scratch (and --save on the same root then
    overwrote the checkpoints): both are errors naming --load and what is there."""
    err = at_ep1["errors"]["untracked"]
    assert err.startswith("CheckpointError"), err
    assert f"--load {work / 'untracked'} holds checkpoints (iter_0000002, iter_0000003)" in err, err
    assert "latest_checkpointed_iteration.txt" in err
    err = at_ep1["errors"]["partial"]
    assert err.startswith("CheckpointError") and "partial checkpoint" in err, err
    assert at_ep1["errors"]["missing"] == "no error"  # a first run: --load of a new folder
    err = at_ep1["errors"]["missing_skip_train"]
    assert err.startswith("ValueError") and "no such folder; --skip-train converts" in err, err


def test_a_first_save_killed_before_the_latest_file_resumes(at_ep1):
    """Killed between committing its first checkpoint and writing the latest file, a run left a
    root that every restart refused (a --load X --save X loop was stuck): its one complete
    checkpoint is now loaded, as the latest file would have named it."""
    got = at_ep1["first_save_killed"]
    assert got["error"] == "no error" and got["consumed_samples"] == got["want"] > 0, got


def test_resume_with_another_global_batch_and_tp_size(tmp_path):
    """The data position is the samples consumed, not iteration x global batch: a run saved at
    global batch 2 (iteration 3: 6 samples) resumes at sample 6 with global batch 4 (it used to
    start at 3 x 4 = 12, skipping samples 6-11). Every run reads one and the same epoch of
    training data, whatever its global batch and --train-iters (they used to size it, which
    reshuffled it). Loading a TP=2 checkpoint at TP=1 names
    --make-vocab-size-divisible-by (the padded vocabulary depends on TP), and a load with
    another top-k warns, naming --fmoe-top-k."""
    out = run_workers(w.another_batch_size_and_tp, 2, timeout=600, threads_per_worker=1,
                      args=(str(tmp_path / "c"),))[0]
    assert out["saved_consumed"] == 6, out
    assert out["tp_error"].startswith("CheckpointError"), out["tp_error"]
    assert "at TP=1 pass --make-vocab-size-divisible-by 256" in out["tp_error"], out["tp_error"]
    assert "resuming at sample 6 of the data (iteration 3; the global batch is now 4)" in out["log"]
    assert out["losses"] == 2 and out["consumed"] == 6 + 2 * 4, out
    assert all(lr > 0 for lr in out["lrs"]), out["lrs"]  # decays over 5 x 4 samples, not 3 x 2
    assert out["smaller_consumed"] == 14 + 2 * 2, out
    epoch = out["asked"][0][1]
    assert epoch > 14 + 2 * 2 and out["asked"] == [(None, epoch)] * 3, out
    assert "--fmoe-top-k 2 in the checkpoint, 1 now" in out["routing_warning"], out["routing_warning"]


def test_lr_schedule_on_resume(tmp_path):
    """Extending a run: megatron-core's scheduler used to keep the checkpoint's schedule quietly
    (a run extended from 4 to 8 iterations trained at LR 0). Now the default is an error naming
    both flags, as Megatron-LM's assertion would stop, and each flag does what it says."""
    out = run_workers(w.lr_schedule_on_resume, 1, timeout=600, threads_per_worker=1,
                      args=(str(tmp_path / "c"),))[0]

    def cosine(i, iters):  # the LR of step i of a cosine decay from 5e-3 to 0 over iters steps
        return 5e-3 * 0.5 * (1 + math.cos(math.pi * i / iters))

    assert out["first"] == pytest.approx([cosine(i, 4) for i in range(4)], rel=1e-6)
    err = out["error"]
    assert err.startswith("CheckpointError"), err
    assert "--override-opt-param-scheduler" in err and "--use-checkpoint-opt-param-scheduler" in err
    assert "total number of iterations: 16 in this run, 8 in the checkpoint" in err, err
    assert out["override"] == pytest.approx([cosine(i, 8) for i in range(4, 8)], rel=1e-6)
    assert out["checkpoint"] == [0.0] * 4
    assert out["same"] == []
    assert out["convert"] == "no error", out["convert"]
    assert out["longer"] == pytest.approx([cosine(i, 8) for i in (2, 3)], rel=1e-6)


def test_corrupt_checkpoint_load_names_the_file(at_ep1):
    err = at_ep1["errors"]["corrupt"]
    assert err.startswith("CheckpointError"), err
    assert at_ep1["victim"] in err and "truncated" in err


@pytest.mark.parametrize("case,saved,now", [("to_distributed_optimizer", "without", "with"),
                                             ("from_distributed_optimizer", "with", "without")])
def test_optimizer_kind_mismatch_names_the_flag(at_ep1, case, saved, now):
    """The distributed optimizer's state and a plain one's do not load into each other: the error
    names --use-distributed-optimizer and --no-load-optim, before anything is read."""
    err = at_ep1["errors"][case]
    assert err.startswith("CheckpointError"), err
    assert f"saved {saved} --use-distributed-optimizer, and this run is {now} it" in err, err
    assert "--no-load-optim" in err, err


def test_nan_in_the_gate_input_is_a_clear_error(at_ep1):
    """A diverged model (lr 1e30): the MoE layer raises FloatingPointError, no silent NaN."""
    err = at_ep1["errors"]["nan"]
    assert err.startswith("FloatingPointError"), err
    assert "NaN or Inf" in err


@pytest.mark.parametrize("argv,flag", [
    (["--hidden-size", "0"], "--hidden-size"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--hidden-hidden-size", "-8"], "--hidden-hidden-size"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size"),
    (["--exit-interval", "0"], "--exit-interval"),
    (["--fmoefy", "--fmoe-num-experts", "6", "--expert-model-parallel-size", "4"],
     "--fmoe-num-experts"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--fmoe-top-k", "8"], "--fmoe-top-k"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--balance-strategy", "switch", "--fmoe-top-k", "1",
      "--fmoe-capacity-factor", "-1"], "--fmoe-capacity-factor"),
    (["--fmoefy", "--fmoe-num-experts", "4", "--expert-model-parallel-size", "3"],
     "--expert-model-parallel-size"),
    # These used to pass and fail later with a traceback (ZeroDivisionError, no training data,
    # an IndexError in the position embedding, torch's dropout check).
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by"),
    (["--split", "0,100,0"], "--split"),
    (["--split", "90,5,5,1"], "--split"),
    (["--split", "a,b"], "--split"),
    (["--split", "1.2.3"], "--split"),
    (["--max-position-embeddings", "16", "--seq-length", "32"], "--max-position-embeddings"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout"),
    (["--attention-dropout", "-0.1"], "--attention-dropout"),
    (["--adam-beta2", "1"], "--adam-beta2"),
    (["--clip-grad", "-1"], "--clip-grad"),
    # These used to fail later with a traceback (numpy's seed check, the TCP store, megatron-core's
    # tensor-parallel layers), or ran without effect (fastmoe flags without --fmoefy).
    (["--seed", "-1"], "--seed"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes"),
    (["--fmoe-num-experts", "8"], "--fmoe-num-experts"),
    (["--balance-strategy", "gshard"], "--balance-strategy"),
    (["--hidden-hidden-size", "64"], "--hidden-hidden-size"),
    (["--tensor-model-parallel-size", "2", "--hidden-size", "64", "--num-attention-heads", "1"],
     "--num-attention-heads"),
    (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "33"], "--ffn-hidden-size"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"],
     "--seq-length"),
    (["--tensor-model-parallel-size", "2", "--num-experts", "2", "--disable-bias-linear"],
     "--sequence-parallel"),
    (["--eval-interval", "10"], "--split"),  # the default split has no valid share
    (["--eval-interval", "0", "--split", "90,10,0"], "--eval-interval"),
    (["--eval-interval", "10", "--eval-iters", "0", "--split", "90,10,0"], "--eval-iters"),
    # --lr was named as --min-lr's fault, and --lr 0 passed; 0 meant no limit on the corpus.
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--default-corpus-bytes", "0"], "--default-corpus-bytes"),
    # megatron-core's MoE flags without --num-experts were ignored (e.g. an aux loss with --fmoefy).
    (["--fmoefy", "--fmoe-num-experts", "4", "--moe-aux-loss-coeff", "0.01"],
     "--moe-aux-loss-coeff without --num-experts"),
    (["--moe-router-topk", "1", "--moe-token-dispatcher-type", "allgather"],
     "--moe-router-topk, --moe-token-dispatcher-type without --num-experts"),
    (["--moe-router-load-balancing-type", "none"], "--moe-router-load-balancing-type without"),
    # A conversion of a mistyped --load saved a freshly initialised model (exit status 0).
    (["--skip-train", "--load", "no/such/ckpt", "--save", "out"], "--load no/such/ckpt: no such"),
])
def test_bad_flags_name_the_flag(argv, flag):
    from fastmoe_megatron.megatron.pretrain_gpt import build_parser, validate_args

    with pytest.raises(ValueError, match=re.escape(flag)):
        validate_args(build_parser().parse_args(argv), 4)


def test_reshard_leaves_out_the_moe_flags_its_checkpoint_ignored():
    """A run of --fmoefy with a megatron-core --moe-* flag (accepted and ignored before such
    flags without --num-experts became a flag error) saved them in its manifest: reshard passed
    them on, and its new-layout processes refused them. With --num-experts they are kept."""
    from fastmoe_megatron.megatron.pretrain_gpt import build_parser, validate_args
    from fastmoe_megatron.megatron.reshard import argv_from_args

    saved = vars(build_parser().parse_args(["--fmoefy", "--fmoe-num-experts", "4"]))
    saved.update(moe_aux_loss_coeff=0.01, moe_router_topk=1)
    argv = argv_from_args(saved)
    assert "--moe-aux-loss-coeff" not in argv and "--moe-router-topk" not in argv, argv
    validate_args(build_parser().parse_args(argv), 2)
    saved.update(fmoefy=False, fmoe_num_experts=None, num_experts=4, disable_bias_linear=True)
    argv = argv_from_args(saved)
    assert argv[argv.index("--moe-aux-loss-coeff") + 1] == "0.01"
    assert argv[argv.index("--moe-router-topk") + 1] == "1"
    validate_args(build_parser().parse_args(argv), 1)


def test_skip_train_needs_a_checkpoint_to_convert(tmp_path, capsys):
    """pretrain_gpt --skip-train on a --load holding no checkpoint (empty, only an unfinished
    .tmp save, or a file) used to save a freshly initialised model as the "converted" checkpoint
    and exit 0; now a flag error naming --load, before any process group (exit status 2)."""
    from fastmoe_megatron.megatron.pretrain_gpt import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "partial" / "iter_0000002.tmp").mkdir(parents=True)
    (tmp_path / "file").write_text("")
    for load, why in (("empty", "no checkpoint in it"), ("partial", "no checkpoint in it"),
                      ("file", "not a folder")):
        code = main(["--skip-train", "--load", str(tmp_path / load), "--save",
                     str(tmp_path / "out")])
        assert code == 2
        err = capsys.readouterr().err
        assert f"error: --load {tmp_path / load}: {why}; --skip-train converts" in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--lr", "--clip-grad", "--init-method-std", "--weight-decay",
                                  "--distributed-timeout-minutes", "--fmoe-capacity-factor"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_flags_must_be_finite(flag, value, capsys):
    """NaN passed every "value <= 0" check: --clip-grad nan turned clipping off without a word,
    and --init-method-std nan or --distributed-timeout-minutes inf failed later with a traceback.
    argparse now refuses them, naming the flag (exit status 2)."""
    from fastmoe_megatron.megatron.pretrain_gpt import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([f"{flag}={value}"])
    assert info.value.code == 2
    assert f"argument {flag}: expected a finite number, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--split", "969,30,1"], ["--split", "0.9/0.1"],
                                  ["--split", "0,1,0", "--skip-train"], ["--split", "98 2 0"],
                                  ["--data-path", "no/such/prefix", "--skip-train"],  # unread
                                  ["--max-position-embeddings", "16", "--seq-length", "32",
                                   "--position-embedding-type", "rope"],
                                  ["--eval-interval", "10", "--split", "969,30,1"],
                                  ["--load", "no/such/ckpt"],
                                  ["--num-experts", "4", "--disable-bias-linear",
                                   "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0.01"]])  # a first run: from scratch
def test_good_flags_pass(argv):
    from fastmoe_megatron.megatron.pretrain_gpt import build_parser, validate_args

    validate_args(build_parser().parse_args(argv), 4)


def test_bad_layer_arguments_raise_value_errors():
    from fastmoe_megatron import FMoE, FMoETransformerMLP
    from fastmoe_megatron.gates import GShardGate

    with pytest.raises(ValueError):  # top_k larger than the number of experts
        FMoETransformerMLP(num_expert=2, d_model=8, d_hidden=16, top_k=3)
    with pytest.raises(ValueError):  # capacity factor <= 0
        GShardGate(8, 4, 1, 2, capacity=(0.0, 0.0))
    layer = FMoETransformerMLP(num_expert=2, d_model=8, d_hidden=16, top_k=2)
    with pytest.raises(ValueError, match="d_model=8"):  # hidden sizes that do not match
        layer(torch.randn(3, 5, 12))
    with pytest.raises(ValueError, match="d_model=8"):
        FMoE.forward(layer, torch.randn(4, 12))


# ---------------------------------------------------------------- integrity and weights_only

def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst) / "iter_0000003"


def _refresh_manifest(folder: Path, name: str):
    """Makes the manifest agree with a tampered file (as an attacker could): only the allowlists
    stand between the file and the unpickler then."""
    path = folder / "fmoe_checkpoint.json"
    manifest = json.loads(path.read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", ["truncated", "deleted", "flipped", "no-manifest", "bad-latest",
                                  "torch-truncated"])
def test_corrupt_or_partial_checkpoint_names_the_file(source, tmp_path, case):
    from fastmoe_megatron.megatron import checkpointing as ckpt

    fmt = "torch" if case.startswith("torch") else "dist"
    folder = _copy(source["roots"][fmt], tmp_path / "c")
    if case in ("truncated", "torch-truncated"):
        victim = sorted(folder.rglob("*.distcp" if fmt == "dist" else "*.pt"))[-1]
        with open(victim, "r+b") as f:
            f.truncate(max(1, victim.stat().st_size - 100))
        want = [str(victim), "truncated"]
    elif case == "deleted":
        victim = folder / "common.pt"
        victim.unlink()
        want = [str(victim), "missing"]
    elif case == "flipped":
        victim = sorted(folder.glob("*.distcp"))[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        want = [str(victim), "CRC32"]
    elif case == "no-manifest":
        (folder / "fmoe_checkpoint.json").unlink()
        want = [str(folder / "fmoe_checkpoint.json"), "partial checkpoint"]
    else:
        (folder.parent / "latest_checkpointed_iteration.txt").write_text("3x")
        want = [str(folder.parent / "latest_checkpointed_iteration.txt"), "corrupt"]
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify(folder.parent, distributed=False)
    for piece in want:
        assert piece in str(info.value), str(info.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", [".metadata", "common.pt", "torch-rank-file"])
def test_loads_never_run_pickled_code(source, tmp_path, target):
    """Tampered pickles (with a matching manifest) are refused before anything runs: the
    .metadata pickle by its allowlist unpickler, torch files by weights_only=True."""
    from fastmoe_megatron.megatron import checkpointing as ckpt

    marker = tmp_path / "pwned"
    fmt = "torch" if target.startswith("torch") else "dist"
    folder = _copy(source["roots"][fmt], tmp_path / "c")
    if target == ".metadata":
        name = ".metadata"
        (folder / name).write_bytes(pickle.dumps(_Evil(marker)))
    elif target == "common.pt":
        name = "common.pt"
        torch.save({"x": _Evil(marker)}, folder / name)
    else:
        name = "mp_rank_00_001/model_optim_rng.pt"
        torch.save({"x": _Evil(marker)}, folder / name)
    _refresh_manifest(folder, name)
    with pytest.raises(ckpt.CheckpointError) as info:
        if fmt == "dist":
            ckpt.verify(folder, distributed=False)
        else:
            ckpt.load_model_tensors(folder)
    assert str(folder / name) in str(info.value)
    assert "allow" in str(info.value)
    assert not marker.exists(), "the pickled code ran"


# ------------------------------------------------------------------- failures while running

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_and_time_limit_stop_with_a_checkpoint(tmp_path):
    out = run_workers(w.stop_on_sigterm_or_duration, 2, timeout=600, threads_per_worker=1,
                      args=(str(tmp_path),))
    for o in out:
        assert o["first"] == 3 and o["latest"] == 3 and o["resumed"] == 3, o
        assert o["handler_restored"], o
        assert o["timed"] == 1 and o["timed_latest"] == 1, o
        assert o["during"] == 2 and o["during_latest"] == 2, o
        assert o["during_saved"] == ["iter_0000002"], o
        assert o["evalstop"] == 2 and o["evalstop_valid"] == [] and o["evalstop_latest"] == 2, o
    (off_main,) = run_workers(w.exit_signal_handler_off_the_main_thread, 1, timeout=300,
                              threads_per_worker=1)
    assert off_main == {"losses": 2}, off_main


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_a_failed_checkpoint_write_says_where_and_what_stays(tmp_path, fmt):
    """A save that cannot write its files (here a 40 KiB file size limit, as a full disk does)
    used to end with torch's own "unexpected pos 704 vs 598": now with the folder, the room left
    there, and the checkpoint that is still the latest (which a restart then resumes)."""
    import resource

    argv = [sys.executable, "-m", "fastmoe_megatron.megatron.pretrain_gpt", "--num-layers", "1",
            "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--default-corpus-bytes", "300000", "--threads", "1",
            "--train-iters", "4", "--save", "ck", "--save-interval", "2", "--ckpt-format", fmt]
    env = dict(_env(), OMP_NUM_THREADS="1")
    first = subprocess.run(argv + ["--exit-interval", "2"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, 40 * 1024))

    full = subprocess.run(argv + ["--load", "ck"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)
    assert full.returncode != 0
    line = next((x for x in full.stderr.splitlines() if "pretrain_gpt: rank 0 failed" in x), "")
    assert "CheckpointError: writing iteration 4 into ck/iter_0000004.tmp failed (" in line, \
        full.stderr[-3000:]
    assert "MiB free there" in line and line.endswith("the latest checkpoint is still iteration 2")
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_failed_worker_ends_the_job_with_a_message(tmp_path, fault):
    """2 processes (no torchrun). exit: rank 1 os._exit()s in the middle of iteration 2; rank 0
    must fail at once (the peer closed the connection). hang: rank 1 stops in iteration 2 (a
    long sleep); rank 0 must fail when --distributed-timeout-minutes (15 s) runs out. Either way
    rank 0 exits 1 naming the failure, and the checkpoint of iteration 1 is intact."""
    timeout_min = 1.0 if fault == "exit" else 0.25
    argv = w.TINY + ["--train-iters", "6", "--distributed-timeout-minutes", str(timeout_min),
                     "--save", str(tmp_path / "c"), "--save-interval", "1"]
    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2",
               FMOE_FAULT_INJECT="step:2:1:" + ("exit" if fault == "exit" else "sleep300"))
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    try:
        for r in range(2):
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fastmoe_megatron.megatron.pretrain_gpt", *argv],
                    env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 240
        while "fault injection" not in logs[1].read_text(errors="replace"):
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                logs[0].read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        t_fault = time.monotonic()
        procs[0].wait(timeout=timeout_min * 60 + 60)
        waited = time.monotonic() - t_fault
        if fault == "exit":
            procs[1].wait(timeout=30)
    finally:
        for p in procs:  # the ranks and anything they left behind
            try:
                os.killpg(p.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
    outs = [log.read_text(errors="replace") for log in logs]
    if fault == "exit":
        assert procs[1].returncode == 17, outs[1][-2000:]
        assert waited < 20, waited  # at once, not after the timeout
    else:
        assert "Timed out" in outs[0] or "timed out" in outs[0], outs[0][-3000:]
        assert waited < timeout_min * 60 + 20, waited
    assert procs[0].returncode == 1, outs[0][-3000:]
    assert "pretrain_gpt: rank 0 failed" in outs[0], outs[0][-3000:]
    from fastmoe_megatron.megatron import checkpointing as ckpt

    assert ckpt.latest_iteration(tmp_path / "c") == 1
    ckpt.verify(tmp_path / "c", distributed=False)


def test_soak_short_setting_three_kills(tmp_path):
    """scripts/soak_test.py with 3 kills (one during a step, one during a save, one between the
    commit and the latest file): each kill leaves the previous checkpoint intact and verified,
    the restart resumes from it, and the final weights equal the uninterrupted run's. The work
    folder's name holds a space (the resume point is read from the log's checkpoint path)."""
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak_test.py"), "--iters", "8",
                          "--save-interval", "2", "--kills", "3", "--seed", "3",
                          "--workdir", str(tmp_path / "soak dir"), "--report", str(report)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rep = json.loads(report.read_text())
    assert rep["ok"] and rep["final_weights_equal"], rep
    kills = [s for s in rep["segments"] if s["fault"]]
    assert len(kills) == 3 and {s["fault"].split(":")[0] for s in kills} == {"step", "save", "commit"}
    for s in kills:
        assert s["injected"] and s["returncode"] != 0 and s["latest"] == s["expected_latest"], s
        assert s.get("latest_verifies", True), s
    save_kill = next(s for s in kills if s["fault"].startswith("save"))
    assert save_kill["partial_left"], save_kill  # the interrupted save left only its .tmp folder
    resumed = [s["resumed_from"] for s in rep["segments"][1:]]
    assert resumed == [s["latest"] for s in kills], rep["segments"]


def test_soak_timeout_ends_the_whole_job(tmp_path):
    """A launch past --timeout: torchrun's workers (in sessions of their own) kept training after
    torchrun was killed, writing checkpoints into the work folder, and no report was written.
    Now the job ends whole, the report says why, and bad numbers are refused at once."""
    import psutil

    report, work = tmp_path / "report.json", tmp_path / "work"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak_test.py"),
                          "--iters", "100000", "--save-interval", "2", "--timeout", "25",
                          "--workdir", str(work), "--report", str(report)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert not rep["ok"] and rep["failures"] == [
        f"the uninterrupted run ran past --timeout 25 s; see {work / 'reference.log'}"], rep
    left = [q.pid for q in psutil.process_iter(["cmdline"])
            if any(str(work) in a for a in (q.info["cmdline"] or []))]
    assert left == [], left
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak_test.py"),
                          "--save-interval", "0"], env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--save-interval must be >= 1, got 0" in bad.stderr, bad.stderr
