"""moefy: turn the feed-forward blocks of any PyTorch model into MoE layers, in place.

    moefy(model, match=nn.TransformerEncoderLayer, num_expert=4, top_k=2, upcycle=True)

walks ``model``, and every module that ``match`` selects has its dense feed-forward block
``fc2(act(fc1(x)))`` replaced by an ``FMoETransformerMLP`` whose experts run ``fc1 -> act -> fc2``
(``act`` being everything between the two linears: activation, inner dropout). Everything around
the block is left as it was: the module keeps its class, its ``forward`` and so its call signature,
residual, layer norm (before or after) and output dropout.

How the block is replaced (the default adapters):

- the module's data flow is traced (``torch.fx``) and must contain one chain
  ``x -> fc1 -> m1 -> ... -> mk -> fc2`` of module calls, each used once, with
  ``fc1: Linear(d, h)`` and ``fc2: Linear(h, d)``. ``fc2`` becomes the MoE layer (its experts apply
  ``m1 ... mk`` between their two linears) and ``fc1, m1 ... mk`` become pass-throughs
  (``MovedIntoMoE``). This covers ``nn.Sequential(Linear, act, [Dropout], Linear, [Dropout])``,
  custom MLP modules, and blocks with a residual and a norm around such an MLP;
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (whose ``forward`` cannot be
  traced): their ``_ff_block`` is ``linear2(dropout(activation(linear1(x))))``, so the same surgery
  applies to ``linear1``, ``activation``, ``dropout`` and ``linear2``; the layer's fused inference
  fast path (which reads the dense weights) is switched off, and so is the nested-tensor path of
  any ``nn.TransformerEncoder`` holding such a layer. ``norm_first``, the residuals and
  ``dropout2`` run as before, since the layer's own ``forward`` still runs.

Any other shape takes an ``adapter``: a function ``adapter(module) -> DenseFFN | None`` that names
the two linears and the activation and says how to install the MoE layer (see ``DenseFFN``;
``fastmoe_megatron.transformer_xl`` has one that swaps in a whole new module).

Upcycling (``upcycle=True``): every expert starts as a copy of the dense block (Komatsuzaki et al.,
"Sparse Upcycling"), optionally plus Gaussian noise on the weights. With noise 0 and a gate whose
scores sum to one (NaiveGate), the MoE model computes what the dense model computed. Each
global expert's noise comes from its own generator, seeded by (``upcycle_seed``, the block's index
in ``model``, the expert's global index): a rank draws the noise of its own experts only.

A moefied model, upcycled or not, is the same whatever the expert-parallel size: each MoE layer
takes one draw of the global generator as its seed, builds its gate from it and initialises every
expert from (that seed, the expert's global index).

Expert parallel and parameter tags work as in ``FMoETransformerMLP``: ``num_expert`` experts per
rank, ``world_size`` ranks in ``moe_group``; expert parameters are tagged ``dp_comm =
expert_dp_comm`` (default ``"none"`` when the experts are spread over ranks, else ``"dp"``), the
gate ``"gate"``, and the rest of the model is untagged (``"dp"``) for
``DistributedGroupedDataParallel``.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.fx
import torch.nn as nn

from . import comm
from .gates import NaiveGate
from .layers import FMoE, FMoETransformerMLP, key_seed

Matcher = Union[type, str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]
Match = Union[Matcher, tuple, list]

__all__ = [
    "moefy", "DenseFFN", "MovedIntoMoE", "default_adapter", "traced_ffn", "transformer_layer_ffn",
    "upcycle_experts", "moe_layers", "gate_loss",
]


@dataclass
class DenseFFN:
    """A dense feed-forward block found in a module: ``fc2(activation(fc1(x)))``.

    ``fc1`` is ``Linear(d_model, d_hidden)`` and ``fc2`` is ``Linear(d_hidden, d_model)``;
    ``activation`` is the module each expert runs between its two linears (it may hold the inner
    dropout). ``install(moe)`` puts the new MoE layer in place of the block and returns the module
    that takes the matched module's place in the model (often the matched module itself).
    """

    fc1: nn.Linear
    fc2: nn.Linear
    activation: nn.Module
    install: Callable[[FMoETransformerMLP], nn.Module]

    @property
    def d_model(self) -> int:
        return self.fc1.in_features

    @property
    def d_hidden(self) -> int:
        return self.fc1.out_features


Adapter = Callable[[nn.Module], Optional[DenseFFN]]


class MovedIntoMoE(nn.Identity):
    """A pass-through left where a dense linear or activation was: it now runs inside the experts
    of the MoE layer at ``where``."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def extra_repr(self) -> str:
        return f"now inside the MoE layer {self.where!r}"


