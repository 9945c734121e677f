"""What FastMoE (v1.1) code does with the layers, against the brute-force per-token reference:
experts whose forward takes the row count, nests of tensors, FastMoE's gate output shapes,
scalar mask fills, inputs under autocast (with and without a mask), ``gate_bias`` for gate
subclasses, FastMoE 1.1's per-expert state dicts and its module paths."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn

from fastmoe_megatron import FMoE, FMoELinear, FMoETransformerMLP
from fastmoe_megatron.gates import GShardGate, NaiveGate, NoisyGate
from tests import reference as ref

D, H, T = 8, 16, 11
TOL = dict(rtol=1e-5, atol=1e-5)


class CountingExpert(nn.Module):
    """A FastMoE-style expert: ``forward(inp, fwd_expert_count)``."""

    def __init__(self, d_model):
        super().__init__()
        self.fc = nn.Linear(d_model, d_model)
        self.seen = []

    def forward(self, inp, fwd_expert_count):
        self.seen.append(int(fwd_expert_count.reshape(-1)[0]))
        assert fwd_expert_count.numel() == 1 and int(fwd_expert_count[0]) == inp.shape[0]
        return torch.tanh(self.fc(inp))


def _params_equal_grads(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_experts_that_take_the_row_count():
    torch.manual_seed(0)
    layer = FMoE(num_expert=3, d_model=D, top_k=2, expert=CountingExpert)
    x = torch.randn(T, D, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    idx, score = layer.gate(x.detach())
    experts = ref.copy_modules(layer.experts)
    for e in experts:
        e.seen = []
    xr = x.detach().clone().requires_grad_(True)
    want = ref.moe(xr, idx, score.detach(),
                   [lambda v, m=m: torch.tanh(m.fc(v.unsqueeze(0))).squeeze(0) for m in experts])
    want.pow(2).sum().backward()
    torch.testing.assert_close(y, want, **TOL)
    counts = torch.bincount(idx.reshape(-1), minlength=3).tolist()
    assert [m.seen[0] for m in layer.experts] == counts
    for m, r in zip(layer.experts, experts):
        _params_equal_grads(m, r)


class PairGate(NaiveGate):
    """A gate over a nest: routes on its tensor "a"."""

    def forward(self, inp):
        return super().forward(inp["a"])


class PairExperts(nn.Module):
    """Fused experts over a nest {"a": [rows, D], "b": [rows, 2, D]}."""

    def __init__(self, num_expert):
        super().__init__()
        self.fa = FMoELinear(num_expert, D, D)
        self.fb = FMoELinear(num_expert, D, D)

    def forward(self, inp, fwd_expert_count):
        b = inp["b"]
        fb = self.fb(b[:, 0], fwd_expert_count) + self.fb(b[:, 1], fwd_expert_count)
        return {"a": self.fa(inp["a"], fwd_expert_count), "b": fb}


class PairMoE(FMoE):
    def __init__(self, num_expert=3):
        super().__init__(num_expert=num_expert, d_model=D, top_k=2, gate=PairGate)
        self.experts = PairExperts(num_expert)


def test_nests_of_tensors():
    torch.manual_seed(1)
    layer = PairMoE()
    a = torch.randn(T, D, requires_grad=True)
    b = torch.randn(T, 2, D, requires_grad=True)
    out = layer({"a": a, "b": b})
    assert set(out) == {"a", "b"} and out["a"].shape == (T, D) and out["b"].shape == (T, D)
    (out["a"].pow(2).sum() + out["b"].sin().sum()).backward()

    wa, ba, wb, bb = (ref.leaf_copy(p) for p in (layer.experts.fa.weight, layer.experts.fa.bias,
                                                  layer.experts.fb.weight, layer.experts.fb.bias))
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    idx, score = layer.gate({"a": a2})  # the scores carry the gradient of "a" through the gate
    want_a = ref.moe(a2, idx, score, [lambda v, e=e: wa[e] @ v + ba[e] for e in range(3)])
    rows = []  # expert e on token t of "b": fb(b[t, 0]) + fb(b[t, 1])
    for t in range(T):
        acc = b2[t, 0] * 0
        for j in range(2):
            e = int(idx[t, j])
            acc = acc + score[t, j] * (wb[e] @ b2[t, 0] + bb[e] + wb[e] @ b2[t, 1] + bb[e])
        rows.append(acc)
    want_b = torch.stack(rows)
    (want_a.pow(2).sum() + want_b.sin().sum()).backward()
    torch.testing.assert_close(out["a"], want_a, **TOL)
    torch.testing.assert_close(out["b"], want_b, **TOL)
    torch.testing.assert_close(a.grad, a2.grad, **TOL)
    torch.testing.assert_close(b.grad, b2.grad, **TOL)
    for mine, want in zip((layer.experts.fa.weight, layer.experts.fa.bias, layer.experts.fb.weight,
                           layer.experts.fb.bias), (wa, ba, wb, bb)):
        torch.testing.assert_close(mine.grad, want.grad, **TOL)
    with pytest.raises(ValueError, match="same number of tokens"):
        layer({"a": a, "b": b[:3]})


@pytest.mark.parametrize("tokens", [0, 1])
def test_nests_with_few_tokens(tokens):
    """A nest of zero tokens (an expert-parallel rank can have none) failed with "cannot reshape
    tensor of 0 elements into shape [0, -1]"; its output and gradients are empty."""
    torch.manual_seed(2)
    layer = PairMoE()
    a = torch.randn(tokens, D, requires_grad=True)
    b = torch.randn(tokens, 2, D, requires_grad=True)
    out = layer({"a": a, "b": b})
    assert out["a"].shape == (tokens, D) and out["b"].shape == (tokens, D)
    (out["a"].sum() + out["b"].sum()).backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    assert all(p.grad is not None for p in layer.experts.parameters())


