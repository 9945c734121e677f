"""moefy on plain PyTorch models: nn.TransformerEncoder (norm_first True and False), nn.Sequential,
custom MLP modules, a user adapter; matching, upcycling with noise, parameter tags.

Equality with the dense model: an upcycled model (noise 0) whose experts are all copies of the
dense block computes, per token, ``sum_k score_k * dense(x)``; the NaiveGate's scores sum to one,
so this is the dense output for any top_k (top_k = 1 gives score 1 exactly).
"""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmoe_megatron import FMoETransformerMLP
from fastmoe_megatron.gates import GShardGate
from fastmoe_megatron.moefy import DenseFFN, MovedIntoMoE, gate_loss, moe_layers, moefy

D, H = 16, 32
TOL = dict(rtol=1e-5, atol=1e-5)


def encoder(norm_first, dropout=0.1, activation="relu", layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, H, dropout=dropout, activation=activation,
                                       batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=not norm_first)


class MLP(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), act or nn.GELU(), nn.Linear(H, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):  # post-norm residual block
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class Net(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.blocks = nn.ModuleList([MLP() for _ in range(n)])
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


# ---------------------------------------------------------------------------- TransformerEncoder

@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_transformer_encoder_upcycled_equals_dense(norm_first, top_k):
    dense = encoder(norm_first).eval()
    moe = moefy(copy.deepcopy(dense), nn.TransformerEncoderLayer, num_expert=4, top_k=top_k,
                upcycle=True)
    assert [n for n, _ in moe_layers(moe)] == ["layers.0.linear2", "layers.1.linear2"]
    layer = moe.layers[0]
    assert layer.norm_first is norm_first and isinstance(layer.linear1, MovedIntoMoE)
    assert isinstance(layer.linear2, FMoETransformerMLP) and layer.linear2.top_k == top_k

    x = torch.randn(3, 7, D)
    xd, xm = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yd, ym = dense(xd), moe(xm)
    torch.testing.assert_close(ym, yd, **TOL)
    (yd * x).sum().backward()
    (ym * x).sum().backward()
    torch.testing.assert_close(xm.grad, xd.grad, **TOL)

    # Key padding mask in eval mode: the dense encoder takes torch's nested-tensor fast path
    # (zeros at padded positions); the MoE one must not, and agrees on the real tokens.
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    with torch.no_grad():
        keep = ~pad
        torch.testing.assert_close(moe(x, src_key_padding_mask=pad)[keep],
                                   dense(x, src_key_padding_mask=pad)[keep], **TOL)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_keeps_its_forward(norm_first):
    """Train mode with dropout: the layer still runs its own forward (norm placement, residuals,
    dropout1/dropout2); the experts apply the activation and the inner dropout."""
    model = moefy(encoder(norm_first, activation="gelu"), nn.TransformerEncoderLayer,
                  num_expert=2, top_k=2)
    layer = model.layers[1]
    acts = list(layer.linear2.experts.activation)
    assert acts[0].fn is F.gelu and isinstance(acts[1], nn.Dropout) and acts[1].p == 0.1
    assert layer.dropout2.p == 0.1 and layer.activation_relu_or_gelu == 0
    assert not model.use_nested_tensor
    x = torch.randn(2, 5, D)
    torch.manual_seed(1)
    y1 = model(x)
    torch.manual_seed(1)
    y2 = model(x)
    torch.testing.assert_close(y1, y2)  # dropout comes from torch's RNG only
    y1.sum().backward()
    assert all(p.grad is not None for p in layer.linear2.parameters())
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_decoder_layer():
    torch.manual_seed(0)
    dense = nn.TransformerDecoderLayer(D, 2, H, dropout=0.0, batch_first=True).eval()
    moe = moefy(copy.deepcopy(dense), nn.TransformerDecoderLayer, num_expert=3, top_k=1,
                upcycle=True)
    x, mem = torch.randn(2, 5, D), torch.randn(2, 6, D)
    torch.testing.assert_close(moe(x, mem), dense(x, mem), **TOL)


# ---------------------------------------------------------------------------- other shapes

def test_sequential_keeps_layout():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, H), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(H, D), nn.Dropout(0.2)).eval()
    moe = moefy(copy.deepcopy(dense), nn.Sequential, num_expert=2, top_k=2, upcycle=True)
    assert isinstance(moe, nn.Sequential) and len(moe) == 6
    assert [type(m).__name__ for m in moe] == ["LayerNorm", "MovedIntoMoE", "MovedIntoMoE",
                                               "MovedIntoMoE", "FMoETransformerMLP", "Dropout"]
    x = torch.randn(4, 3, D)
    torch.testing.assert_close(moe(x), dense(x), **TOL)


