"""``python -m fastmoe_megatron.bench``: how fast the MoE layer is, measured side by side.

Cases (``--case``, comma-separated, default ``all``):

- ``layer``: forward + backward of ``FMoETransformerMLP`` (naive top-k gate, GELU experts) against
  a dense MLP with the same active FLOPs (``d -> d_hidden * top_k -> d``), a naive PyTorch MoE (a
  loop over experts with boolean masks: FastMoE's paper baseline) and megatron-core's own
  ``MoELayer`` (alltoall dispatcher, SequentialMLP experts, same experts and top-k, no capacity),
  at every ``--threads`` count. Also the layer's experts alone (``experts``: the fused expert
  MLP on rows already grouped by expert, no gate, dispatch or combine), the floor of the layer's
  time. On a GPU (or with ``--gemm-ref``) also the experts' six GEMMs as single dense products of
  the same FLOPs (``gemm``), as one product per expert (``expert_gemms``) and as the same
  per-expert products all on one expert's weights (``expert_gemms_one_weight``: weights that stay
  in the cache), and every figure as TFLOP/s.
- ``memory``: peak memory of forward + backward, the layer against the dense MLP.
- ``ep``: the layer at expert-parallel size 2 (2 processes over gloo, 1 thread each) against one
  process doing half the work (the same layer with every expert local and one process' tokens):
  the efficiency, and the share of the step spent waiting for communication; both for the
  default path, which overlaps the exchange with the experts (``ep_overlap``), and for the
  all-to-alls (``FMOE_EP_OVERLAP=0``), in the same rounds; and how evenly the gate spread the rows
  over the two ranks.
- ``e2e``: ``pretrain_gpt --fmoefy`` tokens/s against the same GPT with megatron-core's own MoE
  (``pretrain_gpt --num-experts``, alltoall dispatcher, same experts, top-k softmax router without
  balance loss on both sides), and against the dense GPT of the same active FLOPs (MLP width
  ``ffn * top_k``: the ceiling of any MoE there, but for the optimizer's work on the MoE's E /
  top_k times more MLP parameters), trained in turn, each run in a fresh process, at the largest
  ``--threads``.
- ``compile``: a model containing the layer, eager against ``torch.compile``.

Every case runs its contenders in interleaved rounds in one process (each round times each
contender once, so that they see the same machine noise) and reports medians and ratios.
``--json`` prints one JSON object on stdout (the tables then go to stderr). ``--tiny`` runs every
case at a toy size in seconds (for CI; its figures mean nothing). ``--rounds``, ``--ep-rounds``
(default 3 x ``--rounds``: with 7 rounds, EP efficiencies of the same code scattered from 78% to
101% between runs), ``--warmup``, ``--e2e-iters`` and ``--e2e-rounds`` set the repeat counts;
``--case`` and ``--shapes`` a subset.
Memory on the CPU is measured from the profiler's allocation events (see ``case_memory``).

Shapes (T tokens, d model width, h expert hidden width, E experts, k top-k):

    paper     T=4096 d=1024 h=4096 E=64 k=2   FastMoE's paper shape
    dispatch  T=4096 d=256  h=512  E=64 k=2   small GEMMs: dispatch and per-expert costs dominate
    gemm      T=4096 d=512  h=2048 E=8  k=2   large GEMMs
    e2e_small T=2048 d=256  h=1024 E=8  k=2   the layer of the e2e case's small GPT (on request)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import queue
import statistics
import sys
import time
import traceback
from typing import Callable

import torch
import torch.nn as nn


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    T: int
    d: int
    h: int
    E: int
    k: int

    @property
    def flops(self) -> float:
        """Multiply-adds x 2 of the expert GEMMs in forward + backward (the active FLOPs)."""
        return 12.0 * self.T * self.k * self.d * self.h

    def describe(self) -> str:
        return f"T={self.T} d={self.d} h={self.h} E={self.E} top-{self.k}"


SHAPES = {
    "paper": Shape("paper", 4096, 1024, 4096, 64, 2),
    "dispatch": Shape("dispatch", 4096, 256, 512, 64, 2),
    "gemm": Shape("gemm", 4096, 512, 2048, 8, 2),
    # The MoE layer of the e2e case's small GPT (seq 256 x batch 8 tokens); not run by default.
    "e2e_small": Shape("e2e_small", 2048, 256, 1024, 8, 2),
}
TINY_SHAPE = Shape("tiny", 64, 16, 32, 4, 2)
DEFAULT_SHAPES = {
    "layer": ("paper", "dispatch", "gemm"),
    "memory": ("paper", "dispatch", "gemm"),
    "ep": ("dispatch", "gemm"),
    "compile": ("dispatch",),
}
CASES = ("layer", "memory", "ep", "e2e", "compile")
# The layer case's contenders that --skip can leave out.
CONTENDERS = ("naive", "megatron")

# GPT configurations of the end-to-end case: pretrain_gpt flags without the MoE ones.
E2E_CONFIGS = {
    # configs/tiny-cpu.args' model
    "tiny": dict(layers=2, hidden=128, heads=4, ffn=256, seq=128, mbs=8, experts=4, top_k=2),
    "small": dict(layers=4, hidden=256, heads=8, ffn=1024, seq=256, mbs=8, experts=8, top_k=2),
}
E2E_TINY = {"micro": dict(layers=1, hidden=32, heads=4, ffn=64, seq=32, mbs=2, experts=4, top_k=2)}


def log(*msg):
    print(*msg, file=_LOG, flush=True)


_LOG = sys.stdout


# ============================================================================ timing helpers

class Clock:
    """Wall time of one call (with a device synchronisation on CUDA) and the process' CPU time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int,
                clock: Clock) -> dict[str, dict[str, float]]:
    """Runs every contender once per round, in turn; returns median wall and CPU ms."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    wall = {n: [] for n in contenders}
    cpu = {n: [] for n in contenders}
    for r in range(rounds):
        names = list(contenders)
        if r % 2:  # alternate the order, so that no contender always runs right after another
            names.reverse()
        for name in names:
            w, c = clock(contenders[name])
            wall[name].append(w)
            cpu[name].append(c)
    return {n: {"ms": 1e3 * statistics.median(wall[n]), "cpu_ms": 1e3 * statistics.median(cpu[n]),
                "min_ms": 1e3 * min(wall[n])} for n in contenders}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ============================================================================ contenders

class DenseMLP(nn.Sequential):
    """The dense MLP with the MoE's active FLOPs: d -> d_hidden * top_k -> d."""

    def __init__(self, s: Shape):
        super().__init__(nn.Linear(s.d, s.h * s.k), nn.GELU(), nn.Linear(s.h * s.k, s.d))


