"""Worker bodies of the expert-parallel tests (run in gloo processes by tests/dist_utils.py).

Every rank builds the same one-process reference model holding all global experts (same seed),
and the expert-parallel model whose experts are its slice of them. The reference sees the tokens
of all ranks at once; its loss is the mean of the ranks' losses, which is what data-parallel
training optimises. Every comparison runs inside the worker; a mismatch raises there.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fastmoe_megatron import DistributedGroupedDataParallel, FMoETransformerMLP
from fastmoe_megatron.distributed import global_grad_norm
from fastmoe_megatron.gates import NaiveGate

D_MODEL, D_HIDDEN, TOP_K = 16, 24, 2
RTOL, ATOL = 1e-5, 1e-6


def layout(world, ep):
    """(ep_group, edp_group, ep_rank, edp_rank) for ranks laid out [edp, ep]."""
    rank = dist.get_rank()
    ep_groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
    edp_groups = [dist.new_group(list(range(r, world, ep))) for r in range(ep)]
    return ep_groups[rank // ep], edp_groups[rank % ep], rank % ep, rank // ep


def tokens_per_rank(world, zero_rank):
    counts = [5 + 3 * r for r in range(world)]
    if zero_rank is not None:
        counts[zero_rank] = 0
    return counts


# Expert variants of forward_backward: FMoETransformerMLP keyword arguments.
VARIANTS = {
    "plain": {},
    "no-bias": dict(bias=False),
    "swiglu": dict(gated_linear_unit=True, activation=torch.nn.SiLU()),
    "no-check": {},  # check_finite=False: the flag with the counts then only chooses the path
}


def make_models(world, ep, e_local, ep_group, ep_rank, gate=NaiveGate, top_k=TOP_K, **layer_kw):
    torch.manual_seed(0)
    ref = FMoETransformerMLP(num_expert=e_local * ep, d_model=D_MODEL, d_hidden=D_HIDDEN,
                             top_k=top_k, gate=gate, **layer_kw)
    model = FMoETransformerMLP(num_expert=e_local, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=top_k,
                               gate=gate, world_size=ep, moe_group=ep_group,
                               expert_dp_comm="edp" if world > ep else "none", **layer_kw)
    sl = slice(ep_rank * e_local, (ep_rank + 1) * e_local)
    with torch.no_grad():
        model.gate.load_state_dict(ref.gate.state_dict())
        for name, p in model.experts.named_parameters():
            p.copy_(dict(ref.experts.named_parameters())[name][sl])
    return ref, model


def batch(world, counts, step):
    """Every rank's tokens and loss weights; the same on all ranks (seeded by step)."""
    g = torch.Generator().manual_seed(1000 + step)
    xs = [torch.randn(n, D_MODEL, generator=g) for n in counts]
    ws = [torch.randn(n, D_MODEL, generator=g) for n in counts]
    return xs, ws


def reference_step(ref, xs, ws):
    x_all = torch.cat(xs).requires_grad_(True)
    y_all = ref(x_all)
    world = len(xs)
    loss = sum((y * w).sum() for y, w in zip(torch.split(y_all, [x.shape[0] for x in xs]), ws)) / world
    loss.backward()
    return y_all.detach(), x_all.grad


def check(name, actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def equal_on_all_ranks(value: torch.Tensor, name: str):
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value)
    for r, v in enumerate(gathered):
        assert torch.equal(v, gathered[0]), f"{name} differs between rank 0 and rank {r}: {gathered}"


