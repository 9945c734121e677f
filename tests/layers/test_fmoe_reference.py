"""FMoE / FMoETransformerMLP against the brute-force per-token reference (tests/reference.py).

Every comparison covers the output, the input gradient and the gradient of every parameter (gate
weight and bias, htoh4 and h4toh weights and biases), on both kernel back ends.

Precision. fp32 models are compared with the reference run in fp32 on the same weights (tight
tolerances: only summation order differs). bf16 models are compared with the reference run in
*fp32* on the same bf16-rounded weights and inputs: that is what the bf16 layer approximates, and
an fp32 reference exposes every bf16 rounding the layer makes (tolerance 2e-2, bf16 has 8 bits of
mantissa). In bf16, router logits that nearly tie can be ordered differently by bf16 and fp32
arithmetic, so there the reference uses the layer's own expert ids (checked to agree with the
fp32 top-k wherever the fp32 logits are clearly separated) and recomputes the scores from them.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction
import re

import pytest
import torch
import torch.nn as nn

from fastmoe_megatron import FMoE, FMoELinear, FMoETransformerMLP, ops
from fastmoe_megatron.gates import GShardGate, NaiveGate, SwitchGate
from tests import reference as ref
from tests.reference import MLP_PARAMS as PARAMS
from tests.reference import assert_all_close

D, H, T = 16, 32, 24
BACKENDS = ["native", "torch"]
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16: rtol 2e-2, and atol 2e-2 times the largest entry of the reference tensor (at least 1). The
# gradients are sums over many tokens whose rounding error scales with the tensor's magnitude, not
# with each (possibly cancelled, near-zero) entry. Measured: max error <= 0.8% of the largest entry.
BF16_TOL = dict(rtol=2e-2, atol=2e-2, scaled=True)


# ---------------------------------------------------------------------------- custom gates

class SubsetGate(NaiveGate):
    """NaiveGate whose selection is restricted to ``allowed`` experts: the others get no token."""

    def __init__(self, d_model, num_expert, world_size, top_k=2, gate_bias=True, allowed=()):
        super().__init__(d_model, num_expert, world_size, top_k=top_k, gate_bias=gate_bias)
        mask = torch.full((self.tot_expert,), float("-inf"))
        mask[list(allowed)] = 0.0
        self.register_buffer("mask", mask)

    def forward(self, inp):
        logits = self.gate(inp)
        idx = torch.topk(logits + self.mask.to(logits.dtype), self.top_k, dim=-1).indices
        return idx, torch.softmax(logits.gather(1, idx), dim=-1)


def drop_pattern(T: int, K: int) -> torch.Tensor:
    """Slots that DropGate drops: every slot of token 0 and of token 5, and (t + j) % 3 == 0."""
    t = torch.arange(T).unsqueeze(1)
    j = torch.arange(K).unsqueeze(0)
    drop = (t + j) % 3 == 0
    drop[0] = True
    if T > 5:
        drop[5] = True
    return drop


class DropGate(NaiveGate):
    """NaiveGate that then marks a fixed pattern of slots as dropped (-1); scores unchanged."""

    def forward(self, inp):
        idx, score = super().forward(inp)
        return idx.masked_fill(drop_pattern(*idx.shape).to(idx.device), -1), score


# ---------------------------------------------------------------------------- helpers

def make_mlp(num_expert, top_k, dtype=torch.float32, gate=NaiveGate, seed=0, **kw):
    torch.manual_seed(seed)
    model = FMoETransformerMLP(num_expert=num_expert, d_model=D, d_hidden=H, top_k=top_k,
                               gate=gate, **kw)
    # Give the biases some size, so that a bias bug cannot hide under the weights.
    with torch.no_grad():
        model.experts.htoh4.bias.normal_(0, 0.5)
        model.experts.h4toh.bias.normal_(0, 0.5)
    return model.to(dtype)


def inputs(shape=(T, D), dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    gy = torch.randn(*shape, generator=g).to(dtype)
    return x, gy


def run_model(model, x, gy, backend):
    """Output, input gradient and parameter gradients of ``model`` on ``x`` with upstream ``gy``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        y = model(x)
        y.backward(gy)
    return y.detach(), x.grad, ref.model_grads(model)


