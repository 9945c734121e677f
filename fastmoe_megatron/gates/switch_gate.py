"""Switch gate (Fedus et al., 2021): top-1 of an fp32 softmax, multiplicative jitter while
training, capacity per expert enforced over all workers, loss ``sum(frac * prob) * E``."""
import numbers

import torch
import torch.nn.functional as F

from .base_gate import reject_top_k_keyword
from .naive_gate import NaiveGate
from .utils import check_capacity, expert_capacity, limit_by_capacity, tokens_over_workers


class SwitchGate(NaiveGate):
    def __init__(self, d_model, num_expert, world_size, topk=1, switch_eps=0.1,
                 capacity=(1.2, 2.4), gate_bias=True, **options):
        reject_top_k_keyword(type(self).__name__, options)
        if isinstance(topk, bool) or topk != 1:
            raise ValueError(f"SwitchGate routes to one expert: topk must be 1, got {topk!r}")
        if (isinstance(switch_eps, bool) or not isinstance(switch_eps, numbers.Real)
                or not 0 <= switch_eps < 1):
            # The jitter multiplies the logits by U(1 - eps, 1 + eps): from eps = 1 on it can
            # flip their sign.
            raise ValueError(f"switch_eps must be a number in [0, 1), got {switch_eps!r}")
        super().__init__(d_model, num_expert, world_size, top_k=1, gate_bias=gate_bias, **options)
        self.switch_eps = float(switch_eps)
        self.capacity = check_capacity(capacity)

    def forward(self, inp):
        logits = self.gate(inp)
        if self.training and self.switch_eps > 0:
            jitter = torch.empty_like(logits).uniform_(1.0 - self.switch_eps, 1.0 + self.switch_eps)
            logits = logits * jitter
        probs = F.softmax(logits.float(), dim=-1)  # fp32 for stability
        # The top-1 of the softmax is that of the logits; the aux-loss-free bias goes on the
        # logits, as in every other gate.
        idx = torch.topk(self.selection_logits(logits.float()), k=1, dim=-1).indices
        score = probs.gather(1, idx).to(inp.dtype)

        self.record_load(idx)  # the demand, before the capacity cut (as every gate counts it)
        cap_rate = self.capacity[0 if self.training else 1]
        tokens = tokens_over_workers(inp.shape[0], self.world_size, self.moe_group)
        cap = expert_capacity(cap_rate, tokens, self.tot_expert)  # the mean load over all workers
        _, _, idx = limit_by_capacity(idx, self.num_expert, self.world_size, cap, self.moe_group)

        kept = idx[idx >= 0]
        n = max(1, kept.numel())
        frac = torch.bincount(kept, minlength=self.tot_expert).float() / n
        prob = probs.sum(0) / n
        self.set_loss_with_z((frac * prob).sum() * self.tot_expert, logits)
        return idx, score
