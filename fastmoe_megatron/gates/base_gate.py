"""The gate interface: a gate routes tokens to experts and records its auxiliary loss.

``forward(x [T, d_model]) -> (idx [T, top_k] int64 global expert ids, -1 = dropped,
score [T, top_k] combine weights)``.

Two options shared by every gate that computes router logits:

- router z-loss (ST-MoE): ``z_loss_weight * mean(logsumexp(logits)^2)``, added to the gate loss;
- aux-loss-free balancing (DeepSeek-V3): with ``expert_bias_update_rate > 0`` a per-expert bias is
  added to the logits for *selection only* (the combine weights use the unbiased logits). The
  gate counts the tokens each expert receives while training; ``update_expert_bias()`` (call it
  once per optimizer step, e.g. through ``fastmoe_megatron.update_expert_biases(model)``) moves
  every bias by ``rate * sign(mean load - load)`` and resets the count.
"""
from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
import torch.nn as nn


def check_top_k(top_k: int, tot_expert: int, name: str = "top_k") -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"{name} must be an int between 1 and the number of experts "
                        f"(num_expert * world_size = {tot_expert}), got {top_k!r}")
    if not 1 <= top_k <= tot_expert:
        raise ValueError(f"{name}={top_k} must be between 1 and the number of experts "
                         f"(num_expert * world_size = {tot_expert})")
    return int(top_k)


def reject_top_k_keyword(gate: str, options: dict) -> None:
    """The gates that name their top-k ``topk`` (FastMoE's GShard, Switch and DC gates) refuse
    ``top_k=`` with a message naming ``topk`` (it would otherwise reach ``NaiveGate`` twice)."""
    if "top_k" in options:
        raise TypeError(f"{gate} names its top-k argument topk, as FastMoE's does; "
                        f"got top_k={options['top_k']!r}")


class BaseGate(nn.Module):
    def __init__(self, num_expert, world_size, *, z_loss_weight: float = 0.0,
                 expert_bias_update_rate: float = 0.0):
        super().__init__()
        if num_expert < 1 or world_size < 1:
            raise ValueError(f"num_expert ({num_expert}) and world_size ({world_size}) must be >= 1")
        if z_loss_weight < 0:
            raise ValueError(f"z_loss_weight must be >= 0, got {z_loss_weight}")
        if expert_bias_update_rate < 0:
            raise ValueError(f"expert_bias_update_rate must be >= 0, got {expert_bias_update_rate}")
        self.world_size = world_size
        self.num_expert = num_expert
        self.tot_expert = world_size * num_expert
        self.loss = None
        self.z_loss_weight = z_loss_weight
        self.expert_bias_update_rate = expert_bias_update_rate
        # Set by FMoE: the group its experts are spread over (for capacity and SWIPE exchanges).
        self.moe_group = None
        if expert_bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(self.tot_expert))
            self.register_buffer("expert_load", torch.zeros(self.tot_expert))

    _FP32_BUFFERS = ("expert_bias", "expert_load")

    def _apply(self, fn, *args, **kwargs):
        """Moves and casts as ``nn.Module`` does, except that ``expert_bias`` and ``expert_load``
        are kept in (or brought to) fp32; they still move with the module. Under ``.bfloat16()`` (megatron's
        Float16Module, ``--bf16``) a bias update of 1e-3 rounded away on biases of 0.5 and more,
        and load counts above 256 lost integers. megatron-core keeps its router's expert bias in
        fp32 for the same reason."""
        kept = {n: b for n, b in self._buffers.items() if n in self._FP32_BUFFERS and b is not None}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:  # from the fp32 values, if any
                src = old if old.dtype == torch.float32 else new
                self._buffers[name] = src.to(device=new.device, dtype=torch.float32)
        return out

    def _check_top_k(self, top_k: int, name: str = "top_k") -> int:
        return check_top_k(top_k, self.tot_expert, name)

    # ------------------------------------------------------------------ loss

    def set_loss(self, loss):
        self.loss = loss

    def get_loss(self, clear=True):
        loss = self.loss
        if clear:
            self.loss = None
        return loss

    @property
    def has_loss(self):
        return self.loss is not None

    def z_loss(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.z_loss_weight <= 0 or logits.shape[0] == 0:
            return None
        return self.z_loss_weight * torch.logsumexp(logits.float(), dim=-1).square().mean()

    def set_loss_with_z(self, loss: torch.Tensor | None, logits: torch.Tensor):
        """Records ``loss`` plus the router z-loss of ``logits`` (when enabled). A gate without a
        loss records a zero, as FastMoE's gates do; outside any graph (FastMoE's required a
        gradient), so that the model can still be deep-copied after a forward."""
        z = self.z_loss(logits)
        if z is not None:
            loss = z if loss is None else loss + z
        self.set_loss(loss if loss is not None else logits.new_zeros((), dtype=torch.float32))

    # ------------------------------------------------------------------ aux-loss-free balancing

    def selection_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits used to pick experts: biased when aux-loss-free balancing is on (then in fp32,
        so that a bf16 model does not round its bias away)."""
        if self.expert_bias_update_rate > 0:
            return logits.float() + self.expert_bias.float()
        return logits

    def record_load(self, idx: torch.Tensor):
        if self.expert_bias_update_rate > 0 and self.training:
            with torch.no_grad():
                kept = idx.reshape(-1)
                kept = kept[kept >= 0]
                self.expert_load += torch.bincount(kept, minlength=self.tot_expert).to(self.expert_load)

    @torch.no_grad()
    def update_expert_bias(self, group=None):
        """Applies one aux-loss-free bias update from the load seen since the last one.

        The load is summed over ``group`` (default: every rank, when torch.distributed is
        initialized), so that replicas of the gate keep identical biases.
        """
        if self.expert_bias_update_rate <= 0:
            return
        load = self.expert_load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        if load.sum() > 0:
            self.expert_bias += self.expert_bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()
