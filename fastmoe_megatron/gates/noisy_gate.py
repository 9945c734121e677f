"""Noisy top-k gate (Shazeer et al., 2017): Gaussian noise of learned scale on the logits while
training; loss = cv^2(importance) + cv^2(load), with the smooth load estimator."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base_gate import BaseGate


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation; 0 for fewer than two values."""
    x = x.float()
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyGate(BaseGate):
    def __init__(self, d_model, num_expert, world_size, top_k=2, **options):
        super().__init__(num_expert, world_size, **options)
        self.w_gate = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.w_noise = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.top_k = self._check_top_k(top_k)
        self.noise_epsilon = 1e-2
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Both weights start as an ``nn.Linear(d_model, experts)``'s would, uniform in
        ``+-1 / sqrt(d_model)`` (FastMoE's ``kaiming_uniform_`` on the ``[d_model, experts]``
        tensors took the expert count as the fan-in)."""
        bound = 1.0 / math.sqrt(self.w_gate.shape[0]) if self.w_gate.shape[0] > 0 else 0.0
        for w in (self.w_gate, self.w_noise):
            nn.init.uniform_(w, -bound, bound)

    def _prob_in_top_k(self, clean, noisy, noise_std, top_values):
        # Probability that each logit stays in the top k under re-drawn noise: compare with the
        # k-th largest noisy value if it is in, with the (k+1)-th if it is out. All of it on the
        # logits the experts are picked on (with the aux-loss-free bias, if any).
        threshold_in = top_values[:, self.top_k:self.top_k + 1]
        threshold_out = top_values[:, self.top_k - 1:self.top_k]
        is_in = noisy > threshold_in
        normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
        p_in = normal.cdf((clean - threshold_in) / noise_std)
        p_out = normal.cdf((clean - threshold_out) / noise_std)
        return torch.where(is_in, p_in, p_out)

    def forward(self, inp):
        clean = inp @ self.w_gate
        noise_std = (F.softplus(inp @ self.w_noise) + self.noise_epsilon) * float(self.training)
        # No draw in eval mode: an evaluation leaves the random state of training alone.
        noisy = clean + torch.randn_like(clean) * noise_std if self.training else clean
        m = min(self.top_k + 1, self.tot_expert)
        selection = self.selection_logits(noisy.float())
        top_idx = selection.topk(m, dim=1).indices
        idx = top_idx[:, :self.top_k]
        score = F.softmax(noisy.gather(1, idx), dim=1)
        # The loss in fp32: importance and load are sums over all tokens.
        gates = torch.zeros_like(noisy, dtype=torch.float32).scatter(1, idx, score.float())
        importance = gates.sum(0)
        if self.training and self.top_k < self.tot_expert and inp.shape[0] > 0:
            load = self._prob_in_top_k(self.selection_logits(clean.float()), selection,
                                       noise_std.float(), selection.gather(1, top_idx)).sum(0)
        else:
            load = (gates > 0).sum(0)
        self.record_load(idx)
        self.set_loss_with_z(cv_squared(importance) + cv_squared(load), clean)
        return idx, score