class FastMoEShapedGate(NaiveGate):
    """Returns idx flat [T*K] and score [T, 1, K], as FastMoE's gates may."""

    def forward(self, inp):
        idx, score = super().forward(inp)
        return idx.reshape(-1), score.unsqueeze(1)


def test_fastmoe_gate_output_shapes():
    torch.manual_seed(2)
    layer = FMoETransformerMLP(num_expert=4, d_model=D, d_hidden=H, top_k=2, gate=FastMoEShapedGate)
    plain = FMoETransformerMLP(num_expert=4, d_model=D, d_hidden=H, top_k=2)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(T, D)
    torch.testing.assert_close(layer(x), plain(x))


class ReturningGate(nn.Module):
    """A gate that returns whatever ``fn(x)`` gives."""
    top_k = 2

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _ids(x, dtype=torch.int64):
    return torch.zeros(x.shape[0], 2, dtype=dtype)


@pytest.mark.parametrize("fn,message", [
    (lambda x: (_ids(x, torch.int32), torch.ones(x.shape[0], 2)),
     "ReturningGate returned expert ids (idx) of dtype torch.int32; they must be int64"),
    (lambda x: (_ids(x, torch.float32), torch.ones(x.shape[0], 2)),
     "ReturningGate returned expert ids (idx) of dtype torch.float32; they must be int64"),
    (lambda x: torch.zeros(x.shape[0], 4),
     "ReturningGate must return (idx, score), two tensors of [tokens, top_k]; got a Tensor"),
    (lambda x: (_ids(x), torch.ones(x.shape[0], 2), None),
     "ReturningGate must return (idx, score), two tensors of [tokens, top_k]; got a tuple of 3"),
])
def test_gate_output_of_another_kind_is_refused_naming_the_gate(fn, message):
    """A custom gate's int32 ids or lone logits failed with "idx must be int64, got Int" or
    "too many values to unpack", which did not say that the gate was at fault."""
    layer = FMoETransformerMLP(num_expert=2, d_model=D, d_hidden=H, top_k=2, gate=ReturningGate(fn))
    with pytest.raises(TypeError, match=re.escape(message)):
        layer(torch.randn(3, D))
    ok = FMoETransformerMLP(num_expert=2, d_model=D, d_hidden=H, top_k=2,
                            gate=ReturningGate(lambda x: (_ids(x), torch.ones(x.shape[0], 2))))
    assert ok(torch.randn(3, D)).shape == (3, D)


def test_gate_output_of_slots_by_tokens_is_refused():
    """[top_k, tokens] ids and scores (transposed) hold as many elements as [tokens, top_k]:
    they were reshaped into it and routed the wrong tokens' choices without an error."""
    ids = lambda x: (_ids(x).t().contiguous(), torch.ones(2, x.shape[0]))  # noqa: E731
    layer = FMoETransformerMLP(num_expert=2, d_model=D, d_hidden=H, top_k=2, gate=ReturningGate(ids))
    with pytest.raises(RuntimeError, match=re.escape(
            "ReturningGate returned idx (2, 3) and score (2, 3); expected [3, 2] each")):
        layer(torch.randn(3, D))