class NaiveMoE(nn.Module):
    """A plain PyTorch MoE (FastMoE's paper baseline): for each expert, a boolean mask of its
    tokens, the expert on the masked rows, and the weighted result added back."""

    def __init__(self, gate: nn.Module, experts: list[nn.Module]):
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)

    def forward(self, x):
        idx, score = self.gate(x)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = idx == e                     # [T, k]
            rows = mask.any(1)                  # tokens routed to e
            if not bool(rows.any()):
                continue
            weight = (score * mask).sum(1)[rows].unsqueeze(1)
            y[rows] += weight * expert(x[rows])
        return y


def _expert(d, h, w1, b1, w2, b2):
    """An nn.Sequential expert whose weights share storage with the fused layer's (no copy)."""
    lin1, lin2 = nn.Linear(d, h), nn.Linear(h, d)
    lin1.weight, lin1.bias = nn.Parameter(w1), nn.Parameter(b1)
    lin2.weight, lin2.bias = nn.Parameter(w2), nn.Parameter(b2)
    return nn.Sequential(lin1, nn.GELU(), lin2)


def build_fmoe(s: Shape, device):
    from .gates import NaiveGate
    from .layers import FMoETransformerMLP

    return FMoETransformerMLP(num_expert=s.E, d_model=s.d, d_hidden=s.h, top_k=s.k,
                              gate=NaiveGate).to(device)


def build_naive(s: Shape, fmoe) -> NaiveMoE:
    import copy

    ex = fmoe.experts
    experts = [_expert(s.d, s.h, ex.htoh4.weight.data[e], ex.htoh4.bias.data[e],
                       ex.h4toh.weight.data[e], ex.h4toh.bias.data[e]) for e in range(s.E)]
    return NaiveMoE(copy.deepcopy(fmoe.gate), experts)


_MEGATRON_READY = None


def megatron_env(device) -> str | None:
    """Initialises torch.distributed (one process) and megatron-core's parallel state once;
    returns None when ready, else why megatron-core cannot be used."""
    global _MEGATRON_READY
    if _MEGATRON_READY is not None:
        return _MEGATRON_READY or None
    try:
        import torch.distributed as dist

        if device.type == "cpu":
            from .megatron import cpu_compat

            cpu_compat.apply()
        else:
            from .megatron import te_compat

            te_compat.apply()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1,
                                                     expert_tensor_parallel_size=1)
        model_parallel_cuda_manual_seed(1234)
        _MEGATRON_READY = ""
    except Exception as exc:  # noqa: BLE001 - report and go on without it
        _MEGATRON_READY = f"megatron-core unavailable: {type(exc).__name__}: {exc}"
    return _MEGATRON_READY or None


class MegatronMoE(nn.Module):
    """megatron-core's MoELayer behind the [T, d] -> [T, d] interface."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out, _bias = self.layer(x.unsqueeze(1))
        return out.squeeze(1)


def build_megatron(s: Shape, fmoe, device):
    """megatron-core's MoELayer: top-k softmax router (no load balancing, no capacity), alltoall
    dispatcher, SequentialMLP experts (no grouped_gemm / Transformer Engine here), no expert
    biases. Router and expert weights are those of ``fmoe`` (the experts share its storage)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    heads = 1
    cfg = TransformerConfig(
        num_layers=1, hidden_size=s.d, num_attention_heads=heads, ffn_hidden_size=s.h,
        moe_ffn_hidden_size=s.h, num_moe_experts=s.E, moe_router_topk=s.k,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        use_cpu_initialization=device.type == "cpu", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False)
    spec = get_gpt_layer_local_spec(num_experts=s.E, moe_grouped_gemm=False).submodules.mlp
    layer = build_module(spec, config=cfg).to(device)
    with torch.no_grad():
        layer.router.weight.copy_(fmoe.gate.gate.weight)
    ex = fmoe.experts
    for e, expert in enumerate(layer.experts.local_experts):
        expert.linear_fc1.weight = nn.Parameter(ex.htoh4.weight.data[e])
        expert.linear_fc2.weight = nn.Parameter(ex.h4toh.weight.data[e])
    return MegatronMoE(layer)


class GemmReference(nn.Module):
    """The layer's six expert GEMMs (forward and backward) as single dense products: the floor
    that the grouped GEMM is measured against on a GPU (cuBLAS)."""

    def __init__(self, s: Shape, device, dtype):
        super().__init__()
        n = s.T * s.k
        self.a = torch.randn(n, s.d, device=device, dtype=dtype)
        self.w1 = torch.randn(s.h, s.d, device=device, dtype=dtype) / math.sqrt(s.d)
        self.w2 = torch.randn(s.d, s.h, device=device, dtype=dtype) / math.sqrt(s.h)
        self.g = torch.randn(n, s.d, device=device, dtype=dtype)

    def step(self):
        hid = self.a @ self.w1.t()
        _out = hid @ self.w2.t()
        g_hid = self.g @ self.w2
        _gw2 = self.g.t() @ hid
        _ga = g_hid @ self.w1
        _gw1 = g_hid.t() @ self.a


class GroupedGemmReference:
    """The same six products per expert, one BLAS call each (``torch.mm``), on rows grouped by
    expert with the layer's own counts: what the small per-expert products cost on this BLAS, with
    no activation, no dispatch and no autograd. Against ``GemmReference`` (the same FLOPs as single
    products) it shows how much of the layer's excess over the dense MLP comes from the BLAS.

    With ``one_weight``, every expert's products use one expert's weights and write one expert's
    gradients: the same products on weights that stay in the cache, where one expert's two weights
    fit in it (on a CPU, in a core's L2 at the dispatch shape, not at the paper or gemm shapes).
    Against the real per-expert products it then shows what streaming the experts' weights costs
    (E / top_k times the dense MLP's: an MoE's parameters, not its FLOPs)."""

    def __init__(self, s: Shape, counts: torch.Tensor, device, dtype, one_weight: bool = False):
        self.sizes = [int(c) for c in counts.tolist()]
        self.one_weight = one_weight
        n = sum(self.sizes)
        stored = 1 if one_weight else s.E
        g = torch.Generator().manual_seed(2)
        self.a = torch.randn(n, s.d, generator=g, dtype=dtype).to(device)
        self.g = torch.randn(n, s.d, generator=g, dtype=dtype).to(device)
        self.w1 = (torch.randn(stored, s.h, s.d, generator=g, dtype=dtype) / math.sqrt(s.d)).to(device)
        self.w2 = (torch.randn(stored, s.d, s.h, generator=g, dtype=dtype) / math.sqrt(s.h)).to(device)
        self.hid, self.g_hid = (torch.empty(n, s.h, device=device, dtype=dtype) for _ in range(2))
        self.out, self.g_a = (torch.empty(n, s.d, device=device, dtype=dtype) for _ in range(2))
        self.gw1, self.gw2 = torch.empty_like(self.w1), torch.empty_like(self.w2)

    def step(self):
        r0 = 0
        for e, m in enumerate(self.sizes):
            if m == 0:
                continue
            rows = slice(r0, r0 + m)
            r0 += m
            w = 0 if self.one_weight else e  # whose weights and gradients
            a, g, hid, g_hid = self.a[rows], self.g[rows], self.hid[rows], self.g_hid[rows]
            torch.mm(a, self.w1[w].t(), out=hid)
            torch.mm(hid, self.w2[w].t(), out=self.out[rows])
            torch.mm(g, self.w2[w], out=g_hid)
            torch.mm(g.t(), hid, out=self.gw2[w])
            torch.mm(g_hid, self.w1[w], out=self.g_a[rows])
            torch.mm(g_hid.t(), a, out=self.gw1[w])