def graph_nodes(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that ``t`` was computed through."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def set_overlap(overlap: str, rank: int = 0, world: int = 1) -> str:
    """FMOE_EP_OVERLAP for this worker; returns the autograd node the layer must then go through.
    Two settings that differ between ranks, after which every rank must take the all-to-alls
    (a rank on the overlapped schedule and one on the all-to-all waited for each other):
    ``mixed``, FMOE_EP_OVERLAP=1 on rank 0 only; ``unfused-last``, FMOE_FUSED_EXPERTS=0 on the
    last rank only (unfused experts cannot take the overlapped schedule)."""
    os.environ["FMOE_EP_OVERLAP"] = {"mixed": "1" if rank == 0 else "0",
                                     "unfused-last": "1"}.get(overlap, overlap)
    if overlap == "unfused-last":
        os.environ["FMOE_FUSED_EXPERTS"] = "0" if rank == world - 1 else "1"
    return "_OverlappedExpertsBackward" if overlap == "1" else "_GlobalScatterBackward"


def forward_backward(rank, world, ep, e_local, zero_rank, overlap="1", dtype="fp32",
                     variant="plain"):
    node = set_overlap(overlap, rank, world)
    ep_group, edp_group, ep_rank, _ = layout(world, ep)
    ref, model = make_models(world, ep, e_local, ep_group, ep_rank, **VARIANTS[variant])
    model.check_finite = variant != "no-check"
    if variant == "swiglu":  # gated experts never take the overlapped schedule
        node = "_GlobalScatterBackward"
    tol = {}
    if dtype == "bf16":
        ref.to(torch.bfloat16)
        model.to(torch.bfloat16)
        tol = dict(rtol=2e-2, atol=2e-2)
    counts = tokens_per_rank(world, zero_rank)
    xs, ws = batch(world, counts, 0)
    xs, ws = [x.to(model.gate.gate.weight.dtype) for x in xs], [w.to(xs[0].dtype) for w in ws]
    ddp = DistributedGroupedDataParallel(model, edp_group=edp_group, data_parallel_size=world)

    x = xs[rank].clone().requires_grad_(True)
    y = ddp(x)
    assert node in graph_nodes(y), f"FMOE_EP_OVERLAP={overlap}: no {node} in the graph"
    (y * ws[rank]).sum().backward()
    ddp.allreduce_gradients()

    y_ref, gx_ref = reference_step(ref, xs, ws)
    start = sum(counts[:rank])
    rows = slice(start, start + counts[rank])
    check("output", y.detach(), y_ref[rows], **tol)
    # The reference's input gradient carries the 1/world of the mean loss.
    check("input grad", x.grad * (1.0 / world), gx_ref[rows], **tol)
    for name, p in model.gate.named_parameters():
        check(f"gate.{name} grad", p.grad, dict(ref.gate.named_parameters())[name].grad, **tol)
    sl = slice(ep_rank * e_local, (ep_rank + 1) * e_local)
    for name, p in model.experts.named_parameters():
        check(f"experts.{name} grad", p.grad, dict(ref.experts.named_parameters())[name].grad[sl],
              **tol)

    norm = global_grad_norm(model.parameters(), expert_dp_group=edp_group if world > ep else None)
    ref_norm = torch.linalg.vector_norm(torch.stack(
        [p.grad.float().norm() for p in ref.parameters() if p.grad is not None]))
    check("grad norm", norm.float(), ref_norm, **tol)
    equal_on_all_ranks(norm.reshape(1), "grad norm")
    if world > ep:
        # Over one model replica (its EP group) only: the experts count on every replica, not
        # only where the expert-data-parallel group's rank 0 is (the other replicas left them out).
        own = global_grad_norm(model.parameters(), group=ep_group, expert_dp_group=edp_group)
        check("grad norm over the EP group", own.float(), ref_norm, **tol)
        equal_on_all_ranks(own.reshape(1), "grad norm over the EP group")
    return {"tokens": counts[rank], "norm": float(norm)}


def overlap_matches_all_to_all(rank, world, dtype):
    """The overlapped path and the all-to-all path on the same EP model and batch, with a
    capacity limit that drops slots (zero rows after each rank's routed ones): the same output,
    input gradient and parameter gradients."""
    import functools

    from fastmoe_megatron.gates import SwitchGate

    torch.manual_seed(0)
    gate = functools.partial(SwitchGate, switch_eps=0.0, capacity=(0.6, 0.6))
    model = FMoETransformerMLP(num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=1,
                               gate=gate, world_size=world)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model.to(dt)
    g = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(13 + 4 * rank, D_MODEL, generator=g).to(dt)
    w = torch.randn(x.shape, generator=g).to(dt)
    results = {}
    for overlap in ("1", "0"):
        node = set_overlap(overlap)
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        y = model(xr)
        assert node in graph_nodes(y), f"FMOE_EP_OVERLAP={overlap}: no {node} in the graph"
        (y * w).sum().backward()
        results[overlap] = [y.detach(), xr.grad] + [p.grad for p in model.parameters()]
        dropped = torch.tensor([x.shape[0] - int(model.last_expert_count.sum())])
        dist.all_reduce(dropped)
        assert int(dropped) > 0, "the capacity limit dropped no slot: the test lost its point"
    names = ["output", "input grad"] + [n for n, _ in model.named_parameters()]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(names, results["1"], results["0"]):
        check(f"{name}: overlapped against all-to-all", a, b, **tol)

    # The op itself, on a buffer with padding rows: global_scatter -> expert_mlp ->
    # global_gather, and zero rows (and zero gradients) past the routed ones.
    from fastmoe_megatron import comm, ep_overlap, ops

    E = 3
    local_count = torch.randint(0, 5, (world * E,), generator=g)
    local_count[rank * E] = 0  # an expert that gets nothing from this rank
    global_count = comm.exchange_counts(local_count, E, None)
    total = int(local_count.sum())
    experts = FMoETransformerMLP(num_expert=E, d_model=D_MODEL, d_hidden=D_HIDDEN).experts.to(dt)
    params = [experts.htoh4.weight, experts.htoh4.bias, experts.h4toh.weight, experts.h4toh.bias]
    buf = torch.randn(total + 3, D_MODEL, generator=g).to(dt)
    gy = torch.randn(total + 3, D_MODEL, generator=g).to(dt)
    got, want = {}, {}
    for key, res in (("overlap", got), ("all_to_all", want)):
        b_ = buf.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        if key == "overlap":
            out = ep_overlap.expert_parallel_mlp(b_, local_count, global_count, E, None,
                                                 *params, "gelu")
        else:
            recv = comm.global_scatter(b_, local_count, global_count, E)
            y = ops.expert_mlp(recv, global_count.view(world, E).sum(0), *params, "gelu")
            out = comm.global_gather(y, local_count, global_count, E, out_rows=total + 3)
        (out * gy).sum().backward()
        res.update(out=out.detach(), gx=b_.grad, **{f"param{i}": p.grad for i, p in enumerate(params)})
    assert torch.count_nonzero(got["out"][total:]) == 0, "padding rows of the output"
    assert torch.count_nonzero(got["gx"][total:]) == 0, "padding rows of the input gradient"
    for key in want:
        check(f"expert_parallel_mlp {key}", got[key], want[key], **tol)
    return True


def sgd_steps(rank, world, ep, e_local, steps, overlap="1"):
    set_overlap(overlap)
    ep_group, edp_group, ep_rank, _ = layout(world, ep)
    ref, model = make_models(world, ep, e_local, ep_group, ep_rank)
    ddp = DistributedGroupedDataParallel(model, edp_group=edp_group, data_parallel_size=world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    counts = tokens_per_rank(world, None)
    for step in range(steps):
        xs, ws = batch(world, counts, step)
        opt.zero_grad()
        (ddp(xs[rank]) * ws[rank]).sum().backward()
        ddp.allreduce_gradients()
        opt.step()
        ref_opt.zero_grad()
        reference_step(ref, xs, ws)
        ref_opt.step()
    for name, p in model.gate.named_parameters():
        check(f"gate.{name} after {steps} steps", p.detach(), dict(ref.gate.named_parameters())[name].detach(),
              rtol=1e-4, atol=1e-4)
    sl = slice(ep_rank * e_local, (ep_rank + 1) * e_local)
    for name, p in model.experts.named_parameters():
        check(f"experts.{name} after {steps} steps", p.detach(),
              dict(ref.experts.named_parameters())[name].detach()[sl], rtol=1e-4, atol=1e-4)
    return True


class DictOutput(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return {"y": self.module(x), "aux": [x.sum()]}


class UnwrapDict(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)["y"]


def auto_allreduce_accumulates(rank, world, ep, schedule):
    """auto_allreduce=True reduces at the end of every backward pass. Gradients accumulated over
    micro-batches must still come out as one reduction of their sum would give: the reference's
    gradient of the summed losses, for dense, gate and expert parameters alike.
    ``schedule``: "passes" (a backward per micro-batch), "one_pass" (one backward over the sum of
    the micro-batches' losses), "kept" (grads zeroed in place, not set to None, between steps)
    or "dict" (as "passes", with a module whose output is a dict)."""
    ep_group, edp_group, ep_rank, _ = layout(world, ep)
    ref, model = make_models(world, ep, 2, ep_group, ep_rank)
    wrapped = DictOutput(model) if schedule == "dict" else model
    ddp = DistributedGroupedDataParallel(wrapped, auto_allreduce=True, edp_group=edp_group,
                                         data_parallel_size=world)
    if schedule == "dict":  # the output is a dict: the reduction hooks onto its tensors
        ddp = UnwrapDict(ddp)
    counts = tokens_per_rank(world, None)
    micro = [batch(world, counts, step) for step in range(3)]
    if schedule == "kept":  # a first step whose gradients are zeroed in place, then accumulation
        xs, ws = micro[0]
        (ddp(xs[rank]) * ws[rank]).sum().backward()
        model.zero_grad(set_to_none=False)
        ref.zero_grad(set_to_none=False)
    if schedule == "one_pass":
        sum((ddp(xs[rank]) * ws[rank]).sum() for xs, ws in micro).backward()
    else:
        for xs, ws in micro:
            (ddp(xs[rank]) * ws[rank]).sum().backward()
    for xs, ws in micro:
        reference_step(ref, xs, ws)
    for name, p in model.gate.named_parameters():
        check(f"{schedule}: gate.{name} grad", p.grad, dict(ref.gate.named_parameters())[name].grad)
    sl = slice(ep_rank * 2, (ep_rank + 1) * 2)
    for name, p in model.experts.named_parameters():
        check(f"{schedule}: experts.{name} grad", p.grad,
              dict(ref.experts.named_parameters())[name].grad[sl])
    return True


class DoubledExperts(FMoETransformerMLP):
    """A subclass with its own expert_fn: expert parallelism must call it (the overlapped path
    runs the experts' weights itself, so it must step aside)."""

    def expert_fn(self, inp, fwd_expert_count):
        return 2 * super().expert_fn(inp, fwd_expert_count)


def overridden_expert_fn_is_used(rank, world):
    ep_group, _, ep_rank, _ = layout(world, world)
    ref, model = make_models(world, world, 2, ep_group, ep_rank)
    doubled = DoubledExperts(num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K,
                             gate=NaiveGate, world_size=world, moe_group=ep_group)
    doubled.load_state_dict(model.state_dict())
    counts = tokens_per_rank(world, None)
    xs, ws = batch(world, counts, 0)
    y = doubled(xs[rank])
    assert "_OverlappedExpertsBackward" not in graph_nodes(y)
    y_ref, _ = reference_step(ref, xs, ws)
    start = sum(counts[:rank])
    check("doubled output", y.detach(), 2 * y_ref[start:start + counts[rank]])
    return True


def nested_input_matches_one_process(rank, world, zero_rank=None):
    """A nest {"a", "b"} through FMoE subclass experts at EP=world, against the one-process layer
    holding all experts: outputs and input gradients of each tensor of the nest. ``zero_rank``
    has no tokens (a nest of zero tokens failed to reshape)."""
    from fastmoe_megatron import FMoE, FMoELinear

    class Gate(NaiveGate):
        def forward(self, inp):
            return super().forward(inp["a"])

    class Experts(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.fa, self.fb = FMoELinear(n, D_MODEL, D_MODEL), FMoELinear(n, D_MODEL, D_MODEL)

        def forward(self, inp, count):
            return {"a": self.fa(inp["a"], count), "b": torch.tanh(self.fb(inp["b"], count))}

    class Layer(FMoE):
        def __init__(self, n, world_size=1, moe_group=None):
            super().__init__(num_expert=n, d_model=D_MODEL, top_k=TOP_K, gate=Gate,
                             world_size=world_size, moe_group=moe_group)
            self.experts = Experts(n)

    ep_group, _, ep_rank, _ = layout(world, world)
    torch.manual_seed(0)
    ref = Layer(2 * world)
    model = Layer(2, world, ep_group)
    sl = slice(ep_rank * 2, ep_rank * 2 + 2)
    with torch.no_grad():
        model.gate.load_state_dict(ref.gate.state_dict())
        for name, p in model.experts.named_parameters():
            p.copy_(dict(ref.experts.named_parameters())[name][sl])
    counts = tokens_per_rank(world, zero_rank)
    xs, ws = batch(world, counts, 0)
    bs, _ = batch(world, counts, 1)
    a, b = xs[rank].clone().requires_grad_(True), bs[rank].clone().requires_grad_(True)
    out = model({"a": a, "b": b})
    ((out["a"] * ws[rank]).sum() + out["b"].sum()).backward()
    a_all, b_all = torch.cat(xs).requires_grad_(True), torch.cat(bs).requires_grad_(True)
    want = ref({"a": a_all, "b": b_all})
    ((want["a"] * torch.cat(ws)).sum() + want["b"].sum()).backward()
    start = sum(counts[:rank])
    rows = slice(start, start + counts[rank])
    check("nest a", out["a"].detach(), want["a"].detach()[rows])
    check("nest b", out["b"].detach(), want["b"].detach()[rows])
    check("nest a grad", a.grad, a_all.grad[rows])
    check("nest b grad", b.grad, b_all.grad[rows])
    return True


def fastmoe_allreduce_arguments(rank, world):
    """allreduce_gradients takes FastMoE's (no_scale, reduce_after, fp32_allreduce): no_scale
    leaves the sum undivided, fp32_allreduce reduces bf16 gradients in fp32."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ddp = DistributedGroupedDataParallel(model)
    grads = [torch.full((3, 4), 0.1 * (r + 1)) for r in range(world)]
    for no_scale in (False, True):
        model.weight.grad = grads[rank].to(torch.bfloat16)
        model.bias.grad = None
        ddp.allreduce_gradients(no_scale=no_scale, reduce_after=True, fp32_allreduce=True)
        want = sum(g.to(torch.bfloat16).float() for g in grads)
        want = (want if no_scale else want / world).to(torch.bfloat16)
        check(f"no_scale={no_scale}", model.weight.grad, want, rtol=0, atol=0)
    # fp16 gradients of 40000 on every rank: FastMoE's default (reduce_after=False) divides
    # before the sum, which stays in range (the sum, 80000, overflows fp16: it gave inf).
    half = torch.nn.Linear(1, 1, bias=False).to(torch.float16)
    ddp = DistributedGroupedDataParallel(half)
    for reduce_after, want in ((False, 40000.0), (True, float("inf"))):
        half.weight.grad = torch.full((1, 1), 40000.0, dtype=torch.float16)
        ddp.allreduce_gradients(reduce_after=reduce_after)
        assert float(half.weight.grad) == want, (reduce_after, half.weight.grad)
    return True


def gradients_missing_on_some_ranks(rank, world):
    """A parameter unused on some ranks has no gradient there; it counts as zero. The ranks used
    to reduce flat buffers of different parameters: rank 0's gradient of `a` was added to rank
    1's of `b` (same sizes), or gloo failed on the sizes. Brute force: the mean over ranks of
    each rank's gradients, None as zero."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3),
                                 "c": torch.nn.Linear(3, 3)})
    ddp = DistributedGroupedDataParallel(model)
    for used in ({0: "a", 1: "b"}, {0: "ab", 1: "b"}):
        grads = []  # every rank's gradients, as each computes them alone
        for r in range(world):
            model.zero_grad(set_to_none=True)
            x = torch.full((2, 3), float(r + 1))
            sum(model[k](x).sum() for k in used[r]).backward()
            grads.append({n: None if q.grad is None else q.grad.clone()
                          for n, q in model.named_parameters()})
        model.zero_grad(set_to_none=True)
        x = torch.full((2, 3), float(rank + 1))
        sum(model[k](x).sum() for k in used[rank]).backward()
        ddp.allreduce_gradients()
        for n, q in model.named_parameters():
            mine = [g[n] for g in grads if g[n] is not None]
            if not mine:  # unused everywhere: stays None
                assert q.grad is None, n
                continue
            check(f"{used} {n}", q.grad, sum(mine) / world)
    return True


def slice_group_matches_full(rank, world, gate_over_world):
    """Workers of a slice group share one batch and each send a slice through the experts. Every
    worker must end with the unsliced model's output and input gradient; the gate's gradients
    agree without any reduction, and the experts' sum over the group. ``gate_over_world``: the
    gate is reduced over the default gate group (the world: both workers, which hold the same
    gate gradient; it came out twice the unsliced one), else over each worker alone."""
    torch.manual_seed(0)
    model = FMoETransformerMLP(num_expert=4, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K,
                               slice_group=dist.group.WORLD, expert_dp_comm="slice")
    torch.manual_seed(0)
    ref = FMoETransformerMLP(num_expert=4, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K)
    solo = dist.new_group([rank], use_local_synchronization=True)
    groups = {} if gate_over_world else {"gate_group": solo}
    # The default dp group (all ranks) holds both workers of the slice group, which share one
    # batch: refused, since every gradient would come out divided by them.
    refused(lambda: DistributedGroupedDataParallel(model, slice_group=dist.group.WORLD),
            "the default dp group", "the dp group holds 2 workers of the slice group",
            "dp_group=")
    ddp = DistributedGroupedDataParallel(model, dp_group=solo, slice_group=dist.group.WORLD,
                                         **groups)
    x, w = batch(1, [11], 0)
    xr = x[0].clone().requires_grad_(True)
    y = ddp(xr)
    (y * w[0]).sum().backward()
    ddp.allreduce_gradients()
    xf = x[0].clone().requires_grad_(True)
    y_ref = ref(xf)
    (y_ref * w[0]).sum().backward()
    check("sliced output", y.detach(), y_ref.detach())
    check("sliced input grad", xr.grad, xf.grad)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        check(f"sliced {name} grad", p.grad, q.grad)
    return True


def capacity_is_global(rank, world, e_local, cap):
    """limit_by_capacity: each expert accepts at most `cap` rows over all ranks, granted in rank
    order, each rank keeping its first choices first; all ranks agree."""
    from fastmoe_megatron.gates.utils import limit_by_capacity

    E = e_local * world
    g = torch.Generator().manual_seed(7)
    all_idx = [torch.randint(-1, E, (6 + 2 * r, 2), generator=g) for r in range(world)]
    lec, gec, new_idx = limit_by_capacity(all_idx[rank].clone(), e_local, world, cap)
    # Brute force over every rank's choices.
    granted = torch.zeros(E, dtype=torch.int64)
    expected = []
    for r in range(world):
        out = torch.full_like(all_idx[r], -1)
        for j in range(all_idx[r].shape[1]):
            for t in range(all_idx[r].shape[0]):
                e = int(all_idx[r][t, j])
                if e >= 0 and granted[e] < cap:
                    granted[e] += 1
                    out[t, j] = e
        expected.append(out)
    assert torch.equal(new_idx, expected[rank]), f"rank {rank}: {new_idx} != {expected[rank]}"
    return True


def capacity_follows_the_mean_load(rank, world, cls_name, counts, factor):
    """DCGate and SwitchGate with uneven batches (a rank may have none): each expert's capacity is
    factor x the mean load of an expert over all ranks (it came from the receiving rank's own
    batch, so a rank without tokens accepted nothing), granted in rank order."""
    import math
    from fractions import Fraction

    from fastmoe_megatron.gates import DCGate, SwitchGate

    cls, top_k = {"dc": (DCGate, 2), "switch": (SwitchGate, 1)}[cls_name]
    e_local = 2
    E = e_local * world
    torch.manual_seed(0)
    gate = cls(D_MODEL, e_local, world, top_k, capacity=(factor, factor)).eval()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, D_MODEL, generator=g) for n in counts]
    idx, _ = gate(xs[rank])
    # Brute force: every rank's router choices, one global capacity, granted in rank order (each
    # rank's first choices before its second ones).
    cap = math.ceil(Fraction(str(factor)) * sum(counts) * top_k / E)
    granted = [0] * E
    expected = []
    with torch.no_grad():
        for x in xs:
            logits = x @ gate.gate.weight.t() + gate.gate.bias
            raw = [[int(e) for e in torch.argsort(row, descending=True)[:top_k]] for row in logits]
            out = [[-1] * top_k for _ in raw]
            for j in range(top_k):
                for t, choice in enumerate(raw):
                    if granted[choice[j]] < cap:
                        granted[choice[j]] += 1
                        out[t][j] = choice[j]
            expected.append(out)
    assert idx.tolist() == expected[rank], (rank, cap, idx.tolist(), expected[rank])
    return int((idx < 0).sum())


