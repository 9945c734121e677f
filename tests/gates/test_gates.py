"""The gates of fastmoe_megatron.gates: output contract, NaiveGate against the brute-force
reference gate, balance losses against formulas written out here, capacities, the router z-loss,
aux-loss-free bias balancing, and configuration errors. Single process (world_size 1 unless a
gate needs no communication)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import fastmoe_megatron
from fastmoe_megatron import ops
from fastmoe_megatron.gates import (BaseGate, DCGate, GShardGate, NaiveGate, NoisyGate, SwipeGate,
                                    SwitchGate, ZeroGate)
from tests import reference as ref

D, E, T = 8, 4, 24

ALL_GATES = [NaiveGate, NoisyGate, GShardGate, SwitchGate, DCGate, SwipeGate, ZeroGate]
# Gates whose router is an nn.Linear called ``gate`` (FastMoE's layout).
LINEAR_GATES = [NaiveGate, GShardGate, SwitchGate, DCGate, SwipeGate]


def make_gate(cls, top_k=2, num_expert=E, world_size=1, seed=0, **kw):
    torch.manual_seed(seed)
    gate = cls(D, num_expert, world_size, top_k, **kw)
    if isinstance(gate, NoisyGate):  # larger logits than its default init, and some noise
        with torch.no_grad():
            gate.w_gate.normal_()
            gate.w_noise.normal_(0, 0.1)
    return gate


def x_of(n=T, seed=1, dtype=torch.float32):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def logits_of(gate, x):
    """The router logits, computed token by token from the gate's weights."""
    if isinstance(gate, NoisyGate):
        return ref.logits_of(x, gate.w_gate.t(), None)
    return ref.logits_of(x, gate.gate.weight, gate.gate.bias)


def cases():
    for cls in ALL_GATES:
        for k in (1, 2, 3):
            if cls is SwitchGate and k != 1:
                continue
            yield pytest.param(cls, k, id=f"{cls.__name__}-k{k}")