def experts_step(fmoe, x: torch.Tensor) -> tuple[Callable[[], None], torch.Tensor]:
    """The layer's experts alone, forward + backward, on rows that the layer's gate grouped by
    expert (its own scatter of ``x``, done once here): the layer minus the gate, the dispatch and
    the combine. Against the dense MLP it is the floor that no dispatch work can go below.
    Returns the step and the counts per expert (on the host)."""
    from . import ops

    with torch.no_grad():
        idx, _score = fmoe.gate(x)
        counts = ops.expert_count(idx, fmoe.num_expert)
        pos, inv = ops.assign_pos(idx, counts)
        rows = ops.scatter_rows(x, pos, inv, fmoe.top_k)
    counts = counts.cpu()
    g_rows = torch.randn(rows.shape, generator=torch.Generator().manual_seed(3)).to(rows)
    params = [p for p in fmoe.experts.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        fmoe.experts(rows.detach().requires_grad_(True), counts).backward(g_rows)

    return step, counts


def make_step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    """One training step's forward and backward (gradients reset to None first, as
    ``zero_grad()`` does)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        xx = x.detach().requires_grad_(True)
        module(xx).backward(gy)

    return step


def check_same_output(modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    """Max |difference| of each module's output from the first's (the MoE contenders route and
    compute the same thing; a large value would mean an unfair comparison)."""
    with torch.no_grad():
        outs = {n: m(x) for n, m in modules.items()}
    ref = next(iter(outs.values()))
    scale = float(ref.abs().max()) or 1.0
    return {n: float((o - ref).abs().max()) / scale for n, o in outs.items()}


# ============================================================================ case: layer

def case_layer(args, shapes, device) -> list[dict]:
    results = []
    clock = Clock(device)
    for s in shapes:
        torch.manual_seed(0)
        fmoe = build_fmoe(s, device)
        with torch.no_grad():  # megatron's experts have no biases, its router none either
            fmoe.gate.gate.bias.zero_()
            fmoe.experts.htoh4.bias.zero_()
            fmoe.experts.h4toh.bias.zero_()
        contenders: dict[str, nn.Module] = {"fmoe": fmoe, "dense": DenseMLP(s).to(device)}
        if "naive" not in args.skip:
            contenders["naive"] = build_naive(s, fmoe)
        skipped = {}
        if "megatron" not in args.skip:
            why = megatron_env(device)
            if why is None:
                try:
                    contenders["megatron"] = build_megatron(s, fmoe, device)
                except Exception as exc:  # noqa: BLE001
                    skipped["megatron"] = f"{type(exc).__name__}: {exc}"
            else:
                skipped["megatron"] = why
        g = torch.Generator().manual_seed(1)
        x = torch.randn(s.T, s.d, generator=g).to(device)
        gy = torch.randn(s.T, s.d, generator=g).to(device)
        moe_like = {n: m for n, m in contenders.items() if n != "dense"}
        diffs = check_same_output(moe_like, x)
        steps = {n: make_step(m, x, gy) for n, m in contenders.items()}
        steps["experts"], counts = experts_step(fmoe, x)
        if device.type == "cuda" or args.gemm_ref:
            steps["gemm"] = GemmReference(s, device, x.dtype).step
            steps["expert_gemms"] = GroupedGemmReference(s, counts, device, x.dtype).step
            steps["expert_gemms_one_weight"] = GroupedGemmReference(
                s, counts, device, x.dtype, one_weight=True).step
        if args.unfused:
            steps["fmoe_unfused"] = _with_env(steps["fmoe"], "FMOE_FUSED_EXPERTS", "0")
        for threads in (args.threads if device.type == "cpu" else [None]):
            if threads is not None:
                torch.set_num_threads(threads)
            load0 = loadavg()
            timing = interleaved(steps, args.rounds, args.warmup, clock)
            row = {
                "shape": s.name, "dims": dataclasses.asdict(s), "threads": threads,
                "loadavg": [load0, loadavg()],
                "median_ms": {n: round(v["ms"], 3) for n, v in timing.items()},
                "min_ms": {n: round(v["min_ms"], 3) for n, v in timing.items()},
                "cpu_ms": {n: round(v["cpu_ms"], 3) for n, v in timing.items()},
                "tflops": {n: float(f"{s.flops / (v['ms'] * 1e-3) / 1e12:.4g}") for n, v in timing.items()},
                "ratios": {},
                "output_rel_diff": {n: float(f"{v:.3g}") for n, v in diffs.items()},
                "skipped": skipped,
            }
            t = row["median_ms"]
            row["ratios"]["fmoe_over_dense"] = round(t["fmoe"] / t["dense"], 4)
            row["ratios"]["experts_over_dense"] = round(t["experts"] / t["dense"], 4)
            if "gemm" in t:
                row["ratios"]["fmoe_over_gemm"] = round(t["fmoe"] / t["gemm"], 4)
                row["ratios"]["expert_gemms_over_gemm"] = round(t["expert_gemms"] / t["gemm"], 4)
                row["ratios"]["expert_gemms_over_one_weight"] = round(
                    t["expert_gemms"] / t["expert_gemms_one_weight"], 4)
            if "fmoe_unfused" in t:
                row["ratios"]["fused_over_unfused"] = round(t["fmoe"] / t["fmoe_unfused"], 4)
            for other in ("naive", "megatron"):
                if other in t:
                    row["ratios"][f"speedup_vs_{other}"] = round(t[other] / t["fmoe"], 4)
            results.append(row)
            rat = row["ratios"]
            log(f"layer {s.name:8s} ({s.describe()}) threads={threads}: "
                + "  ".join(f"{n} {v:.1f} ms" for n, v in t.items())
                + f" | fmoe/dense {rat['fmoe_over_dense']:.3f}"
                + f"  experts/dense {rat['experts_over_dense']:.3f}"
                + "".join(f"  {k.replace('speedup_vs_', 'x vs ')} {v:.2f}"
                          for k, v in rat.items() if k.startswith("speedup"))
                + (f"  fmoe/gemm {rat['fmoe_over_gemm']:.3f}  expert_gemms/gemm "
                   f"{rat['expert_gemms_over_gemm']:.3f}  expert_gemms/one_weight "
                   f"{rat['expert_gemms_over_one_weight']:.3f}" if "fmoe_over_gemm" in rat else "")
                + (f"  fused/unfused {rat['fused_over_unfused']:.3f}"
                   if "fused_over_unfused" in rat else "")
                + f" | load {row['loadavg'][0]}")
        del contenders, steps, fmoe, moe_like
        gc.collect()
    return results


# ============================================================================ case: memory

def _cpu_peak(step: Callable[[], None], params: list[nn.Parameter]) -> tuple[int, int]:
    """(peak bytes allocated during ``step`` above what was allocated before it, the same
    without the allocations that end up as the parameters' gradients), from the profiler's
    allocation events (every allocation of the CPU allocator, inside native kernels too)."""
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._utils import traverse_dfs

    for p in params:
        p.grad = None
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    for ev in traverse_dfs(prof.profiler.kineto_results.experimental_event_tree()):
        f = ev.extra_fields
        if isinstance(f, _ExtraFields_Allocation) and f.device.type == "cpu":
            events.append((ev.start_time_ns, f.ptr, f.alloc_size))
    events.sort(key=lambda e: e[0])
    grad_ptrs = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    last_alloc = {}
    for i, (_t, ptr, size) in enumerate(events):
        if size > 0 and ptr in grad_ptrs:
            last_alloc[ptr] = i
    grads = set(last_alloc.values())
    cur = peak = cur_w = peak_w = 0
    for i, (_t, _ptr, size) in enumerate(events):
        cur += size
        peak = max(peak, cur)
        if i not in grads:
            cur_w += size
            peak_w = max(peak_w, cur_w)
    return peak, peak_w


def _cuda_peak(step, params) -> tuple[int, int]:
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return peak, peak - grads  # working: an upper bound (grads may not all exist at the peak)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _with_env(fn: Callable[[], None], name: str, value: str) -> Callable[[], None]:
    def run():
        with _env(name, value):
            fn()

    return run


def case_memory(args, shapes, device) -> list[dict]:
    """Peak bytes allocated by one forward + backward above what was allocated before it (the
    parameters, the input and the output gradient), and the same without the parameter
    gradients, which scale with all parameters rather than the active ones. On the CPU from the
    profiler's allocation events (``profile_memory``: every allocation of torch's CPU allocator,
    native kernels included, replayed in order); on a GPU from the caching allocator's peak. The
    layer's reuse of its weight-gradient buffers is turned off here, so that its weight gradients
    are allocated inside the step as the dense MLP's are (and both are counted, or both not).
    On the CPU the step runs on one thread: the profiler sees only the allocations of the thread
    it profiles, and the native kernels allocate per-thread buffers in their worker threads."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _case_memory(args, shapes, device, threads=1)
        finally:
            torch.set_num_threads(threads)
    return _case_memory(args, shapes, device, threads=torch.get_num_threads())


def _case_memory(args, shapes, device, threads) -> list[dict]:
    results = []
    for s in shapes:
        torch.manual_seed(0)
        mods = {"fmoe": build_fmoe(s, device), "dense": DenseMLP(s).to(device)}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(s.T, s.d, generator=g).to(device)
        gy = torch.randn(s.T, s.d, generator=g).to(device)
        row = {"shape": s.name, "dims": dataclasses.asdict(s), "threads": threads, "peak_mb": {},
               "working_peak_mb": {}, "param_mb": {}, "ratios": {}}
        for name, m in mods.items():
            params = [p for p in m.parameters() if p.requires_grad]
            step = make_step(m, x, gy)
            with _env("FMOE_REUSE_GRAD_BUFFERS", "0"):
                step()  # warm up (one-time allocations)
                peak, working = (_cuda_peak if device.type == "cuda" else _cpu_peak)(step, params)
            for p in params:
                p.grad = None
            row["peak_mb"][name] = round(peak / 2**20, 2)
            row["working_peak_mb"][name] = round(working / 2**20, 2)
            row["param_mb"][name] = round(sum(p.numel() * p.element_size() for p in params) / 2**20, 2)
        row["ratios"]["working_fmoe_over_dense"] = round(
            row["working_peak_mb"]["fmoe"] / row["working_peak_mb"]["dense"], 4)
        row["ratios"]["peak_fmoe_over_dense"] = round(row["peak_mb"]["fmoe"] / row["peak_mb"]["dense"], 4)
        results.append(row)
        log(f"memory {s.name:8s} ({s.describe()}): peak of forward+backward above the parameters: "
            f"fmoe {row['peak_mb']['fmoe']:.1f} MB, dense {row['peak_mb']['dense']:.1f} MB "
            f"(x{row['ratios']['peak_fmoe_over_dense']:.2f}); without the parameter gradients "
            f"(which scale with all parameters, {row['param_mb']['fmoe']:.1f} MB vs "
            f"{row['param_mb']['dense']:.1f} MB): fmoe {row['working_peak_mb']['fmoe']:.1f} MB, dense "
            f"{row['working_peak_mb']['dense']:.1f} MB (x{row['ratios']['working_fmoe_over_dense']:.2f})")
        del mods
        gc.collect()
    return results


# ============================================================================ worker processes

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main(fn, rank, world, port, threads, backend, args, result_q):
    try:
        torch.set_num_threads(threads)
        if world > 1:
            import torch.distributed as dist

            store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                                  timeout=datetime.timedelta(seconds=600))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        result = fn(rank, world, *args)
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        result_q.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        result_q.put((rank, False, traceback.format_exc()))
    finally:
        result_q.close()
        result_q.join_thread()


