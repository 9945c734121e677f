"""``python -m fastmoe_megatron.bench --tiny --json``: every case runs at a toy size and the JSON
report has the documented structure. No figure is asserted (toy sizes on a shared CI machine
measure nothing); only that each figure is a positive finite number."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fastmoe_megatron.bench", "--tiny", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout), proc.stderr


def test_report_header(report):
    rep, _ = report
    assert set(rep) >= {"environment", "args", "cases", "seconds"}
    assert rep["args"]["tiny"] is True
    assert rep["args"]["ep_rounds"] == rep["args"]["rounds"]  # 3 x rounds without --tiny
    assert rep["environment"]["device"] in ("cpu", "cuda") or rep["environment"]["device"].startswith("cuda")
    assert set(rep["cases"]) == {"layer", "memory", "ep", "e2e", "compile"}
    assert all(_number(s) or s == 0 for s in rep["seconds"].values())


def test_layer_case(report):
    rep, log = report
    rows = rep["cases"]["layer"]
    assert rows and {r["threads"] for r in rows} == set(rep["args"]["threads"])
    for r in rows:
        assert {"fmoe", "dense", "naive", "experts", "gemm", "expert_gemms",
                "expert_gemms_one_weight", "fmoe_unfused"} <= set(r["median_ms"])
        assert "megatron" in r["median_ms"] or "megatron" in r["skipped"]
        for key in ("median_ms", "min_ms", "cpu_ms", "tflops"):
            assert all(_number(v) for v in r[key].values()), (key, r[key])
        assert set(r["ratios"]) >= {"fmoe_over_dense", "experts_over_dense", "fmoe_over_gemm",
                                     "expert_gemms_over_gemm", "expert_gemms_over_one_weight",
                                     "speedup_vs_naive",
                                     "fused_over_unfused"}
        assert all(_number(v) for v in r["ratios"].values())
        # The MoE contenders compute the same function (same gate, experts and routing).
        assert all(d < 1e-4 for d in r["output_rel_diff"].values()), r["output_rel_diff"]
    assert "fmoe/dense" in log


def test_memory_case(report):
    rep, _ = report
    for r in rep["cases"]["memory"]:
        for key in ("peak_mb", "working_peak_mb", "param_mb"):
            assert set(r[key]) == {"fmoe", "dense"} and all(_number(v) for v in r[key].values())
        assert r["working_peak_mb"]["fmoe"] <= r["peak_mb"]["fmoe"]
        assert r["threads"] == 1  # the profiler sees only its own thread's allocations
        assert all(_number(v) for v in r["ratios"].values())


def test_expert_parallel_case(report):
    rep, _ = report
    (r,) = rep["cases"]["ep"]
    assert r["world_size"] == 2 and r["backend"] == "gloo" and r["threads_per_process"] == 1
    assert all(_number(v) for v in r["median_ms"].values())
    for key in ("efficiency", "efficiency_all_to_all", "overlap_speedup", "communication_share",
                "communication_share_all_to_all", "load_imbalance"):
        assert _number(r[key]), key
    assert r["communication_share"] < 1 and r["communication_share_all_to_all"] < 1
    assert len(r["rows_received_per_rank"]) == 2 and r["load_imbalance"] >= 1


def test_end_to_end_case(report):
    rep, log = report
    rows = rep["cases"]["e2e"]
    if not rows:
        assert "e2e" in rep.get("skipped", {})
        return
    for r in rows:
        assert r["device"] in ("cpu", "cuda")
        assert set(r["tokens_per_s"]) == {"fmoefy", "megatron_moe", "dense"}
        assert all(_number(v) for v in r["tokens_per_s"].values())
        assert set(r["ratios"]) == {"fmoefy_over_megatron_moe", "fmoefy_over_dense",
                                    "dense_over_megatron_moe"}
        assert all(_number(v) for v in r["ratios"].values())
        assert all(math.isfinite(v) for v in r["last_loss"].values())
        for variant in r["tokens_per_s"]:  # progress: a line per run, as it ends
            assert re.search(rf"e2e +{r['config']} +run 1/1 {variant} +[0-9.]+ ms/iteration", log), log


def test_compile_case(report):
    rep, _ = report
    for r in rep["cases"]["compile"]:
        assert set(r["median_ms"]) == {"eager", "compiled"}
        assert r["max_abs_diff"] < 1e-4
        assert _number(r["ratios"]["compiled_over_eager"])


def test_gemm_references_compute_the_layer_products():
    """The per-expert GEMM reference computes the six products of every expert (checked against
    an fp64 loop), and skips an expert with no rows."""
    import torch

    from fastmoe_megatron.bench import GroupedGemmReference, Shape

    s = Shape("t", T=6, d=5, h=7, E=3, k=2)
    counts = torch.tensor([4, 0, 8])
    ref = GroupedGemmReference(s, counts, "cpu", torch.float32)
    ref.step()
    a, g, w1, w2 = (t.double() for t in (ref.a, ref.g, ref.w1, ref.w2))
    r0 = 0
    for e, m in enumerate(counts.tolist()):
        if m == 0:
            continue
        rows = slice(r0, r0 + m)
        r0 += m
        hid = a[rows] @ w1[e].T
        g_hid = g[rows] @ w2[e]
        for got, want in ((ref.hid[rows], hid), (ref.out[rows], hid @ w2[e].T),
                          (ref.g_hid[rows], g_hid), (ref.gw2[e], g[rows].T @ hid),
                          (ref.g_a[rows], g_hid @ w1[e]), (ref.gw1[e], g_hid.T @ a[rows])):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_experts_step_runs_the_layers_experts_on_its_grouped_rows():
    """``experts_step`` feeds the layer's experts exactly the rows of ``x`` that the gate sends to
    each expert, in expert order (brute force: a loop over experts and slots), and its backward
    reaches every expert parameter."""
    import torch

    from fastmoe_megatron.bench import Shape, build_fmoe, experts_step

    torch.manual_seed(0)
    s = Shape("t", T=16, d=8, h=12, E=4, k=2)
    fmoe = build_fmoe(s, "cpu")
    x = torch.randn(s.T, s.d)
    step, counts = experts_step(fmoe, x)
    idx, _ = fmoe.gate(x)
    want_rows = torch.cat([x[t].unsqueeze(0) for e in range(s.E) for t in range(s.T)
                           for j in range(s.k) if int(idx[t, j]) == e])
    assert counts.tolist() == [int((idx == e).sum()) for e in range(s.E)]
    seen = []
    hook = fmoe.experts.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    try:
        step()
    finally:
        hook.remove()
    # The rows of one expert may come in any order: compare them sorted.
    r0 = 0
    for m in counts.tolist():
        got, want = seen[0][r0:r0 + m], want_rows[r0:r0 + m]
        r0 += m
        key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
        torch.testing.assert_close(key(got), key(want))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fmoe.experts.parameters())


def test_e2e_runs_differ_only_in_the_mlp():
    """The e2e case's three ``pretrain_gpt`` runs of a config train the same GPT: the two MoE
    variants with the config's experts, the dense one with MLP width ``ffn * top_k`` (the same
    active FLOPs) and no MoE; every other flag is the same."""
    from fastmoe_megatron.bench import E2E_CONFIGS, _e2e_runs
    from fastmoe_megatron.megatron.pretrain_gpt import build_parser

    cfg = E2E_CONFIGS["small"]
    runs = {n: vars(build_parser().parse_args(a)) for n, a in _e2e_runs(cfg, 5, 2, 1000).items()}
    assert set(runs) == {"fmoefy", "megatron_moe", "dense"}
    fm, mc, dense = runs["fmoefy"], runs["megatron_moe"], runs["dense"]
    assert fm["fmoefy"] and fm["fmoe_num_experts"] == cfg["experts"] and fm["fmoe_top_k"] == cfg["top_k"]
    assert not mc["fmoefy"] and mc["num_experts"] == cfg["experts"]
    assert mc["moe_router_topk"] == cfg["top_k"]
    assert not dense["fmoefy"] and not dense["num_experts"]
    assert fm["ffn_hidden_size"] == mc["ffn_hidden_size"] == cfg["ffn"]
    assert dense["ffn_hidden_size"] == cfg["ffn"] * cfg["top_k"]
    moe_flags = ("fmoe", "moe_", "num_experts", "balance_", "top_k")
    shared = {k for k in dense if k != "ffn_hidden_size" and not k.startswith(moe_flags)}
    assert {"num_layers", "hidden_size", "seq_length", "micro_batch_size", "threads", "seed",
            "disable_bias_linear"} <= shared
    assert {k: dense[k] for k in shared} == {k: fm[k] for k in shared} == {k: mc[k] for k in shared}
    assert dense["default_corpus_bytes"] == 1000 and dense["hidden_size"] == cfg["hidden"]


@pytest.mark.parametrize("argv,message", [
    (["--case", "nothing"], "--case 'nothing'"),
    (["--shapes", "huge"], "--shapes 'huge'"),
    (["--e2e-configs", "big"], "--e2e-configs 'big'"),
    (["--skip", "dense"], "--skip 'dense'"),
    (["--threads", "0"], "--threads '0'"),
    (["--threads", "one"], "--threads 'one'"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--e2e-iters", "0"], "--e2e-iters must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--device", "tpu"], "--device"),
    (["--shapes", ","], "--shapes: name at least one"),
    (["--e2e-configs", ","], "--e2e-configs: name at least one"),
    (["--case", "all,layer"], "'all' stands alone"),
    (["--case", ","], "--case: name at least one"),
    # A bad back end failed after every earlier case had run, and their results were lost.
    (["--case", "layer,compile", "--compile-backend", "bogus"], "--compile-backend 'bogus'"),
])
def test_bad_options_name_the_option(argv, message, capsys):
    from fastmoe_megatron.bench import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    """--device cuda resolves to the current GPU (torch.device("cuda") has no index, which
    torch.cuda.set_device refuses); without CUDA it is an error naming the option."""
    from fastmoe_megatron.bench import main

    assert main(["--device", "cuda", "--case", "layer", "--tiny"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_a_failing_case_keeps_the_other_results(monkeypatch, capsys):
    """A case that raises (here the memory case, made to fail) no longer throws away what the
    cases before and after it measured: the JSON comes out with the error, and the exit status
    is 1."""
    from fastmoe_megatron import bench

    def broken(*a, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench, "case_memory", broken)
    code = bench.main(["--tiny", "--json", "--case", "memory,layer", "--skip", "naive,megatron",
                       "--threads", "1"])
    out = capsys.readouterr()
    rep = json.loads(out.out)
    assert code == 1
    assert rep["errors"] == {"memory": "RuntimeError: out of memory"}
    assert rep["cases"]["memory"] == [] and rep["cases"]["layer"], rep["cases"]
    assert "bench: the memory case failed: RuntimeError: out of memory" in out.err
