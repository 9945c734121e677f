"""Naive gate: linear router, top-k of the logits, softmax over the k kept logits. No balance loss
(besides the optional z-loss)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base_gate import BaseGate


class NaiveGate(BaseGate):
    def __init__(self, d_model, num_expert, world_size, top_k=2, gate_bias=True, **options):
        super().__init__(num_expert, world_size, **options)
        self.gate = nn.Linear(d_model, self.tot_expert, bias=gate_bias)
        self.top_k = self._check_top_k(top_k)

    def route(self, logits: torch.Tensor, top_k: int):
        """(idx [T, k], kept logits [T, k]): the top-k experts of the (possibly biased) logits."""
        idx = torch.topk(self.selection_logits(logits), k=top_k, dim=-1, sorted=True).indices
        return idx, logits.gather(1, idx)

    def forward(self, inp, return_all_scores=False):
        logits = self.gate(inp)  # [T, E]
        idx, top_logits = self.route(logits, self.top_k)
        score = F.softmax(top_logits, dim=-1)
        self.record_load(idx)
        self.set_loss_with_z(None, logits)
        if return_all_scores:
            return idx, score, logits
        return idx, score
