"""FMoE, FMoELinear and FMoETransformerMLP: the forward pass of an MoE layer, nothing else.

    x [T, d] -> gate -> (idx [T, K], score [T, K])
      -> count per expert -> positions (pos, inv)
      -> scatter: buffer [T*K, d] with rows grouped by expert
      -> (expert parallel) all-to-all of counts and rows
      -> experts (grouped GEMM)
      -> (expert parallel) all-to-all back
         (on the CPU, FMoETransformerMLP overlaps the exchange with its experts: ep_overlap)
      -> gather: each token's K rows combined with its scores -> [T, d]

A dropped slot (expert id -1, from a capacity limit or random routing) contributes zero, so a
token whose slots are all dropped gets a zero output (FastMoE's behaviour; add a residual around
the layer to pass such tokens through).
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
import warnings

import torch
import torch.nn as nn

from . import comm, ep_overlap, ops
from .gates import NaiveGate


def key_seed(*key: int) -> int:
    """A seed derived from the integers of ``key`` (e.g. base seed, layer, expert index), for
    weights that must not depend on how the experts are spread over ranks."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k)) % (2**62)
    return seed


class FMoELinear(nn.Module):
    """``num_expert`` linear layers applied to rows grouped by expert (one grouped GEMM)."""

    def __init__(self, num_expert: int, in_feat: int, out_feat: int, bias: bool = True, rank: int = 0):
        super().__init__()
        self.num_expert, self.in_feat, self.out_feat, self.rank = num_expert, in_feat, out_feat, rank
        self.weight = nn.Parameter(torch.empty(num_expert, out_feat, in_feat))
        self.bias = nn.Parameter(torch.empty(num_expert, out_feat)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        for e in range(self.num_expert):
            self.reset_expert(e)

    @torch.no_grad()
    def reset_expert(self, e: int, generator: torch.Generator | None = None):
        """Initialises expert ``e``: its weight like an ``nn.Linear`` of the same shape's (from
        ``generator``, default the global one), its bias to zero (as FastMoE's ``FMoELinear`` and
        Megatron do)."""
        nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5), generator=generator)
        if self.bias is not None:
            self.bias[e].zero_()

    def forward(self, inp: torch.Tensor, fwd_expert_count: torch.Tensor) -> torch.Tensor:
        # Rows in another dtype (autocast) run in the weights' dtype, as in FastMoE.
        return ops.grouped_linear(inp.to(self.weight.dtype), self.weight, fwd_expert_count,
                                  self.bias)

    def extra_repr(self):
        return (f"num_expert={self.num_expert}, in_features={self.in_feat}, "
                f"out_features={self.out_feat}, bias={self.bias is not None}, rank={self.rank}")


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(x).all()`` as a 0-d bool tensor, in one pass over ``x`` instead of three
    (``isfinite`` writes a bool tensor that ``all`` reads again): ``x`` is finite exactly when its
    minimum and maximum are, since ``aminmax`` propagates NaN and an infinity is an extremum."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)


@functools.lru_cache(maxsize=None)
def _takes_count(expert_cls: type) -> bool:
    """Whether an expert class's forward takes the row count as its second argument, as
    FastMoE's experts do (``forward(self, inp, fwd_expert_count)``): a second positional parameter
    after ``self`` without a default. Cached per class: it is asked for every expert call."""
    try:
        params = list(inspect.signature(expert_cls.forward).parameters.values())[1:]  # no self
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and positional[1].default is inspect.Parameter.empty


def _width(t: torch.Tensor) -> int:
    """The features per row of ``t`` [rows, ...] (the product of its trailing dimensions)."""
    return math.prod(t.shape[1:])


def mark_module_parallel_comm(module: nn.Module, comm: str) -> None:
    """Tags every parameter of ``module`` with ``dp_comm = comm`` (FastMoE's helper)."""
    for p in module.parameters():
        p.dp_comm = comm


