"""An independent, brute-force reference for the MoE layers: one Python loop over tokens.

Nothing here uses ``fastmoe_megatron``: only plain torch ops on one token (one row) at a time, so
that the layers' dispatch machinery (counts, positions, scatter/gather, grouped GEMM) is held
against the definition of a Mixture-of-Experts layer:

    y[t] = sum_j score[t, j] * expert_{idx[t, j]}(x[t]),    a slot with idx[t, j] == -1 adds 0.

Gradients come from autograd through these loops. To compare gradients with a model, copy its
parameters with ``leaf_copy`` / ``mlp_params`` (fresh leaves), run the reference on the copies and
call backward with the same upstream gradient.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch


# ---------------------------------------------------------------------------- parameters

def leaf_copy(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A detached copy of ``t`` (optionally cast) that is a fresh autograd leaf."""
    if t is None:
        return None
    c = t.detach().clone()
    if dtype is not None:
        c = c.to(dtype)
    return c.requires_grad_(True)


def mlp_params(model, dtype: torch.dtype | None = None) -> dict:
    """Fresh leaf copies of an FMoETransformerMLP's parameters, by their FastMoE names.

    Layout (FastMoE's): htoh4.weight [E, H, D], htoh4.bias [E, H], h4toh.weight [E, D, H],
    h4toh.bias [E, D], gate.gate an nn.Linear(D, E * world_size).
    """
    return {name: leaf_copy(p, dtype) for name, p in mlp_tensors(model).items()}


def model_grads(model) -> dict:
    """The model's parameter gradients under the names ``mlp_params`` uses."""
    return {name: (None if p is None else p.grad) for name, p in mlp_tensors(model).items()}


def mlp_tensors(model) -> dict:
    """The parameters of an FMoETransformerMLP by the names ``mlp_params`` uses (None where the
    model has no such parameter: experts built with ``bias=False``)."""
    return {
        "gate.weight": model.gate.gate.weight,
        "gate.bias": model.gate.gate.bias,
        "htoh4.weight": model.experts.htoh4.weight,
        "htoh4.bias": model.experts.htoh4.bias,
        "h4toh.weight": model.experts.h4toh.weight,
        "h4toh.bias": model.experts.h4toh.bias,
    }


# ---------------------------------------------------------------------------- experts