def launch(fn, world: int, args=(), threads: int = 1, timeout: float = 1800.0,
           backend: str = "gloo") -> list:
    """Runs ``fn(rank, world, *args)`` in ``world`` fresh processes (joined in one process
    group when world > 1); returns their results in rank order."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = None
    port = 0
    if world > 1:  # the parent hosts the rendezvous store on a port the OS picks
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
        port = store.port
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(fn, r, world, port, threads, backend,
                                                    tuple(args), result_q)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            try:
                rank, ok, payload = result_q.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{fn.__name__}: workers did not finish in {timeout:.0f} s")
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in results and r not in errors]
                if dead and not errors:
                    time.sleep(1.0)  # a last report may still be in the pipe
                    if result_q.empty():
                        raise RuntimeError(f"{fn.__name__}: worker(s) {dead} died without a report")
                continue
            (results if ok else errors)[rank] = payload
            if errors:
                break
        if errors:
            rank, tb = next(iter(errors.items()))
            raise RuntimeError(f"{fn.__name__}: rank {rank} failed:\n{tb}")
        for p in procs:
            p.join(timeout=30)
        return [results[r] for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        result_q.close()
        result_q.cancel_join_thread()
        del store


# ============================================================================ case: ep

def _ep_worker(rank, world, s: Shape, rounds: int, warmup: int):
    """EP=world layer (every rank T tokens, E / world experts), once with the exchange overlapped
    (``ep_overlap``, the default) and once through the all-to-alls (``FMOE_EP_OVERLAP=0``); and,
    on rank 0 while the other ranks wait, the same layer in one process (T tokens, all E
    experts). Times each step and the communication that the step waited for: the count
    exchange, and the all-to-alls of rows or the overlapped path's waits for its messages."""
    import torch.distributed as dist

    from . import comm, ep_overlap
    from .layers import FMoETransformerMLP

    acc = [0.0]

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[0] += time.perf_counter() - t0
        return wrapper

    class TimedPending:  # the count exchange: its start and the wait for its end
        def __init__(self, pending):
            self.pending = pending

        def wait(self):
            return timed(self.pending.wait)()

        @property
        def flags(self):
            return self.pending.flags

    start_counts = timed(comm.exchange_counts_async)
    comm.exchange_counts_async = lambda *a, **kw: TimedPending(start_counts(*a, **kw))
    comm._all_to_all_rows = timed(comm._all_to_all_rows)
    ep_overlap._wait = timed(ep_overlap._wait)

    torch.manual_seed(0)  # the same gate on every rank, as data-parallel replicas have
    ep = FMoETransformerMLP(num_expert=s.E // world, d_model=s.d, d_hidden=s.h, top_k=s.k,
                            world_size=world)
    local = FMoETransformerMLP(num_expert=s.E, d_model=s.d, d_hidden=s.h, top_k=s.k)
    with torch.no_grad():
        local.gate.load_state_dict(ep.gate.state_dict())
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(s.T, s.d, generator=g)
    gy = torch.randn(s.T, s.d, generator=g)
    step_local = make_step(local, x, gy)
    steps = {"ep": _with_env(make_step(ep, x, gy), "FMOE_EP_OVERLAP", "1"),
             "ep_all_to_all": _with_env(make_step(ep, x, gy), "FMOE_EP_OVERLAP", "0")}
    times = {k: [] for k in ("ep", "ep_all_to_all", "comm", "comm_all_to_all", "alone", "side")}
    for r in range(warmup + rounds):
        for name, step in sorted(steps.items(), reverse=bool(r % 2)):  # alternating order
            dist.barrier()
            acc[0] = 0.0
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            if r >= warmup:
                times[name].append(t1 - t0)
                times["comm" if name == "ep" else "comm_all_to_all"].append(acc[0])
        dist.barrier()
        # One process doing its half of the work alone (rank 0; the others wait in a barrier).
        alone = None
        if rank == 0:
            t2 = time.perf_counter()
            step_local()
            alone = time.perf_counter() - t2
        dist.barrier()
        # Every process doing its half at the same time, without exchanging anything.
        t3 = time.perf_counter()
        step_local()
        side = time.perf_counter() - t3
        if r >= warmup:
            times["alone"].append(alone)
            times["side"].append(side)
    out = {f"{k}_ms": [1e3 * v for v in vals] for k, vals in times.items() if k != "alone"}
    out["alone_ms"] = [1e3 * v for v in times["alone"]] if rank == 0 else None
    # Rows this rank's experts received (every step routes the same batch): how evenly the gate
    # spread the work over the ranks.
    out["rows_received"] = int(comm.exchange_counts(ep.last_expert_count, ep.num_expert).sum())
    return out