# ---------------------------------------------------------------------------- output contract

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n_tokens", [T, 1, 0])
@pytest.mark.parametrize("cls,top_k", list(cases()))
def test_output_contract(cls, top_k, n_tokens, training):
    gate = make_gate(cls, top_k).train(training)
    x = x_of(n_tokens)
    idx, score = gate(x)
    assert idx.dtype == torch.int64
    assert idx.shape == (n_tokens, top_k), "idx must be [tokens, top_k] (FastMoE's 1-D idx bug)"
    assert score.shape == (n_tokens, top_k)
    assert score.dtype == x.dtype and torch.isfinite(score).all()
    assert ((idx >= -1) & (idx < E)).all()
    if cls in (NaiveGate, NoisyGate, SwipeGate):
        # No capacity: nothing dropped, k distinct experts, scores a softmax over the k.
        assert (idx >= 0).all()
        assert all(len(set(row)) == top_k for row in idx.tolist())
        torch.testing.assert_close(score.sum(1), torch.ones(n_tokens))
    if cls is ZeroGate:
        assert (idx == 0).all()
        torch.testing.assert_close(score, torch.full((n_tokens, top_k), 1.0 / top_k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls", ALL_GATES, ids=lambda c: c.__name__)
def test_score_dtype_follows_input(cls, dtype):
    gate = make_gate(cls, 1).to(dtype).eval()
    idx, score = gate(x_of(dtype=dtype))
    assert idx.dtype == torch.int64 and score.dtype == dtype


def test_zero_gate_top_k_may_exceed_experts():
    idx, score = ZeroGate(D, 2, 1, top_k=3)(x_of(5))
    assert idx.shape == (5, 3) and (idx == 0).all()


@pytest.mark.parametrize("cls", [NaiveGate, NoisyGate, GShardGate])
def test_world_size_gives_global_ids(cls):
    # world_size only widens the router to num_expert * world_size global experts.
    gate = make_gate(cls, 2, num_expert=3, world_size=2).eval()
    idx, _ = gate(x_of(64))
    assert idx.max() < 6 and (idx >= 3).any(), "experts of the second worker are never chosen"


# ---------------------------------------------------------------------------- NaiveGate vs reference

@pytest.mark.parametrize("gate_bias", [True, False])
@pytest.mark.parametrize("num_expert,top_k", [(1, 1), (4, 1), (4, 2), (4, 4), (16, 3)])
def test_naive_gate_matches_reference(num_expert, top_k, gate_bias):
    gate = make_gate(NaiveGate, top_k, num_expert=num_expert, gate_bias=gate_bias)
    assert (gate.gate.bias is not None) == gate_bias
    x = x_of().requires_grad_(True)
    idx, score = gate(x)
    w, b = ref.leaf_copy(gate.gate.weight), ref.leaf_copy(gate.gate.bias)
    xr = ref.leaf_copy(x)
    ridx, rscore = ref.naive_gate(xr, w, b, top_k)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(score, rscore, rtol=1e-6, atol=1e-6)
    gs = torch.randn(score.shape, generator=torch.Generator().manual_seed(2))
    (score * gs).sum().backward()
    (rscore * gs).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate.gate.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    if gate_bias:
        torch.testing.assert_close(gate.gate.bias.grad, b.grad, rtol=1e-5, atol=1e-6)
    # No balance loss (a zero is recorded, as in FastMoE).
    assert gate.has_loss and gate.get_loss().item() == 0.0 and not gate.has_loss


# ---------------------------------------------------------------------------- balance losses

def softmax_rows(logits):
    return [torch.softmax(logits[t].double(), 0).tolist() for t in range(logits.shape[0])]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_gshard_loss_by_hand(top_k):
    gate = make_gate(GShardGate, top_k, capacity=(100.0, 100.0)).eval()
    x = x_of()
    idx, _ = gate(x)
    loss = gate.get_loss()
    logits = logits_of(gate, x).detach()
    probs = softmax_rows(logits)
    first = [max(range(E), key=lambda e: logits[t, e].item()) for t in range(T)]
    c = [sum(1 for t in range(T) if first[t] == e) / T for e in range(E)]
    m = [sum(probs[t][e] for t in range(T)) / T for e in range(E)]
    want = sum(c[e] * m[e] for e in range(E)) / E * E ** 2
    assert idx[:, 0].tolist() == first
    assert loss.requires_grad
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_gshard_loss_counts_exactly_in_bf16():
    """The fractions of first choices are counted in fp32: in bf16, counts above 256 lose their
    last bits (2876 became 2880)."""
    from fastmoe_megatron.gates.gshard_gate import gshard_balance_loss

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3000, 4, generator=g) * 0.1
    logits[:, 0] += 0.3
    top1 = logits.argmax(1)
    bf = logits.bfloat16()
    c = torch.bincount(top1, minlength=4).double() / 3000
    want = float((c * torch.softmax(bf.double(), 1).mean(0)).mean() * 16)
    assert int(torch.bincount(top1)[0]) > 256
    assert float(gshard_balance_loss(top1, bf, 4)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("factor", [100.0, 0.6])
def test_switch_loss_by_hand(factor):
    """sum_e(frac_e * prob_e) * E with frac_e the share of kept tokens routed to e and prob_e the
    summed router probability of e, both divided by the number of kept tokens (FastMoE's
    normalisation; with no drops it is the Switch paper's mean over tokens)."""
    gate = make_gate(SwitchGate, 1, capacity=(factor, factor)).eval()
    x = x_of()
    idx, score = gate(x)
    loss = gate.get_loss()
    logits = logits_of(gate, x).detach()
    probs = softmax_rows(logits)
    top1 = [max(range(E), key=lambda e: probs[t][e]) for t in range(T)]
    cap = math.ceil(factor * T / E)
    kept = ref.prune_by_capacity(torch.tensor(top1).unsqueeze(1), [cap] * E).squeeze(1)
    assert torch.equal(idx.squeeze(1), kept)
    n = max(1, int((kept >= 0).sum()))
    frac = [sum(1 for v in kept.tolist() if v == e) / n for e in range(E)]
    prob = [sum(probs[t][e] for t in range(T)) / n for e in range(E)]
    want = sum(frac[e] * prob[e] for e in range(E)) * E
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # The score is the full softmax's probability of the chosen expert (fp32 softmax).
    for t in range(T):
        assert score[t, 0].item() == pytest.approx(probs[t][top1[t]], rel=1e-6)
    if factor < 1:
        assert (idx < 0).any()


def cv2(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return var / (mean ** 2 + 1e-10)


@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_gate_eval_loss_by_hand(top_k):
    """Without noise (eval): cv^2 of the importance (summed gate values) + cv^2 of the load
    (tokens per expert)."""
    gate = make_gate(NoisyGate, top_k).eval()
    x = x_of()
    idx, score = gate(x)
    loss = gate.get_loss()
    ridx, rscore = ref.naive_gate(x, gate.w_gate.t().detach(), None, top_k)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(score, rscore.detach(), rtol=1e-6, atol=1e-6)
    importance = [0.0] * E
    load = [0] * E
    for t in range(T):
        for j in range(top_k):
            importance[int(idx[t, j])] += rscore[t, j].item()
            load[int(idx[t, j])] += 1
    assert loss.item() == pytest.approx(cv2(importance) + cv2(load), rel=1e-4)


def test_noisy_gate_training_loss_differentiable():
    gate = make_gate(NoisyGate, 2).train()
    idx, score = gate(x_of())
    loss = gate.get_loss()
    assert torch.isfinite(loss)
    (loss + score.sum()).backward()
    assert torch.isfinite(gate.w_gate.grad).all() and gate.w_gate.grad.abs().sum() > 0
    assert torch.isfinite(gate.w_noise.grad).all() and gate.w_noise.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- capacity

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls,top_k", [(c, k) for c in (GShardGate, DCGate) for k in (1, 2, 3)]
                         + [(SwitchGate, 1)])
def test_capacity_respected(cls, top_k, training):
    factors = (0.5, 0.8)
    gate = make_gate(cls, top_k, capacity=factors).train(training)
    if cls is not SwitchGate:
        gate.random_routing = False
    x = x_of()
    idx, _ = gate(x)
    f = factors[0 if training else 1]
    slots = {GShardGate: T * top_k,     # per expert, this worker
             DCGate: T * top_k,         # per local expert, all workers
             SwitchGate: T}[cls]
    cap = math.ceil(Fraction(str(f)) * slots / E)
    counts = torch.bincount(idx[idx >= 0], minlength=E)
    assert (counts <= cap).all(), f"counts {counts.tolist()} exceed capacity {cap}"
    if cls is not SwitchGate or not training:
        # Without jitter the choice is deterministic: the kept slots are exactly the first `cap`
        # of each expert in priority order (all first choices, then second choices, ...).
        raw = ref.naive_gate(x, gate.gate.weight.detach(), gate.gate.bias.detach(), top_k)[0]
        assert torch.equal(idx, ref.prune_by_capacity(raw, [cap] * E))


def test_gshard_random_routing():
    """Training: the second choice is dropped where 2 * p2 < U(0, 1), and only then."""
    gate = make_gate(GShardGate, 2, capacity=(100.0, 100.0), random_routing=True).train()
    x = x_of(200)
    torch.manual_seed(123)
    idx, score = gate(x)
    torch.manual_seed(123)
    u = torch.rand(200)  # the gate's only random draw
    dropped = idx[:, 1] < 0
    assert torch.equal(dropped, 2 * score[:, 1].detach() < u)
    assert dropped.any() and not dropped.all()
    assert (idx[:, 0] >= 0).all()
    gate.eval()
    assert (gate(x)[0] >= 0).all(), "no random routing in eval mode"


@pytest.mark.parametrize("factor,slots,experts,want", [
    (1.2, 10, 3, 4),      # 12 / 3 exactly: the float 1.2 * 10 is 12.000000000000002
    (2.4, 2, 8, 1),       # GShard, one token, top-2, 8 experts: 0.6 rounds up to 1
    (1.2, 7 * 2, 4, 5),   # 4.2
    (0.5, 4, 4, 1),
    (1.0, 0, 4, 0),
    (1e-7, 10 ** 6, 1, 1),          # small factors stay above 0
    (1.0000001, 10 ** 7, 1, 10 ** 7 + 1),
])
def test_expert_capacity_rounds_up_exactly(factor, slots, experts, want):
    from fastmoe_megatron.gates.utils import expert_capacity
    assert expert_capacity(factor, slots, experts) == want


@pytest.mark.parametrize("cls", [GShardGate, DCGate])
def test_small_batches_keep_their_tokens(cls):
    """GShard's capacity rounded down: one token with top-2 over 8 experts got capacity
    floor(ceil(2.4) * 2 / 8) = 0, every slot was dropped and the layer returned zeros. It is
    ceil(2.4 * 2 / 8) = 1: an eval-mode GShard layer upcycled from a dense block computes the dense
    block, one token at a time too."""
    import torch.nn as nn
    from fastmoe_megatron import FMoETransformerMLP
    from fastmoe_megatron.moefy import upcycle_experts
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(D, 16), nn.Linear(16, D)
    moe = FMoETransformerMLP(num_expert=8, d_model=D, d_hidden=16, top_k=2, gate=cls).eval()
    upcycle_experts(moe, fc1, fc2)
    for n in (1, 3):
        x = x_of(n)
        assert (moe.gate(x)[0] >= 0).all()
        with torch.no_grad():
            torch.testing.assert_close(moe(x), fc2(torch.nn.functional.gelu(fc1(x))))


@pytest.mark.parametrize("cls", [GShardGate, DCGate])
def test_random_routing_before_capacity(cls):
    """A second choice that random routing drops takes no room: the capacity goes to the later
    tokens' second choices (GShard's Algorithm 1). Cutting the capacity first wasted it."""
    top_k, n = 2, 16
    gate = cls(E, E, 1, topk=top_k, capacity=(1.0, 1.0), random_routing=True).train()
    with torch.no_grad():
        gate.gate.weight.copy_(torch.eye(E))
        gate.gate.bias.zero_()
    # First choices spread over experts 0-2 (at most 6 each, all fit in the capacity of 8);
    # every second choice is expert 3.
    x = torch.full((n, E), -1.0)
    x[torch.arange(n), torch.arange(n) % 3] = 1.5
    x[:, 3] = 0.0
    torch.manual_seed(5)
    idx, score = gate(x)
    torch.manual_seed(5)
    u = torch.rand(n)  # the gate's only random draw
    cap = n * top_k // E
    second, room = [], cap
    for t in range(n):
        keep = not (2 * score[t, 1].item() < u[t].item()) and room > 0
        room -= keep
        second.append(3 if keep else -1)
    assert idx[:, 0].tolist() == (torch.arange(n) % 3).tolist()
    assert idx[:, 1].tolist() == second
    assert second.count(3) > 3, "the case must use more of expert 3's room than the old order left"


def noisy_loss_by_hand(clean, std, noisy, bias, top_k, idx):
    """Shazeer et al.'s loss token by token, in float64: cv^2 of the importance (softmax of the
    kept noisy logits, summed) + cv^2 of the load, sum over tokens of P(clean_i + b_i + noise >
    the k-th largest of the other experts' noisy + b). ``idx`` are the experts picked; they must
    be the top-k of noisy + b (ties, frequent in bf16, may go either way)."""
    T_, E_ = clean.shape
    importance, load = [0.0] * E_, [0.0] * E_
    for t in range(T_):
        sel = [float(noisy[t, i]) + float(bias[i]) for i in range(E_)]
        chosen = idx[t].tolist()
        assert sorted((sel[i] for i in chosen), reverse=True) == sorted(sel, reverse=True)[:top_k]
        kept = [math.exp(float(noisy[t, i])) for i in chosen]
        for i, v in zip(chosen, kept):
            importance[i] += v / sum(kept)
        for i in range(E_):
            kth = sorted(sel[:i] + sel[i + 1:], reverse=True)[top_k - 1]
            z = (float(clean[t, i]) + float(bias[i]) - kth) / float(std[t, i])
            load[i] += 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return cv2(importance) + cv2(load)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("biased", [False, True], ids=["nobias", "bias"])
def test_noisy_gate_training_loss_by_hand(top_k, biased):
    """With noise (training), and with the aux-loss-free bias: the load estimate compares the
    biased logits the experts are picked on (it took the thresholds from the unbiased ones, so an
    expert the bias kept out got a probability near 1)."""
    gate = make_gate(NoisyGate, top_k, expert_bias_update_rate=0.1 if biased else 0.0).train()
    bias = torch.tensor([2.0, 0.0, 0.0, -2.0]) if biased else torch.zeros(E)
    if biased:
        gate.expert_bias.copy_(bias)
    x = x_of()
    torch.manual_seed(7)
    idx, _ = gate(x)
    loss = gate.get_loss().item()
    torch.manual_seed(7)
    eps = torch.randn(T, E)  # the gate's only random draw
    with torch.no_grad():
        clean = x.double() @ gate.w_gate.double()
        std = torch.nn.functional.softplus(x.double() @ gate.w_noise.double()) + 1e-2
    want = noisy_loss_by_hand(clean, std, clean + eps.double() * std, bias, top_k, idx)
    assert loss == pytest.approx(want, rel=1e-4)


def test_noisy_gate_loss_sums_in_fp32_under_bf16():
    """Importance and load are sums over all tokens: in bf16 they were rounded (2% off at 8192
    tokens). From the same bf16 logits and noise, the loss is that of float64 arithmetic."""
    n, dm, ne, top_k = 8192, 32, 8, 2
    torch.manual_seed(0)
    gate = NoisyGate(dm, ne, 1, top_k=top_k).bfloat16().train()
    x = torch.randn(n, dm).bfloat16()
    torch.manual_seed(1)
    idx, _ = gate(x)
    loss = gate.get_loss().item()
    torch.manual_seed(1)
    with torch.no_grad():
        clean = x @ gate.w_gate                       # the gate's own bf16 products
        std = torch.nn.functional.softplus(x @ gate.w_noise) + 1e-2
        noisy = clean + torch.randn_like(clean) * std
    want = noisy_loss_by_hand(clean.double(), std.double(), noisy.double(), torch.zeros(ne), top_k, idx)
    assert loss == pytest.approx(want, rel=2e-3)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_capacity_helpers_take_fastmoe_flat_indices(backend):
    """FastMoE's gates return flat [T * top_k] indices, and its capacity helpers take them: the
    slots count in their order."""
    from fastmoe_megatron.gates import limit_by_capacity, prune_gate_by_capacity
    flat = torch.tensor([0, 1, 0, 1, 1, -1, 0])
    with ops.use_backend(backend):
        assert prune_gate_by_capacity(flat, torch.tensor([2, 1]), 2, 1).tolist() == [0, 1, 0, -1, -1, -1, -1]
        lec, gec, idx = limit_by_capacity(flat, 2, 1, 2)
    assert idx.tolist() == [0, 1, 0, 1, -1, -1, -1]
    assert lec.tolist() == gec.tolist() == [2, 2]


# ---------------------------------------------------------------------------- z-loss

@pytest.mark.parametrize("cls", LINEAR_GATES + [NoisyGate])
def test_z_loss(cls):
    weight = 0.01
    top_k = 1 if cls is SwitchGate else 2
    base = make_gate(cls, top_k, seed=4).eval()
    withz = make_gate(cls, top_k, seed=4, z_loss_weight=weight).eval()
    x = x_of()
    base(x)
    withz(x)
    logits = logits_of(withz, x).detach().double()
    lse2 = [torch.logsumexp(logits[t], 0).item() ** 2 for t in range(T)]
    want_z = weight * sum(lse2) / T
    loss0, loss = base.get_loss(), withz.get_loss()
    assert (loss - loss0).item() == pytest.approx(want_z, rel=1e-4)
    assert not withz.has_loss, "get_loss() clears by default"
    loss.backward()
    w = withz.w_gate if cls is NoisyGate else withz.gate.weight
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_z_loss_gradient_by_autograd():
    """NaiveGate has no other loss: the gradient of get_loss() is that of weight*mean(lse^2)."""
    gate = make_gate(NaiveGate, 2, z_loss_weight=0.1)
    x = x_of()
    gate(x)
    gate.get_loss().backward()
    w, b = ref.leaf_copy(gate.gate.weight), ref.leaf_copy(gate.gate.bias)
    logits = ref.logits_of(x, w, b)
    z = 0.1 * torch.stack([torch.logsumexp(logits[t], 0) ** 2 for t in range(T)]).mean()
    z.backward()
    torch.testing.assert_close(gate.gate.weight.grad, w.grad)
    torch.testing.assert_close(gate.gate.bias.grad, b.grad)


def test_z_loss_empty_batch():
    gate = make_gate(NaiveGate, 2, z_loss_weight=0.1)
    gate(x_of(0))
    loss = gate.get_loss()
    assert loss is not None and loss.item() == 0.0


# ---------------------------------------------------------------------------- aux-loss-free bias

BIAS_GATES = [NaiveGate, GShardGate, SwitchGate, DCGate, SwipeGate, NoisyGate]


@pytest.mark.parametrize("cls", BIAS_GATES)
def test_expert_bias_affects_selection_only(cls):
    top_k = 1 if cls is SwitchGate else 2
    kw = {"capacity": (100.0, 100.0)} if cls in (GShardGate, DCGate, SwitchGate) else {}
    gate = make_gate(cls, top_k, expert_bias_update_rate=0.1, **kw).eval()
    assert "expert_bias" in dict(gate.named_buffers()) and "expert_bias" not in dict(gate.named_parameters())
    x = x_of()
    gate.expert_bias[2] = 100.0  # expert 2 wins every first choice
    idx, score = gate(x)
    assert (idx[:, 0] == 2).all()
    logits = logits_of(gate, x).detach()
    for t in range(T):
        chosen = logits[t, idx[t]]
        if cls is SwitchGate:  # the full softmax's probability, unbiased
            want = torch.softmax(logits[t], 0)[idx[t]]
        else:                  # softmax over the k chosen, unbiased
            want = torch.softmax(chosen, 0)
        torch.testing.assert_close(score[t].detach(), want, rtol=1e-5, atol=1e-6)
    # The remaining choices still follow the unbiased logits.
    if top_k > 1 and cls is not NoisyGate:
        second = [max((e for e in range(E) if e != 2), key=lambda e: logits[t, e].item()) for t in range(T)]
        assert idx[:, 1].tolist() == second


@pytest.mark.parametrize("cls", [NaiveGate, SwitchGate])
def test_expert_bias_is_added_to_the_logits(cls):
    """The first choice is the top of logits + bias (SwitchGate once added the bias to the
    softmax's probabilities instead, which picks other experts for the same bias)."""
    top_k = 1 if cls is SwitchGate else 2
    kw = {"capacity": (100.0, 100.0)} if cls is SwitchGate else {}
    gate = make_gate(cls, top_k, expert_bias_update_rate=0.1, **kw).eval()
    x = x_of()
    logits = logits_of(gate, x).detach()
    gate.expert_bias.copy_(torch.linspace(-1.0, 1.0, E))
    idx, _ = gate(x)
    assert idx[:, 0].tolist() == (logits + gate.expert_bias).argmax(1).tolist()


def test_update_expert_bias_moves_toward_balance():
    assert not torch.distributed.is_initialized()
    rate = 0.05
    gate = make_gate(NaiveGate, 1, expert_bias_update_rate=rate).train()
    x = x_of(40)
    gate.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # expert 0 takes everything
    idx, _ = gate(x)
    assert (idx == 0).all()
    assert gate.expert_load.tolist() == [40, 0, 0, 0]
    gate(x)  # loads accumulate until the update
    assert gate.expert_load.tolist() == [80, 0, 0, 0]
    fastmoe_megatron.update_expert_biases(torch.nn.Sequential(gate))
    # Overloaded expert 0 goes down by the rate, the idle ones go up by it; the load resets.
    torch.testing.assert_close(gate.expert_bias, torch.tensor([5.0 - rate, rate, rate, rate]))
    assert gate.expert_load.tolist() == [0, 0, 0, 0]
    # No load since the last update: nothing moves.
    gate.update_expert_bias()
    torch.testing.assert_close(gate.expert_bias, torch.tensor([5.0 - rate, rate, rate, rate]))


@pytest.mark.parametrize("cls", BIAS_GATES)
def test_expert_load_counted_in_training_only(cls):
    # Large capacity (no drops): the load is the router's choices, which a drop-free case pins
    # for every gate (test_expert_load_is_the_demand_before_the_capacity_cut has drops).
    top_k = 1 if cls is SwitchGate else 2
    kw = {"capacity": (100.0, 100.0)} if cls in (GShardGate, DCGate, SwitchGate) else {}
    gate = make_gate(cls, top_k, expert_bias_update_rate=0.1, **kw).train()
    if hasattr(gate, "random_routing"):
        gate.random_routing = False
    idx, _ = gate(x_of())
    assert (idx >= 0).all()
    want = torch.bincount(idx.reshape(-1), minlength=E).float()
    assert torch.equal(gate.expert_load, want)
    gate.eval()
    gate(x_of(seed=5))
    assert torch.equal(gate.expert_load, want), "eval mode must not count load"


@pytest.mark.parametrize("cls", [GShardGate, DCGate, SwitchGate], ids=lambda c: c.__name__)
def test_expert_load_is_the_demand_before_the_capacity_cut(cls):
    """The load that moves the aux-loss-free bias counts what the router asked for, slots the
    capacity then dropped included: an expert over its capacity must still look overloaded."""
    top_k = 1 if cls is SwitchGate else 2
    gate = make_gate(cls, top_k, capacity=(0.3, 0.3), expert_bias_update_rate=0.1).train()
    if hasattr(gate, "random_routing"):
        gate.random_routing = False
    if cls is SwitchGate:
        gate.switch_eps = 0.0
    x = x_of()
    idx, _ = gate(x)
    assert (idx < 0).any(), "the case should drop slots"
    with torch.no_grad():
        raw = torch.topk(logits_of(gate, x), top_k, dim=1).indices
    assert torch.equal(gate.expert_load, torch.bincount(raw.reshape(-1), minlength=E).float())


def test_balanced_load_keeps_bias():
    gate = make_gate(NaiveGate, 1, expert_bias_update_rate=0.1)
    gate.expert_load.copy_(torch.tensor([3.0, 3.0, 3.0, 3.0]))
    gate.update_expert_bias()
    assert gate.expert_bias.tolist() == [0.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------- configuration errors

@pytest.mark.parametrize("make,match", [
    (lambda: NaiveGate(D, 2, 1, top_k=3), "top_k"),
    (lambda: NaiveGate(D, 2, 2, top_k=5), "top_k"),
    (lambda: NaiveGate(D, 4, 1, top_k=0), "top_k"),
    (lambda: NoisyGate(D, 2, 1, top_k=3), "top_k"),
    (lambda: SwipeGate(D, 2, 1, top_k=3), "top_k"),
    (lambda: GShardGate(D, 2, 1, topk=3), "top_?k"),
    (lambda: DCGate(D, 1, 1, topk=2), "top_?k"),
    (lambda: ZeroGate(D, 2, 1, top_k=0), "top_k"),
    (lambda: SwitchGate(D, 4, 1, topk=2), "topk"),
    (lambda: SwitchGate(D, 4, 1, topk=0), "topk"),
    (lambda: GShardGate(D, 4, 1, capacity=(0.0, 1.0)), "capacity"),
    (lambda: GShardGate(D, 4, 1, capacity=(1.0, -2.0)), "capacity"),
    (lambda: SwitchGate(D, 4, 1, capacity=(-1.0, 1.0)), "capacity"),
    (lambda: DCGate(D, 4, 1, capacity=(1.0, 0)), "capacity"),
    (lambda: GShardGate(D, 4, 1, capacity=1.2), "capacity"),
    (lambda: NaiveGate(D, 0, 1), "num_expert"),
    (lambda: NaiveGate(D, 4, 0), "world_size"),
    (lambda: NaiveGate(D, 4, 1, z_loss_weight=-1.0), "z_loss_weight"),
    (lambda: NaiveGate(D, 4, 1, expert_bias_update_rate=-0.1), "expert_bias_update_rate"),
    (lambda: fastmoe_megatron.FMoETransformerMLP(num_expert=2, d_model=D, d_hidden=4, top_k=3), "top_k"),
])
def test_invalid_config(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make,error,match", [
    (lambda: NaiveGate(D, 4, 1, top_k=1.5), TypeError, "top_k must be an int.*1.5"),
    (lambda: NaiveGate(D, 4, 1, top_k="2"), TypeError, "top_k must be an int.*'2'"),
    (lambda: NoisyGate(D, 4, 1, top_k=True), TypeError, "top_k must be an int"),
    (lambda: GShardGate(D, 4, 1, topk=2.0), TypeError, "topk must be an int"),
    (lambda: ZeroGate(D, 4, 1, top_k=1.5), ValueError, "top_k must be an int"),
    (lambda: GShardGate(D, 4, 1, top_k=2), TypeError, "names its top-k argument topk"),
    (lambda: SwitchGate(D, 4, 1, top_k=1), TypeError, "names its top-k argument topk"),
    (lambda: DCGate(D, 4, 1, top_k=2), TypeError, "names its top-k argument topk"),
    (lambda: GShardGate(D, 4, 1, capacity=("a", "b")), ValueError, r"capacity factor \(train\)"),
    (lambda: GShardGate(D, 4, 1, capacity=(1.0, math.inf)), ValueError, r"\(eval\).*finite"),
    (lambda: DCGate(D, 4, 1, capacity=(math.nan, 1.0)), ValueError, "finite number > 0"),
    (lambda: SwitchGate(D, 4, 1, switch_eps=-0.5), ValueError, r"switch_eps.*\[0, 1\)"),
    (lambda: SwitchGate(D, 4, 1, switch_eps=1.0), ValueError, "switch_eps"),
    (lambda: SwitchGate(D, 4, 1, switch_eps="0.1"), ValueError, "switch_eps"),
])
def test_invalid_argument_types_and_values(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    assert NaiveGate(D, 4, 1, top_k=np.int64(2)).top_k == 2
    assert GShardGate(D, 4, 1, capacity=(np.float32(1.5), 2)).capacity == (1.5, 2.0)
    assert SwitchGate(D, 4, 1, switch_eps=np.float64(0.2)).switch_eps == 0.2


def test_noisy_gate_starts_like_a_linear_layer():
    """Its weights start uniform in +-1/sqrt(d_model), as nn.Linear(d_model, experts)'s (they were
    zeros, which sent every token of a fresh gate in eval mode to the same experts)."""
    d = 64
    torch.manual_seed(0)
    gate = NoisyGate(d, 8, 1, top_k=2).eval()
    for w in (gate.w_gate, gate.w_noise):
        assert w.abs().max() <= 1 / math.sqrt(d)
        assert w.abs().max() > 0.9 / math.sqrt(d), "uniform over the whole range"
        assert w.std() > 0.5 / math.sqrt(3 * d)
    idx, _ = gate(torch.randn(32, d))
    assert len({tuple(sorted(r)) for r in idx.tolist()}) > 1


@pytest.mark.parametrize("cls", [GShardGate, DCGate, SwitchGate, NoisyGate],
                         ids=lambda c: c.__name__)
def test_loss_without_tokens_is_a_zero_in_the_graph(cls):
    """A gate with a balance loss and no tokens records a zero that backward() accepts (GShard's
    and DC's was a constant) and that adds nothing to any gradient."""
    gate = make_gate(cls, 1 if cls is SwitchGate else 2).train()
    gate(x_of(0))
    loss = gate.get_loss()
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("cls", [NaiveGate, SwipeGate], ids=lambda c: c.__name__)
def test_layer_with_a_lossless_gate_deep_copies_after_forward(cls):
    """Its zero loss requires no gradient: a non-leaf tensor on the gate would stop
    copy.deepcopy of the model (an EMA copy, a reference model) after a forward."""
    import copy

    layer = fastmoe_megatron.FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=4, gate=cls)
    layer(x_of()).sum().backward()
    assert layer.gate.has_loss and not layer.gate.get_loss(clear=False).requires_grad
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(x_of(seed=3)), layer(x_of(seed=3)))


def test_gate_interface():
    gate = make_gate(NaiveGate)
    assert isinstance(gate, BaseGate) and not gate.has_loss
    gate.set_loss(torch.tensor(2.0))
    assert gate.has_loss
    assert float(gate.get_loss(clear=False)) == 2.0 and gate.has_loss
    assert float(gate.get_loss()) == 2.0 and not gate.has_loss and gate.get_loss() is None


@pytest.mark.parametrize("cls,top_k", [(GShardGate, 2), (DCGate, 3), (SwitchGate, 1)])
def test_capacity_gates_same_on_both_backends(cls, top_k):
    """Capacity gates call the index ops: both back ends give the same routing."""
    x = x_of()
    out = {}
    for backend in ("native", "torch"):
        with ops.use_backend(backend):
            gate = make_gate(cls, top_k, capacity=(0.5, 0.5)).eval()
            out[backend] = gate(x)[0]
    assert (out["native"] < 0).any()
    assert torch.equal(out["native"], out["torch"])


def test_expert_bias_and_load_stay_fp32_under_bf16():
    """--bf16 (megatron's Float16Module calls .bfloat16()) kept the gate's expert_bias and
    expert_load in bf16: updates of the rate below rounded away once a bias reached 0.5, and
    counts above 256 lost integers. They stay fp32 and move with the module; the bf16 gate's
    biases follow an fp32 gate's update for update."""
    rate = 1e-3
    fp32 = make_gate(NaiveGate, 1, expert_bias_update_rate=rate).train()
    bf16 = make_gate(NaiveGate, 1, expert_bias_update_rate=rate).train()
    bf16.load_state_dict(fp32.state_dict())
    bf16.bfloat16()
    assert bf16.gate.weight.dtype == torch.bfloat16
    assert bf16.expert_bias.dtype == torch.float32 and bf16.expert_load.dtype == torch.float32
    start = torch.tensor([0.75, 0.0, 0.0, 0.0])  # bf16's spacing at 0.75 is 2**-7 > 2 * rate
    for g in (fp32, bf16):
        g.expert_bias.copy_(start)
    x = x_of(300)
    for _ in range(3):
        idx, score = bf16(x.bfloat16())
        assert score.dtype == torch.bfloat16
        assert bf16.expert_load.sum() == 300  # exact above 256
        fp32.expert_load.copy_(bf16.expert_load)  # the same load, so the same update
        fp32.update_expert_bias()
        bf16.update_expert_bias()
    torch.testing.assert_close(bf16.expert_bias, fp32.expert_bias, rtol=0, atol=0)
    assert bf16.expert_bias[0] < 0.75  # the updates did not round away
    bf16.double()
    assert bf16.expert_bias.dtype == torch.float32
    assert dict(bf16.state_dict())["expert_bias"].dtype == torch.float32
    # Buffers made in bf16 (a bf16 default dtype) are brought to fp32 by the next cast.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        made = make_gate(NaiveGate, 1, expert_bias_update_rate=rate)
    finally:
        torch.set_default_dtype(old)
    assert made.expert_bias.dtype == torch.bfloat16
    made.bfloat16()
    assert made.expert_bias.dtype == torch.float32 and made.expert_load.dtype == torch.float32