class _Fn(nn.Module):
    """A plain function (e.g. ``F.relu`` as stored by ``nn.TransformerEncoderLayer``) as a module."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _as_module(fn) -> nn.Module:
    return fn if isinstance(fn, nn.Module) else _Fn(fn)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _chain(mods: list) -> nn.Module:
    if not mods:
        return nn.Identity()
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


# ---------------------------------------------------------------------------- adapters

def transformer_layer_ffn(layer: nn.Module) -> Optional[DenseFFN]:
    """The feed-forward block of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
    (``None`` for other modules, or for a subclass that overrides ``_ff_block``)."""
    for cls in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        if isinstance(layer, cls) and type(layer)._ff_block is cls._ff_block:
            break
    else:
        return None
    if isinstance(layer.linear2, FMoE):
        raise ValueError(f"{type(layer).__name__} already holds an MoE layer")
    activation = nn.Sequential(_as_module(layer.activation), layer.dropout)

    def install(moe: FMoETransformerMLP) -> nn.Module:
        # _ff_block still computes dropout2(linear2(dropout(activation(linear1(x))))).
        for name in ("linear1", "activation", "dropout"):
            setattr(layer, name, MovedIntoMoE("linear2").train(layer.training))
        layer.linear2 = moe
        # The fused inference kernel reads linear1/linear2's dense weights: never take it.
        layer.activation_relu_or_gelu = 0
        return layer

    return DenseFFN(layer.linear1, layer.linear2, activation, install)


class _LinearTracer(torch.fx.Tracer):
    """Traces into ``nn.Sequential`` and into every custom module that holds an ``nn.Linear``;
    torch.nn's own modules (``Linear``, ``MultiheadAttention``, norms, activations) and modules
    without a linear (custom activations) stay one call each."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if super().is_leaf_module(m, qualname):
            return True
        return not any(isinstance(s, nn.Linear) for s in m.modules())


