"""FMoETransformerMLP and FMoE on a GPU against the brute-force per-token reference
(tests/reference.py), run on the CPU in fp32 on copies of the same weights.

Every comparison covers the output, the input gradient and every parameter gradient, on the native
CUDA kernels and on the pure-PyTorch fallback, in fp32 and bf16, with dropped slots, capacities,
empty batches and sizes that span many thread blocks. Skipped where CUDA is not available; on a GPU
machine a CUDA library that fails to build fails these tests.
"""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.nn as nn

from fastmoe_megatron import FMoE, FMoETransformerMLP, ops
from fastmoe_megatron.gates import GShardGate, NaiveGate, SwitchGate
from tests import reference as ref
from tests.reference import MLP_PARAMS as PARAMS
from tests.reference import assert_all_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available: the GPU layer tests cannot run here")

BACKENDS = ["native", "torch"]
# fp32 on the GPU: other summation orders and fused multiply-adds than the CPU reference.
FP32_TOL = dict(rtol=1e-4, atol=1e-4)
# bf16 against the fp32 reference: 2e-2 relative, and 2e-2 of the tensor's largest entry.
BF16_TOL = dict(rtol=2e-2, atol=2e-2, scaled=True)
DEV = "cuda"


# FMOE_NATIVE=0 or FMOE_CUDA_OPS=0: the native CUDA ops are off on purpose; the "native" cases
# then skip and the pure-PyTorch ones still run.
DISABLED = next((v for v in ("FMOE_NATIVE", "FMOE_CUDA_OPS")
                 if os.environ.get(v, "auto").strip().lower() == "0"), None)


@pytest.fixture(scope="module", autouse=True)
def _native_cuda():
    from fastmoe_megatron import _native

    if DISABLED:
        return
    assert _native.load("cuda"), f"the native CUDA ops did not build or load: {_native.status()}"
    assert ops.backend_name(DEV) == "native"


@pytest.fixture(autouse=True)
def _skip_native_when_disabled(request):
    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend")
    if DISABLED and backend != "torch":
        pytest.skip(f"native CUDA ops disabled by {DISABLED}=0")


def make_mlp(E, K, d=16, h=32, dtype=torch.float32, gate=NaiveGate, seed=0):
    torch.manual_seed(seed)
    model = FMoETransformerMLP(num_expert=E, d_model=d, d_hidden=h, top_k=K, gate=gate)
    with torch.no_grad():  # biases of some size, so that a bias bug cannot hide
        model.experts.htoh4.bias.normal_(0, 0.5)
        model.experts.h4toh.bias.normal_(0, 0.5)
    return model.to(DEV, dtype)


def inputs(T, d=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, d, generator=g).to(DEV, dtype), torch.randn(T, d, generator=g).to(DEV, dtype))


