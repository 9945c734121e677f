"""torch.library.opcheck over the registered ``fmoe`` ops (the CPU kernels): their schemas
(outputs that do not alias one another or the inputs), their fake kernels against the real
outputs, and their use under AOT autograd. The backward ops are checked with every output mask
and with the caller's ``*_out`` buffers, which leave several outputs empty."""
from __future__ import annotations

import itertools

import pytest
import torch

from fastmoe_megatron.ops import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native ops not built")

F = torch.ops.fmoe if native.available() else None
SCHEMA_AND_FAKE = ("test_schema", "test_faketensor")


def _check(op, args, test_utils=SCHEMA_AND_FAKE):
    torch.library.opcheck(op, args, test_utils=test_utils)


def _plan():
    idx = torch.tensor([[0, 2], [1, -1], [2, 2], [0, 1]])
    counts = F.expert_count(idx, 3)
    pos, inv = F.assign_pos(idx.reshape(-1), counts)
    return idx, counts, pos, inv


def test_dispatch_ops():
    idx, counts, pos, inv = _plan()
    g = torch.Generator().manual_seed(0)
    x, buf = torch.randn(4, 5, generator=g), torch.randn(8, 5, generator=g)
    w = torch.rand(8, generator=g)
    for op, args in [
        (F.expert_count, (idx, 3)),
        (F.assign_pos, (idx.reshape(-1), counts)),
        (F.scatter_rows, (x, pos, 2, w)),
        (F.scatter_rows, (x, pos, 2, None)),
        (F.gather_rows, (buf, inv, 2, w)),
        (F.gather_weight_grad, (torch.randn(4, 5, generator=g), buf, inv, 2)),
        (F.limit_by_capacity, (torch.tensor([4, 1, 3, 2, 2, 3]), torch.tensor([5, 10]), 2, 3)),
        (F.prune_gate_by_capacity, (idx, torch.tensor([1, 1, 1]))),
    ]:
        _check(op, args, test_utils=SCHEMA_AND_FAKE + ("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("mask", list(itertools.product([True, False], repeat=3)),
                         ids=lambda m: "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("into_out", [False, True], ids=["fresh", "gw_out"])
def test_grouped_mm_backward(mask, into_out):
    """An output that the mask leaves out, or that went into grad_weight_out, is an empty tensor
    of its own: the same empty tensor in two slots broke the schema's no-alias promise."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    counts = torch.tensor([3, 2, 2])
    out = torch.empty_like(w) if into_out else None
    _check(F.grouped_mm_backward, (torch.randn(8, 6, generator=g), x, w, counts, list(mask), out))


def test_grouped_mm():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(8, 5, generator=g), torch.randn(3, 6, 5, generator=g), torch.randn(3, 6)
    _check(F.grouped_mm, (x, w, torch.tensor([3, 2, 2]), b),
           test_utils=SCHEMA_AND_FAKE + ("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("mask", [[True] * 5, [True, True, False, True, False],
                                  [False, True, True, False, False], [False] * 5])
@pytest.mark.parametrize("buffers", ["fresh", "out", "accumulate"])
def test_expert_mlp_ops(mask, buffers):
    g = torch.Generator().manual_seed(3)
    x, counts = torch.randn(8, 5, generator=g), torch.tensor([3, 2, 2])
    w1, w2 = torch.randn(3, 7, 5, generator=g), torch.randn(3, 5, 7, generator=g)
    b1, b2 = torch.randn(3, 7, generator=g), torch.randn(3, 5, generator=g)
    _check(F.expert_mlp, (x, counts, w1, b1, w2, b2, "gelu"))
    _, hidden = F.expert_mlp(x, counts, w1, b1, w2, b2, "gelu")
    outs = [None] * 4
    if buffers != "fresh":
        outs = [torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(b1), torch.zeros_like(b2)]
    _check(F.expert_mlp_backward, (torch.randn(8, 5, generator=g), x, hidden, counts, w1, w2,
                                   "gelu", mask, *outs, buffers == "accumulate"))