def traced_ffn(module: nn.Module) -> Optional[DenseFFN]:
    """Finds the chain ``fc1 -> m1 -> ... -> mk -> fc2`` in ``module``'s traced forward (see the
    module docstring). ``None`` when there is no such chain; ``TypeError`` when the forward cannot
    be traced or the only chain shares a module with the rest of the forward (naming it),
    ``ValueError`` when it holds more than one chain."""
    try:
        graph = _LinearTracer().trace(module)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow, unsupported ops, ...
        raise TypeError(f"moefy: cannot trace {type(module).__name__}.forward to find its "
                        f"feed-forward block ({type(e).__name__}: {e}); pass adapter=...") from e
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [n.target for n in graph.nodes if n.op == "get_attr"]

    def used_once(path):  # called once, and none of its parameters read directly
        return calls[path] == 1 and not any(a.startswith(path + ".") for a in attrs)

    found, shared = [], []
    for first in graph.nodes:
        if first.op != "call_module" or not isinstance(module.get_submodule(first.target), nn.Linear):
            continue
        node, middle = first, []
        while len(node.users) == 1:
            nxt = next(iter(node.users))
            if nxt.op != "call_module" or tuple(nxt.args) != (node,) or nxt.kwargs:
                break
            if isinstance(module.get_submodule(nxt.target), nn.Linear):
                fc1, fc2 = module.get_submodule(first.target), module.get_submodule(nxt.target)
                if fc1.in_features == fc2.out_features and fc1.out_features == fc2.in_features:
                    chain = [first.target, *(m.target for m in middle), nxt.target]
                    reused = [p for p in chain if not used_once(p)]
                    if reused:
                        shared.append((chain, reused))
                    else:
                        found.append((first.target, chain[1:-1], nxt.target))
                break
            middle.append(nxt)
            node = nxt
    if not found and shared:
        chain, reused = shared[0]
        uses = "; ".join(f"{p} is called {calls[p]} times" if calls[p] != 1 else
                         f"{p}'s parameters are also read directly" for p in reused)
        raise TypeError(f"moefy: the feed-forward chain {' -> '.join(chain)} of "
                        f"{type(module).__name__} shares a module with the rest of its forward "
                        f"({uses}), so it cannot move into the experts; give the block its own "
                        "modules, or pass adapter=...")
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"moefy: {type(module).__name__} holds {len(found)} feed-forward chains "
                         f"({', '.join(f[0] + '->' + f[2] for f in found)}); match the blocks "
                         "themselves, or pass an adapter")
    fc1_path, middle_paths, fc2_path = found[0]
    fc1, fc2 = module.get_submodule(fc1_path), module.get_submodule(fc2_path)
    activation = _chain([module.get_submodule(p) for p in middle_paths])

    def install(moe: FMoETransformerMLP) -> nn.Module:
        for path in [fc1_path, *middle_paths]:
            _set_submodule(module, path, MovedIntoMoE(fc2_path).train(module.training))
        _set_submodule(module, fc2_path, moe)
        return module

    return DenseFFN(fc1, fc2, activation, install)


def default_adapter(module: nn.Module) -> Optional[DenseFFN]:
    """``transformer_layer_ffn``, else ``traced_ffn``."""
    return transformer_layer_ffn(module) or traced_ffn(module)


# ---------------------------------------------------------------------------- matching

def _matcher(match: Match) -> Callable[[str, nn.Module], bool]:
    if isinstance(match, (list, tuple)) and match:
        if all(isinstance(m, type) for m in match):
            types = tuple(match)
            return lambda name, mod: isinstance(mod, types)
        parts = [_matcher(m) for m in match]
        return lambda name, mod: any(p(name, mod) for p in parts)
    if isinstance(match, type):
        return lambda name, mod: isinstance(mod, match)
    if isinstance(match, str):
        return lambda name, mod: fnmatch.fnmatchcase(name, match)
    if isinstance(match, re.Pattern):
        return lambda name, mod: match.fullmatch(name) is not None
    if callable(match):
        return match
    raise TypeError(f"moefy: match must be a class, a name pattern, a regex, a predicate "
                    f"(name, module) -> bool, or a list of these; got {match!r}")


def _find(model: nn.Module, select) -> list:
    """(name, module) of the selected modules, outermost first; nothing inside a selected module
    or an existing MoE layer is visited."""
    out = []

    def visit(name, mod):
        if isinstance(mod, FMoE):
            return
        if select(name, mod):
            out.append((name, mod))
            return
        for child_name, child in mod.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return out


# ---------------------------------------------------------------------------- upcycling