def run_reference(model, x, gy, dtype=None, idx=None, route=None):
    """The brute-force reference on copies of ``model``'s weights (cast to ``dtype``).

    ``idx`` forces the experts chosen; ``route(idx) -> idx`` post-processes the gate's choice
    (drops); returns ``(y, x.grad, {name: grad}, idx)``.
    """
    p = ref.mlp_params(model, dtype)
    xr = ref.leaf_copy(x, dtype)
    flat = xr.reshape(-1, xr.shape[-1])
    idx, score = ref.naive_gate(flat, p["gate.weight"], p["gate.bias"], model.top_k, idx=idx)
    if route is not None:
        idx = route(idx)
    y = ref.moe(flat, idx, score, ref.mlp_experts(p, model.experts.activation)).reshape(xr.shape)
    y.backward(gy.to(y.dtype))
    return y.detach(), xr.grad, {k: None if v is None else v.grad for k, v in p.items()}, idx


def assert_finite(*tensors):
    for t in tensors:
        items = t.values() if isinstance(t, dict) else [t]
        for v in items:
            assert v is None or torch.isfinite(v).all(), "NaN or inf in the output or a gradient"


SWEEP = [(E, k) for E in (1, 4, 16) for k in (1, 2, 3, 4) if k <= E]


# ---------------------------------------------------------------------------- the sweep

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_expert,top_k", SWEEP)
def test_fp32_matches_reference(num_expert, top_k, backend):
    model = make_mlp(num_expert, top_k)
    x, gy = inputs()
    got = run_model(model, x, gy, backend)
    want = run_reference(model, x, gy)
    # The gate itself: the same experts, in the same (descending) order.
    with torch.no_grad():
        idx, _ = model.gate(x)
    assert torch.equal(idx, want[3])
    assert_all_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_expert,top_k", SWEEP)
def test_bf16_matches_fp32_reference(num_expert, top_k, backend):
    model = make_mlp(num_expert, top_k, dtype=torch.bfloat16)
    x, gy = inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        idx, score = model.gate(x)
    assert idx.dtype == torch.int64 and score.dtype == torch.bfloat16
    # Routing: the bf16 gate agrees with the fp32 top-k wherever the choice is not a near tie.
    p = ref.mlp_params(model, torch.float32)
    logits = ref.logits_of(x.float(), p["gate.weight"], p["gate.bias"]).detach()
    ref_idx, _ = ref.naive_gate(x.float(), p["gate.weight"], p["gate.bias"], top_k)
    for t in range(T):
        if set(idx[t].tolist()) != set(ref_idx[t].tolist()):
            row = logits[t].sort(descending=True).values
            gap = (row[top_k - 1] - row[top_k]).item() if top_k < num_expert else math.inf
            assert gap < 0.05, f"token {t}: bf16 chose {idx[t].tolist()}, fp32 {ref_idx[t].tolist()}"
    got = run_model(model, x, gy, backend)
    want = run_reference(model, x.float(), gy.float(), dtype=torch.float32, idx=idx)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    assert_all_close(got, want, **BF16_TOL)


def test_acceptance_case():
    """The acceptance configuration: FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=32,
    top_k=2), default gate and activation, both back ends."""
    torch.manual_seed(0)
    model = FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=32, top_k=2)
    x, gy = inputs((10, 16))
    want = run_reference(model, x, gy)
    for backend in BACKENDS:
        got = run_model(model, x, gy, backend)
        assert got[0].shape == (10, 16)
        assert_all_close(got, want, **FP32_TOL)


