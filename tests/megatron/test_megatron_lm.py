"""Megatron-LM checkout integration: the launcher (runtime patches), the source patch, both model
families (megatron-core GPT and legacy GPT with ParallelMLP).

The tests marked "checkout" need a Megatron-LM checkout at core_v0.16.1:

    git clone https://github.com/NVIDIA/Megatron-LM /tmp/Megatron-LM
    git -C /tmp/Megatron-LM checkout core_v0.16.1
    pip install six pydantic        # megatron.training / megatron.rl (the megatron-lm extra)
    MEGATRON_LM_PATH=/tmp/Megatron-LM pytest tests/megatron/test_megatron_lm.py

Without MEGATRON_LM_PATH they are skipped. A checkout of another version fails them, unless
FMOE_MEGATRON_UNCHECKED=1 (then the patches are tried on it anyway).

What runs on this CPU (gloo, cpu_compat; see megatron_lm_workers.py for every bypassed step):
argument parsing by the checkout's parser, validate_args, initialize_megatron without its CUDA
assertion and model-parallel set-up, the script's model_provider/gpt_builder through the
checkout's setup_model_and_optimizer (get_model, DDP, get_megatron_optimizer), and train_step
with pretrain_gpt.forward_step. What does not: ``pretrain_gpt.py`` itself (``pretrain()`` ->
``initialize_megatron`` asserts ``torch.cuda.is_available()``: test_launcher_runs_the_real_script
checks that the launcher gets that far), data loading through GPTDataset (a C++ helper compiled
at start-up), fused kernels, checkpoint saving inside ``train()``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_workers

ROOT = Path(__file__).resolve().parents[2]
CHECKED_TAG = "core_v0.16.1"
CHECKED_COMMIT = "55ac7082517c3878ae653c07c09c534b8aed49f6"
FLAGS = ["--fmoefy", "--fmoe-num-experts", "--fmoe-top-k", "--top-k", "--balance-strategy",
         "--balance-loss-weight", "--hidden-hidden-size", "--fmoe-capacity-factor",
         "--fmoe-z-loss-weight", "--fmoe-expert-bias-update-rate",
         "--expert-model-parallel-size", "--expert-tensor-parallel-size"]

SKIP_MESSAGE = (
    "needs a Megatron-LM checkout: set MEGATRON_LM_PATH to one at core_v0.16.1 "
    "(git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout "
    "core_v0.16.1; six and pydantic, which scripts/setup.sh installs), e.g. "
    "MEGATRON_LM_PATH=/tmp/Megatron-LM pytest tests/megatron/test_megatron_lm.py")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _run(cmd, timeout=120, **env):
    return subprocess.run(cmd, cwd=str(ROOT), env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _checkout_version(path: Path):
    text = (path / "megatron" / "core" / "package_info.py").read_text()
    parts = [re.search(rf"^{k} = (\d+)", text, re.M) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


@pytest.fixture(scope="module")
def checkout():
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path:
        pytest.skip(SKIP_MESSAGE)
    path = Path(path).resolve()
    if not (path / "pretrain_gpt.py").is_file() or not (path / "megatron" / "training").is_dir():
        pytest.fail(f"MEGATRON_LM_PATH={path} is not a Megatron-LM checkout (no pretrain_gpt.py)")
    version = _checkout_version(path)
    if version != CHECKED_TAG[len("core_v"):] and os.environ.get("FMOE_MEGATRON_UNCHECKED") != "1":
        pytest.fail(f"MEGATRON_LM_PATH={path} is megatron-core {version}; these tests are for "
                    f"{CHECKED_TAG} (set FMOE_MEGATRON_UNCHECKED=1 to try them anyway)")
    return str(path)


# ------------------------------------------------------------------ without a checkout


def test_launch_help_documents_the_flags():
    out = _run([sys.executable, "-m", "fastmoe_megatron.launch", "--help"])
    assert out.returncode == 0, out.stderr
    for flag in FLAGS:
        assert flag in out.stdout, flag
    assert "torchrun" in out.stdout and "--list-patches" in out.stdout


def test_launch_lists_its_patches_with_checked_versions():
    out = _run([sys.executable, "-m", "fastmoe_megatron.launch", "--list-patches"])
    assert out.returncode == 0, out.stderr
    for target in ("megatron.training.arguments:parse_args", "megatron.training.arguments:"
                   "validate_args", "megatron.training.arguments:core_transformer_config_from_args",
                   "megatron.training.training:get_model", "megatron.training.training:train_step"):
        assert target in out.stdout
    assert out.stdout.count("checked: Megatron-LM 0.16.1") == 5


def test_launch_without_a_script_or_with_a_missing_one():
    out = _run([sys.executable, "-m", "fastmoe_megatron.launch"])
    assert out.returncode == 2 and "usage" in out.stdout
    out = _run([sys.executable, "-m", "fastmoe_megatron.launch", "/nonexistent/pretrain_gpt.py"])
    assert out.returncode == 2 and "no such script" in out.stderr


def _stand_in_checkout(folder: Path, version: str, source_patched: bool = False) -> Path:
    """A folder that the launcher takes for a Megatron-LM checkout of ``version``: the packages
    megatron, megatron.core (its package_info) and megatron.training; returns its script."""
    for package in ("megatron", "megatron/core", "megatron/training"):
        (folder / package).mkdir(parents=True, exist_ok=True)
        (folder / package / "__init__.py").write_text("")
    major, minor, patch = version.split(".")
    (folder / "megatron" / "core" / "package_info.py").write_text(
        f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\n__version__ = '{version}'\n")
    if source_patched:
        (folder / "megatron" / "training" / "training.py").write_text(
            "from fastmoe_megatron.megatron import megatron_lm  # the source patch's hooks\n")
    script = folder / "pretrain_gpt.py"
    script.write_text("raise SystemExit('must not run')\n")
    return script


@pytest.mark.parametrize("version,source_patched,message", [
    ("0.99.0", False, "Megatron-LM 0.99.0 (megatron-core 0.99.0) is not a version the --fmoefy "
                      "patches were checked against"),
    ("0.16.1", True, "already carries the fastmoe_megatron source patch"),
])
def test_launcher_refuses_a_checkout_in_one_line(version, source_patched, message, tmp_path):
    """An unchecked version, or a checkout that already carries the source patch: one line and
    status 2 (on every rank under torchrun this was a traceback of about ten lines)."""
    script = _stand_in_checkout(tmp_path, version, source_patched)
    env = {k: v for k, v in _env().items() if k != "FMOE_MEGATRON_UNCHECKED"}
    out = subprocess.run([sys.executable, "-m", "fastmoe_megatron.launch", str(script), "--x"],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmoe_megatron.launch: ") \
        and message in lines[0], out.stderr


def test_importing_megatron_lm_imports_no_megatron():
    code = ("import sys; import fastmoe_megatron.megatron.megatron_lm, fastmoe_megatron.launch; "
            "print(sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')))")
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_top_k_alias_only_where_unambiguous():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from fastmoe_megatron.megatron.arguments import add_fmoe_args, fmoe_config_from_args

    plain = add_fmoe_args(argparse.ArgumentParser())
    args = plain.parse_args(["--fmoefy", "--fmoe-num-experts", "4", "--top-k", "1"])
    assert args.fmoe_top_k == 1 and fmoe_config_from_args(args).top_k == 1
    assert plain.parse_args(["--fmoe-top-k", "3"]).fmoe_top_k == 3
    # A parser with the sampling --top_k (Megatron-LM's text generation tools): no alias.
    sampling = argparse.ArgumentParser()
    sampling.add_argument("--top_k", type=int, default=1)
    add_fmoe_args(sampling)
    args = sampling.parse_args(["--fmoe-top-k", "2", "--top_k", "5"])
    assert (args.fmoe_top_k, args.top_k) == (2, 5)
    with pytest.raises(SystemExit):
        sampling.parse_args(["--top-k", "2"])


def test_fmoefy_keeps_a_pre_mlp_norm_fused_into_the_dense_mlp():
    """Transformer Engine specs (Megatron-LM's default) fuse the pre-MLP norm into the dense MLP;
    fmoefy must not drop it with the MLP (simulated: TE is not installable here)."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from tests.megatron import megatron_lm_workers as w

    out = run_workers(w.fused_pre_mlp_norm_is_kept, 1, timeout=120)[0]
    assert out["built"] == [32] and out["norm"] == "LayerNorm"
    assert out["weight"] == [2.0] and out["bias"] == [0.5]
    assert out["separate_untouched"] and out["mlps"] == ["MegatronMLP", "MegatronMLP"]
    assert out["out_shape"] == [16, 2, 32]


# ------------------------------------------------------------------ with a checkout


def test_launcher_parses_flags_with_the_checkouts_parser(checkout):
    from tests.megatron import megatron_lm_workers as w

    base = w.TINY + w.CORE
    cases = {
        "ep2": base + w.FMOE + ["--expert-model-parallel-size", "2", "--top-k", "1",
                                "--hidden-hidden-size", "48", "--fmoe-z-loss-weight", "0.001"],
        "no-fmoefy-ep2": base + ["--expert-model-parallel-size", "2"],
        "both-moes": base + w.FMOE + ["--num-experts", "4"],
        "indivisible": base + ["--fmoefy", "--fmoe-num-experts", "3",
                               "--expert-model-parallel-size", "2"],
        "etp2": base + w.FMOE + ["--expert-tensor-parallel-size", "2"],
        "ep4-world2": base + w.FMOE + ["--expert-model-parallel-size", "4"],
        "ep0": base + w.FMOE + ["--expert-model-parallel-size", "0"],
        "tp2-etp-default": base + w.FMOE + ["--tensor-model-parallel-size", "2"],
        "legacy": w.TINY + w.LEGACY + w.FMOE,
        # fastmoe flags without --fmoefy would leave a dense model: refused, naming them
        "flags-without-fmoefy": base + ["--fmoe-num-experts", "8", "--balance-strategy", "gshard"],
        "hidden-hidden-size-0": base + w.FMOE + ["--hidden-hidden-size", "0"],
    }
    results = run_workers(w.parse_cases, 1, timeout=120, args=(checkout, cases, 2),
                          init_process_group=False)[0]
    ep2 = results["ep2"]
    assert "error" not in ep2, ep2
    assert ep2["parsed"]["fmoefy"] is True and ep2["parsed"]["fmoe_num_experts"] == 4
    assert ep2["parsed"]["fmoe_top_k"] == 1 and ep2["parsed"]["top_k"] == "<absent>"
    assert ep2["parsed"]["hidden_hidden_size"] == 48
    assert ep2["parsed"]["fmoe_z_loss_weight"] == 0.001
    assert ep2["validated"]["expert_model_parallel_size"] == 2
    assert ep2["validated"]["expert_tensor_parallel_size"] == 1
    # Megatron's own MoE stays off: num_experts was shown to validate_args' check only.
    assert ep2["validated"]["num_experts"] is None
    assert ep2["validated"]["moe_ffn_hidden_size"] is None
    assert "num_experts must be non None" in results["no-fmoefy-ep2"]["error"]
    assert "--num-experts" in results["both-moes"]["error"]
    assert "--fmoe-num-experts" in results["indivisible"]["error"]
    assert "--expert-tensor-parallel-size" in results["etp2"]["error"]
    assert "--expert-model-parallel-size 4" in results["ep4-world2"]["error"]
    assert "world size 2" in results["ep4-world2"]["error"]
    assert "--expert-model-parallel-size must be >= 1" in results["ep0"]["error"]
    assert ("--fmoe-num-experts, --balance-strategy without --fmoefy"
            in results["flags-without-fmoefy"]["error"]), results["flags-without-fmoefy"]
    assert "--hidden-hidden-size must be >= 1, got 0" in results["hidden-hidden-size-0"]["error"]
    tp2 = results["tp2-etp-default"]
    assert "error" not in tp2, tp2
    assert tp2["validated"]["expert_tensor_parallel_size"] == 1  # Megatron would say 2 (= TP)
    assert "error" not in results["legacy"], results["legacy"]
    # A script whose parser has the sampling --top_k: --fmoe-top-k only.
    sampling = results["sampling-top_k"]
    assert sampling["parsed"]["fmoe_top_k"] == 2 and sampling["parsed"]["top_k"] == 7


def test_launcher_refuses_an_unchecked_version_and_patches_nothing(checkout):
    from tests.megatron import megatron_lm_workers as w

    out = run_workers(w.version_gate, 1, timeout=120, args=(checkout,),
                      init_process_group=False)[0]
    assert "not a version" in out["unchecked"] and "nothing was patched" in out["unchecked"]
    assert out["unchecked_applied"] is False and out["get_model_untouched"] is True
    assert out["override_applied"] is True
    assert "megatron.core imported is 0.99.0" in out["mixed"]


def test_launcher_runs_a_script_with_the_flags(checkout, tmp_path):
    """The launcher's own path (argv, sys.path, patches, runpy) on a small script that parses its
    arguments the way pretrain()/initialize_megatron does."""
    script = tmp_path / "parse_only.py"
    script.write_text(
        "import json\n"
        "from megatron.training.arguments import parse_args, validate_args\n"
        "args = parse_args()\n"
        "validate_args(args, {'tokenizer_type': 'GPT2BPETokenizer'})\n"
        "print('ARGS', json.dumps({k: getattr(args, k) for k in ('fmoefy', 'fmoe_num_experts', "
        "'fmoe_top_k', 'balance_strategy', 'expert_model_parallel_size', "
        "'expert_tensor_parallel_size', 'num_experts')}))\n")
    from tests.megatron import megatron_lm_workers as w

    out = _run([sys.executable, "-m", "fastmoe_megatron.launch", str(script), *w.TINY, *w.CORE,
                *w.FMOE, "--expert-model-parallel-size", "2"],
               PYTHONPATH=f"{ROOT}{os.pathsep}{checkout}", WORLD_SIZE="2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "fastmoe_megatron.launch: Megatron-LM 0.16.1: patched parse_args, validate_args" \
        in out.stdout or os.environ.get("FMOE_MEGATRON_UNCHECKED") == "1"
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ARGS "))
    assert '"fmoefy": true' in line and '"fmoe_num_experts": 4' in line
    assert '"expert_model_parallel_size": 2' in line and '"expert_tensor_parallel_size": 1' in line
    assert '"num_experts": null' in line


def test_launcher_names_a_missing_module_and_where_to_get_it(checkout, tmp_path):
    """Megatron-LM's training code needs pydantic (the megatron-lm extra): without it (hidden here
    by a sitecustomize, as if not installed) the launcher names the module and the install command,
    and keeps the traceback. A script's own missing module is named, with no word of the extra."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'pydantic':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Hide())\n")
    script = str(Path(checkout) / "pretrain_gpt.py")
    out = _run([sys.executable, "-m", "fastmoe_megatron.launch", script, "--fmoefy",
                "--fmoe-num-experts", "4"],
               PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    assert out.returncode != 0
    assert "needs the module 'pydantic'" in out.stderr, out.stderr[-3000:]
    assert "pip install 'fastmoe-megatron[megatron-lm]'" in out.stderr
    assert "Traceback" in out.stderr and "ModuleNotFoundError" in out.stderr
    # Any other missing module is named without pointing at the extra.
    own = tmp_path / "own_script.py"
    own.write_text("import fmoe_test_no_such_module\n")
    out = _run([sys.executable, "-m", "fastmoe_megatron.launch", str(own)],
               PYTHONPATH=f"{ROOT}{os.pathsep}{checkout}")
    assert out.returncode != 0
    assert "needs the module 'fmoe_test_no_such_module'" in out.stderr, out.stderr[-3000:]
    assert "install it there" in out.stderr and "[megatron-lm]" not in out.stderr


def test_launcher_runs_the_real_script_until_cuda_is_required(checkout):
    """pretrain_gpt.py itself, through scripts/pretrain_megatron_lm.sh (torchrun + launcher): on a
    machine without CUDA it stops at initialize_megatron's `assert torch.cuda.is_available()`,
    after the patches were applied."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this checks the CPU-only stopping point")
    out = _run(["bash", str(ROOT / "scripts" / "pretrain_megatron_lm.sh"), checkout,
                "--fmoefy", "--fmoe-num-experts", "4"], timeout=180,
               FMOE_VENV=sys.prefix, NPROC_PER_NODE="1")
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "fastmoe_megatron.launch: Megatron-LM" in text and "patched parse_args" in text, \
        text[-3000:]
    assert "Megatron requires CUDA." in text, text[-3000:]


def _check_built_and_stepped(results, family, ep, world, balance_scale=None):
    for r in results:
        assert r["family"] == family and r["ddp"], r
        assert r["mlp_is_megatron_mlp"], r["mlp_types"]
        assert r["mlp_contract"]  # (output [s, b, h], bias None), as the layer expects
        assert r["local_experts"] == [4 // ep] * 2
        assert [list(t) for t in r["expert_tags"]] == [[False, True]]  # allreduce, TP-tagged
        assert r["gate_allreduce"] == [True]
        assert r["experts_in_expert_buffers"] and not r["experts_in_dense_buffers"]
        assert r["optimizers"] == 2 and r["expert_optimizer_holds_all_experts"]
        assert r["experts_only_in_one_optimizer"]
        assert r["config_ep"] == 1 and r["args"]["ep"] == ep and r["args"]["etp"] == 1
        # 1/num_microbatches (fp32: loss scale 1); global batch 8 = 2 x mbs 2 x DP.
        assert r["num_microbatches"] == 8 // (2 * r["args"]["dp"])
        expected = balance_scale or 1.0 / r["num_microbatches"]
        assert r["balance_scales"] == [expected] * len(r["balance_scales"])
        assert all(b is not None and 0.5 < b < 5 for b in r["balance"]), r["balance"]
        assert all(x == x and 0 < x < 10 for x in r["losses"]), r["losses"]
        assert r["experts_changed"]
    # Every rank reports the same loss and norm (DP-averaged loss, one global norm).
    assert len({tuple(r["losses"]) for r in results}) == 1
    assert len({tuple(r["grad_norms"]) for r in results}) == 1
    if results[0]["args"].get("tp", 1) == 1:
        # After clipping to 1.0, the gradients (dense once, every EP rank's experts once) have
        # norm min(norm, 1): the clipping norm covered the experts exactly once.
        for r in results:
            assert abs(r["manual_norm_step0"] - min(r["grad_norms"][0], 1.0)) < 1e-4, r
    if ep > 1:
        rows = results[0]["first_expert_rows"]
        assert rows[0] != rows[1]  # each EP rank holds its own experts


@pytest.mark.parametrize("family", ["core", "legacy"])
def test_model_from_the_checkouts_provider_is_fmoefied_and_trains(checkout, family):
    """EP=2 over 2 gloo processes: pretrain_gpt.py's model_provider(gpt_builder) through the
    checkout's setup_model_and_optimizer, then two train_step calls with its forward_step."""
    from tests.megatron import megatron_lm_workers as w

    argv = w.TINY + (w.CORE if family == "core" else w.LEGACY) + w.FMOE + \
        ["--expert-model-parallel-size", "2"]
    results = run_workers(w.build_and_step, 2, timeout=180, args=(checkout, argv),
                          threads_per_worker=1)
    _check_built_and_stepped(results, family, ep=2, world=2)
    if family == "legacy":
        assert results[0]["legacy_layer_class"] == "ParallelTransformerLayer"


@pytest.mark.parametrize("family", ["core", "legacy"])
def test_swiglu_without_biases_reaches_the_experts(checkout, family):
    """Megatron-LM's --swiglu --disable-bias-linear: the experts are gated (htoh4 of 2 x ffn rows)
    and have no biases, as the dense MLPs they replace; the model trains."""
    from tests.megatron import megatron_lm_workers as w

    argv = w.TINY + (w.CORE if family == "core" else w.LEGACY) + w.FMOE + \
        ["--expert-model-parallel-size", "2", "--swiglu", "--disable-bias-linear"]
    results = run_workers(w.build_and_step, 2, timeout=180, args=(checkout, argv),
                          threads_per_worker=1)
    _check_built_and_stepped(results, family, ep=2, world=2)
    for r in results:
        assert r["expert_shapes"] == {"htoh4.weight": [2, 128, 32], "h4toh.weight": [2, 32, 64]}, r


def test_tensor_parallel_with_sequence_parallel_sets_expert_tp_1(checkout):
    """TP=2 + sequence parallel, EP=1: Megatron's default expert TP (= TP, 2) becomes 1; the
    experts are replicated over the TP ranks and reduced over the expert-data-parallel group.
    With --calculate-per-token-loss, the balance-loss scale is the tokens per microbatch."""
    from tests.megatron import megatron_lm_workers as w

    argv = w.TINY + w.CORE + w.FMOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                       "--calculate-per-token-loss"]
    results = run_workers(w.build_and_step, 2, timeout=180, args=(checkout, argv),
                          threads_per_worker=1)
    for r in results:
        r["args"]["tp"] = 2
    _check_built_and_stepped(results, "core", ep=1, world=2, balance_scale=2 * 16)


def _git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def patched_checkout(checkout, tmp_path_factory):
    """A throw-away clone of MEGATRON_LM_PATH at core_v0.16.1 (objects shared, nothing written to
    the original) with the source patch applied by scripts/apply_megatron_patch.sh."""
    if _git("-C", checkout, "rev-parse", "--git-dir").returncode != 0:
        pytest.skip(f"MEGATRON_LM_PATH={checkout} is not a git checkout: the patch test clones it")
    if _git("-C", checkout, "cat-file", "-e", f"{CHECKED_COMMIT}^{{commit}}").returncode != 0:
        pytest.fail(f"MEGATRON_LM_PATH={checkout} does not contain {CHECKED_TAG} "
                    f"({CHECKED_COMMIT})")
    dest = tmp_path_factory.mktemp("mlm") / "Megatron-LM"
    assert _git("clone", "--quiet", "--shared", "--no-checkout", checkout,
                str(dest)).returncode == 0
    co = _git("-C", str(dest), "-c", "advice.detachedHead=false", "checkout", "--quiet",
              CHECKED_COMMIT)
    assert co.returncode == 0, co.stderr
    return dest


def test_patch_applies_cleanly_and_the_patched_checkout_builds(patched_checkout):
    script = ROOT / "scripts" / "apply_megatron_patch.sh"
    patch = ROOT / "patches" / f"megatron-lm-{CHECKED_TAG}.patch"
    check = _git("-C", str(patched_checkout), "apply", "--check", str(patch))
    assert check.returncode == 0, check.stderr
    out = _run(["bash", str(script), str(patched_checkout)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "applies cleanly" in out.stdout and "applied" in out.stdout
    changed = _git("-C", str(patched_checkout), "diff", "--name-only").stdout.split()
    assert changed == ["megatron/training/arguments.py", "megatron/training/training.py"]
    again = _run(["bash", str(script), str(patched_checkout)])
    assert again.returncode == 0 and "already carries the patch" in again.stdout

    # The patched checkout, without the runtime patches, builds and trains the MoE model.
    from tests.megatron import megatron_lm_workers as w

    argv = w.TINY + w.CORE + w.FMOE + ["--expert-model-parallel-size", "2"]
    results = run_workers(w.build_and_step, 2, timeout=180,
                          args=(str(patched_checkout), argv, 2, False), threads_per_worker=1)
    assert results[0]["runtime_patched"] is False
    assert results[0]["training_module"].startswith(str(patched_checkout))
    _check_built_and_stepped(results, "core", ep=2, world=2)

    # The launcher refuses a patched checkout (the hooks would run twice).
    launched = _run([sys.executable, "-m", "fastmoe_megatron.launch",
                     f"{patched_checkout}/pretrain_gpt.py", "--fmoefy", "--fmoe-num-experts", "4"])
    assert launched.returncode != 0 and "already carries the fastmoe_megatron source patch" \
        in launched.stderr


def test_apply_script_refuses_wrong_or_dirty_checkouts(checkout, tmp_path):
    script = ROOT / "scripts" / "apply_megatron_patch.sh"
    out = _run(["bash", str(script), str(tmp_path)])
    assert out.returncode == 1 and "not a git checkout" in out.stderr
    if _git("-C", checkout, "rev-parse", "--git-dir").returncode != 0:
        return
    dest = tmp_path / "clone"
    assert _git("clone", "--quiet", "--shared", "--no-checkout", checkout,
                str(dest)).returncode == 0
    parent = _git("-C", checkout, "rev-parse", f"{CHECKED_COMMIT}^").stdout.strip()
    if parent:
        _git("-C", str(dest), "-c", "advice.detachedHead=false", "checkout", "--quiet", parent)
        out = _run(["bash", str(script), str(dest)])
        assert out.returncode == 1 and f"neither {CHECKED_TAG}" in out.stderr
    _git("-C", str(dest), "-c", "advice.detachedHead=false", "checkout", "--quiet", CHECKED_COMMIT)
    with open(dest / "pretrain_gpt.py", "a") as f:
        f.write("# local change\n")
    out = _run(["bash", str(script), str(dest)])
    assert out.returncode == 1 and "changes to tracked files" in out.stderr
    assert _git("-C", str(dest), "diff", "--name-only").stdout.split() == ["pretrain_gpt.py"]

    # A fork: commits on top of the tag. The patch applies if it applies; committed, it is seen.
    ident = ["-c", "user.name=t", "-c", "user.email=t@t"]
    assert _git("-C", str(dest), *ident, "commit", "--quiet", "-am", "fork").returncode == 0
    out = _run(["bash", str(script), str(dest)])
    assert out.returncode == 0 and "built on" in out.stdout and "applied" in out.stdout, \
        out.stdout + out.stderr
    assert _git("-C", str(dest), *ident, "commit", "--quiet", "-am", "patched").returncode == 0
    out = _run(["bash", str(script), str(dest)])
    assert out.returncode == 0 and "already carries the patch" in out.stdout, out.stdout + out.stderr
    shutil.rmtree(dest, ignore_errors=True)