def case_ep(args, shapes, device) -> list[dict]:
    results = []
    world = 2
    for s in shapes:
        if s.E % world:
            continue
        out = launch(_ep_worker, world, args=(s, args.ep_rounds, args.warmup), threads=1)

        def median_of_slowest(key):  # a step takes as long as its slowest rank
            return statistics.median(max(v) for v in zip(*(o[key] for o in out)))

        ep_ms, a2a_ms = median_of_slowest("ep_ms"), median_of_slowest("ep_all_to_all_ms")
        comm_ms, comm_a2a_ms = median_of_slowest("comm_ms"), median_of_slowest("comm_all_to_all_ms")
        side_ms = median_of_slowest("side_ms")
        alone_ms = statistics.median(out[0]["alone_ms"])
        rows = [o["rows_received"] for o in out]
        row = {"shape": s.name, "dims": dataclasses.asdict(s), "world_size": world,
               "threads_per_process": 1, "backend": "gloo", "tokens_per_rank": s.T,
               "median_ms": {"ep": round(ep_ms, 3), "ep_all_to_all": round(a2a_ms, 3),
                             "one_process_half_work": round(alone_ms, 3),
                             "two_processes_half_work_each": round(side_ms, 3),
                             "communication": round(comm_ms, 3),
                             "communication_all_to_all": round(comm_a2a_ms, 3)},
               "efficiency": round(alone_ms / ep_ms, 4),
               "efficiency_vs_side_by_side": round(side_ms / ep_ms, 4),
               "efficiency_all_to_all": round(alone_ms / a2a_ms, 4),
               "overlap_speedup": round(a2a_ms / ep_ms, 4),
               "communication_share": round(comm_ms / ep_ms, 4),
               "communication_share_all_to_all": round(comm_a2a_ms / a2a_ms, 4),
               "rows_received_per_rank": rows,
               "load_imbalance": round(max(rows) * len(rows) / max(1, sum(rows)), 4)}
        results.append(row)
        log(f"ep     {s.name:8s} ({s.describe()}, T per rank): EP=2 over gloo {ep_ms:.1f} ms "
            f"overlapped, {a2a_ms:.1f} ms through all-to-alls; one process with half the work "
            f"{alone_ms:.1f} ms -> efficiency {100 * row['efficiency']:.1f}% "
            f"(all-to-alls {100 * row['efficiency_all_to_all']:.1f}%; "
            f"{100 * row['efficiency_vs_side_by_side']:.1f}% against two processes each doing its "
            f"half at once, {side_ms:.1f} ms); waiting for communication {comm_ms:.1f} ms = "
            f"{100 * row['communication_share']:.1f}% of the step (all-to-alls {comm_a2a_ms:.1f} "
            f"ms = {100 * row['communication_share_all_to_all']:.1f}%); rows per rank {rows} "
            f"(busiest / mean {row['load_imbalance']:.3f})")
    return results


