"""Worker bodies of the expert-parallel moefy tests (run in gloo processes by tests/dist_utils.py).

Every rank builds the same dense model (same seed) and from it two MoE models, both upcycled with
the same noise seed: the one-process reference holding all ``world * E`` experts, and the
expert-parallel model (``world_size=world``, ``E`` experts per rank). Upcycling draws each global
expert's noise from its own seed, and moefy seeds each layer independently of the expert-parallel
size, so from the same global seed the experts and the gates already agree (checked). Each rank
feeds its own tokens; every comparison runs in the worker.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from fastmoe_megatron import DistributedGroupedDataParallel, FMoE
from fastmoe_megatron.moefy import moe_layers, moefy

D, H, E = 16, 32, 2
TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(dense, world, rank, moefy_fn):
    torch.manual_seed(1)  # the same global random state for both: the same model
    ref = moefy_fn(copy.deepcopy(dense), world_size=1, num_expert=E * world)
    torch.manual_seed(1)
    ep = moefy_fn(copy.deepcopy(dense), world_size=world, num_expert=E)
    sl = slice(rank * E, (rank + 1) * E)
    for (name, m), (_, r) in zip(moe_layers(ep), moe_layers(ref)):
        assert isinstance(m, FMoE) and m.world_size == world and m.num_expert == E, name
        for pname, p in m.experts.named_parameters():
            q = dict(r.experts.named_parameters())[pname]
            if pname.startswith("activation."):  # one copy on every rank, reduced as dense
                torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{name}.experts.{pname}")
                assert p.dp_comm == "dp" and getattr(p, "allreduce", True) is True
                continue
            torch.testing.assert_close(p, q[sl], rtol=0, atol=0, msg=f"{name}.experts.{pname}")
            assert p.dp_comm == "none" and p.allreduce is False
        # The gates too, and so everything after them (they once depended on the number of
        # local experts drawn before them from the global generator).
        for pname, p in m.gate.named_parameters():
            q = dict(r.gate.named_parameters())[pname]
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{name}.gate.{pname}")
    return ref, ep


def encoder_matches_one_process(rank, world, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, H, dropout=0.0, batch_first=True, norm_first=norm_first)
    dense = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def fn(model, **kw):
        return moefy(model, nn.TransformerEncoderLayer, top_k=2, upcycle=True, upcycle_noise=0.2,
                     **kw)

    return _train_step_matches(dense, world, rank, fn)


def norm_in_the_chain_matches_one_process(rank, world):
    """An MLP with a LayerNorm between its linears: moefy keeps it as the experts' activation,
    one copy shared by every expert and rank. Its gradient on each rank holds only the rows of
    that rank's experts, so it must be reduced like a dense parameter (it once was tagged as an
    expert parameter and never reduced)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(D, H), nn.LayerNorm(H), nn.GELU(), nn.Linear(H, D))

    def fn(model, **kw):
        return moefy(model, "", top_k=2, upcycle=True, upcycle_noise=0.3, **kw)

    return _train_step_matches(dense, world, rank, fn)


def plain_moefy_is_the_same_at_any_ep_size(rank, world):
    """Without upcycling: two blocks, experts and gates (checked in _pair) equal the one-process
    model's, and so does the rest of the model built after them."""
    torch.manual_seed(0)
    dense = nn.Sequential(*[nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
                            for _ in range(2)])

    def fn(model, **kw):
        model = moefy(model, ["0", "1"], top_k=2, **kw)
        model.append(nn.Linear(D, D))  # drawn from the global generator after both layers
        return model

    ref, ep = _pair(dense, world, rank, fn)
    torch.testing.assert_close(ep[2].weight, ref[2].weight, rtol=0, atol=0)
    return True


def _train_step_matches(dense, world, rank, fn):
    ref, ep = _pair(dense, world, rank, fn)
    ddp = DistributedGroupedDataParallel(ep)  # every rank holds the same dense weights already

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3 + r, D, generator=g) for r in range(world)]
    ws = [torch.randn(2, 3 + r, D, generator=g) for r in range(world)]
    y = ddp(xs[rank])
    (y * ws[rank]).sum().backward()
    ddp.allreduce_gradients()  # mean over the ranks' losses

    ref_loss = 0.0
    for r in range(world):
        y_ref = ref(xs[r])
        if r == rank:
            torch.testing.assert_close(y.detach(), y_ref.detach(), **TOL)
        ref_loss = ref_loss + (y_ref * ws[r]).sum() / world
    ref_loss.backward()

    ref_params = dict(ref.named_parameters())
    sl = slice(rank * E, (rank + 1) * E)
    for name, p in ep.named_parameters():
        expected = ref_params[name].grad
        if ".experts." in name and ".experts.activation." not in name:
            expected = expected[sl]
        torch.testing.assert_close(p.grad, expected, **TOL, msg=lambda m: f"{name} grad: {m}")
    return float(y.detach().abs().sum())


def transformer_xl_plain_is_the_same_at_any_ep_size(rank, world):
    """Not upcycled: moefy_transformer_xl draws the experts and gates again as transformers
    initialises linears, each expert from its global index; they equal the one-process model's
    (checked in _pair)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    from fastmoe_megatron.transformer_xl import (byte_level_config, moefy_transformer_xl,
                                                 transfo_xl_module)

    torch.manual_seed(0)
    config = byte_level_config(d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0)
    dense = transfo_xl_module().TransfoXLLMHeadModel(config)
    _pair(dense, world, rank, lambda model, **kw: moefy_transformer_xl(model, top_k=2, **kw))
    return True


def transformer_xl_matches_one_process(rank, world):
    warnings.filterwarnings("ignore", category=FutureWarning)
    from fastmoe_megatron.transformer_xl import (byte_level_config, moefy_transformer_xl,
                                                 transfo_xl_module)

    torch.manual_seed(0)
    config = byte_level_config(d_model=32, n_layer=2, n_head=4, d_inner=64, tgt_len=5, mem_len=6,
                               dropout=0.0)
    dense = transfo_xl_module().TransfoXLLMHeadModel(config).eval()

    def fn(model, **kw):
        return moefy_transformer_xl(model, top_k=2, upcycle=True, upcycle_noise=0.2, **kw)

    ref, ep = _pair(dense, world, rank, fn)
    g = torch.Generator().manual_seed(2)
    segments = [torch.randint(0, 256, (1 + rank, 5), generator=g) for _ in range(3)]
    mems_ep = mems_ref = None
    with torch.no_grad():
        for seg in segments:
            a, b = ep(seg, mems=mems_ep), ref(seg, mems=mems_ref)
            mems_ep, mems_ref = a.mems, b.mems
            torch.testing.assert_close(a.prediction_scores, b.prediction_scores, **TOL)
            for x, y in zip(mems_ep, mems_ref):
                torch.testing.assert_close(x, y, **TOL)
    assert dist.get_world_size() == world
    return True