def swipe_matches_brute_force(rank, world, e_local, top_k, counts):
    """SwipeGate in training over ``world`` workers of uneven batches, against a row-by-row
    simulation of its rule: in each round k, every worker accepts rows (senders in rank order,
    each sender's rows in token order) while it has room (``top_k`` times its own batch over all
    rounds); each sender's refused rows, senders in rank order and rows in token order, go to the
    lowest-ranked worker with room left, to its local expert ``k % e_local``. The scores are the
    softmax of the logits of the experts finally picked. Returns the rows it moved."""
    from fastmoe_megatron.gates import SwipeGate

    E = e_local * world
    g = torch.Generator().manual_seed(11)
    # The router's logits are the input itself (identity gate); expert 0 is the favourite.
    xs = [torch.randn(n, E, generator=g) + torch.eye(E)[0] * 2.0 for n in counts]
    gate = SwipeGate(E, e_local, world, top_k=top_k).train()
    with torch.no_grad():
        gate.gate.weight.copy_(torch.eye(E))
        gate.gate.bias.zero_()
    idx, score = gate(xs[rank])

    choices = [torch.topk(x, top_k, dim=1).indices.tolist() for x in xs]
    new = [[list(row) for row in c] for c in choices]
    room = [n * top_k for n in counts]
    moved = 0
    for k in range(top_k):
        refused = []  # (sender, token), senders in rank order, tokens in order
        accepted = [[True] * n for n in counts]
        for w_ in range(world):
            for r in range(world):
                for t in range(counts[r]):
                    if choices[r][t][k] // e_local == w_:
                        if room[w_] > 0:
                            room[w_] -= 1
                        else:
                            accepted[r][t] = False
        for r in range(world):
            refused += [(r, t) for t in range(counts[r]) if not accepted[r][t]]
        for r, t in refused:
            w_ = next(w_ for w_ in range(world) if room[w_] > 0)
            room[w_] -= 1
            new[r][t][k] = w_ * e_local + k % e_local
            moved += 1
    want = torch.tensor(new[rank], dtype=torch.int64).reshape(counts[rank], top_k)
    assert torch.equal(idx, want), (rank, idx.tolist(), want.tolist())
    want_score = torch.softmax(xs[rank].gather(1, want), dim=1)
    torch.testing.assert_close(score, want_score, rtol=RTOL, atol=ATOL)
    # Eval mode routes as the naive gate: no exchange, the router's own choices.
    idx_eval, _ = gate.eval()(xs[rank])
    assert idx_eval.tolist() == choices[rank]
    return moved