@torch.no_grad()
def upcycle_experts(moe: FMoETransformerMLP, fc1: nn.Linear, fc2: nn.Linear, noise: float = 0.0,
                    seed: int = 0, rank: int = 0) -> None:
    """Copies the dense ``fc1``/``fc2`` into every local expert of ``moe`` (rank ``rank`` holds
    global experts ``rank*E .. rank*E+E-1``). With ``noise > 0`` each global expert's weights get
    ``noise * std(dense weight) * N(0, 1)``, drawn (on the CPU, ``fc1``'s then ``fc2``'s) from a
    generator seeded with ``key_seed(seed, global expert index)``: a rank draws only its own
    experts' noise, and each expert's is the same at any expert-parallel size. A dense linear
    without bias gives zero expert biases; experts without biases (``bias=False``) take only
    dense linears without."""
    pairs = ((fc1, moe.experts.htoh4), (fc2, moe.experts.h4toh))
    for dense, experts in pairs:
        w = dense.weight.detach()
        if tuple(experts.weight.shape[1:]) != tuple(w.shape):
            raise ValueError(f"upcycling needs experts shaped like the dense block: expert weight "
                             f"{tuple(experts.weight.shape[1:])}, dense {tuple(w.shape)}")
        if experts.bias is None and dense.bias is not None:
            raise ValueError("upcycling copies the dense block, whose linears have biases: build "
                             "the experts with bias=True (the default), not bias=False")
        experts.weight.copy_(w.expand_as(experts.weight))
        if experts.bias is not None:
            if dense.bias is not None:
                experts.bias.copy_(dense.bias.detach().expand_as(experts.bias))
            else:
                experts.bias.zero_()
    if noise > 0:
        scales = [noise * dense.weight.detach().float().std() for dense, _ in pairs]
        generator = torch.Generator()
        for e in range(moe.num_expert):
            generator.manual_seed(key_seed(seed, rank * moe.num_expert + e))
            for (dense, experts), scale in zip(pairs, scales):
                eps = torch.randn(dense.weight.shape, generator=generator, dtype=torch.float32)
                experts.weight[e].add_((eps * scale).to(experts.weight))


# ---------------------------------------------------------------------------- moefy

def _moe_at_any_ep_size(rank: int, **kwargs) -> FMoETransformerMLP:
    """An ``FMoETransformerMLP`` whose weights, and the global random state after it, do not
    depend on the expert-parallel size: one draw of the global generator seeds the layer, its gate
    (shaped by the global expert count) is built from that seed, and each expert is initialised
    from (that seed, its global index)."""
    seed = int(torch.randint(0, 2**62, (1,)))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        moe = FMoETransformerMLP(**kwargs)
    generator = torch.Generator(device=moe.experts.htoh4.weight.device)
    for e in range(moe.num_expert):
        for part, linear in enumerate((moe.experts.htoh4, moe.experts.h4toh)):
            generator.manual_seed(key_seed(seed, rank * moe.num_expert + e, part))
            linear.reset_expert(e, generator)
    return moe


