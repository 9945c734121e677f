"""moefy on Hugging Face transformers' Transformer-XL (the ``transformerxl`` extra).

A moefied model keeps the forward shapes and the segment memory of the dense one; upcycled with
top_k = 1 and identical experts it computes the dense model's output, segment after segment; a
short training run with memory lowers the loss; the training script runs end to end.
"""
from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
# transformers announces TransfoXL's deprecation and its future output format.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:The output of TransfoXL:DeprecationWarning")]

from fastmoe_megatron import FMoETransformerMLP  # noqa: E402
from fastmoe_megatron.moefy import gate_loss, moe_layers, moefy  # noqa: E402
from fastmoe_megatron.transformer_xl import (  # noqa: E402
    MoEPositionwiseFF, byte_level_config, moefy_transformer_xl, transfo_xl_module)

TOL = dict(rtol=1e-5, atol=1e-5)
ROOT = Path(__file__).resolve().parents[2]


def small_txl(pre_lnorm=False, mem_len=6, tgt_len=5, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    config = byte_level_config(d_model=32, n_layer=3, n_head=4, d_inner=64, tgt_len=tgt_len,
                               mem_len=mem_len, dropout=dropout, pre_lnorm=pre_lnorm)
    return transfo_xl_module().TransfoXLLMHeadModel(config)


def run_segments(model, segments):
    """prediction_scores and mems of consecutive segments, each with the previous mems."""
    outs, mems = [], None
    for seg in segments:
        out = model(seg, mems=mems)
        mems = out.mems
        outs.append((out.prediction_scores, [m.clone() for m in mems]))
    return outs


@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_every_positionwise_ff_replaced(pre_lnorm):
    dense = small_txl(pre_lnorm)
    model = moefy_transformer_xl(copy.deepcopy(dense), num_expert=4, top_k=2)
    ffs = [layer.pos_ff for layer in model.transformer.layers]
    assert len(ffs) == 3 and all(isinstance(f, MoEPositionwiseFF) for f in ffs)
    assert not any(isinstance(m, transfo_xl_module().PositionwiseFF) for m in model.modules())
    assert len(moe_layers(model)) == 3
    for ff, old in zip(ffs, (layer.pos_ff for layer in dense.transformer.layers)):
        assert ff.pre_lnorm == pre_lnorm and ff.drop.p == old.CoreNet[4].p
        torch.testing.assert_close(ff.layer_norm.weight, old.layer_norm.weight)
        assert isinstance(ff.moe, FMoETransformerMLP) and ff.moe.experts.htoh4.weight.shape == (4, 64, 32)
        relu, drop = ff.moe.experts.activation
        assert isinstance(relu, torch.nn.ReLU) and drop.p == old.CoreNet[2].p


@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_shapes_and_memory_unchanged_and_upcycled_equals_dense(pre_lnorm):
    dense = small_txl(pre_lnorm).eval()
    moe = moefy_transformer_xl(copy.deepcopy(dense), num_expert=4, top_k=1, upcycle=True).eval()
    g = torch.Generator().manual_seed(0)
    segments = [torch.randint(0, 256, (2, 5), generator=g) for _ in range(3)]
    with torch.no_grad():
        for (sd, md), (sm, mm) in zip(run_segments(dense, segments), run_segments(moe, segments)):
            assert sm.shape == sd.shape == (2, 5, 256)
            assert len(mm) == len(md) == 3  # the input of each layer is cached
            assert [m.shape for m in mm] == [m.shape for m in md] == [(6, 2, 32)] * 3
            torch.testing.assert_close(sm, sd, **TOL)
            for a, b in zip(mm, md):
                torch.testing.assert_close(a, b, **TOL)
        # labels: the model's own shifted loss
        out_d, out_m = dense(segments[0], labels=segments[0]), moe(segments[0], labels=segments[0])
        assert out_m.losses.shape == out_d.losses.shape == (2, 4)
        torch.testing.assert_close(out_m.loss, out_d.loss, **TOL)


@pytest.mark.parametrize("init", ["normal", "uniform"])
def test_new_experts_and_gates_start_as_the_model_initialises_its_linears(init):
    """Not upcycled, the experts and the gate are drawn as transformers draws every linear of
    Transformer-XL (N(0, init_std) or U(-init_range, init_range), zero biases), as FastMoE's
    example did; they used to keep nn.Linear's default, about 5x wider here."""
    torch.manual_seed(0)
    config = byte_level_config(d_model=64, n_layer=2, n_head=4, d_inner=128, init=init,
                               init_std=0.03, init_range=0.05)
    model = moefy_transformer_xl(transfo_xl_module().TransfoXLLMHeadModel(config), num_expert=4)
    expected_std = 0.03 if init == "normal" else 0.05 / math.sqrt(3)
    for _, moe in moe_layers(model):
        for linear in (moe.experts.htoh4, moe.experts.h4toh, moe.gate.gate):
            # (the gate has 256 weights; nn.Linear's default gives it about 2.4 x expected_std)
            assert abs(float(linear.weight.detach().std()) / expected_std - 1) < 0.2
            assert not linear.bias.any()
        if init == "uniform":
            assert float(moe.experts.htoh4.weight.detach().abs().max()) <= 0.05
        w = moe.experts.htoh4.weight
        assert all(not torch.equal(w[i], w[j]) for i in range(4) for j in range(i))
    # Upcycled experts are still copies of the dense block.
    dense = small_txl()
    up = moefy_transformer_xl(copy.deepcopy(dense), num_expert=2, upcycle=True)
    torch.testing.assert_close(up.transformer.layers[0].pos_ff.moe.experts.htoh4.weight[1],
                               dense.transformer.layers[0].pos_ff.CoreNet[0].weight)


def test_d_inner_is_the_experts_width():
    model = moefy_transformer_xl(small_txl(), num_expert=2, d_hidden=48)
    ff = model.transformer.layers[0].pos_ff
    assert ff.d_inner == ff.moe.d_hidden == 48 and ff.moe.experts.htoh4.weight.shape == (2, 48, 32)


def test_generic_moefy_on_positionwise_ff_matches_the_adapter():
    """moefy's traced default adapter handles PositionwiseFF too (keeping its class): same output
    as MoEPositionwiseFF with the same gate and experts."""
    dense = small_txl(pre_lnorm=True).eval()
    a = moefy_transformer_xl(copy.deepcopy(dense), num_expert=3, top_k=2, upcycle=True,
                             upcycle_noise=0.05)
    b = moefy(copy.deepcopy(dense), transfo_xl_module().PositionwiseFF, num_expert=3, top_k=2,
              upcycle=True, upcycle_noise=0.05)
    for la, lb in zip(a.transformer.layers, b.transformer.layers):
        assert type(lb.pos_ff).__name__ == "PositionwiseFF"
        lb.pos_ff.CoreNet[3].load_state_dict(la.pos_ff.moe.state_dict())
    x = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(a(x).prediction_scores, b(x).prediction_scores, **TOL)


def test_training_with_memory_lowers_the_loss():
    from fastmoe_megatron.demo import stdlib_corpus

    model = small_txl(mem_len=16, tgt_len=16, dropout=0.0)
    moefy_transformer_xl(model, num_expert=4, top_k=2)
    data = stdlib_corpus(40_000).view(8, -1)  # 8 streams
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mems, losses = None, []
    for i in range(40):
        seg = data[:, i * 16: i * 16 + 17]
        out = model(seg[:, :-1], mems=mems)
        mems = out.mems
        assert all(not m.requires_grad for m in mems)
        loss = F.nll_loss(out.prediction_scores.reshape(-1, 256), seg[:, 1:].reshape(-1))
        aux = gate_loss(model)
        opt.zero_grad()
        (loss + 0.01 * aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(256)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, losses


def _script():
    spec = importlib.util.spec_from_file_location("train_txl", ROOT / "scripts" / "train_transformer_xl.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_training_script_runs_and_its_loss_falls(capsys):
    script = _script()
    threads = torch.get_num_threads()
    try:
        code = script.main(["--moe", "--moe-num-expert", "2", "--moe-top-k", "2", "--iters", "40",
                            "--d-model", "32", "--d-inner", "64", "--n-head", "2",
                            "--tgt-len", "32", "--mem-len", "32", "--batch-size", "8",
                            "--log-interval", "20", "--eval-segments", "4",
                            "--corpus-bytes", "300000", "--lr", "3e-3"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "MoE: 2 layers x 2 experts" in out and "held-out loss" in out


@pytest.mark.parametrize("flags,named", [
    (["--moe-gate", "switch", "--moe-top-k", "2"], "--moe-top-k must be 1"),
    (["--moe-num-expert", "0"], "--moe-num-expert must be at least 1"),
    (["--d-model", "30", "--n-head", "4"], "--d-model 30 must be a multiple of --n-head 4"),
    (["--iters", "0"], "--iters must be at least 1"),
    # These used to end in tracebacks (or, for 9000 bytes, train on streams shorter than a
    # segment, reading the same bytes every iteration).
    (["--distributed", "--world-size", "0"], "--world-size must be at least 1, got 0"),
    (["--moe", "--moe-num-expert", "1", "--moe-top-k", "2"],
     "--moe-top-k must be between 1 and the experts of all processes (--moe-num-expert 1 x 1 "
     "process(es) = 1), got 2"),
    (["--dropout", "1.5"], "--dropout must be at least 0 and below 1, got 1.5"),
    (["--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
    (["--clip", "0"], "--clip must be a positive finite number, got 0.0"),
    (["--balance-loss-weight", "nan"], "--balance-loss-weight must be at least 0, got nan"),
    (["--corpus-bytes", "1000"], "--corpus-bytes 1000 is too small for --batch-size 16 x 1 "
                                 "process(es) of --tgt-len 64 and --eval-segments 8: give at least "
                                 "9248"),
    (["--corpus-bytes", "9000"], "--corpus-bytes 9000 is too small"),
    (["--corpus-bytes", "9247"], "--corpus-bytes 9247 is too small"),
    (["--corpus-bytes", "12000", "--distributed", "--world-size", "4"],
     "--corpus-bytes 12000 is too small for --batch-size 16 x 4 process(es)"),
])
def test_training_script_refuses_bad_flags(flags, named, capsys):
    script = _script()
    with pytest.raises(SystemExit) as info:
        script.parse_args(flags)
    err = capsys.readouterr().err
    assert info.value.code == 2 and named in err and "Traceback" not in err, err
    assert script.parse_args(["--moe-gate", "switch"]).moe_top_k == 1
    assert script.parse_args(["--corpus-bytes", "9248"]).corpus_bytes == 9248  # just enough
    # Two processes of one expert each: top-2 picks among both.
    assert script.parse_args(["--moe", "--moe-num-expert", "1", "--distributed"]).moe_top_k == 2


def test_the_training_streams_fit_a_segment_at_the_least_corpus():
    script = _script()
    args = script.parse_args(["--corpus-bytes", "9248"])
    n_eval, train_len, eval_len = script.split_sizes(9248, 1, args)
    assert train_len == args.tgt_len + 1 and eval_len == args.eval_segments * args.tgt_len + 1
    with pytest.raises(ValueError, match="--corpus-bytes 9248 is too small"):
        script.train(0, 2, args)  # a caller that skips parse_args: refused in train() too


def test_training_script_with_one_iteration_succeeds(capsys):
    """One iteration has one training loss (first == last): it used to exit 1 every time."""
    script = _script()
    threads = torch.get_num_threads()
    try:
        code = script.main(["--moe", "--moe-num-expert", "2", "--iters", "1", "--warmup", "0",
                            "--d-model", "32", "--d-inner", "64", "--n-head", "2",
                            "--tgt-len", "16", "--mem-len", "16", "--batch-size", "4",
                            "--eval-segments", "2", "--corpus-bytes", "20000"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "iter     1 |" in out and "held-out loss" in out