def nonfinite_input_stops_every_rank(rank, world, ep, bad_ranks, overlap):
    """A NaN in the input of ``bad_ranks`` makes every rank of their expert-parallel group raise
    FloatingPointError (the flag travels with the counts), instead of the others waiting for rows
    that never come. Nothing is left half done: the next, finite step on every rank still matches
    the reference."""
    set_overlap(overlap)
    ep_group, _edp_group, ep_rank, _ = layout(world, ep)
    ref, model = make_models(world, ep, 2, ep_group, ep_rank)
    counts = tokens_per_rank(world, None)
    xs, ws = batch(world, counts, 0)
    x = xs[rank].clone()
    if rank in bad_ranks:
        x[1, 2] = float("nan")
    group_first = rank - ep_rank
    bad_in_group = sorted(r - group_first for r in bad_ranks if group_first <= r < group_first + ep)
    try:
        model(x)
    except FloatingPointError as err:
        if rank in bad_ranks:
            assert "holds NaN or Inf values, so the gate" in str(err), err
        else:
            assert f"rank(s) {bad_in_group} of the expert-parallel group" in str(err), err
        raised = True
    else:
        raised = False
    assert raised == bool(bad_in_group), (rank, raised, bad_in_group)

    # The same ranks, finite input: the layer still works and matches the reference.
    x = xs[rank].clone().requires_grad_(True)
    y = model(x)
    (y * ws[rank]).sum().backward()
    y_ref, _ = reference_step(ref, xs, ws)
    start = sum(counts[:rank])
    check("output after the error", y.detach(), y_ref[start:start + counts[rank]])
    return {"raised": raised}


