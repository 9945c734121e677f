"""SWIPE gate (from FastMoE): while training, each worker accepts at most its share of rows per
routing round; rows that overflow a worker are re-sent, in rank order, to workers with spare
room (to their expert ``round % num_expert``). With one worker nothing overflows, so it is the
naive top-k gate. Deterministic: every decision is made in rank and token order."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import comm
from .naive_gate import NaiveGate


class SwipeGate(NaiveGate):
    def __init__(self, d_model, num_expert, world_size, top_k=2, gate_bias=True, **options):
        super().__init__(d_model, num_expert, world_size, top_k=top_k, gate_bias=gate_bias, **options)

    def swipe_once(self, idx: torch.Tensor, capacity: int, bias: int) -> tuple[torch.Tensor, int]:
        """Balances one routing round ``idx`` [T] of global expert ids; returns the new ids and the
        capacity this worker has left."""
        W, E, group = self.world_size, self.num_expert, self.moe_group
        if W == 1:
            return idx, capacity - idx.numel()
        rank = comm.group_rank(group)
        dest = torch.div(idx, E, rounding_mode="floor").cpu()
        lec = torch.bincount(dest, minlength=W).to(torch.int64)
        gec = comm.exchange_counts(lec, 1, group)  # rows each worker sends me
        drops = torch.zeros(W, dtype=torch.int64)
        for j in range(W):  # accept in rank order
            take = min(capacity, int(gec[j]))
            drops[j] = gec[j] - take
            gec[j] = take
            capacity -= take
        lec = comm.exchange_counts(gec, 1, group)  # how many of my rows each worker accepted
        device = comm._comm_device(group)
        drops = drops.to(device)
        dist.all_reduce(drops, group=group)  # drops[i]: rows of worker i sent back
        caps = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(W)]
        dist.all_gather(caps, torch.tensor([capacity], device=device), group=group)
        drops, room = drops.cpu().tolist(), [int(c) for c in torch.cat(caps).cpu()]
        j = 0
        for i in range(W):  # hand every worker's dropped rows to the first workers with room
            while drops[i] > 0 and j < W:
                n = min(drops[i], room[j])
                if n > 0:
                    if i == rank:
                        lec[j] += n
                    if j == rank:
                        capacity -= n
                    drops[i] -= n
                    room[j] -= n
                if room[j] == 0:
                    j += 1
        new = idx.clone().cpu()
        quota = lec.clone()
        moved = []
        for t, w in enumerate(dest.tolist()):
            if quota[w] > 0:
                quota[w] -= 1
            else:
                moved.append(t)
        w = 0
        for t in moved:
            while quota[w] == 0:
                w += 1
            quota[w] -= 1
            new[t] = w * E + bias
        return new.to(idx.device), capacity

    def forward(self, inp):
        logits = self.gate(inp)
        idx, top = self.route(logits, self.top_k)
        self.record_load(idx)  # the demand, before rebalancing
        if self.training and self.world_size > 1:
            capacity = inp.shape[0] * self.top_k
            cols = []
            for k in range(self.top_k):
                col, capacity = self.swipe_once(idx[:, k], capacity, k % self.num_expert)
                cols.append(col)
            idx = torch.stack(cols, 1)
            top = logits.gather(1, idx)
        self.set_loss_with_z(None, logits)
        return idx, F.softmax(top, dim=-1)
