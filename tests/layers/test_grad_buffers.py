"""The reused weight-gradient buffers of the grouped GEMM (CPU): reuse must never change what a
user sees in ``.grad``, whatever they keep or accumulate."""
import pytest
import torch

from fastmoe_megatron import FMoETransformerMLP


def _layer(seed=0):
    torch.manual_seed(seed)
    return FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=32, top_k=2)


def _grads(layer, x):
    layer.zero_grad(set_to_none=True)
    layer(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.fixture(params=["1", "0"], ids=["reuse", "no-reuse"])
def reuse(request, monkeypatch):
    monkeypatch.setenv("FMOE_REUSE_GRAD_BUFFERS", request.param)
    return request.param


def test_kept_gradients_are_not_overwritten(reuse):
    layer = _layer()
    x1, x2 = torch.randn(24, 16), torch.randn(24, 16)
    ref1, ref2 = _grads(_layer(), x1), _grads(_layer(), x2)
    layer(x1).square().sum().backward()
    kept = {n: p.grad for n, p in layer.named_parameters()}  # references, not copies
    layer.zero_grad(set_to_none=True)
    layer(x2).square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(kept[n], ref1[n])
        torch.testing.assert_close(p.grad, ref2[n])


def test_accumulation_and_repeated_steps(reuse):
    layer = _layer()
    xs = [torch.randn(24, 16) for _ in range(3)]
    refs = [_grads(_layer(), x) for x in xs]
    layer.zero_grad(set_to_none=True)
    for x in xs:  # accumulate three micro-batches
        layer(x).square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, sum(r[n] for r in refs), rtol=1e-5, atol=1e-5)
    for x, ref in zip(xs, refs):  # then steps with set_to_none and with zeroing in place
        for set_to_none in (True, False):
            layer.zero_grad(set_to_none=set_to_none)
            layer(x).square().sum().backward()
            for n, p in layer.named_parameters():
                torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)


def test_buffers_are_reused_between_steps(monkeypatch):
    """After zero_grad(set_to_none=True) the next backward pass writes into the kept buffer of
    each expert weight (a regression test: the cache was once keyed by the Python object that
    saved_tensors hands back, a new one every step, so nothing was ever reused)."""
    from fastmoe_megatron import ops

    monkeypatch.setenv("FMOE_REUSE_GRAD_BUFFERS", "1")
    layer = _layer()
    x = torch.randn(24, 16)
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        for w in (layer.experts.htoh4.weight, layer.experts.h4toh.weight):
            entry = ops._weight_grad_buffers._bufs.get(w)
            assert entry is not None, "no buffer kept for the expert weight"
            assert w.grad.data_ptr() == entry[0].data_ptr()


def test_kept_storage_is_not_overwritten(reuse):
    """A user who keeps only the gradient's storage object (not a tensor on it) keeps the values
    too: a Python storage object does not raise the storage's use count, so the reuse check also
    looks at the object's Python reference count."""
    layer = _layer()
    x1, x2 = torch.randn(24, 16), torch.randn(24, 16)
    ref2 = _grads(_layer(), x2)
    layer(x1).square().sum().backward()
    w = layer.experts.htoh4.weight
    first = w.grad.clone()
    storage = w.grad.untyped_storage()
    layer.zero_grad(set_to_none=True)
    layer(x2).square().sum().backward()
    kept = torch.empty(0, dtype=first.dtype).set_(storage).view(first.shape)
    torch.testing.assert_close(kept, first)
    torch.testing.assert_close(w.grad, ref2["experts.htoh4.weight"])
    assert kept.data_ptr() != w.grad.data_ptr()


def test_bad_switch_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FMOE_REUSE_GRAD_BUFFERS", "yes")
    layer = _layer()
    with pytest.raises(ValueError, match="FMOE_REUSE_GRAD_BUFFERS='yes'.*allowed values: 0, 1"):
        layer(torch.randn(8, 16)).sum().backward()