def exchange_path_is_agreed(rank, world):
    """``comm._agreed`` / ``_make_native_comm``: one rank that cannot use the native communicator
    takes the whole group onto torch.distributed; and a destroyed group's cached communicator
    goes with it."""
    import gc

    from fastmoe_megatron import comm

    sub = dist.new_group(list(range(world)))
    got = {name: [comm._agreed(usable, group) for group in (None, sub)]
           for name, usable in (("all", True), ("none", False), ("one", rank != world - 1))}
    assert got == {"all": [True, True], "none": [False, False], "one": [False, False]}, got
    # The choice itself: the native communicator counted as built on every rank but the last
    # (as when the CUDA build failed on one node) gives torch.distributed on all of them, at once.
    from fastmoe_megatron.ops import nccl

    nccl.available = lambda: rank != world - 1
    assert comm._make_native_comm(sub) is None and comm._make_native_comm(None) is None
    # Cached communicators are held by group, weakly.
    comm._native_comms[sub] = "a communicator"
    assert len(comm._native_comms) == 1
    dist.destroy_process_group(sub)
    del sub
    gc.collect()
    assert len(comm._native_comms) == 0
    return True


def double_backward(rank, world, overlap):
    """A gradient penalty (``create_graph=True``) through the expert-parallel layer: with the
    all-to-alls (FMOE_EP_OVERLAP=0) the second derivatives match the one-process reference; the
    overlapped schedule has no double backward and says so on every rank."""
    set_overlap(overlap)
    ep_group, _edp_group, ep_rank, _ = layout(world, world)
    ref, model = make_models(world, world, 2, ep_group, ep_rank)
    counts = tokens_per_rank(world, None)
    xs, _ = batch(world, counts, 0)
    x = xs[rank].clone().requires_grad_(True)
    y = model(x)
    if overlap == "1":
        try:
            torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        except RuntimeError as err:
            assert "FMOE_EP_OVERLAP=0" in str(err), err
            return True
        raise AssertionError("double backward through the overlapped experts did not raise")
    (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    (gx ** 2).sum().backward()

    x_all = torch.cat(xs).requires_grad_(True)
    (gx_all,) = torch.autograd.grad((ref(x_all) ** 3).sum(), x_all, create_graph=True)
    (gx_all ** 2).sum().backward()  # the sum over ranks of their penalties
    start = sum(counts[:rank])
    check("first-order input grad", gx.detach(), gx_all.detach()[start:start + counts[rank]])
    check("input grad", x.grad, x_all.grad[start:start + counts[rank]])
    for name, p in model.gate.named_parameters():  # each rank holds its own penalty's part
        g = p.grad.clone()
        dist.all_reduce(g)
        check(f"gate.{name} grad", g, dict(ref.gate.named_parameters())[name].grad)
    sl = slice(ep_rank * 2, (ep_rank + 1) * 2)
    for name, p in model.experts.named_parameters():
        check(f"experts.{name} grad", p.grad, dict(ref.experts.named_parameters())[name].grad[sl])
    return True


def refused(build, what: str, *needles: str) -> None:
    """``build()`` raises ValueError, and its message holds every one of ``needles``."""
    try:
        build()
    except ValueError as err:
        for needle in needles:
            assert needle in str(err), err
    else:
        raise AssertionError(f"{what} was accepted")


def misconfigured_layouts(rank, world):
    """Configurations that used to go wrong quietly, or with a shape error: a ``world_size`` that
    the default group does not have, and experts replicated on every rank (``world_size=1``) but
    tagged ``none``, whose copies then drifted apart under DistributedGroupedDataParallel."""
    refused(lambda: FMoETransformerMLP(num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN,
                                       world_size=world + 2),
            "a world_size the default group does not have",
            f"world_size={world + 2} but moe_group=None (the default group) has {world}")

    torch.manual_seed(0)
    replicated = FMoETransformerMLP(num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN)
    refused(lambda: DistributedGroupedDataParallel(replicated), "replicated experts tagged 'none'",
            "experts.htoh4.weight is tagged dp_comm='none'", "expert_dp_comm='dp'")

    # Tagged dp, the replicas are averaged like any dense parameter and stay equal.
    replicated.mark_parallel_comm("dp")
    ddp = DistributedGroupedDataParallel(replicated)
    torch.manual_seed(10 + rank)
    ddp(torch.randn(6, D_MODEL)).sum().backward()
    local = replicated.experts.htoh4.weight.grad.clone()
    ddp.allreduce_gradients()
    mean = local.clone()
    dist.all_reduce(mean)
    check("replicated expert grad", replicated.experts.htoh4.weight.grad, mean / world)
    equal_on_all_ranks(replicated.experts.htoh4.weight.grad, "replicated expert grad")

    if world >= 4:
        # EP=2 x DP=world: each expert has world / 2 replicas; tagged none they would drift too.
        ep_group, edp_group, _, _ = layout(world, 2)
        sharded = FMoETransformerMLP(num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN,
                                     world_size=2, moe_group=ep_group)
        refused(lambda: DistributedGroupedDataParallel(sharded, data_parallel_size=world),
                "EP=2 experts with replicas, tagged 'none'",
                "world_size=2 and data_parallel_size is 4", "expert_dp_comm='edp'")
        sharded.mark_parallel_comm("edp")
        DistributedGroupedDataParallel(sharded, edp_group=edp_group, data_parallel_size=world)
    return True


class NaNForDroppedGate(NaiveGate):
    """NaiveGate that drops the second choice of every other token and gives the dropped slots a
    NaN score, as a gate does whose softmax runs over logits masked to -inf."""

    def forward(self, inp):
        idx, score = super().forward(inp)
        drop = torch.zeros_like(idx, dtype=torch.bool)
        drop[::2, 1] = True
        return idx.masked_fill(drop, -1), score.masked_fill(drop, float("nan"))


def nan_scores_of_dropped_slots_under_slice_group(rank, world):
    """A dropped slot contributes nothing, whatever its score: the slice group's combine must give
    the unsliced layer's finite output and gradients (it multiplied the dropped slot's zero row by
    the NaN score)."""
    torch.manual_seed(0)
    model = FMoETransformerMLP(num_expert=4, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K,
                               gate=NaNForDroppedGate, slice_group=dist.group.WORLD)
    torch.manual_seed(0)
    ref = FMoETransformerMLP(num_expert=4, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K,
                             gate=NaNForDroppedGate)
    x, w = batch(1, [9], 0)
    xs = x[0].clone().requires_grad_(True)
    y = model(xs)
    (y * w[0]).sum().backward()
    xf = x[0].clone().requires_grad_(True)
    y_ref = ref(xf)
    (y_ref * w[0]).sum().backward()
    assert torch.isfinite(y_ref).all()
    check("sliced output", y.detach(), y_ref.detach())
    check("sliced input grad", xs.grad, xf.grad)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name.startswith("experts."):  # each worker holds its slice's share: summed
            g = p.grad.clone()
            dist.all_reduce(g)
            check(f"sliced {name} grad", g, q.grad)
        else:
            check(f"sliced {name} grad", p.grad, q.grad)
    return True