# ---------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_expert,top_k", [(1, 1), (4, 2), (16, 4)])
def test_empty_batch(num_expert, top_k, backend):
    model = make_mlp(num_expert, top_k)
    x = torch.zeros(0, D)
    y, gx, grads = run_model(model, x, torch.zeros(0, D), backend)
    assert y.shape == (0, D) and gx.shape == (0, D)
    for name, g in grads.items():
        assert g is not None and torch.count_nonzero(g) == 0, name
    # Leading dimensions are kept even when one of them is 0.
    with ops.use_backend(backend):
        assert model(torch.zeros(2, 0, D)).shape == (2, 0, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_expert,top_k,allowed", [
    (4, 1, [3]),            # one expert takes everything; experts 0..2 (before it) get nothing
    (4, 2, [1, 3]),
    (16, 2, [5, 6]),        # empty blocks before, between and after the busy ones
    (16, 4, [0, 7, 8, 15]),
])
def test_experts_without_tokens(num_expert, top_k, allowed, backend):
    gate = functools.partial(SubsetGate, allowed=allowed)
    model = make_mlp(num_expert, top_k, gate=gate)
    x, gy = inputs()
    got = run_model(model, x, gy, backend)
    want = run_reference(
        model, x, gy,
        idx=torch.tensor([ref.top_k_of(ref.logits_of(x, model.gate.gate.weight, model.gate.gate.bias)[t],
                                       top_k, allowed) for t in range(T)]))
    assert set(want[3].unique().tolist()) <= set(allowed)
    assert_all_close(got, want, **FP32_TOL)
    # The idle experts' gradients are exactly zero.
    idle = [e for e in range(num_expert) if e not in allowed]
    for name in ("htoh4.weight", "htoh4.bias", "h4toh.weight", "h4toh.bias"):
        assert torch.count_nonzero(got[2][name][idle]) == 0, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_expert,top_k", [(1, 1), (4, 2), (16, 3)])