def test_experts_of_another_output_width_are_refused_by_name():
    """An expert wider at its output than d_model failed in torch.cat ("Sizes of tensors must
    match except in dimension 0"), which did not say which module was at fault."""
    layer = FMoE(num_expert=2, d_model=D, top_k=2, expert=lambda d: nn.Linear(d, 2 * d))
    with pytest.raises(ValueError, match=re.escape(
            f"expert 0 (Linear) returned (3, {2 * D}) for rows of (3, {D}): an FMoE expert maps "
            "rows to rows of the same shape")):
        layer(torch.randn(3, D))


def test_mask_dict_with_scalar_fills():
    torch.manual_seed(3)
    mask = torch.tensor([0, 1, 0, 2, 0, 0, 1, 0, 0, 0, 0])
    layer = FMoE(num_expert=2, d_model=D, top_k=1, expert=lambda d: nn.Linear(d, d),
                 mask=mask, mask_dict={1: 0.5, 2: torch.full((D,), -1.0)})
    y = layer(torch.randn(T, D))
    assert torch.all(y[mask == 1] == 0.5) and torch.all(y[mask == 2] == -1.0)


@pytest.mark.parametrize("fill", [torch.zeros(D + 1), torch.zeros(2, D), torch.zeros(D, 1)])
def test_mask_dict_fill_of_another_shape_is_refused_by_name(fill):
    """A fill that is not a scalar or [d_model] (e.g. FastMoE's [top_k, d_model]) failed in
    torch's index_put ("shape mismatch: value tensor ...") and only when a token had its value."""
    mask = torch.tensor([0, 0, 0, 0])
    layer = FMoE(num_expert=2, d_model=D, top_k=1, expert=lambda d: nn.Linear(d, d),
                 mask=mask, mask_dict={1: fill})
    with pytest.raises(ValueError, match=re.escape(
            f"mask_dict[1] has shape {tuple(fill.shape)}: a masked token's output must be a "
            f"scalar or [d_model={D}]")):
        layer(torch.randn(4, D))


def test_mask_dict_fill_keeps_its_gradient():
    fill = torch.zeros(1, D, requires_grad=True)
    layer = FMoE(num_expert=2, d_model=D, top_k=1, expert=lambda d: nn.Linear(d, d),
                 mask=torch.tensor([0, 1, 0, 1, 1]), mask_dict={1: fill})
    layer(torch.randn(5, D)).sum().backward()
    torch.testing.assert_close(fill.grad, torch.full((1, D), 3.0))


