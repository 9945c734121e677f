"""Data parallelism around MoE layers: grouped gradient reduction, a gradient norm that counts
every expert once, and aux-loss-free bias updates.

Gradient scaling. Each rank's loss is the mean over its own batch, and the global loss is the mean
over the ``data_parallel_size`` ranks that hold different batches. The true gradient of any
parameter is then ``(sum over every copy's local gradient) / data_parallel_size``: dense and gate
parameters sum over all ranks; an expert sharded over the MoE group already holds the sum over
that group's ranks (its rows came through the all-to-all), so it sums over its replicas only (the
expert-data-parallel group, or nothing) and is still divided by ``data_parallel_size``. FastMoE
skipped that division for experts, so they trained with a gradient ``world_size`` times too big.
One exception: the workers of a layer's slice group run its gate on the same whole batch, so they
hold the same gate gradient, and a gate reduced over a group that takes in ``c`` of them is
divided by ``c`` as well.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn

_DEFAULT_TAGS = ("dp", "gate", "moe", "world")


def _flat_reduce(tensors: list[torch.Tensor], group, scale: float, device=None,
                 fp32: bool = False, scale_first: bool = False, extra=None):
    """All-reduces (sum) ``tensors`` in place as one flat buffer per dtype (in fp32 with
    ``fp32``) and scales them, before the sum with ``scale_first`` (an fp16 sum of large
    gradients stays in range), else after it. ``extra``: a further divisor of each tensor."""
    by_dtype = defaultdict(list)
    for i, t in enumerate(tensors):
        by_dtype[t.dtype].append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        if device is not None:
            flat = flat.to(device)
        if fp32 and flat.is_floating_point():
            flat = flat.float()
        if scale != 1.0 and scale_first:
            flat.mul_(scale)
        if group is not False:
            dist.all_reduce(flat, group=group)
        if scale != 1.0 and not scale_first:
            flat.mul_(scale)
        offset = 0
        for i in idx:
            t = tensors[i]
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            if extra is not None and extra[i] != 1:
                t.div_(extra[i])
            offset += n


class DistributedGroupedDataParallel(nn.Module):
    """FastMoE's data-parallel wrapper: every parameter is reduced over the group of its
    ``dp_comm`` tag (untagged parameters count as ``dp``).

    Groups come from ``<tag>_group`` keyword arguments; ``dp``, ``gate``, ``moe`` and ``world``
    default to the whole world. Parameters tagged ``none`` (experts spread over the MoE group)
    are never all-reduced; the experts of a layer with ``world_size=1`` are replicas, and tagged
    ``none`` they are refused (with more than one data-parallel rank). Any other tag needs its
    group, e.g. experts replicated over an
    expert-data-parallel group: ``expert_dp_comm="edp"`` on the layer and ``edp_group=...`` here.
    All gradients are divided by ``data_parallel_size`` (default: the size of the ``dp`` group),
    see the module docstring. Call ``allreduce_gradients()`` after ``backward()``, or pass
    ``auto_allreduce=True`` to have it run at the end of every backward pass (gradients
    accumulated over several backward passes are reduced once each: the result is what one call
    at the end gives, up to rounding).
    """

    def __init__(self, module, auto_allreduce=False, need_sync=True, data_parallel_size=None,
                 **kwargs):
        super().__init__()
        self.module = module
        self.comms: dict[str, object] = {tag: None for tag in _DEFAULT_TAGS}
        for key, group in kwargs.items():
            if not key.endswith("_group"):
                raise TypeError(f"unexpected keyword argument {key!r} (groups are passed as <tag>_group)")
            self.comms[key[: -len("_group")]] = group
        self.data_parallel_size = (data_parallel_size if data_parallel_size is not None
                                   else dist.get_world_size(self.comms["dp"]))
        self._check_tags()
        self._gate_copies = self._sliced_gate_copies()
        self.auto_allreduce = auto_allreduce
        self._auto_task = None  # the backward pass whose reduction is queued
        if need_sync:
            self._sync_params()

    def _tag(self, p) -> str:
        return getattr(p, "dp_comm", "dp")

    def _check_tags(self):
        for name, p in self.module.named_parameters():
            tag = self._tag(p)
            if tag != "none" and tag not in self.comms:
                raise ValueError(f"parameter {name} is tagged dp_comm={tag!r} but no {tag}_group "
                                 f"was given; known tags: none, {', '.join(sorted(self.comms))}")
        if self.data_parallel_size > 1:
            self._check_replicated_experts()

    def _check_replicated_experts(self):
        """Experts are sharded over a layer's ``world_size`` ranks; with more data-parallel ranks
        than that, each expert has replicas (every rank's, with ``world_size=1``). Tagged
        ``none`` (never reduced, FMoETransformerMLP's default) each replica would train on its
        own ranks' batches only and drift away from the others."""
        from .moefy import moe_layers

        for prefix, layer in moe_layers(self.module):
            experts = getattr(layer, "experts", None)
            if layer.world_size >= self.data_parallel_size or experts is None:
                continue
            for name, p in experts.named_parameters():
                if self._tag(p) == "none":
                    where = f"{prefix}.experts.{name}" if prefix else f"experts.{name}"
                    fix = ("reduce them as data parallel (expert_dp_comm='dp' on "
                           "FMoETransformerMLP, or layer.mark_parallel_comm('dp')), or shard them "
                           "with world_size > 1" if layer.world_size == 1 else
                           "reduce them over their replicas (expert_dp_comm='edp' on "
                           "FMoETransformerMLP, or layer.mark_parallel_comm('edp'), and pass "
                           "edp_group=)")
                    raise ValueError(
                        f"parameter {where} is tagged dp_comm='none' (never all-reduced), but "
                        f"its layer has world_size={layer.world_size} and data_parallel_size is "
                        f"{self.data_parallel_size}: its experts are replicated and their copies "
                        f"would drift apart. To train them, {fix}")

    def _sliced_gate_copies(self) -> dict:
        """{gate parameter: c} for the gates of layers with a slice group: their gradient is the
        same on every worker of it (each runs the gate on the whole batch), so a reduction over
        a group holding ``c`` of those workers counts it ``c`` times."""
        from .moefy import moe_layers

        copies = {}
        for prefix, layer in moe_layers(self.module):
            if getattr(layer, "slice_size", 1) <= 1:
                continue
            workers = set(_ranks(layer.slice_group))
            in_dp = len(workers & set(_ranks(self.comms["dp"])))
            if in_dp > 1:
                # data_parallel_size would count copies of one batch as batches: every gradient
                # (the experts' partial ones too) would come out divided by them.
                raise ValueError(
                    f"the dp group holds {in_dp} workers of the slice group of MoE layer "
                    f"{prefix or '(the module)'}, which share one batch: pass "
                    "dp_group=<the data-parallel group> (one worker of each slice group), as "
                    "FastMoE's Megatron wrapper does")
            for p in layer.gate.parameters():
                tag = self._tag(p)
                if tag == "none":
                    continue
                c = len(workers & set(_ranks(self.comms[tag])))
                if c > 1:
                    copies[p] = c
        return copies

    def _params_by_tag(self):
        groups = defaultdict(list)
        for p in self.module.parameters():
            groups[self._tag(p)].append(p)
        return groups

    def _device_for(self, group):
        return (torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend(group) == "nccl" else torch.device("cpu"))

    @torch.no_grad()
    def _sync_params(self):
        for tag, params in self._params_by_tag().items():
            if tag == "none":
                continue
            group = self.comms[tag]
            src = dist.get_global_rank(group, 0) if group is not None else 0
            for p in params:
                buf = p.data.to(self._device_for(group))
                dist.broadcast(buf, src, group=group)
                p.data.copy_(buf)

    @torch.no_grad()
    def allreduce_gradients(self, no_scale: bool = False, reduce_after: bool = False,
                            fp32_allreduce: bool = False, *, reduced=None):
        """Reduces every gradient over the group of its tag and divides it by
        ``data_parallel_size`` (FastMoE's arguments: ``no_scale`` leaves out the division,
        ``reduce_after`` divides after the sum instead of before it, ``fp32_allreduce`` reduces
        in fp32). A parameter whose gradient is None on some ranks of its group only (unused
        there) counts as zero on those. ``reduced`` maps parameters to the part of their
        gradient that is already reduced (what ``auto_allreduce`` held when a backward pass
        began): only the rest is reduced, so gradients accumulated over several backward passes
        are right."""
        scale = 1.0 if no_scale else 1.0 / self.data_parallel_size
        for tag, params in self._params_by_tag().items():
            group = False if tag == "none" else self.comms[tag]
            device = None if group is False else self._device_for(group)
            params = self._with_grads(params, group, device)
            if not params:
                continue
            before = [None if reduced is None else reduced.get(p) for p in params]
            # The part to reduce: the whole gradient, or what was added since ``before``.
            fresh = [p.grad if b is None else p.grad - b for p, b in zip(params, before)]
            _flat_reduce(fresh, group, scale, device, fp32=fp32_allreduce,
                         scale_first=not reduce_after,
                         extra=[self._gate_copies.get(p, 1) for p in params])
            for p, b, f in zip(params, before, fresh):
                if b is not None:
                    p.grad.copy_(b + f)

    @staticmethod
    def _with_grads(params, group, device) -> list:
        """The parameters of one tag whose gradient some rank of ``group`` has, with a zero
        gradient where this rank has none: the ranks' flat buffers must hold the same
        parameters (they were misaligned, or of different sizes, when a parameter was unused on
        some ranks only)."""
        params = [p for p in params if p.requires_grad]
        if group is False or not params:
            return [p for p in params if p.grad is not None]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
        out = []
        for p, h in zip(params, has.tolist()):
            if h:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                out.append(p)
        return out

    allreduce_params = allreduce_gradients

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if self.auto_allreduce and torch.is_grad_enabled():
            def queue(grad):
                # Once per backward pass (several forwards may feed one), after every gradient is
                # accumulated. The gradients held now were reduced by earlier passes (or are
                # the user's own): keep them aside and reduce only what this pass adds.
                task = torch._C._current_graph_task_id()
                if self._auto_task != task:
                    self._auto_task = task
                    held = {p: p.grad.clone() for p in self.module.parameters()
                            if p.grad is not None}
                    torch.autograd.Variable._execution_engine.queue_callback(
                        lambda: self.allreduce_gradients(reduced=held))
                return grad

            from torch.utils import _pytree as pytree

            # Any nest of outputs (tuples, dicts, ModelOutput): every tensor that needs a gradient.
            for t in pytree.tree_leaves(out):
                if torch.is_tensor(t) and t.requires_grad:
                    t.register_hook(queue)
        return out


def _ranks(group) -> list[int]:
    """The global ranks of ``group`` (None: the whole world)."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def is_expert_param(p: torch.Tensor) -> bool:
    """Expert parameters sharded over an MoE group (tagged by ``mark_parallel_comm``)."""
    return getattr(p, "allreduce", True) is False


def _counts_its_experts(group, expert_dp_group) -> bool:
    """Whether this rank adds its experts to a norm over ``group``: it is the lowest rank of
    ``group`` among their replicas (decided locally, from the two groups' members)."""
    if expert_dp_group is None or not dist.is_initialized():
        return True
    replicas = dist.get_process_group_ranks(expert_dp_group)
    if group is not None:
        members = set(dist.get_process_group_ranks(group))
        replicas = [r for r in replicas if r in members]
    return dist.get_rank() == min(replicas)


@torch.no_grad()
def global_grad_norm(parameters, norm_type: float = 2.0, group=None, expert_dp_group=None) -> torch.Tensor:
    """The gradient norm of the whole model across ``group`` (default: all ranks), counting every
    parameter exactly once. Returns the same value on every rank.

    Parameters that are not experts must be identical on every rank (as after data-parallel
    reduction) and count once; expert parameters (``allreduce is False``) count once per distinct
    expert: of their replicas (``expert_dp_group``) in ``group``, only the lowest rank adds them.
    """
    params = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    dense = [p.grad for p in params if not is_expert_param(p)]
    experts = [p.grad for p in params if is_expert_param(p)]
    owner = _counts_its_experts(group, expert_dp_group)
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.is_initialized() and dist.get_backend(group) == "nccl" else torch.device("cpu"))

    def part(grads):
        if norm_type == float("inf"):
            return max((g.detach().abs().max().float() for g in grads), default=torch.zeros(()))
        return sum((g.detach().float().norm(norm_type) ** norm_type for g in grads), torch.zeros(()))

    dense_part = part(dense).to(device)
    expert_part = (part(experts) if owner else torch.zeros(())).to(device)
    if dist.is_initialized():
        op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM
        dist.all_reduce(expert_part, op=op, group=group)
    if norm_type == float("inf"):
        return torch.maximum(dense_part, expert_part).cpu()
    return ((dense_part + expert_part) ** (1.0 / norm_type)).cpu()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, group=None,
                    expert_dp_group=None) -> torch.Tensor:
    """Clips gradients by ``global_grad_norm``; returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(params, norm_type, group, expert_dp_group)
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def update_expert_biases(module: nn.Module, group=None) -> None:
    """Applies the aux-loss-free bias update of every gate in ``module`` (call once per step)."""
    from .gates import BaseGate

    for m in module.modules():
        if isinstance(m, BaseGate):
            m.update_expert_bias(group)
