"""GShard gate (Lepikhin et al., 2020): top-k, balance loss ``mean(c_e * m_e) * E^2``, a local
per-expert capacity, and random routing of the second choice."""
import torch
import torch.nn.functional as F

from .base_gate import check_top_k, reject_top_k_keyword
from .naive_gate import NaiveGate
from .utils import check_capacity, expert_capacity, prune_gate_by_capacity


def gshard_balance_loss(top1_idx, logits, tot_expert):
    """``mean_e(c_e * m_e) * E^2``: c_e the fraction of tokens whose first choice is e, m_e the
    mean router probability of e."""
    T = max(1, logits.shape[0])
    c_e = torch.bincount(top1_idx.clamp(min=0), minlength=tot_expert).float() / T
    m_e = F.softmax(logits.float(), dim=1).sum(0) / T  # zeros in the graph of logits for T = 0
    return (c_e * m_e).mean() * tot_expert ** 2


def random_routing(idx, score):
    """Drops each token's second choice where ``2 * p2 < U(0, 1)`` (GShard's random routing): one
    draw of ``T`` uniforms from the global generator."""
    drop = 2 * score[:, 1].detach() < torch.rand(score.shape[0], device=score.device)
    idx = idx.clone()
    idx[:, 1] = idx[:, 1].masked_fill(drop, -1)
    return idx


class GShardGate(NaiveGate):
    def __init__(self, d_model, num_expert, world_size, topk=2, capacity=(1.2, 2.4),
                 random_routing=True, gate_bias=True, **options):
        reject_top_k_keyword(type(self).__name__, options)
        check_top_k(topk, num_expert * world_size, "topk")
        super().__init__(d_model, num_expert, world_size, top_k=topk, gate_bias=gate_bias, **options)
        self.capacity = check_capacity(capacity)
        self.random_routing = random_routing

    def forward(self, x):
        idx, score, logits = super().forward(x, return_all_scores=True)
        loss = gshard_balance_loss(idx[:, 0], logits, self.tot_expert)
        self.set_loss_with_z(loss, logits)

        # Random routing first (GShard's Algorithm 1): a second choice it drops takes no room.
        if self.random_routing and self.top_k > 1 and self.training:
            idx = random_routing(idx, score)

        # Capacity per expert, per worker: cap_rate * (slots / experts), as in GShard's groups.
        cap_rate = self.capacity[0 if self.training else 1]
        cap = expert_capacity(cap_rate, x.shape[0] * self.top_k, self.tot_expert)
        keep = torch.full((self.tot_expert,), cap, dtype=torch.int64)
        return prune_gate_by_capacity(idx, keep), score
