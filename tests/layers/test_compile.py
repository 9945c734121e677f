"""torch.compile of a small model containing FMoETransformerMLP, on the CPU: forward and backward
match eager execution (outputs, input gradient, every parameter gradient).

- the ``aot_eager`` back end on both kernel back ends (it traces the native ops through their
  fake kernels and the autograd functions through AOTAutograd), with a second batch size on the
  native kernels so that the dynamic-shape recompile runs the fake kernels on symbolic sizes;
- the default inductor back end on the native kernels (about 20 s of compile time here);
- ``fullgraph=True`` on the native kernels: the whole layer should trace as one graph.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from fastmoe_megatron import FMoETransformerMLP, ops
from fastmoe_megatron.ops import native


class Block(nn.Module):
    """A pre-norm residual block around the MoE, plus a dense head."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.moe = FMoETransformerMLP(num_expert=4, d_model=d, d_hidden=32, top_k=2)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(x + self.moe(self.norm(x)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    assert native.available(), "the native CPU ops did not build or load"
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break warnings
        yield
    torch._dynamo.reset()


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    module = getattr(model, "_orig_mod", model)  # a compiled module wraps the original
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def _assert_same(got, want, tol):
    (y, gx, grads), (y_e, gx_e, grads_e) = got, want
    torch.testing.assert_close(y, y_e, **tol)
    torch.testing.assert_close(gx, gx_e, **tol)
    assert grads.keys() == grads_e.keys()
    for name in grads_e:
        assert grads[name] is not None, f"{name}: no gradient from the compiled model"
        torch.testing.assert_close(grads[name], grads_e[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def _check(backend, kernels, shapes, tol, **compile_kw):
    torch.manual_seed(0)
    eager = Block()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=backend, **compile_kw)
    with ops.use_backend(kernels):
        for i, shape in enumerate(shapes):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(i))
            _assert_same(_run(compiled, x), _run(eager, x), tol)


@pytest.mark.parametrize("kernels,shapes", [
    # [batch, seq, d] inputs; the second shape triggers a recompile with dynamic sizes, which
    # runs the native ops' fake kernels on symbolic shapes.
    ("native", [(2, 5, 16), (3, 7, 16)]),
    ("torch", [(2, 5, 16)]),
])
def test_compile_aot_eager_matches_eager(kernels, shapes):
    _check("aot_eager", kernels, shapes, dict(rtol=1e-6, atol=1e-6))


def test_compile_inductor_matches_eager():
    _check("inductor", "native", [(2, 5, 16)], dict(rtol=1e-5, atol=1e-5))


def test_compile_fullgraph_native():
    _check("aot_eager", "native", [(2, 5, 16)], dict(rtol=1e-6, atol=1e-6), fullgraph=True)