def test_autocast_runs_the_experts_in_their_dtype():
    """Under CPU autocast the layer's input arrives in bf16 (from an autocast linear): the experts
    run in their own fp32 weights on it, as FastMoE's FMoELinear casts (it used to raise)."""
    torch.manual_seed(4)
    layer = FMoETransformerMLP(num_expert=4, d_model=D, d_hidden=H, top_k=2)
    proj = nn.Linear(D, D)
    x = torch.randn(T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = proj(x)
        y = layer(h)
        idx, score = layer.gate(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    y.sum().backward()
    assert layer.experts.htoh4.weight.grad is not None and proj.weight.grad is not None
    params = ref.mlp_params(layer)
    want = ref.moe(h.detach().float(), idx, score.detach().float(),
                   ref.mlp_experts(params, nn.GELU()))
    torch.testing.assert_close(y.detach(), want.detach(), **TOL)


def test_masked_layer_under_autocast():
    """With a mask, the routed tokens' outputs (fp32 from the experts) and the masked ones' fills
    share one output in the experts' dtype, as without a mask (it used to raise)."""
    torch.manual_seed(5)
    mask = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    layer = FMoETransformerMLP(num_expert=4, d_model=D, d_hidden=H, top_k=2, mask=mask,
                               mask_dict={1: 0.25})
    proj = nn.Linear(D, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = proj(torch.randn(T, D))
        y = layer(h)
        idx, score = layer.gate(h[mask == 0])
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    assert torch.all(y[mask == 1] == 0.25)
    want = ref.moe(h[mask == 0].detach().float(), idx, score.detach().float(),
                   ref.mlp_experts(ref.mlp_params(layer), nn.GELU()))
    torch.testing.assert_close(y[mask == 0].detach(), want.detach(), **TOL)
    y.sum().backward()
    assert proj.weight.grad is not None


class ForwardingGate(NaiveGate):
    """A FastMoE-style subclass that passes everything on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)


class ForwardingGShardGate(GShardGate):
    def __init__(self, d_model, num_expert, world_size, topk=2, **kwargs):
        super().__init__(d_model, num_expert, world_size, topk, **kwargs)


@pytest.mark.parametrize("gate", [NaiveGate, ForwardingGate, ForwardingGShardGate])
@pytest.mark.parametrize("gate_bias", [True, False])
def test_gate_bias_reaches_naive_gate_subclasses(gate, gate_bias):
    """As in FastMoE, a NaiveGate subclass gets ``gate_bias`` even when its signature does not
    name it (it takes ``**kwargs``); the state dict then matches NaiveGate's."""
    layer = FMoETransformerMLP(num_expert=4, d_model=D, d_hidden=H, gate=gate, gate_bias=gate_bias)
    assert (layer.gate.gate.bias is not None) == gate_bias
    plain = FMoETransformerMLP(num_expert=4, d_model=D, d_hidden=H, gate_bias=gate_bias)
    layer.load_state_dict(plain.state_dict())


class OwnBiasGate(NaiveGate):
    """A subclass that sets the bias itself and passes the rest on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, gate_bias=False, **kwargs)


def test_subclass_that_sets_its_own_bias():
    """With the default gate_bias=True nothing is passed to a **kwargs subclass (True is
    NaiveGate's default anyway), so one that sets the bias itself keeps working."""
    layer = FMoETransformerMLP(num_expert=4, d_model=D, d_hidden=H, gate=OwnBiasGate)
    assert layer.gate.gate.bias is None


def test_gates_without_a_bias_do_not_get_gate_bias():
    """NoisyGate has no bias and takes no ``gate_bias`` (nor did it in FastMoE)."""
    layer = FMoETransformerMLP(num_expert=4, d_model=D, d_hidden=H, gate=NoisyGate,
                               gate_bias=False)
    assert isinstance(layer.gate, NoisyGate)


def test_fastmoe_1_1_per_expert_state_dict_loads():
    """FastMoE 1.0.1+ keeps each expert of FMoETransformerMLP as its own one-expert module
    (experts.{i}.htoh4.weight [1, H, D], ...); such a state dict loads into the stacked form."""
    torch.manual_seed(5)
    src = FMoETransformerMLP(num_expert=3, d_model=D, d_hidden=H, top_k=2)
    per_expert = {k: v for k, v in src.state_dict().items() if not k.startswith("experts.")}
    for name, v in src.experts.state_dict().items():
        for i in range(3):
            per_expert[f"experts.{i}.{name}"] = v[i:i + 1].clone()
    dst = FMoETransformerMLP(num_expert=3, d_model=D, d_hidden=H, top_k=2)
    dst.load_state_dict(per_expert)
    for (name, p), q in zip(src.named_parameters(), dst.parameters()):
        assert torch.equal(p, q), name
    x = torch.randn(T, D)
    torch.testing.assert_close(dst(x), src(x))


def test_fastmoe_module_paths():
    from fastmoe_megatron.layers import mark_module_parallel_comm
    from fastmoe_megatron.linear import FMoELinear as Linear
    from fastmoe_megatron.transformer import FMoETransformerMLP as MLP

    assert Linear is FMoELinear and MLP is FMoETransformerMLP
    m = nn.Linear(2, 2)
    mark_module_parallel_comm(m, "dp")
    assert {p.dp_comm for p in m.parameters()} == {"dp"}


def test_fmoe_linear_starts_like_fastmoes():
    """Each expert's weight starts as an nn.Linear's of its shape, uniform in +-1/sqrt(in_feat),
    and its bias at zero, as FastMoE's FMoELinear (and Megatron) start them."""
    torch.manual_seed(0)
    lin = FMoELinear(4, 64, 16)
    bound = 1 / math.sqrt(64)
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(lin.bias) == 0
    assert not torch.equal(lin.weight[0], lin.weight[1])


@pytest.mark.parametrize("gate_kw,match", [
    (dict(num_expert=2, world_size=1), r"routes to 2 experts.*= 4"),
    (dict(num_expert=8, world_size=1), r"routes to 8 experts.*= 4"),
    (dict(num_expert=4, world_size=1, top_k=1), r"top_k=1 experts.*top_k=2"),
])
def test_gate_module_built_for_another_layer_is_refused(gate_kw, match):
    """A gate module must route to the layer's experts: one built for fewer left experts idle
    silently, one for more failed later in the count op."""
    gate = NaiveGate(D, **{"top_k": 2, **gate_kw})
    with pytest.raises(ValueError, match=match):
        FMoE(num_expert=4, d_model=D, top_k=2, gate=gate, expert=lambda d: nn.Linear(d, d))
    ok = NaiveGate(D, 4, 1, top_k=2)
    assert FMoE(num_expert=4, d_model=D, top_k=2, gate=ok, expert=lambda d: nn.Linear(d, d)).gate is ok