# ============================================================================ case: e2e

def _e2e_argv(cfg: dict, iters: int, threads: int) -> list[str]:
    return ["--num-layers", str(cfg["layers"]), "--hidden-size", str(cfg["hidden"]),
            "--num-attention-heads", str(cfg["heads"]), "--ffn-hidden-size", str(cfg["ffn"]),
            "--seq-length", str(cfg["seq"]), "--micro-batch-size", str(cfg["mbs"]),
            "--global-batch-size", str(cfg["mbs"]), "--train-iters", str(iters),
            "--lr", "1e-3", "--lr-decay-style", "constant", "--log-interval", "1000000",
            "--threads", str(threads), "--seed", "1234", "--disable-bias-linear"]


def _e2e_runs(cfg: dict, iters: int, threads: int, corpus_bytes: int | None) -> dict[str, list[str]]:
    """The ``pretrain_gpt`` command lines of one config: ``--fmoefy``, megatron-core's MoE, and the
    dense GPT of the same active FLOPs (MLP width ``ffn * top_k``), the ceiling of any MoE there
    (see the module doc)."""
    extra = ["--default-corpus-bytes", str(corpus_bytes)] if corpus_bytes else []
    base = _e2e_argv(cfg, iters, threads) + extra
    # All without linear biases (megatron-core's expert biases fail, see pretrain_gpt), the
    # experts of both MoEs included. The same router: top-k softmax, no balance loss.
    return {
        "fmoefy": base + ["--fmoefy", "--fmoe-num-experts", str(cfg["experts"]),
                          "--fmoe-top-k", str(cfg["top_k"]), "--balance-strategy", "naive",
                          "--balance-loss-weight", "0"],
        "megatron_moe": base + ["--num-experts", str(cfg["experts"]), "--moe-router-topk",
                                str(cfg["top_k"]), "--moe-token-dispatcher-type", "alltoall",
                                "--moe-router-load-balancing-type", "none"],
        "dense": _e2e_argv(dict(cfg, ffn=cfg["ffn"] * cfg["top_k"]), iters, threads) + extra,
    }


def _e2e_worker(rank, world, argv: list[str], warmup: int):
    """One ``pretrain_gpt`` run in this (fresh) process; returns its iteration times after
    ``warmup`` iterations, and its last loss."""
    import contextlib as _cl
    import io

    from .megatron import pretrain_gpt as ptg

    orig_step = ptg.forward_step
    stamps: list[float] = []

    def forward_step(data_iterator, model):  # one microbatch per iteration: one stamp each
        stamps.append(time.perf_counter())
        return orig_step(data_iterator, model)

    ptg.forward_step = forward_step
    try:
        with _cl.redirect_stdout(io.StringIO()):
            res = ptg.run(argv)
        marks = stamps + [time.perf_counter()]
    finally:
        ptg.forward_step = orig_step
    return {"iter_s": [b - a for a, b in zip(marks, marks[1:])][warmup:],
            "last_loss": res.losses[-1]}


def case_e2e(args, device) -> list[dict]:
    """Each run trains in a fresh process. Runs that shared one process slowed each other down,
    by an amount that depended on their order: megatron-core's MoE model stays alive after its
    run (measured: 179 modules and about 340 MB per run of the small config), and three runs of
    the same ``--fmoefy`` model in one process took 877, 917 and 971 ms per iteration."""
    configs = E2E_TINY if args.tiny else {n: E2E_CONFIGS[n] for n in args.e2e_configs}
    threads = max(args.threads)
    iters = 2 if args.tiny else args.e2e_iters
    warmup = 1 if args.tiny else 2
    corpus = 300_000 if args.tiny else None
    results = []
    for name, c in configs.items():
        runs = _e2e_runs(c, warmup + iters, threads, corpus)
        times: dict[str, list[float]] = {n: [] for n in runs}
        losses = {}
        for r in range(args.e2e_rounds):
            for variant in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                t0 = time.perf_counter()
                # pretrain_gpt trains on a GPU whenever it sees one: --device cpu hides them.
                with (_env("CUDA_VISIBLE_DEVICES", "") if device.type == "cpu"
                      else contextlib.nullcontext()):
                    (res,) = launch(_e2e_worker, 1, args=(runs[variant], warmup), threads=threads)
                times[variant] += res["iter_s"]
                losses[variant] = res["last_loss"]
                # Progress: each run is a fresh process (seconds of start-up on a GPU machine).
                log(f"e2e    {name:8s} run {r + 1}/{args.e2e_rounds} {variant:12s} "
                    f"{1e3 * statistics.median(res['iter_s']):.1f} ms/iteration "
                    f"({time.perf_counter() - t0:.1f} s with start-up)")
        tokens = c["mbs"] * c["seq"]
        tps = {n: tokens / statistics.median(v) for n, v in times.items()}
        row = {"config": name, "model": c, "device": device.type,
               "threads": threads if device.type == "cpu" else None, "processes": 1,
               "tokens_per_iter": tokens,
               "iter_ms": {n: round(1e3 * statistics.median(v), 2) for n, v in times.items()},
               "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
               "ratios": {"fmoefy_over_megatron_moe": round(tps["fmoefy"] / tps["megatron_moe"], 4),
                          "fmoefy_over_dense": round(tps["fmoefy"] / tps["dense"], 4),
                          # about what fmoefy / megatron-core MoE would be with MoE layers as
                          # fast as the dense MLP (the MoE's larger optimizer step aside)
                          "dense_over_megatron_moe": round(tps["dense"] / tps["megatron_moe"], 4)},
               "last_loss": losses}
        results.append(row)
        log(f"e2e    {name:8s} (GPT {c['layers']} layers, hidden {c['hidden']}, ffn {c['ffn']}, "
            f"seq {c['seq']} x batch {c['mbs']}, {c['experts']} experts top-{c['top_k']}, "
            f"{threads} threads): --fmoefy {tps['fmoefy']:.0f} tokens/s, megatron-core MoE "
            f"{tps['megatron_moe']:.0f} tokens/s -> x{row['ratios']['fmoefy_over_megatron_moe']:.2f}; "
            f"dense GPT of the same active FLOPs {tps['dense']:.0f} tokens/s (--fmoefy / dense "
            f"{row['ratios']['fmoefy_over_dense']:.2f}, dense / megatron-core MoE "
            f"x{row['ratios']['dense_over_megatron_moe']:.2f})")
    return results