@pytest.mark.parametrize("match", [
    MLP,
    "blocks.*",
    re.compile(r"blocks\.\d+"),
    lambda name, m: isinstance(m, MLP) and name.startswith("blocks"),
    [MLP, "nothing.*"],
])
def test_custom_mlp_by_class_name_regex_predicate(match):
    torch.manual_seed(0)
    dense = Net().eval()
    moe = moefy(copy.deepcopy(dense), match, num_expert=3, top_k=2, upcycle=True)
    assert [n for n, _ in moe_layers(moe)] == ["blocks.0.fc2", "blocks.1.fc2"]
    assert type(moe.blocks[0]) is MLP  # the block keeps its class and forward
    x = torch.randn(5, D)
    torch.testing.assert_close(moe(x), dense(x), **TOL)


def test_block_with_attention_and_prenorm_mlp():
    """A custom pre-norm block holding attention and an MLP: only the MLP chain is replaced."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(D, H), nn.SiLU(), nn.Linear(H, D))
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.drop(self.mlp(self.ln2(x)))

    torch.manual_seed(0)
    dense = nn.Sequential(Block(), Block()).eval()
    moe = moefy(copy.deepcopy(dense), Block, num_expert=2, top_k=1, upcycle=True)
    assert [n for n, _ in moe_layers(moe)] == ["0.mlp.2", "1.mlp.2"]
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(moe(x), dense(x), **TOL)


def test_name_pattern_selects_some_blocks():
    torch.manual_seed(0)
    model = moefy(Net(3), "blocks.1", num_expert=2)
    assert [n for n, _ in moe_layers(model)] == ["blocks.1.fc2"]
    assert isinstance(model.blocks[0].fc2, nn.Linear)


def test_functional_activation_needs_an_adapter():
    class FunctionalMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

        def forward(self, x):
            return x + self.down(F.silu(self.up(x)))

    with pytest.raises(TypeError, match="adapter"):
        moefy(FunctionalMLP(), FunctionalMLP, num_expert=2)

    class Residual(nn.Module):
        def __init__(self, ffn):
            super().__init__()
            self.ffn = ffn

        def forward(self, x):
            return x + self.ffn(x)

    def adapter(m):
        if not isinstance(m, FunctionalMLP):
            return None
        return DenseFFN(m.up, m.down, nn.SiLU(), install=lambda moe: Residual(moe))

    torch.manual_seed(0)
    dense = nn.Sequential(FunctionalMLP(), nn.Linear(D, 2)).eval()
    moe = moefy(copy.deepcopy(dense), FunctionalMLP, num_expert=2, top_k=1, upcycle=True,
                adapter=adapter)
    assert isinstance(moe[0], Residual)
    x = torch.randn(6, D)
    torch.testing.assert_close(moe(x), dense(x), **TOL)


def test_errors():
    with pytest.raises(ValueError, match="selects no module"):
        moefy(Net(), nn.Conv1d, num_expert=2)
    with pytest.raises(TypeError, match="no feed-forward block"):
        moefy(nn.Sequential(nn.Linear(D, H), nn.ReLU()), nn.Sequential, num_expert=2)
    with pytest.raises(ValueError, match="d_hidden"):
        moefy(Net(), MLP, num_expert=2, d_hidden=2 * H, upcycle=True)
    class Branchy(nn.Module):  # data-dependent control flow: not traceable
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

        def forward(self, x):
            return self.fc2(self.fc1(x)) if x.sum() > 0 else x

    with pytest.raises(TypeError, match="cannot trace Branchy"):
        moefy(Branchy(), Branchy, num_expert=2)
    enc = moefy(encoder(False), nn.TransformerEncoderLayer, num_expert=2)
    with pytest.raises(ValueError, match="already holds an MoE layer"):
        moefy(enc, nn.TransformerEncoderLayer, num_expert=2)
    two = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D), nn.Linear(D, H), nn.ReLU(),
                        nn.Linear(H, D))
    with pytest.raises(ValueError, match="3 feed-forward chains"):
        moefy(two, nn.Sequential, num_expert=2)


def test_bad_arguments_are_named():
    """They used to pass silently: noise without upcycling was ignored, NaN noise accepted, and
    d_hidden=0 built experts as wide as the dense block."""
    with pytest.raises(ValueError, match="upcycle_noise=0.5 .* needs upcycle=True"):
        moefy(Net(), MLP, num_expert=2, upcycle_noise=0.5)
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match="upcycle_noise must be a finite number >= 0"):
            moefy(Net(), MLP, num_expert=2, upcycle=True, upcycle_noise=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"d_hidden must be >= 1 .*got {bad}"):
            moefy(Net(), MLP, num_expert=2, d_hidden=bad)


def test_a_module_shared_with_the_rest_of_the_forward_is_named():
    """A chain fc1 -> act -> drop -> fc2 whose dropout also serves the attention branch cannot move
    into the experts; the refusal names it (it said only "no feed-forward block found")."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc1, self.act = nn.Linear(D, D), nn.Linear(D, H), nn.GELU()
            self.drop, self.fc2 = nn.Dropout(0.1), nn.Linear(H, D)

        def forward(self, x):
            x = x + self.drop(self.attn(x))
            return x + self.fc2(self.drop(self.act(self.fc1(x))))

    with pytest.raises(TypeError, match=r"fc1 -> act -> drop -> fc2 of Block .*\(drop is called 2 "
                                        r"times\).*adapter="):
        moefy(Block(), Block, num_expert=2)

    class Tied(nn.Module):  # fc1's weight read directly elsewhere
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x))) + F.linear(x, self.fc1.weight).sum(-1, True)

    with pytest.raises(TypeError, match="fc1's parameters are also read directly"):
        moefy(Tied(), Tied, num_expert=2)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_an_eval_mode_model_stays_in_eval_mode():
    """The MovedIntoMoE placeholders take the module's mode (they started in training mode)."""
    for model, match in ((nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)), ""),
                         (encoder(False), nn.TransformerEncoderLayer), (Net(), MLP)):
        moefy(model.eval(), match, num_expert=2)
        assert any(isinstance(m, MovedIntoMoE) for m in model.modules())
        assert [n for n, m in model.named_modules() if m.training] == []
    model = moefy(Net().train(), MLP, num_expert=2)
    assert all(m.training for m in model.modules())


