"""The local path of FMoETransformerMLP keeps no copy of the scattered buffer for the backward
pass (ops.recompute_when_saved re-scatters it): the gradients are those of the plain path, an
in-place change of the input between forward and backward is an error, and the hooks stand aside
under torch.utils.checkpoint (whose own hooks they would shadow)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint as ckpt

from fastmoe_megatron import FMoETransformerMLP, ops


def _layer():
    torch.manual_seed(0)
    return FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=32, top_k=2)


def _grads(layer, x, wrap=None):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = wrap(layer, x) if wrap else layer(x)
    y.square().sum().backward()
    return [x.grad] + [p.grad for p in layer.parameters()]


def _saved_as_usual(layer, x):
    # Any active saved-tensor hooks turn the recompute off: everything is saved as usual.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return layer(x)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_recompute_matches_saved(backend):
    layer = _layer()
    x = torch.randn(2, 6, 16)
    with ops.use_backend(backend):
        got = _grads(layer, x)
        want = _grads(copy.deepcopy(layer), x, _saved_as_usual)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_scattered_buffer_is_not_saved():
    layer = _layer()
    x = torch.randn(12, 16, requires_grad=True)
    saved = []
    real_hooks = ops.recompute_when_saved

    def spy(t, remake, depends_on):
        saved.append(None)
        return real_hooks(t, lambda: (saved.append("remade"), remake())[1], depends_on)

    ops.recompute_when_saved = spy
    try:
        y = layer(x)
    finally:
        ops.recompute_when_saved = real_hooks
    assert saved == [None]
    y.sum().backward()
    assert saved == [None, "remade"]


def test_input_modified_in_place_is_an_error():
    layer = _layer()
    base = torch.randn(12, 16, requires_grad=True)
    x = base * 1  # a non-leaf that may be modified in place
    y = layer(x)
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(RuntimeError, match="modified|inplace"):
        y.sum().backward()


def test_under_checkpoint():
    layer = _layer()
    x = torch.randn(12, 16)
    got = _grads(layer, x, lambda m, inp: ckpt.checkpoint(m, inp, use_reentrant=False))
    want = _grads(copy.deepcopy(layer), x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
