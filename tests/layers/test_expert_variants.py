"""Experts without biases (``bias=False``: Megatron's ``--disable-bias-linear``) and gated experts
(``gated_linear_unit=True``: SwiGLU, Megatron's ``--swiglu``) against the brute-force per-token
reference (tests/reference.py), in fp32 and bf16, on both kernel back ends: the output, the input
gradient and the gradient of every parameter the layer has."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastmoe_megatron import FMoETransformerMLP, ops
from tests import reference as ref
from tests.layers.test_fmoe_reference import BF16_TOL, FP32_TOL, inputs, run_model, run_reference

D, H, E, K = 16, 32, 4, 2

VARIANTS = {
    "no-bias": dict(bias=False),
    "swiglu": dict(gated_linear_unit=True, activation=nn.SiLU()),
    "swiglu-no-bias": dict(gated_linear_unit=True, bias=False, activation=nn.SiLU()),
    "geglu": dict(gated_linear_unit=True, activation=nn.GELU()),
}


def make(variant, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=H, top_k=K, **VARIANTS[variant])
    with torch.no_grad():
        for lin in (model.experts.htoh4, model.experts.h4toh):
            if lin.bias is not None:
                lin.bias.normal_(0, 0.5)
    return model.to(dtype)


def present(model) -> list[str]:
    return [n for n, p in ref.mlp_tensors(model).items() if p is not None]


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_layout(variant):
    kw = VARIANTS[variant]
    model = make(variant)
    gated, bias = kw.get("gated_linear_unit", False), kw.get("bias", True)
    assert model.experts.htoh4.weight.shape == (E, (2 if gated else 1) * H, D)
    assert model.experts.h4toh.weight.shape == (E, D, H)
    names = {n for n, _ in model.experts.named_parameters()}
    want = {"htoh4.weight", "h4toh.weight"} | ({"htoh4.bias", "h4toh.bias"} if bias else set())
    assert names == want
    # A gated layer cannot run as the fused (ungated) expert op; a plain one without biases can.
    assert (model.experts.fused_activation() is None) == (gated or not ops.fused_experts_enabled())


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_matches_reference(variant, backend):
    model = make(variant)
    x, gy = inputs((24, D))
    got = run_model(model, x, gy, backend)
    want = run_reference(model, x, gy)
    ref.assert_all_close(got, want, names=present(model), **FP32_TOL)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_matches_fp32_reference(variant, backend):
    model = make(variant, torch.bfloat16)
    x, gy = inputs((24, D), dtype=torch.bfloat16)
    with torch.no_grad():
        idx, _ = model.gate(x)
    got = run_model(model, x, gy, backend)
    want = run_reference(model, x.float(), gy.float(), dtype=torch.float32, idx=idx)
    assert got[0].dtype == torch.bfloat16
    ref.assert_all_close(got, want, names=present(model), **BF16_TOL)


def test_a_gated_expert_is_its_dense_block():
    """With one expert, top-1 and a gate bias of 0, the layer is exactly the dense gated MLP
    ``fc2(act(fc1(x)[:H]) * fc1(x)[H:])`` (the softmax over one kept logit is 1)."""
    torch.manual_seed(3)
    model = FMoETransformerMLP(num_expert=1, d_model=D, d_hidden=H, top_k=1,
                               gated_linear_unit=True, activation=nn.SiLU())
    fc1, fc2 = nn.Linear(D, 2 * H), nn.Linear(H, D)
    with torch.no_grad():
        model.experts.htoh4.weight[0].copy_(fc1.weight)
        model.experts.htoh4.bias[0].copy_(fc1.bias)
        model.experts.h4toh.weight[0].copy_(fc2.weight)
        model.experts.h4toh.bias[0].copy_(fc2.bias)
    x = torch.randn(5, 7, D)
    a, b = fc1(x).chunk(2, dim=-1)
    torch.testing.assert_close(model(x), fc2(nn.functional.silu(a) * b), rtol=1e-5, atol=1e-6)