def run_model(model, x, gy, backend):
    """Output, input gradient and parameter gradients on the GPU, returned on the CPU."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        y = model(x)
        y.backward(gy)
    assert y.is_cuda and x.grad.is_cuda
    grads = {k: None if v is None else v.cpu() for k, v in ref.model_grads(model).items()}
    return y.detach().cpu(), x.grad.cpu(), grads


def run_reference(model, x, gy, idx, score_fn=None):
    """The per-token reference on the CPU, in fp32, with the experts ``idx`` [T, K] (-1: dropped).
    Scores are the softmax of the chosen logits (NaiveGate, GShardGate) unless ``score_fn``."""
    p = {k: None if v is None else ref.leaf_copy(v.cpu(), torch.float32)
         for k, v in ref.mlp_params(model).items()}
    xr = ref.leaf_copy(x.cpu(), torch.float32)
    logits = ref.logits_of(xr, p["gate.weight"], p["gate.bias"])
    if score_fn is None:
        chosen = logits.gather(1, idx.clamp(min=0))
        score = torch.softmax(chosen, dim=-1)
    else:
        score = score_fn(logits, idx)
    y = ref.moe(xr, idx, score, ref.mlp_experts(p, model.experts.activation))
    y.backward(gy.cpu().float())
    return y.detach(), xr.grad, {k: None if v is None else v.grad for k, v in p.items()}


def gate_choice(model, x):
    with torch.no_grad():
        idx, _ = model.gate(x)
    return idx.cpu()


def assert_routing_agrees(model, x, idx, min_gap):
    """The GPU gate picks the fp32 CPU top-k, in order, wherever the choice is not a near tie."""
    p = ref.mlp_params(model, torch.float32)
    logits = ref.logits_of(x.cpu().float(), p["gate.weight"].cpu(), p["gate.bias"].cpu()).detach()
    K = idx.shape[1]
    for t in range(idx.shape[0]):
        want = ref.top_k_of(logits[t], K)
        if idx[t].tolist() != want:
            row = logits[t].sort(descending=True).values
            gaps = (row[:K] - row[1:K + 1]).abs() if K < row.numel() else (row[:-1] - row[1:]).abs()
            assert gaps.min().item() < min_gap, f"token {t}: GPU chose {idx[t].tolist()}, CPU {want}"


# (E, K, T, d, h): the FastMoE-sized small cases, and a larger one spanning many thread blocks.
SWEEP = [(1, 1, 24, 16, 32), (4, 2, 24, 16, 32), (16, 4, 24, 16, 32), (64, 2, 1024, 64, 128)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,K,T,d,h", SWEEP)
def test_fp32_matches_reference(E, K, T, d, h, backend):
    model = make_mlp(E, K, d, h)
    x, gy = inputs(T, d)
    idx = gate_choice(model, x)
    assert_routing_agrees(model, x, idx, min_gap=1e-4)
    assert_all_close(run_model(model, x, gy, backend), run_reference(model, x, gy, idx), **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,K,T,d,h", SWEEP)
def test_bf16_matches_fp32_reference(E, K, T, d, h, backend):
    model = make_mlp(E, K, d, h, dtype=torch.bfloat16)
    x, gy = inputs(T, d, dtype=torch.bfloat16)
    idx = gate_choice(model, x)
    assert_routing_agrees(model, x, idx, min_gap=0.05)
    got = run_model(model, x, gy, backend)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    assert_all_close(got, run_reference(model, x, gy, idx), **BF16_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kw", [dict(bias=False), dict(gated_linear_unit=True, activation=nn.SiLU()),
                                dict(gated_linear_unit=True, bias=False, activation=nn.SiLU())],
                         ids=["no-bias", "swiglu", "swiglu-no-bias"])
def test_expert_variants_match_reference(kw, dtype, backend):
    """Experts without biases (grouped GEMMs without bias tensors) and gated experts."""
    torch.manual_seed(0)
    model = FMoETransformerMLP(num_expert=16, d_model=64, d_hidden=128, top_k=2, **kw)
    model.to(DEV, dtype)
    x, gy = inputs(512, 64, dtype=dtype)
    idx = gate_choice(model, x)
    assert_routing_agrees(model, x, idx, min_gap=1e-4 if dtype == torch.float32 else 0.05)
    names = [n for n, t in ref.mlp_tensors(model).items() if t is not None]
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert_all_close(run_model(model, x, gy, backend), run_reference(model, x, gy, idx),
                     names=names, **tol)


class DropGate(NaiveGate):
    """NaiveGate that then drops every third slot and every slot of token 0 (-1)."""

    def forward(self, inp):
        idx, score = super().forward(inp)
        return idx.masked_fill(drop_pattern(*idx.shape).to(idx.device), -1), score


def drop_pattern(T, K):
    drop = (torch.arange(T).unsqueeze(1) + torch.arange(K).unsqueeze(0)) % 3 == 0
    drop[0] = True
    return drop


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,K,T", [(4, 2, 24), (64, 3, 1000)])
def test_dropped_slots(E, K, T, backend):
    model = make_mlp(E, K, gate=DropGate)
    x, gy = inputs(T)
    idx = gate_choice(model, x)
    assert torch.equal(idx < 0, drop_pattern(T, K))
    # The reference's scores: softmax over the logits the gate chose before dropping.
    full = NaiveGate.forward(model.gate, x)[0].cpu()
    got = run_model(model, x, gy, backend)
    want = run_reference(model, x, gy, idx,
                         score_fn=lambda logits, i: torch.softmax(logits.gather(1, full), dim=-1))
    assert_all_close(got, want, **FP32_TOL)
    assert torch.count_nonzero(got[0][0]) == 0 and torch.count_nonzero(got[1][0]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,K,factor", [(4, 2, 0.5), (16, 1, 0.3), (16, 3, 0.6)])
def test_gshard_capacity(E, K, factor, backend):
    T = 64
    gate = functools.partial(GShardGate, capacity=(factor, factor), random_routing=False)
    model = make_mlp(E, K, gate=gate)
    x, gy = inputs(T)
    chosen = ref.naive_gate(x.cpu(), model.gate.gate.weight.detach().cpu(),
                            model.gate.gate.bias.detach().cpu(), K)[0]
    cap = math.ceil(factor * T) * K // E
    idx = ref.prune_by_capacity(chosen, [cap] * E)
    assert (idx < 0).any()
    got = run_model(model, x, gy, backend)
    want = run_reference(model, x, gy, idx,
                         score_fn=lambda logits, i: torch.softmax(logits.gather(1, chosen), dim=-1))
    assert_all_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_capacity(backend):
    E, T, factor = 8, 128, 0.5
    model = make_mlp(E, 1, gate=functools.partial(SwitchGate, capacity=(factor, factor))).eval()
    x, gy = inputs(T)
    p = ref.mlp_params(model, torch.float32)
    logits = ref.logits_of(x.cpu(), p["gate.weight"].detach().cpu(), p["gate.bias"].detach().cpu())
    top1 = logits.argmax(1, keepdim=True)
    idx = ref.prune_by_capacity(top1, [math.ceil(factor * T / E)] * E)
    assert (idx < 0).any()
    got = run_model(model, x, gy, backend)
    want = run_reference(model, x, gy, idx,
                         score_fn=lambda lg, i: torch.softmax(lg, dim=-1).gather(1, top1))
    assert_all_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    model = make_mlp(16, 4)
    x, gy = inputs(0)
    y, gx, grads = run_model(model, x, gy, backend)
    assert y.shape == (0, 16) and gx.shape == (0, 16)
    for name, g in grads.items():
        assert g is not None and torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_and_fallback_agree_and_repeat(dtype):
    """The native CUDA kernels and the fallback agree; the native ones give the same bits twice."""
    model = make_mlp(64, 2, 64, 128, dtype=dtype)
    x, gy = inputs(2048, 64, dtype=dtype)
    a, b = run_model(model, x, gy, "native"), run_model(model, x, gy, "native")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in PARAMS:
        assert torch.equal(a[2][name], b[2][name]), name
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert_all_close(a, run_model(model, x, gy, "torch"), **tol)


def test_fmoe_custom_experts():
    """FMoE with a list of nn.Module experts (FastMoE's generic path) on the GPU."""
    torch.manual_seed(3)
    d = 16
    model = FMoE(num_expert=4, d_model=d, top_k=2,
                 expert=lambda d: nn.Sequential(nn.Linear(d, 24), nn.Tanh(), nn.Linear(24, d))).to(DEV)
    x, gy = inputs(40, d)
    experts = [m.cpu() for m in ref.copy_modules(model.experts)]
    gw = ref.leaf_copy(model.gate.gate.weight.cpu())
    gb = ref.leaf_copy(model.gate.gate.bias.cpu())
    xr = ref.leaf_copy(x.cpu())
    idx, score = ref.naive_gate(xr, gw, gb, 2)
    y_ref = ref.moe(xr, idx, score, ref.module_experts(experts))
    y_ref.backward(gy.cpu())
    xm = x.clone().requires_grad_(True)
    y = model(xm)
    y.backward(gy)
    torch.testing.assert_close(y.cpu(), y_ref.detach(), **FP32_TOL)
    torch.testing.assert_close(xm.grad.cpu(), xr.grad, **FP32_TOL)
    torch.testing.assert_close(model.gate.gate.weight.grad.cpu(), gw.grad, **FP32_TOL)
    for m, r in zip(model.experts, experts):
        for p, q in zip(m.parameters(), r.parameters()):
            want = q.grad if q.grad is not None else torch.zeros_like(q)
            torch.testing.assert_close(p.grad.cpu(), want, **FP32_TOL)


def test_torch_compile_inductor():
    """torch.compile (inductor, Triton kernels on the GPU, one graph) of a block containing the
    layer matches eager execution, forward and backward."""
    torch._dynamo.reset()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.moe = FMoETransformerMLP(num_expert=8, d_model=64, d_hidden=128, top_k=2)

        def forward(self, x):
            return x + self.moe(self.norm(x))

    torch.manual_seed(0)
    eager = Block().to(DEV)
    compiled = Block().to(DEV)
    compiled.load_state_dict(eager.state_dict())
    fn = torch.compile(compiled, fullgraph=True)  # a graph break would run the ops eagerly
    x, gy = inputs(256, 64)
    results = []
    for model, call in ((eager, eager), (compiled, fn)):
        xi = x.clone().requires_grad_(True)
        y = call(xi)
        y.backward(gy)
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (y0, gx0, g0), (y1, gx1, g1) = results
    torch.testing.assert_close(y1, y0, **FP32_TOL)
    torch.testing.assert_close(gx1, gx0, **FP32_TOL)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")