def _make_gate(gate, d_model, num_expert, world_size, top_k, gate_bias):
    if isinstance(gate, nn.Module):
        # A gate built for another expert count would leave experts idle, or route past them.
        tot = getattr(gate, "tot_expert", None)
        if tot is not None and tot != num_expert * world_size:
            raise ValueError(f"the gate module routes to {tot} experts, but the layer has "
                             f"num_expert * world_size = {num_expert} * {world_size} = "
                             f"{num_expert * world_size}")
        k = getattr(gate, "top_k", None)
        if k is not None and k != top_k:
            raise ValueError(f"the gate module picks top_k={k} experts per token, but the layer "
                             f"has top_k={top_k}")
        return gate
    if not callable(gate):
        from . import gates

        names = ", ".join(n for n in gates.__all__ if n.endswith("Gate"))
        raise TypeError(f"gate must be a gate class ({names} from fastmoe_megatron.gates, or "
                        f"your own) or a gate module, got {gate!r}")
    if _passes_gate_bias(gate, gate_bias):
        return gate(d_model, num_expert, world_size, top_k, gate_bias=gate_bias)
    return gate(d_model, num_expert, world_size, top_k)


def _passes_gate_bias(gate, gate_bias: bool) -> bool:
    """Whether the gate class gets ``gate_bias``: when its signature names it; and, as in
    FastMoE, a ``NaiveGate`` subclass that passes ``**kwargs`` on when it is ``False`` (True is
    NaiveGate's default, and a subclass may set the bias itself). ``NoisyGate`` and ``ZeroGate``
    have no bias and do not get it."""
    try:
        params = inspect.signature(gate).parameters
    except (TypeError, ValueError):  # a callable without a signature: FastMoE's rule alone
        return isinstance(gate, type) and issubclass(gate, NaiveGate)
    if "gate_bias" in params:
        return True
    return (not gate_bias and isinstance(gate, type) and issubclass(gate, NaiveGate)
            and any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()))


