"""Zero gate: every token to expert 0 with equal weights (for testing)."""
import numbers

import torch

from .base_gate import BaseGate


class ZeroGate(BaseGate):
    def __init__(self, d_model, num_expert, world_size, top_k=2, **options):
        super().__init__(num_expert, world_size, **options)
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        self.top_k = int(top_k)  # every slot goes to expert 0, so top_k may exceed the expert count

    def forward(self, inp):
        T = inp.shape[0]
        idx = torch.zeros(T, self.top_k, dtype=torch.int64, device=inp.device)
        score = torch.full((T, self.top_k), 1.0 / self.top_k, dtype=inp.dtype, device=inp.device)
        return idx, score