def moefy(model: nn.Module, match: Match, *, num_expert: int, top_k: int = 2, gate=NaiveGate,
          d_hidden: Optional[int] = None, upcycle: bool = False, upcycle_noise: float = 0.0,
          upcycle_seed: int = 0, world_size: int = 1, moe_group=None,
          expert_dp_comm: Optional[str] = None, adapter: Optional[Adapter] = None,
          **moe_kwargs) -> nn.Module:
    """Replaces the dense feed-forward block of every module of ``model`` that ``match`` selects
    with an MoE layer (``FMoETransformerMLP``); see the module docstring. Returns the model (the
    same object, unless ``model`` itself matched and its adapter returned a new module).

    Args:
        match: which modules hold a feed-forward block to replace: a class or tuple of classes
            (``isinstance``), a glob over qualified names (``"encoder.layers.*"``, ``fnmatch``
            rules, ``""`` is the model itself), a compiled regex (``fullmatch`` on the name), a
            predicate ``(name, module) -> bool``, or a list of these (any of them). Modules inside
            a selected module, and existing MoE layers, are not visited.
        num_expert: experts per rank (FastMoE's meaning); the gate picks among
            ``num_expert * world_size``.
        top_k: experts per token.
        gate: a gate class, or a ``functools.partial`` of one for its options (e.g.
            ``partial(GShardGate, capacity=(1.2, 2.4))``); called as
            ``gate(d_model, num_expert, world_size, top_k)``.
        d_hidden: the experts' hidden size; default the dense block's.
        upcycle: start every expert as a copy of the dense block (needs the default ``d_hidden``).
        upcycle_noise: with ``upcycle``, add ``upcycle_noise * std(W) * N(0, 1)`` to each expert's
            weights ``W`` (biases are copied as they are).
        upcycle_seed: seed of the noise (each expert of each block draws from its own
            generator, seeded from this, the block's index and the expert's global index).
        world_size, moe_group: expert parallel: ``world_size`` ranks of ``moe_group`` (default:
            the whole world) each hold ``num_expert`` experts.
        expert_dp_comm: the ``dp_comm`` tag of expert parameters; default ``"none"`` when
            ``world_size > 1`` (each rank owns its experts), else ``"dp"`` (experts are replicated
            like the rest of the model).
        adapter: ``adapter(module) -> DenseFFN | None`` finds the block in a selected module;
            default ``default_adapter``. ``None`` from the adapter is an error.
        **moe_kwargs: passed on to ``FMoETransformerMLP`` / ``FMoE`` (``gate_bias``,
            ``slice_group``, ``gate_hook``, ...).
    """
    if num_expert < 1:
        raise ValueError(f"num_expert must be >= 1, got {num_expert}")
    if not 0 <= upcycle_noise < math.inf:
        raise ValueError(f"upcycle_noise must be a finite number >= 0, got {upcycle_noise}")
    if upcycle_noise and not upcycle:
        raise ValueError(f"upcycle_noise={upcycle_noise} is the noise on upcycled experts: it "
                         "needs upcycle=True")
    if d_hidden is not None and d_hidden < 1:
        raise ValueError(f"d_hidden must be >= 1 (or None: the dense block's), got {d_hidden}")
    adapter = adapter or default_adapter
    if expert_dp_comm is None:
        expert_dp_comm = "none" if world_size > 1 else "dp"
    rank = comm.group_rank(moe_group) if world_size > 1 else 0

    selected = _find(model, _matcher(match))
    if not selected:
        raise ValueError(f"moefy: match={match!r} selects no module of {type(model).__name__}")
    if isinstance(gate, nn.Module) and len(selected) > 1:
        raise TypeError("moefy: gate is one module instance but there are "
                        f"{len(selected)} blocks; pass a gate class or factory")
    for block, (name, module) in enumerate(selected):
        ffn = adapter(module)
        if ffn is None:
            raise TypeError(f"moefy: no feed-forward block found in {name or '<model>'} "
                            f"({type(module).__name__}); pass adapter=... for this shape")
        hidden = ffn.d_hidden if d_hidden is None else d_hidden
        if upcycle and hidden != ffn.d_hidden:
            raise ValueError(f"upcycle=True copies the dense block, so d_hidden must be its "
                             f"{ffn.d_hidden}, got {d_hidden}")
        moe = _moe_at_any_ep_size(
            rank, num_expert=num_expert, d_model=ffn.d_model, d_hidden=hidden,
            activation=ffn.activation, expert_dp_comm=expert_dp_comm, expert_rank=rank,
            world_size=world_size, moe_group=moe_group, top_k=top_k, gate=gate, **moe_kwargs)
        moe.to(device=ffn.fc1.weight.device, dtype=ffn.fc1.weight.dtype)
        if upcycle:
            upcycle_experts(moe, ffn.fc1, ffn.fc2, upcycle_noise, key_seed(upcycle_seed, block),
                            rank)
        moe.train(module.training)
        new = ffn.install(moe)
        if new is not module:
            if name:
                _set_submodule(model, name, new)
            else:
                model = new

    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoder) and any(isinstance(m, FMoE) for m in enc.modules()):
            enc.use_nested_tensor = False  # the nested-tensor path reads the dense weights
    return model


# ---------------------------------------------------------------------------- helpers

def moe_layers(model: nn.Module) -> list:
    """``(name, layer)`` of every MoE layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FMoE)]


def gate_loss(model: nn.Module, clear: bool = True) -> Optional[torch.Tensor]:
    """The sum of the balance losses the gates of ``model`` recorded in the last forward pass
    (``None`` when no gate recorded one)."""
    losses = [m.gate.get_loss(clear=clear) for _, m in moe_layers(model)]
    losses = [l for l in losses if l is not None]
    return sum(losses[1:], losses[0]) if losses else None