# ============================================================================ case: compile

class CompileBlock(nn.Module):
    """A pre-norm residual block around the MoE layer."""

    def __init__(self, s: Shape):
        super().__init__()
        from .layers import FMoETransformerMLP

        self.norm = nn.LayerNorm(s.d)
        self.moe = FMoETransformerMLP(num_expert=s.E, d_model=s.d, d_hidden=s.h, top_k=s.k)

    def forward(self, x):
        return x + self.moe(self.norm(x))


def case_compile(args, shapes, device) -> list[dict]:
    import copy

    results = []
    clock = Clock(device)
    for s in shapes:
        torch.manual_seed(0)
        eager = CompileBlock(s).to(device)
        compiled = torch.compile(copy.deepcopy(eager), backend=args.compile_backend)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(s.T, s.d, generator=g).to(device)
        gy = torch.randn(s.T, s.d, generator=g).to(device)
        steps = {"eager": make_step(eager, x, gy), "compiled": make_step(compiled, x, gy)}
        if device.type == "cpu":
            torch.set_num_threads(args.threads[0])  # the first count the loop below times
        t0 = time.perf_counter()
        steps["compiled"]()  # compiles
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            diff = float((compiled(x) - eager(x)).abs().max())
        for i, threads in enumerate(args.threads if device.type == "cpu" else [None]):
            if threads is not None:
                torch.set_num_threads(threads)
            if i:
                # Another thread count recompiles (Dynamo guards on it): not in a timed round,
                # whatever --warmup says.
                t0 = time.perf_counter()
                steps["compiled"]()
                compile_s = time.perf_counter() - t0
            timing = interleaved(steps, args.rounds, args.warmup, clock)
            t = {n: round(v["ms"], 3) for n, v in timing.items()}
            row = {"shape": s.name, "dims": dataclasses.asdict(s), "threads": threads,
                   "backend": args.compile_backend, "median_ms": t,
                   "cpu_ms": {n: round(v["cpu_ms"], 3) for n, v in timing.items()},
                   "compile_s": round(compile_s, 2), "max_abs_diff": diff,
                   "ratios": {"compiled_over_eager": round(t["compiled"] / t["eager"], 4)}}
            results.append(row)
            log(f"compile {s.name:8s} ({s.describe()}) threads={threads}: eager {t['eager']:.1f} ms, "
                f"torch.compile ({args.compile_backend}) {t['compiled']:.1f} ms -> "
                f"x{row['ratios']['compiled_over_eager']:.3f} (compiled in {compile_s:.0f} s)")
        torch._dynamo.reset()
    return results