def test_d_hidden_gate_options_and_training():
    torch.manual_seed(0)
    model = moefy(Net(), MLP, num_expert=4, top_k=2, d_hidden=8,
                  gate=functools.partial(GShardGate, capacity=(2.0, 2.0)))
    moe = model.blocks[0].fc2
    assert moe.experts.htoh4.weight.shape == (4, 8, D) and isinstance(moe.gate, GShardGate)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, D), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        aux = gate_loss(model)
        assert aux is not None and aux.dim() == 0
        opt.zero_grad()
        (loss + 0.01 * aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------- upcycling, tags

def test_upcycle_noise():
    torch.manual_seed(0)
    dense = Net()
    a = moefy(copy.deepcopy(dense), MLP, num_expert=4, upcycle=True, upcycle_noise=0.1)
    b = moefy(copy.deepcopy(dense), MLP, num_expert=4, upcycle=True, upcycle_noise=0.1)
    c = moefy(copy.deepcopy(dense), MLP, num_expert=4, upcycle=True, upcycle_noise=0.1,
              upcycle_seed=1)
    w = dense.blocks[0].fc1.weight
    wa = a.blocks[0].fc2.experts.htoh4.weight
    torch.testing.assert_close(wa, b.blocks[0].fc2.experts.htoh4.weight)  # seeded
    assert not torch.allclose(wa, c.blocks[0].fc2.experts.htoh4.weight)
    assert not torch.allclose(wa, a.blocks[1].fc2.experts.htoh4.weight - dense.blocks[1].fc1.weight + w)
    diff = wa - w
    assert all(not torch.allclose(diff[i], diff[j]) for i in range(4) for j in range(i))
    assert 0.07 < float((diff.std() / w.std()).detach()) < 0.13
    # Biases are copied as they are.
    bias = a.blocks[0].fc2.experts.h4toh.bias
    torch.testing.assert_close(bias, dense.blocks[0].fc2.bias.expand(4, -1))


def test_upcycle_noise_draws_only_the_ranks_experts():
    """Rank r of W draws the noise of its own E experts (it drew E * W copies of each weight and
    kept E), and each expert's noise is the one it gets on one rank holding all E * W."""
    from types import SimpleNamespace

    from fastmoe_megatron.layers import FMoELinear
    from fastmoe_megatron.moefy import upcycle_experts

    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def experts(e, w):
        return SimpleNamespace(num_expert=e, world_size=w, experts=SimpleNamespace(
            htoh4=FMoELinear(e, D, H), h4toh=FMoELinear(e, H, D)))

    whole = experts(8, 1)
    upcycle_experts(whole, fc1, fc2, noise=0.1, seed=3)
    part = experts(2, 4)
    drawn, randn = [], torch.randn

    def spy(*args, **kwargs):
        out = randn(*args, **kwargs)
        drawn.append(out.numel())
        return out

    try:
        torch.randn = spy
        upcycle_experts(part, fc1, fc2, noise=0.1, seed=3, rank=2)
    finally:
        torch.randn = randn
    assert sum(drawn) == 2 * (fc1.weight.numel() + fc2.weight.numel())
    for name in ("htoh4", "h4toh"):
        torch.testing.assert_close(getattr(part.experts, name).weight,
                                   getattr(whole.experts, name).weight[4:6], rtol=0, atol=0)


def test_upcycle_without_expert_biases():
    """Experts without biases (bias=False) upcycle a dense block without biases exactly, and
    refuse one with biases (they used to drop them silently: not the dense model)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16, bias=False), nn.GELU(), nn.Linear(16, 8, bias=False))
    moe = moefy(copy.deepcopy(plain), "", num_expert=2, upcycle=True, bias=False)
    assert [m.experts.htoh4.bias for _, m in moe_layers(moe)] == [None]
    x = torch.randn(5, 8)
    torch.testing.assert_close(moe(x), plain(x), **TOL)
    biased = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match="build the experts with bias=True"):
        moefy(biased, "", num_expert=2, upcycle=True, bias=False)


def test_the_module_behind_the_moefy_function():
    """What the README says: the package attribute ``moefy`` is the function (hiding the
    submodule), and the submodule's other names import from it by its full name."""
    import importlib
    import sys

    import fastmoe_megatron
    import fastmoe_megatron.moefy as mf
    from fastmoe_megatron.moefy import DenseFFN as dense_ffn, gate_loss as gl, moe_layers as ml

    assert fastmoe_megatron.moefy is mf is moefy and callable(mf)
    module = sys.modules["fastmoe_megatron.moefy"]
    assert importlib.import_module("fastmoe_megatron.moefy") is module
    assert (module.moe_layers, module.gate_loss, module.DenseFFN) == (ml, gl, dense_ffn)


def test_param_tags():
    model = moefy(Net(), MLP, num_expert=2)
    moe = model.blocks[0].fc2
    assert {p.dp_comm for p in moe.experts.parameters()} == {"dp"}  # one process: replicated
    assert {p.dp_comm for p in moe.gate.parameters()} == {"gate"}
    assert not hasattr(model.head.weight, "dp_comm")
    model = moefy(Net(), MLP, num_expert=2, expert_dp_comm="edp")
    assert {p.dp_comm for p in model.blocks[1].fc2.experts.parameters()} == {"edp"}