def _positive_int(value, name: str) -> int:
    """``value`` as an int >= 1, or an error naming ``name`` (a float such as ``experts / ranks``
    failed deep in torch.empty: "argument 'size' must be tuple of ints")."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= 1, got {value!r} "
                        f"({type(value).__name__})") from None
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


def _build_expert(ctor, d_model: int) -> nn.Module:
    """One expert from ``ctor(d_model)``; a module instance or anything else that is not a
    constructor is refused naming ``expert`` (calling an instance ran its forward on d_model:
    "linear(): argument 'input' must be Tensor, not int")."""
    hint = ("expert must be a module constructor called with d_model (a class, or e.g. "
            "lambda d: nn.Linear(d, d)) or a list of them")
    if isinstance(ctor, nn.Module):
        raise TypeError(f"{hint}; got a {type(ctor).__name__} instance: pass a function that "
                        "builds one expert")
    if not callable(ctor):
        raise TypeError(f"{hint}; got {ctor!r}")
    module = ctor(d_model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{hint}; {ctor!r} returned a {type(module).__name__}, not an nn.Module")
    return module


class FMoE(nn.Module):
    """A Mixture-of-Experts layer (FastMoE's constructor and forward contract).

    ``num_expert`` experts live on each of ``world_size`` workers of ``moe_group``; the gate picks
    among all ``num_expert * world_size``. Workers of ``slice_group`` (alias ``mp_group``) receive
    the same batch and each route a slice of it. ``expert`` is a constructor (called with
    ``d_model``; an expert whose forward takes a second argument also gets its row count) or a
    list of constructors; ``None`` means the subclass sets ``self.experts``, a fused module called
    as ``experts(rows, fwd_expert_count)``. Tokens where ``mask`` is nonzero skip the experts;
    their output is ``mask_dict[mask value]``. The input is ``[tokens, d_model]``, or a nest of
    ``[tokens, ...]`` tensors for a gate and experts that take nests (``_forward_nest``).
    """

    def __init__(self, num_expert=32, d_model=1024, world_size=1, mp_group=None, slice_group=None,
                 moe_group=None, top_k=2, gate=NaiveGate, expert=None, gate_hook=None, mask=None,
                 mask_dict=None, gate_bias=True):
        super().__init__()
        num_expert = _positive_int(num_expert, "num_expert")
        d_model = _positive_int(d_model, "d_model")
        world_size = _positive_int(world_size, "world_size")
        if moe_group is not None and comm.group_size(moe_group) != world_size:
            raise ValueError(f"world_size={world_size} but moe_group has "
                             f"{comm.group_size(moe_group)} ranks")
        if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(f"world_size={world_size} needs torch.distributed to be initialized")
        if world_size > 1 and moe_group is None and comm.group_size(None) != world_size:
            raise ValueError(f"world_size={world_size} but moe_group=None (the default group) "
                             f"has {comm.group_size(None)} ranks; pass a moe_group of "
                             f"{world_size} ranks")
        self.num_expert = num_expert
        self.d_model = d_model
        self.world_size = world_size
        if mp_group is not None:
            if slice_group is not None:
                raise ValueError("pass slice_group or its deprecated alias mp_group, not both")
            warnings.warn("mp_group is deprecated; use slice_group", DeprecationWarning, stacklevel=2)
            slice_group = mp_group
        self.slice_group = slice_group
        self.slice_size = comm.group_size(slice_group) if slice_group is not None else 1
        self.slice_rank = comm.group_rank(slice_group) if slice_group is not None else 0
        self.moe_group = moe_group
        self.top_k = top_k

        if isinstance(expert, (list, tuple)):
            if not expert:
                raise ValueError("expert is an empty list: give one constructor per local expert")
            self.experts = nn.ModuleList([_build_expert(e, d_model) for e in expert])
            self.experts_fused = False
            self.num_expert = num_expert = len(expert)
        elif expert is not None:
            self.experts = nn.ModuleList([_build_expert(expert, d_model)
                                          for _ in range(num_expert)])
            self.experts_fused = False
        else:
            self.experts_fused = True

        self.gate = _make_gate(gate, d_model, num_expert, world_size, top_k, gate_bias)
        self.gate.moe_group = moe_group
        self.gate_hook = gate_hook
        self.last_expert_count = None
        # Raise on NaN/Inf input instead of routing garbage (no extra host synchronisation).
        self.check_finite = True
        self.mask = mask
        self.mask_dict = mask_dict

    # ------------------------------------------------------------------ experts

    def expert_fn(self, inp: torch.Tensor, fwd_expert_count: torch.Tensor) -> torch.Tensor:
        """Runs the local experts on rows grouped by expert (``fwd_expert_count`` rows each).
        An expert whose forward takes two arguments gets its row count too, as a one-element
        tensor (FastMoE's ``forward(inp, fwd_expert_count)``)."""
        if self.experts_fused:
            return self.experts(inp, fwd_expert_count)
        sizes = [int(c) for c in fwd_expert_count.tolist()]
        total = sum(sizes)
        parts = torch.split(inp[:total], sizes)
        outs = [expert(part, torch.tensor([n])) if _takes_count(type(expert)) else expert(part)
                for expert, part, n in zip(self.experts, parts, sizes)]
        for i, (out, part) in enumerate(zip(outs, parts)):
            if not torch.is_tensor(out) or out.shape != part.shape:
                got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                raise ValueError(
                    f"expert {i} ({type(self.experts[i]).__name__}) returned {got} for rows of "
                    f"{tuple(part.shape)}: an FMoE expert maps rows to rows of the same shape "
                    "(the layer's output has its input's shape, d_model wide)")
        pad = inp.new_zeros((inp.shape[0] - total,) + tuple(inp.shape[1:]))
        return torch.cat(outs + [pad]) if outs else pad

    def mark_parallel_comm(self, expert_dp_comm: str = "none"):
        """Tags parameters for grouped data parallel: experts with ``expert_dp_comm``, the gate
        with ``gate``. Expert parameters sharded over workers (``world_size > 1``) also get
        ``allreduce = False``: megatron-core's DDP then reduces them over the expert-data-parallel
        group only. The parameters of a fused experts' activation module (e.g. a norm between
        the two linears, as ``moefy`` keeps it) are not per expert: one copy on every worker,
        whose gradient holds only the rows of that worker's experts. They are tagged ``dp`` and
        reduced like a dense parameter."""
        if getattr(self, "experts", None) is not None:
            activation = getattr(self.experts, "activation", None) \
                if isinstance(self.experts, _Expert) else None
            shared = ({id(p) for p in activation.parameters()}
                      if isinstance(activation, nn.Module) else set())
            for p in self.experts.parameters():
                if id(p) in shared:
                    p.dp_comm = "dp"
                    continue
                p.dp_comm = expert_dp_comm
                if self.world_size > 1:
                    p.allreduce = False
        for p in self.gate.parameters():
            p.dp_comm = "gate"

    # ------------------------------------------------------------------ forward

    def forward(self, moe_inp: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(moe_inp):
            return self._forward_nest(moe_inp)
        if moe_inp.dim() != 2 or moe_inp.shape[1] != self.d_model:
            raise ValueError(f"FMoE expects [tokens, d_model={self.d_model}] input, got "
                             f"{tuple(moe_inp.shape)}")
        if self.mask is not None:
            if self.slice_size > 1:
                raise NotImplementedError("mask cannot be combined with a slice group")
            return self._forward_masked(moe_inp)
        idx, score = self._gate(moe_inp)
        if self.slice_size > 1:
            return self._forward_sliced(moe_inp, idx, score)
        return self.route(moe_inp, idx, score)

    def _gate(self, x: torch.Tensor):
        # Checked with the counts' host copy in expert_rows: no extra synchronisation.
        self._input_finite = _all_finite(x) if self.check_finite else None
        return self._run_gate(x, x.shape[0])

    def _run_gate(self, inp, n: int):
        """The gate on ``inp`` (a tensor or a nest of ``n`` tokens): ``(idx, score)`` as
        ``[n, top_k]`` each, then the gate hook."""
        out = self.gate(inp)
        name = type(self.gate).__name__
        if not (isinstance(out, (tuple, list)) and len(out) == 2
                and all(torch.is_tensor(t) for t in out)):
            got = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list))
                   else f"a {type(out).__name__}")
            raise TypeError(f"{name} must return (idx, score), two tensors of [tokens, top_k]; "
                            f"got {got}")
        idx, score = out
        if idx.dtype != torch.int64:
            # The ops' own check ("idx must be int64, got Int") did not say where it came from.
            raise TypeError(f"{name} returned expert ids (idx) of dtype {idx.dtype}; they must be "
                            "int64, as torch.topk's indices are (-1 for a dropped slot)")
        want = (n, self.top_k)

        def token_major(t):  # FastMoE's flat [T*K] indices and [T, 1, K] scores, not [K, T]
            return t.shape != want and t.numel() == n * self.top_k \
                and (t.dim() == 1 or t.shape[0] == n)

        if token_major(idx):
            idx = idx.reshape(want)
        if token_major(score):
            score = score.reshape(want)
        if idx.shape != want or score.shape != idx.shape:
            raise RuntimeError(f"{type(self.gate).__name__} returned idx {tuple(idx.shape)} and score "
                               f"{tuple(score.shape)}; expected [{n}, {self.top_k}] each")
        if self.gate_hook is not None:
            self.gate_hook(idx, score, None)
        return idx, score

    def _forward_nest(self, nest):
        """FastMoE's nests of tensors (tuples, lists, dicts of ``[tokens, ...]`` tensors with the
        same number of tokens): the gate gets the nest and returns one routing for all of it;
        every tensor's rows travel with it; the experts (a fused ``self.experts`` or an
        ``expert_fn`` that takes nests) get the nest of grouped rows and return a nest, whose
        tensors are combined with the scores. The input is not checked for NaN or Inf here."""
        from torch.utils import _pytree as pytree

        leaves, spec = pytree.tree_flatten(nest)
        if not leaves or not all(torch.is_tensor(t) and t.dim() >= 1 for t in leaves):
            raise TypeError(f"{type(self).__name__} takes a tensor or a nest (tuple, list, dict) "
                            f"of tensors, got {type(nest).__name__}")
        rows = {t.shape[0] for t in leaves}
        if len(rows) != 1:
            raise ValueError(f"the tensors of a nested MoE input must have the same number of "
                             f"tokens (first dimension), got {sorted(rows)}")
        if self.mask is not None or self.slice_size > 1:
            raise NotImplementedError("nested MoE inputs cannot be combined with mask or a slice group")
        n, K = rows.pop(), self.top_k
        self._input_finite = None
        idx, score = self._run_gate(nest, n)
        counts = ops.expert_count(idx, self.num_expert * self.world_size)
        pending = (comm.exchange_counts_async(counts, self.num_expert, self.moe_group)
                   if self.world_size > 1 else None)
        pos, inv = ops.assign_pos(idx, counts)
        # Rows flattened to an explicit width: reshape(n, -1) cannot infer it for n = 0 tokens
        # (a rank of an expert-parallel group can have none).
        bufs = [ops.scatter_rows(t.contiguous().reshape(n, _width(t)), pos, inv, K) for t in leaves]
        local_count = counts.cpu()
        self.last_expert_count = local_count

        def run(flat, fwd_count):  # the experts on flat [rows, -1] buffers, shaped as the input
            shaped = [b.reshape((b.shape[0],) + tuple(t.shape[1:])) for b, t in zip(flat, leaves)]
            out_leaves, out_spec = pytree.tree_flatten(self.expert_fn(
                pytree.tree_unflatten(shaped, spec), fwd_count))
            return [o.reshape(o.shape[0], _width(o)) for o in out_leaves], out_leaves, out_spec

        if self.world_size > 1:
            global_count = pending.wait()
            recv = [comm.global_scatter(b, local_count, global_count, self.num_expert,
                                        self.moe_group) for b in bufs]
            flat, out_leaves, out_spec = run(
                recv, global_count.view(self.world_size, self.num_expert).sum(0))
            flat = [comm.global_gather(o, local_count, global_count, self.num_expert,
                                       self.moe_group, out_rows=n * K) for o in flat]
        else:
            flat, out_leaves, out_spec = run(bufs, local_count)
        outs = [ops.gather_rows(b, pos, inv, K, score).reshape(
            (n,) + tuple(o.shape[1:])) for b, o in zip(flat, out_leaves)]
        return pytree.tree_unflatten(outs, out_spec)

    def _forward_masked(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask.reshape(-1).to(x.device)
        if mask.numel() != x.shape[0]:
            raise ValueError(f"mask has {mask.numel()} entries for {x.shape[0]} tokens")
        fills = {}
        for value, fill in (self.mask_dict or {}).items():
            fill = torch.as_tensor(fill, device=x.device)
            try:
                fits = torch.broadcast_shapes(fill.shape, (1, self.d_model)) == (1, self.d_model)
            except RuntimeError:
                fits = False
            if not fits:
                # It failed only once a token had this mask value, in torch's index_put.
                raise ValueError(f"mask_dict[{value!r}] has shape {tuple(fill.shape)}: a masked "
                                 f"token's output must be a scalar or [d_model={self.d_model}]")
            fills[value] = fill
        routed = mask == 0
        xr = x[routed]
        yr = self.route(xr, *self._gate(xr))
        # The experts' output dtype (under autocast it can differ from the input's).
        out = yr.new_zeros(x.shape)
        out = out.index_put((routed.nonzero().squeeze(1),), yr)
        for value, fill in fills.items():
            out[mask == value] = fill.to(out.dtype)
        return out

    def _forward_sliced(self, x, idx, score):
        """The workers of the slice group hold the same batch. Each runs the gate on all of it
        (cheap, and the gate's gradients then agree across the group), sends only its slice
        through the experts, and the slot outputs are all-gathered before the combine. A gate
        that draws random numbers therefore needs the same random state on every worker of the
        group (Megatron seeds its tensor-parallel ranks alike)."""
        n, K = x.shape[0], self.top_k
        start, end = comm.slice_bounds(n, self.slice_size, self.slice_rank)
        buf, pos, inv = self.expert_rows(comm.take_slice(x, self.slice_group), idx[start:end])
        slots = ops.gather_rows(buf, pos, inv, 1)  # [slice tokens * K, d]: each slot's output
        slots = comm.slice_gather(slots.reshape(end - start, K * self.d_model), n, self.slice_group)
        # Weighted in fp32 and rounded once, as gather_rows combines; and as there, a dropped
        # slot adds nothing whatever its score (a NaN score times its zero row was NaN).
        acc = torch.promote_types(slots.dtype, torch.float32)
        weight = torch.where(idx >= 0, score.to(acc), 0).unsqueeze(-1)
        return (slots.view(n, K, self.d_model).to(acc) * weight).sum(1).to(slots.dtype)

    def expert_rows(self, x: torch.Tensor, idx: torch.Tensor):
        """Runs every slot of ``idx`` [T, K] through its expert. Returns ``(buf, pos, inv)``: the
        outputs [T*K, d] grouped by expert (zero rows for dropped slots) and the positions."""
        tot_expert = self.num_expert * self.world_size
        if isinstance(self.experts, _Expert) and x.dtype != self.experts.htoh4.weight.dtype:
            x = x.to(self.experts.htoh4.weight.dtype)  # autocast: the experts' dtype, as FastMoE
        counts = ops.expert_count(idx, tot_expert)
        finite = getattr(self, "_input_finite", None)
        self._input_finite = None
        if finite is not None and torch.compiler.is_compiling():
            # A traced graph cannot branch on the flag; assert on it inside the graph instead.
            torch._assert_async(finite, "fastmoe_megatron: the MoE layer's input holds NaN or Inf")
            finite = None
        # Expert parallel: the count exchange runs while the positions and the scatter are made.
        # A flag travels with the counts: bit 0, whether the input is finite, so that when one
        # rank's is not every rank raises here, before the rows are exchanged (none is left
        # waiting); bit 1, whether this rank can take the overlapped exchange (FMoETransformerMLP's
        # own experts, fused, on the CPU over gloo, FMOE_EP_OVERLAP not 0): it is taken only when
        # every rank can, since a rank on it and one on the all-to-all would wait for each other.
        pending = activation = None
        overlap = False
        if self.world_size > 1:
            own = type(self.experts) is _Expert and type(self).expert_fn is FMoE.expert_fn
            activation = self.experts.fused_activation() if own else None
            overlap = activation is not None and ep_overlap.usable(x, self.moe_group)
            flag = finite
            if flag is None and not torch.compiler.is_compiling():
                # finiteness not checked: say finite (made where the counts are: no copy)
                flag = torch.ones((), dtype=torch.int64, device=counts.device)
            if flag is not None:
                flag = flag.to(torch.int64) + 2 * int(overlap)
            pending = comm.exchange_counts_async(counts, self.num_expert, self.moe_group, flag=flag)
        pos, inv = ops.assign_pos(idx, counts)
        x = x.contiguous()
        buf = ops.scatter_rows(x, pos, inv, self.top_k)  # [T*K, d], grouped by expert
        if finite is not None:
            # The one host sync (the GEMMs need the block sizes) also brings the finiteness flag.
            both = torch.cat([counts, finite.to(counts.dtype).reshape(1)]).cpu()
            local_count = both[:-1]
            if not bool(both[-1]):
                if pending is not None:
                    pending.wait()  # leave no collective half done
                raise FloatingPointError(
                    f"{type(self).__name__}: the MoE layer's input holds NaN or Inf values, so the "
                    "gate cannot route it (the model has diverged: lower the learning rate, or "
                    "restart from the last checkpoint); set check_finite=False to skip this check")
        else:
            local_count = counts.cpu()  # the one host sync: the GEMMs need the block sizes
        self.last_expert_count = local_count  # slots sent to each global expert (for load stats)
        if self.world_size > 1:
            global_count = pending.wait()
            flags = pending.flags
            if flags is not None and not bool((flags & 1).all()):
                bad = ((flags & 1) == 0).nonzero().flatten().tolist()
                raise FloatingPointError(
                    f"{type(self).__name__}: the MoE layer's input holds NaN or Inf values on "
                    f"rank(s) {bad} of the expert-parallel group (they raise the same error), so "
                    "this rank stops too instead of waiting for their rows; set "
                    "check_finite=False on every rank to skip this check")
            if overlap and flags is not None and bool((flags & 2).all()):
                # The exchange overlapped with the experts (CPU, gloo): see ep_overlap.
                e = self.experts
                return ep_overlap.expert_parallel_mlp(
                    buf, local_count, global_count, self.num_expert, self.moe_group,
                    e.htoh4.weight, e.htoh4.bias, e.h4toh.weight, e.h4toh.bias, activation), pos, inv
            recv = comm.global_scatter(buf, local_count, global_count, self.num_expert, self.moe_group)
            fwd_expert_count = global_count.view(self.world_size, self.num_expert).sum(0)
            out = self.expert_fn(recv, fwd_expert_count)
            buf = comm.global_gather(out, local_count, global_count, self.num_expert,
                                     self.moe_group, out_rows=buf.shape[0])
        elif isinstance(self.experts, _Expert):
            # The first expert GEMM's saved copy of buf is re-scattered in the backward pass
            # instead (the fused experts only read buf: they do not modify it in place).
            with ops.recompute_when_saved(
                    buf, lambda: ops.scatter_rows(x, pos, inv, self.top_k), depends_on=x):
                buf = self.expert_fn(buf, local_count)
        else:
            buf = self.expert_fn(buf, local_count)
        return buf, pos, inv

    def route(self, x: torch.Tensor, idx: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Sends each token to its experts and combines their outputs with ``score``."""
        buf, pos, inv = self.expert_rows(x, idx)
        return ops.gather_rows(buf, pos, inv, self.top_k, score)


class _Expert(nn.Module):
    """The fused experts of FMoETransformerMLP: htoh4 -> activation -> h4toh, all experts at once
    (one op, ``ops.expert_mlp``, for the activations that it knows).

    ``gated_linear_unit``: htoh4 computes ``2 * d_hidden`` features ``[a, b]`` (in that order,
    as megatron-core's ``linear_fc1`` does) and the experts run ``h4toh(activation(a) * b)``
    (SwiGLU with SiLU); this runs as grouped GEMMs around the gating, not as the fused op."""

    def __init__(self, num_expert, d_model, d_hidden, activation, rank=0, bias=True,
                 gated_linear_unit=False):
        super().__init__()
        if not callable(activation):
            raise TypeError(f"activation must be a callable such as torch.nn.GELU() or "
                            f"torch.nn.functional.relu, got {activation!r}")
        if isinstance(activation, type) and issubclass(activation, nn.Module):
            # Called on the hidden rows, the class built a module from them, and the next
            # product failed with "'GELU' object has no attribute 'contiguous'".
            raise TypeError(f"activation must be a callable such as torch.nn.GELU() or "
                            f"torch.nn.functional.relu, got the class {activation.__name__}: pass "
                            f"an instance, {activation.__name__}()")
        self.gated_linear_unit = bool(gated_linear_unit)
        width = 2 * d_hidden if self.gated_linear_unit else d_hidden
        self.htoh4 = FMoELinear(num_expert, d_model, width, bias=bias, rank=rank)
        self.h4toh = FMoELinear(num_expert, d_hidden, d_model, bias=bias, rank=rank)
        self.activation = activation

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # FastMoE 1.0.1+ keeps each expert as its own one-expert module: experts.{i}.htoh4.weight
        # [1, d_hidden, d_model], ... Those state dicts load here, stacked into [E, ...].
        if prefix + "htoh4.weight" not in state_dict and prefix + "0.htoh4.weight" in state_dict:
            n = self.htoh4.num_expert
            for name in ("htoh4.weight", "htoh4.bias", "h4toh.weight", "h4toh.bias"):
                keys = [f"{prefix}{i}.{name}" for i in range(n)]
                if all(k in state_dict for k in keys):
                    state_dict[prefix + name] = torch.cat([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fused_activation(self) -> str | None:
        """The ``expert_mlp`` activation name when the experts run as that one op, else None."""
        if self.gated_linear_unit or not ops.fused_experts_enabled():
            return None
        return ops.activation_name(self.activation)

    def forward(self, inp, fwd_expert_count):
        inp = inp.to(self.htoh4.weight.dtype)  # autocast: the experts' dtype, as FastMoE
        name = self.fused_activation()
        if name is not None:  # one fused op (fastmoe_megatron.ops.expert_mlp)
            return ops.expert_mlp(inp, fwd_expert_count, self.htoh4.weight, self.htoh4.bias,
                                  self.h4toh.weight, self.h4toh.bias, name)
        x = self.htoh4(inp, fwd_expert_count)
        if self.gated_linear_unit:
            a, b = x.chunk(2, dim=-1)
            x = self.activation(a) * b
        else:
            x = self.activation(x)
        return self.h4toh(x, fwd_expert_count)


class FMoETransformerMLP(FMoE):
    """The transformer feed-forward block as an MoE; input and output ``[..., d_model]``.

    Beyond FastMoE's arguments: ``bias=False`` builds experts without biases, and
    ``gated_linear_unit=True`` gated experts (``h4toh(activation(a) * b)`` with ``[a, b]`` the
    ``2 * d_hidden`` outputs of ``htoh4``; SwiGLU with ``activation=torch.nn.SiLU()``)."""

    def __init__(self, num_expert=32, d_model=1024, d_hidden=4096, activation=torch.nn.GELU(),
                 expert_dp_comm="none", expert_rank=0, bias=True, gated_linear_unit=False,
                 **kwargs):
        if kwargs.get("expert") is not None:
            # FMoE would build those experts, then this class replaces them with its own fused
            # ones while the layer still ran them as a list: '_Expert' object is not iterable.
            raise TypeError(f"{type(self).__name__} builds its own experts (htoh4 -> activation "
                            f"-> h4toh) and takes no expert=; got expert={kwargs['expert']!r}. "
                            "Use FMoE(expert=...) for experts of your own")
        d_hidden = _positive_int(d_hidden, "d_hidden")
        super().__init__(num_expert=num_expert, d_model=d_model, **kwargs)
        self.d_hidden = d_hidden
        self.experts = _Expert(num_expert, d_model, d_hidden, activation, rank=expert_rank,
                               bias=bias, gated_linear_unit=gated_linear_unit)
        self.mark_parallel_comm(expert_dp_comm)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        shape = inp.shape
        if inp.dim() == 0 or shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects [..., d_model={self.d_model}] input, "
                             f"got shape {tuple(shape)}")
        out = super().forward(inp.reshape(-1, self.d_model))
        return out.reshape(shape)