def test_dropped_slots_custom_gate(num_expert, top_k, backend):
    model = make_mlp(num_expert, top_k, gate=DropGate)
    x, gy = inputs()
    drop = drop_pattern(T, top_k)
    y, gx, grads = got = run_model(model, x, gy, backend)
    want = run_reference(model, x, gy, route=lambda idx: idx.masked_fill(drop, -1))
    assert_finite(y, gx, grads)
    assert_all_close(got, want, **FP32_TOL)
    # Tokens whose every slot is dropped: output exactly 0, and nothing flows back to them.
    dead = drop.all(1)
    assert dead[0] and dead[5]
    assert torch.count_nonzero(y[dead]) == 0
    assert torch.count_nonzero(gx[dead]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_expert,top_k,factor", [
    (4, 2, 0.5),    # some slots dropped, some tokens fully dropped
    (4, 1, 0.3),
    (16, 3, 0.6),
    (16, 1, 0.5),   # capacity ceil(0.75) = 1
])
def test_dropped_by_capacity_gshard(num_expert, top_k, factor, backend):
    gate = functools.partial(GShardGate, capacity=(factor, factor), random_routing=False)
    model = make_mlp(num_expert, top_k, gate=gate)
    x, gy = inputs()
    cap = math.ceil(Fraction(str(factor)) * T * top_k / num_expert)  # GShard: factor * slots / experts
    keep = [cap] * num_expert
    y, gx, grads = got = run_model(model, x, gy, backend)
    want = run_reference(model, x, gy, route=lambda idx: ref.prune_by_capacity(idx, keep))
    idx = want[3]
    assert (idx < 0).any(), "the capacity should drop something in this configuration"
    assert_finite(y, gx, grads)
    assert_all_close(got, want, **FP32_TOL)
    dead = (idx < 0).all(1)
    assert torch.count_nonzero(y[dead]) == 0
    assert torch.count_nonzero(gx[dead]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_expert,factor", [(4, 0.5), (16, 0.7)])
def test_dropped_by_capacity_switch(num_expert, factor, backend):
    """SwitchGate (eval: no jitter): top-1 of the full softmax, score = that probability, each
    expert keeps its first ceil(factor * T / E) tokens."""
    gate = functools.partial(SwitchGate, capacity=(factor, factor))
    model = make_mlp(num_expert, 1, gate=gate).eval()
    x, gy = inputs()
    y, gx, grads = got = run_model(model, x, gy, backend)

    p = ref.mlp_params(model)
    xr = ref.leaf_copy(x)
    logits = ref.logits_of(xr, p["gate.weight"], p["gate.bias"])
    probs = torch.stack([torch.softmax(logits[t], 0) for t in range(T)])
    top1 = torch.tensor([[ref.top_k_of(probs[t], 1)[0]] for t in range(T)])
    idx = ref.prune_by_capacity(top1, [math.ceil(factor * T / num_expert)] * num_expert)
    score = torch.stack([probs[t, top1[t]] for t in range(T)])
    y_ref = ref.moe(xr, idx, score, ref.mlp_experts(p, model.experts.activation))
    y_ref.backward(gy)
    assert (idx < 0).any()
    assert_finite(y, gx, grads)
    assert_all_close(got, (y_ref.detach(), xr.grad, {k: v.grad for k, v in p.items()}), **FP32_TOL)
    dead = (idx < 0).all(1)
    assert torch.count_nonzero(y[dead]) == 0 and torch.count_nonzero(gx[dead]) == 0


# ---------------------------------------------------------------------------- back ends, determinism

@pytest.mark.parametrize("gate", [NaiveGate, DropGate])
@pytest.mark.parametrize("num_expert,top_k", [(4, 2), (16, 4)])
def test_native_and_fallback_agree(num_expert, top_k, gate):
    model = make_mlp(num_expert, top_k, gate=gate)
    x, gy = inputs()
    native = run_model(model, x, gy, "native")
    fallback = run_model(model, x, gy, "torch")
    assert_all_close(native, fallback, rtol=1e-6, atol=1e-6)
    # The index ops are exact: the same counts and positions, bit for bit.
    with torch.no_grad():
        idx, _ = model.gate(x)
    plans = {}
    for backend in BACKENDS:
        with ops.use_backend(backend):
            counts = ops.expert_count(idx, num_expert)
            pos, inv = ops.assign_pos(idx, counts)
        plans[backend] = (counts, pos, inv)
    for a, b in zip(plans["native"], plans["torch"]):
        assert a.dtype == b.dtype == torch.int64
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic(backend, dtype):
    results = []
    for _ in range(2):
        model = make_mlp(16, 3, dtype=dtype, seed=7)
        x, gy = inputs((64, D), dtype=dtype, seed=8)
        results.append(run_model(model, x, gy, backend))
    (y1, gx1, g1), (y2, gx2, g2) = results
    assert torch.equal(y1, y2)
    assert torch.equal(gx1, gx2)
    for name in PARAMS:
        assert torch.equal(g1[name], g2[name]), name


# ---------------------------------------------------------------------------- shapes, custom experts, layout

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, D), (4, 1, 2, D), (D,)])
def test_leading_shape(shape, backend):
    model = make_mlp(4, 2)
    x, gy = inputs(shape)
    got = run_model(model, x, gy, backend)
    assert got[0].shape == shape and got[1].shape == shape
    assert_all_close(got, run_reference(model, x, gy), **FP32_TOL)


@pytest.mark.parametrize("kwargs,message", [
    (dict(gate="gshard"), "gate must be a gate class (BaseGate, NaiveGate"),
    (dict(activation="gelu"), "activation must be a callable"),
    # The class, not an instance: it was called on the hidden rows and built a module from them.
    (dict(activation=nn.GELU), "got the class GELU: pass an instance, GELU()"),
    (dict(activation=nn.SiLU, gated_linear_unit=True), "got the class SiLU: pass an instance, SiLU()"),
])
def test_strings_for_classes_are_refused_with_a_hint(kwargs, message):
    """FastMoE's API takes a gate class and an activation callable; a name is refused with what
    to pass instead, not a bare "'str' object is not callable"."""
    with pytest.raises(TypeError, match=re.escape(message)):
        FMoETransformerMLP(num_expert=4, d_model=8, d_hidden=16, **kwargs)


