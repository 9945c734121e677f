"""Balance loss and expert load per MoE layer, accumulated between log intervals.

Every MegatronMLP records its balance loss and the slots it sent to each global expert on each
forward; ``collect`` sums them over all ranks (every pipeline stage holds other layers, so the
tensors are laid out over all layers and all-reduced over the world) and resets.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_loss: dict[int, torch.Tensor] = {}
_calls: dict[int, int] = {}
_load: dict[int, torch.Tensor] = {}


def record_layer_stats(layer: int, loss, counts) -> None:
    if loss is not None:
        value = loss.detach().float().reshape(())
        _loss[layer] = _loss.get(layer, 0) + value
        _calls[layer] = _calls.get(layer, 0) + 1
    if counts is not None:
        _load[layer] = _load.get(layer, 0) + counts.to(torch.float64)


def reset() -> None:
    _loss.clear()
    _calls.clear()
    _load.clear()


def collect(num_layers: int, num_experts: int, group=None, device="cpu") -> dict[int, dict]:
    """{layer (1-based): {"balance_loss": mean over calls and ranks, "load": fraction of slots
    per expert}} for the layers that recorded anything; resets the accumulators."""
    table = torch.zeros(num_layers + 1, 2 + num_experts, dtype=torch.float64)
    for layer, value in _loss.items():
        table[layer, 0] += float(value)
        table[layer, 1] += _calls[layer]
    for layer, counts in _load.items():
        table[layer, 2:] += counts.cpu()
    reset()
    if dist.is_initialized():
        table = table.to(device)
        dist.all_reduce(table, group=group)
        table = table.cpu()
    out = {}
    for layer in range(1, num_layers + 1):
        calls, load = table[layer, 1], table[layer, 2:]
        if calls == 0 and load.sum() == 0:
            continue
        out[layer] = {
            "balance_loss": float(table[layer, 0] / calls) if calls else 0.0,
            "load": (load / load.sum().clamp(min=1)).tolist(),
        }
    return out