# ============================================================================ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastmoe_megatron.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all",
                   help=f"comma-separated cases: {', '.join(CASES)}, or all (default)")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated shapes: {', '.join(SHAPES)} (default per case: "
                        + "; ".join(f"{c}: {','.join(v)}" for c, v in DEFAULT_SHAPES.items()) + ")")
    p.add_argument("--threads", default=None,
                   help="comma-separated CPU thread counts (default 1,2 capped at the cores)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 7)")
    p.add_argument("--ep-rounds", type=int, default=None,
                   help="timed rounds of the ep case (default 3 x --rounds: two processes on "
                        "shared cores are the noisiest figures)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes, a few seconds per case (CI); overrides --shapes, --e2e-configs "
                        "and --e2e-iters")
    p.add_argument("--skip", default="",
                   help=f"comma-separated contenders to leave out: {', '.join(CONTENDERS)}")
    p.add_argument("--gemm-ref", action="store_true",
                   help="also time the layer's GEMMs as dense products on the CPU (always on a GPU)")
    p.add_argument("--unfused", action="store_true",
                   help="also time the layer with FMOE_FUSED_EXPERTS=0 (experts as grouped GEMM, "
                        "activation, grouped GEMM)")
    p.add_argument("--e2e-configs", default="tiny,small", help="end-to-end GPT configs: tiny, small")
    p.add_argument("--e2e-iters", type=int, default=8, help="timed iterations per e2e run")
    p.add_argument("--e2e-rounds", type=int, default=None, help="runs of each e2e model (default 5)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile back end of the compile case (default inductor; "
                        "aot_eager with --tiny)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    for flag in ("rounds", "ep_rounds", "e2e_iters", "e2e_rounds"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    names = [c.strip() for c in args.case.split(",") if c.strip()]
    if "all" in names and len(names) > 1:
        p.error(f"--case {args.case!r}: 'all' stands alone (it runs every case)")
    args.cases = CASES if names == ["all"] else tuple(names)
    if not args.cases:
        p.error(f"--case: name at least one of {', '.join(CASES)}, or all")
    for c in args.cases:
        if c not in CASES:
            p.error(f"--case {c!r}: valid cases are {', '.join(CASES)}, or all alone")
    cores = os.cpu_count() or 1
    if args.threads is None:
        args.threads = sorted({1, min(2, cores)})
    else:
        raw = args.threads
        try:
            args.threads = [int(t) for t in raw.split(",")]
        except ValueError:
            args.threads = []
        if not args.threads or min(args.threads) < 1:
            p.error(f"--threads {raw!r}: expected comma-separated thread counts >= 1")
    args.skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    for c in sorted(args.skip - set(CONTENDERS)):
        p.error(f"--skip {c!r}: valid contenders are {', '.join(CONTENDERS)}")
    args.e2e_configs = [c.strip() for c in args.e2e_configs.split(",") if c.strip()]
    if not args.e2e_configs:
        p.error(f"--e2e-configs: name at least one of {', '.join(E2E_CONFIGS)}")
    for c in args.e2e_configs:
        if c not in E2E_CONFIGS:
            p.error(f"--e2e-configs {c!r}: valid configs are {', '.join(E2E_CONFIGS)}")
    if args.shapes is not None:
        names = [x.strip() for x in args.shapes.split(",") if x.strip()]
        if not names:
            p.error(f"--shapes: name at least one of {', '.join(SHAPES)}")
        for n in names:
            if n not in SHAPES:
                p.error(f"--shapes {n!r}: valid shapes are {', '.join(SHAPES)}")
        args.shape_names = {c: tuple(names) for c in DEFAULT_SHAPES}
    else:
        args.shape_names = dict(DEFAULT_SHAPES)
    if args.rounds is None:
        args.rounds = 2 if args.tiny else 7
    if args.ep_rounds is None:
        args.ep_rounds = args.rounds if args.tiny else 3 * args.rounds
    if args.e2e_rounds is None:
        args.e2e_rounds = 1 if args.tiny else 5
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.tiny else "inductor"
    if "compile" in args.cases:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in known:
            p.error(f"--compile-backend {args.compile_backend!r}: valid back ends are "
                    f"{', '.join(known)}")
    if args.tiny:
        args.gemm_ref = True  # exercise the GPU's reference path on the CPU too
        args.unfused = True
    return args


def _megatron_missing() -> str | None:
    import importlib.util

    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        found = False
    return None if found else "megatron-core is not installed"


def environment(device) -> dict:
    from . import ops

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "kernels": ops.backend_name(device), "loadavg": loadavg()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.package_info.__version__
    except Exception:  # noqa: BLE001
        env["megatron_core"] = None
    return env


def summary(report: dict) -> str:
    """The ratios of every case as one table (lower is better for x/dense, higher for speedups,
    efficiency and tokens/s ratios)."""
    lines = ["", "summary (medians; load average at start "
             f"{report['environment']['loadavg']}, at end {report['environment']['loadavg_end']})",
             f"{'case':8s} {'shape/config':10s} {'threads':>7s}  figures"]
    cases = report["cases"]
    for r in cases.get("layer", []):
        rat = r["ratios"]
        figs = [f"fmoe/dense {rat['fmoe_over_dense']:.3f}",
                f"experts alone/dense {rat['experts_over_dense']:.3f}"]
        figs += [f"{k.replace('speedup_vs_', 'speedup vs ')} {v:.2f}x"
                 for k, v in rat.items() if k.startswith("speedup")]
        if "fmoe_over_gemm" in rat:
            figs.append(f"fmoe/gemm {rat['fmoe_over_gemm']:.3f}, per-expert GEMMs/single GEMMs "
                        f"{rat['expert_gemms_over_gemm']:.3f}, per-expert GEMMs/one expert's "
                        f"weights {rat['expert_gemms_over_one_weight']:.3f}")
        if "fused_over_unfused" in rat:
            figs.append(f"fused/unfused {rat['fused_over_unfused']:.3f}")
        lines.append(f"{'layer':8s} {r['shape']:10s} {str(r['threads']):>7s}  " + ", ".join(figs))
    for r in cases.get("memory", []):
        lines.append(f"{'memory':8s} {r['shape']:10s} {'':>7s}  working peak fmoe/dense "
                     f"{r['ratios']['working_fmoe_over_dense']:.3f} (with parameter gradients "
                     f"{r['ratios']['peak_fmoe_over_dense']:.3f})")
    for r in cases.get("ep", []):
        lines.append(f"{'ep=2':8s} {r['shape']:10s} {'1+1':>7s}  efficiency "
                     f"{100 * r['efficiency']:.1f}% (all-to-alls "
                     f"{100 * r['efficiency_all_to_all']:.1f}%, overlap speed-up "
                     f"{r['overlap_speedup']:.2f}x; vs two processes at once "
                     f"{100 * r['efficiency_vs_side_by_side']:.1f}%), waiting for communication "
                     f"{100 * r['communication_share']:.1f}% of the step (all-to-alls "
                     f"{100 * r['communication_share_all_to_all']:.1f}%)")
    for r in cases.get("e2e", []):
        tps = r["tokens_per_s"]
        lines.append(f"{'e2e':8s} {r['config']:10s} {str(r['threads']):>7s}  "
                     "--fmoefy/megatron-core MoE "
                     f"tokens/s {r['ratios']['fmoefy_over_megatron_moe']:.3f} "
                     f"({tps['fmoefy']:.0f} vs {tps['megatron_moe']:.0f}); dense GPT "
                     f"{tps['dense']:.0f}: --fmoefy/dense {r['ratios']['fmoefy_over_dense']:.3f}, "
                     f"dense/megatron-core MoE {r['ratios']['dense_over_megatron_moe']:.3f}")
    for r in cases.get("compile", []):
        lines.append(f"{'compile':8s} {r['shape']:10s} {str(r['threads']):>7s}  compiled/eager "
                     f"{r['ratios']['compiled_over_eager']:.3f} ({r['backend']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    global _LOG
    args = parse_args(argv)
    _LOG = sys.stderr if args.json else sys.stdout
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"bench: error: --device {args.device}: CUDA is not available", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    threads0 = torch.get_num_threads()
    report = {"environment": environment(device), "args": {
        "cases": list(args.cases), "threads": args.threads, "rounds": args.rounds,
        "ep_rounds": args.ep_rounds, "warmup": args.warmup, "tiny": args.tiny}, "cases": {}}
    log(f"fastmoe_megatron.bench on {device} ({report['environment']['kernels']} kernels, torch "
        f"{torch.__version__}, {os.cpu_count()} cores, load {loadavg()}); medians of "
        f"{args.rounds} interleaved rounds ({args.ep_rounds} for ep)")

    def shapes_for(case):
        return [TINY_SHAPE] if args.tiny else [SHAPES[n] for n in args.shape_names[case]]

    def run_case(case):
        if case == "layer":
            return case_layer(args, shapes_for("layer"), device)
        if case == "memory":
            return case_memory(args, shapes_for("memory"), device)
        if case == "ep":
            return case_ep(args, shapes_for("ep"), device)
        if case == "e2e":
            why = _megatron_missing()
            if why:
                log(f"e2e: skipped ({why})")
                report.setdefault("skipped", {})["e2e"] = why
                return []
            return case_e2e(args, device)
        return case_compile(args, shapes_for("compile"), device)

    t_start = time.perf_counter()
    for case in args.cases:
        t0 = time.perf_counter()
        try:
            res = run_case(case)
        except Exception as exc:  # noqa: BLE001 - the other cases' results still come out
            why = f"{type(exc).__name__}: {exc}"
            log(f"{case}: FAILED: {why}")
            report.setdefault("errors", {})[case] = why
            res = []
        finally:
            torch.set_num_threads(threads0)
        report["cases"][case] = res
        report.setdefault("seconds", {})[case] = round(time.perf_counter() - t0, 1)
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    report["environment"]["loadavg_end"] = loadavg()
    log(summary(report))
    for case, why in report.get("errors", {}).items():
        log(f"bench: the {case} case failed: {why}")
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