def mlp_expert(params: dict, e: int, activation: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """Expert ``e`` of a fused FMoETransformerMLP as a function of one token ``v`` [D].

    Biases may be None (``bias=False``). A gated expert (``gated_linear_unit=True``) has an
    htoh4 weight of ``2H`` rows: ``h = activation(first H) * (last H)``."""
    w1, w2 = params["htoh4.weight"][e], params["h4toh.weight"][e]  # [H or 2H, D], [D, H]
    b1 = params["htoh4.bias"][e] if params["htoh4.bias"] is not None else None
    b2 = params["h4toh.bias"][e] if params["h4toh.bias"] is not None else None
    H = w2.shape[1]
    gated = w1.shape[0] == 2 * H

    def run(v: torch.Tensor) -> torch.Tensor:
        h = torch.mv(w1, v)
        if b1 is not None:
            h = h + b1
        if gated:
            h = activation(h[:H].unsqueeze(0)).squeeze(0) * h[H:]
        else:
            h = activation(h.unsqueeze(0)).squeeze(0)
        y = torch.mv(w2, h)
        return y + b2 if b2 is not None else y

    return run


def mlp_experts(params: dict, activation: Callable) -> list:
    n = params["htoh4.weight"].shape[0]
    return [mlp_expert(params, e, activation) for e in range(n)]


def module_experts(modules: Sequence[torch.nn.Module]) -> list:
    """Per-token functions of (copies of) arbitrary expert modules (``FMoE(expert=...)``)."""
    return [lambda v, m=m: m(v.unsqueeze(0)).squeeze(0) for m in modules]


def copy_modules(modules: Sequence[torch.nn.Module]) -> list:
    """Deep copies with fresh (zeroed) gradients, so the reference accumulates its own."""
    out = [copy.deepcopy(m) for m in modules]
    for m in out:
        for p in m.parameters():
            p.grad = None
    return out


# ---------------------------------------------------------------------------- the MoE combine

def moe(x: torch.Tensor, idx: torch.Tensor, score: torch.Tensor, experts: Sequence[Callable]):
    """``y[t] = sum_j score[t, j] * experts[idx[t, j]](x[t])``; slots with ``idx == -1`` add 0.

    ``x`` [T, D], ``idx`` [T, K] (int), ``score`` [T, K]. One token and one slot at a time.
    """
    T, D = x.shape
    K = idx.shape[1]
    rows = []
    for t in range(T):
        acc = x[t] * 0  # zero, but part of the graph even when every slot is dropped
        for j in range(K):
            e = int(idx[t, j])
            if e < 0:
                continue
            acc = acc + score[t, j].to(x.dtype) * experts[e](x[t])
        rows.append(acc)
    if not rows:
        # No tokens: an empty output that still depends on x (so x.grad exists and is empty).
        return x[:0] * 0
    return torch.stack(rows)


# ---------------------------------------------------------------------------- gates

def logits_of(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Router logits ``weight @ x[t] + bias`` computed token by token."""
    rows = []
    for t in range(x.shape[0]):
        row = torch.mv(weight, x[t])
        rows.append(row + bias if bias is not None else row)
    if not rows:
        return x.new_zeros(0, weight.shape[0]) + (x[:0].sum() * 0)
    return torch.stack(rows)


def top_k_of(row: torch.Tensor, k: int, allowed: Sequence[int] | None = None) -> list:
    """The ``k`` largest entries of one row of logits, largest first (ties: lower id first)."""
    values = row.detach().tolist()
    cands = range(len(values)) if allowed is None else allowed
    return sorted(cands, key=lambda e: (-values[e], e))[:k]


def naive_gate(x, weight, bias, top_k, allowed=None, idx=None):
    """FastMoE's NaiveGate by brute force: linear -> top-k of the logits -> softmax over the k
    kept logits. ``allowed`` restricts the candidates; ``idx`` [T, K] forces the selection (the
    scores are then the softmax of the logits at those ids). Returns ``(idx [T, K] int64, score
    [T, K])``; ``score`` is differentiable w.r.t. ``x``, ``weight`` and ``bias``.
    """
    logits = logits_of(x, weight, bias)
    T = x.shape[0]
    if idx is None:
        idx = torch.tensor([top_k_of(logits[t], top_k, allowed) for t in range(T)],
                           dtype=torch.int64).reshape(T, top_k)
    scores = []
    for t in range(T):
        kept = torch.stack([logits[t, int(e)] for e in idx[t]])
        scores.append(torch.softmax(kept.float(), dim=0).to(logits.dtype))
    score = torch.stack(scores) if scores else logits.new_zeros(0, top_k) + logits.sum() * 0
    return idx, score


def prune_by_capacity(idx: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    """Keeps the first ``keep[e]`` slots of each expert in priority order (every token's first
    choice, by token; then every second choice; ...); the others become -1."""
    idx = idx.clone()
    T, K = idx.shape
    used = [0] * len(keep)
    for j in range(K):
        for t in range(T):
            e = int(idx[t, j])
            if e < 0:
                continue
            if used[e] < keep[e]:
                used[e] += 1
            else:
                idx[t, j] = -1
    return idx


# ---------------------------------------------------------------------------- comparisons

MLP_PARAMS = ["gate.weight", "gate.bias", "htoh4.weight", "htoh4.bias", "h4toh.weight", "h4toh.bias"]


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float,
                 scaled: bool = False) -> None:
    """``got`` against the (fp32) ``want``; with ``scaled``, ``atol`` is relative to the largest
    entry of ``want`` (at least 1): bf16 sums over many tokens err with the tensor's magnitude."""
    want = want.float()
    if scaled and want.numel():
        atol = atol * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_all_close(got, want, names: Sequence[str] = MLP_PARAMS, **tol) -> None:
    """``(output, input grad, {name: grad})`` of a model against the reference's, for every
    FastMoE parameter in ``names`` (default all of ``MLP_PARAMS``); a grad the reference never
    touched is 0."""
    y, gx, grads = got
    y_ref, gx_ref, grads_ref = want[:3]
    assert_close("output", y, y_ref, **tol)
    assert_close("input grad", gx, gx_ref, **tol)
    for name in names:
        g = grads[name]
        assert g is not None, f"{name}: the model produced no gradient"
        r = grads_ref[name]
        r = torch.zeros_like(g, dtype=torch.float32) if r is None else r
        assert_close(f"{name} grad", g, r, **tol)