def test_transformer_mlp_refuses_experts_of_the_caller():
    """FMoETransformerMLP builds its own fused experts: an expert= passed on to FMoE was built,
    then replaced, and the forward pass failed with "'_Expert' object is not iterable"."""
    with pytest.raises(TypeError, match=r"takes no expert=.*FMoE\(expert=\.\.\.\)"):
        FMoETransformerMLP(num_expert=2, d_model=D, d_hidden=H, expert=lambda d: nn.Linear(d, d))
    model = FMoETransformerMLP(num_expert=2, d_model=D, d_hidden=H, top_k=1, expert=None)
    assert model(torch.randn(3, D)).shape == (3, D)


@pytest.mark.parametrize("expert,error,message", [
    (nn.Linear(D, D), TypeError, "got a Linear instance: pass a function that builds one expert"),
    ([nn.Linear(D, D), nn.Linear(D, D)], TypeError, "got a Linear instance"),
    ("linear", TypeError, "expert must be a module constructor called with d_model"),
    (lambda d: torch.zeros(d), TypeError, "returned a Tensor, not an nn.Module"),
    ([], ValueError, "expert is an empty list"),
])
def test_fmoe_refuses_experts_that_are_not_constructors(expert, error, message):
    """FMoE's expert= takes constructors called with d_model; a module instance was called with
    d_model too, and failed with "linear(): argument 'input' must be Tensor, not int"."""
    with pytest.raises(error, match=re.escape(message)):
        FMoE(num_expert=2, d_model=D, top_k=1, expert=expert)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(num_expert=8 / 2), TypeError, "num_expert must be an int >= 1, got 4.0 (float)"),
    (dict(d_model=16.0), TypeError, "d_model must be an int >= 1, got 16.0 (float)"),
    (dict(d_hidden=32.0), TypeError, "d_hidden must be an int >= 1, got 32.0 (float)"),
    (dict(world_size=1.0), TypeError, "world_size must be an int >= 1, got 1.0 (float)"),
    (dict(num_expert=True), TypeError, "num_expert must be an int >= 1, got True (bool)"),
    (dict(d_model=0), ValueError, "d_model must be >= 1, got 0"),
    (dict(d_hidden=0), ValueError, "d_hidden must be >= 1, got 0"),
    (dict(num_expert=0), ValueError, "num_expert must be >= 1, got 0"),
])
def test_sizes_that_are_not_positive_ints_are_refused_by_name(kwargs, error, message):
    """A float size (e.g. ``experts / ranks``) failed inside torch.empty ("argument 'size' must
    be tuple of ints") without naming the argument; d_hidden=0 built experts of bias only."""
    args = dict(num_expert=4, d_model=D, d_hidden=H, top_k=1)
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(message)):
        FMoETransformerMLP(**args)


def test_integer_like_sizes_are_taken():
    np = pytest.importorskip("numpy")
    model = FMoETransformerMLP(num_expert=np.int64(2), d_model=np.int32(D), d_hidden=H, top_k=1)
    assert model(torch.randn(3, D)).shape == (3, D) and model.num_expert == 2


