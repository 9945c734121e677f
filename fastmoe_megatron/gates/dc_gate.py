"""Distributed-capacity gate: GShard's routing and loss, with each expert's capacity enforced over
all workers (the experts decide how many rows each worker may send)."""
from .gshard_gate import GShardGate, gshard_balance_loss, random_routing
from .naive_gate import NaiveGate
from .utils import expert_capacity, limit_by_capacity, tokens_over_workers


class DCGate(GShardGate):
    def forward(self, x):
        idx, score, logits = NaiveGate.forward(self, x, return_all_scores=True)
        self.set_loss_with_z(gshard_balance_loss(idx[:, 0], logits, self.tot_expert), logits)

        # Random routing before the capacity cut, so that it takes no expert's room.
        if self.random_routing and self.top_k > 1 and self.training:
            idx = random_routing(idx, score)

        # Capacity per expert: cap_rate times the mean load of an expert over all workers.
        cap_rate = self.capacity[0 if self.training else 1]
        tokens = tokens_over_workers(x.shape[0], self.world_size, self.moe_group)
        cap = expert_capacity(cap_rate, tokens * self.top_k, self.tot_expert)
        _, _, idx = limit_by_capacity(idx, self.num_expert, self.world_size, cap, self.moe_group)
        return idx, score
