"""Double backward (``create_graph=True``, e.g. a gradient penalty) through the MoE layer.

The native kernels have no derivatives of their own; a backward pass that builds a graph runs
the pure-PyTorch formulas instead (``ops._backward_kernels``). Before that, autograd silently
returned zeros for the native kernels' part of the second derivative, and the pure-PyTorch path
lost the graph through the recomputed scatter buffer and the fused experts' saved fc1 output.
The layer is held against the brute-force per-token reference (tests/reference.py), whose
second derivatives come from autograd through plain torch ops.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from fastmoe_megatron import FMoETransformerMLP, ops
from fastmoe_megatron.gates import NaiveGate
from tests import reference as ref
from tests.reference import MLP_PARAMS

D, H, T, E, K = 6, 8, 10, 4, 2


def drop_route(idx):
    """Drops (-1) every slot of token 0 and each slot with (t + j) % 3 == 0."""
    t = torch.arange(idx.shape[0]).unsqueeze(1)
    j = torch.arange(idx.shape[1]).unsqueeze(0)
    drop = (t + j) % 3 == 0
    drop[:1] = True
    return idx.masked_fill(drop, -1)


class DropGate(NaiveGate):
    def forward(self, inp):
        idx, score = super().forward(inp)
        return drop_route(idx), score


def penalty(loss, params):
    """Sum of squares of the gradients of ``loss`` (with a graph), differentiated again."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    pen = sum((g.float() ** 2).sum() for g in grads)
    return [g.detach() for g in grads], torch.autograd.grad(pen, params)


def layer_second_order(model, x, backend):
    xl = x.detach().clone().requires_grad_(True)
    names = ["x"] + MLP_PARAMS
    params = [xl, model.gate.gate.weight, model.gate.gate.bias, model.experts.htoh4.weight,
              model.experts.htoh4.bias, model.experts.h4toh.weight, model.experts.h4toh.bias]
    with ops.use_backend(backend), warnings.catch_warnings():
        # "an autograd kernel was not registered": a native kernel reached by the second pass.
        warnings.simplefilter("error", UserWarning)
        y = model(xl)
        first, second = penalty((y.float() ** 3).sum(), params)
    return dict(zip(names, first)), dict(zip(names, second))


def reference_second_order(model, x, dtype, route=None):
    p = ref.mlp_params(model, dtype)
    xr = ref.leaf_copy(x, dtype)
    idx, score = ref.naive_gate(xr, p["gate.weight"], p["gate.bias"], model.top_k)
    if route is not None:
        idx = route(idx)
    y = ref.moe(xr, idx, score, ref.mlp_experts(p, model.experts.activation))
    first, second = penalty((y ** 3).sum(), [xr] + [p[n] for n in MLP_PARAMS])
    names = ["x"] + MLP_PARAMS
    return dict(zip(names, first)), dict(zip(names, second))


def make(dtype, gate=NaiveGate):
    torch.manual_seed(0)
    model = FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=H, top_k=K, gate=gate)
    with torch.no_grad():
        model.experts.htoh4.bias.normal_(0, 0.5)
        model.experts.h4toh.bias.normal_(0, 0.5)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    return model.to(dtype), x.to(dtype)


def assert_matches(got, want, rtol, atol):
    for name, w in want.items():
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(got[name].double(), w.double(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("drops", [False, True])
def test_second_derivatives_match_reference(backend, fused, dtype, drops, monkeypatch):
    monkeypatch.setenv("FMOE_FUSED_EXPERTS", fused)
    model, x = make(dtype, DropGate if drops else NaiveGate)
    first, second = layer_second_order(model, x, backend)
    want_first, want_second = reference_second_order(model, x, dtype,
                                                     drop_route if drops else None)
    # fp64 as tight as the gate allows: it takes its softmax in fp32.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_matches(first, want_first, **tol)
    assert_matches(second, want_second, **tol)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_second_derivatives_bf16(backend):
    """bf16 layer against the fp32 reference on the same bf16-rounded weights and input. The
    second derivatives of a cubed output compound bf16 roundings: 5% of the largest entry."""
    model, x = make(torch.bfloat16)
    first, second = layer_second_order(model, x, backend)
    want_first, want_second = reference_second_order(model, x.float(), torch.float32)
    assert_matches(first, want_first, rtol=5e-2, atol=5e-2)
    assert_matches(second, want_second, rtol=5e-2, atol=5e-2)


def test_plain_backward_still_uses_the_native_kernels(monkeypatch):
    """Only a backward pass that builds a graph switches to the pure-PyTorch formulas."""
    if ops.backend_name("cpu") != "native":
        pytest.skip("native ops not built")
    calls = []
    real = ops.reference.gather_rows
    monkeypatch.setattr(ops.reference, "gather_rows",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model, x = make(torch.float32)
    model(x.requires_grad_(True)).sum().backward()
    assert calls == []
    xl = x.detach().clone().requires_grad_(True)
    torch.autograd.grad(model(xl).sum(), xl, create_graph=True)
    assert calls, "the graph-building backward pass did not use the pure-PyTorch kernels"


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_ops_gradgradcheck(backend):
    """Each autograd op on its own, with dropped slots and an expert without rows, in fp64."""
    g = torch.Generator().manual_seed(3)
    idx = torch.tensor([[0, 2], [2, -1], [0, 0], [-1, -1], [2, 0]])
    counts = ops.expert_count(idx, 3)
    pos, inv = ops.assign_pos(idx, counts)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w1 = torch.randn(3, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b1 = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b2 = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)

    def dispatch(x, w, w1, b1):
        buf = ops.scatter_rows(x, pos, inv, 2)
        return ops.gather_rows(ops.grouped_linear(buf, w1, counts, b1).tanh(), pos, inv, 2, w)

    def fused(x, w1, b1, w2, b2):
        return ops.expert_mlp(ops.scatter_rows(x, pos, inv, 2), counts, w1, b1, w2, b2, "gelu")

    with ops.use_backend(backend):
        assert torch.autograd.gradgradcheck(dispatch, (x, w, w1, b1))
        assert torch.autograd.gradgradcheck(fused, (x, w1, b1, w2, b2))