def _expert_ctors():
    def mlp(hidden, act):
        return lambda d: nn.Sequential(nn.Linear(d, hidden), act(), nn.Linear(hidden, d))
    return [mlp(8, nn.ReLU), lambda d: nn.Linear(d, d), mlp(24, nn.Tanh), lambda d: nn.Linear(d, d, bias=False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("as_list", [True, False])
def test_fmoe_custom_experts(top_k, as_list, backend):
    torch.manual_seed(3)
    if as_list:
        model = FMoE(num_expert=4, d_model=D, top_k=top_k, expert=_expert_ctors())
    else:
        model = FMoE(num_expert=4, d_model=D, top_k=top_k, expert=_expert_ctors()[0])
    assert len(model.experts) == 4 and model.gate.tot_expert == 4
    x, gy = inputs()
    # Reference first, on copies (the model's own modules are untouched by it).
    experts = ref.copy_modules(model.experts)
    gw, gb = ref.leaf_copy(model.gate.gate.weight), ref.leaf_copy(model.gate.gate.bias)
    xr = ref.leaf_copy(x)
    idx, score = ref.naive_gate(xr, gw, gb, top_k)
    y_ref = ref.moe(xr, idx, score, ref.module_experts(experts))
    y_ref.backward(gy)

    model.zero_grad(set_to_none=True)
    xm = x.clone().requires_grad_(True)
    with ops.use_backend(backend):
        y = model(xm)
        y.backward(gy)
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    torch.testing.assert_close(xm.grad, xr.grad, **FP32_TOL)
    torch.testing.assert_close(model.gate.gate.weight.grad, gw.grad, **FP32_TOL)
    torch.testing.assert_close(model.gate.gate.bias.grad, gb.grad, **FP32_TOL)
    for e, (m, r) in enumerate(zip(model.experts, experts)):
        for (name, p), q in zip(m.named_parameters(), r.parameters()):
            want = q.grad if q.grad is not None else torch.zeros_like(q)
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got, want, **FP32_TOL, msg=lambda s, n=f"expert {e} {name}": f"{n}: {s}")


@pytest.mark.parametrize("num_expert,d_model,d_hidden", [(4, 16, 32), (3, 8, 5)])
def test_fastmoe_parameter_layout(num_expert, d_model, d_hidden):
    model = FMoETransformerMLP(num_expert=num_expert, d_model=d_model, d_hidden=d_hidden, top_k=1)
    assert isinstance(model.experts.htoh4, FMoELinear) and isinstance(model.experts.h4toh, FMoELinear)
    assert model.experts.htoh4.weight.shape == (num_expert, d_hidden, d_model)
    assert model.experts.htoh4.bias.shape == (num_expert, d_hidden)
    assert model.experts.h4toh.weight.shape == (num_expert, d_model, d_hidden)
    assert model.experts.h4toh.bias.shape == (num_expert, d_model)
    assert type(model.gate.gate) is nn.Linear
    assert (model.gate.gate.in_features, model.gate.gate.out_features) == (d_model, num_expert)
    names = {n for n, _ in model.named_parameters()}
    assert names == {"gate.gate.weight", "gate.gate.bias", "experts.htoh4.weight",
                     "experts.htoh4.bias", "experts.h4toh.weight", "experts.h4toh.bias"}
    # Expert parallel: the gate picks among num_expert * world_size experts.
    gate = NaiveGate(d_model, num_expert, 3, top_k=2)
    assert (gate.gate.in_features, gate.gate.out_features) == (d_model, num_expert * 3)
    # FMoELinear: weight [E, out, in], each expert like nn.Linear(in, out); row-block semantics.
    lin = FMoELinear(num_expert, d_model, d_hidden)
    assert lin.weight.shape == (num_expert, d_hidden, d_model) and lin.bias.shape == (num_expert, d_hidden)
    counts = torch.tensor([2, 0, 1] + [1] * (num_expert - 3), dtype=torch.int64)
    rows = torch.randn(int(counts.sum()), d_model)
    out = lin(rows, counts)
    expert_of_row = torch.repeat_interleave(torch.arange(num_expert), counts)
    for r, e in enumerate(expert_of_row.tolist()):
        torch.testing.assert_close(out[r], torch.mv(lin.weight[e], rows[r]) + lin.bias[e], **FP32_TOL)
