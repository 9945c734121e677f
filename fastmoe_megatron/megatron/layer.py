"""MegatronMLP: FMoETransformerMLP behind megatron-core's MLP contract.

Input ``[s, b, h]``, output ``(output, bias)`` with ``bias = None`` (the experts add their own).
Each expert is the config's dense MLP: its ``activation_func``, ``add_bias_linear`` and
``gated_linear_unit`` (Megatron's ``--swiglu``, ``--quick-geglu``), at the expert width (a
``glu_linear_offset`` or ``activation_func_clamp_value`` is refused).

Parallelism, read from megatron-core's ``parallel_state`` (initialised with
``expert_tensor_parallel_size=1``: an expert lives whole on one rank):

- experts are spread over the expert-model-parallel group (EP ranks); their parameters carry
  ``allreduce = False``, so megatron-core's DDP and distributed optimizer reduce them over the
  expert-data-parallel group (which, with expert TP 1, also spans the tensor-parallel ranks), and
  ``tensor_model_parallel = True``, so the gradient norm counts them on every TP rank;
- tensor parallel without sequence parallel: the TP ranks hold the same tokens and slice them
  (``FMoE``'s slice group): each routes a slice, the gate runs on all tokens;
- tensor parallel with sequence parallel: each TP rank routes its own sequence shard, and the gate
  parameters carry ``sequence_parallel = True`` so that ``finalize_model_grads`` all-reduces their
  gradients over TP. Each rank's balance loss is then the loss of its shard: its gradient is
  scaled by ``1 / TP``, so that the sum over TP is the gradient of the shards' mean loss (for the
  z-loss, a mean over tokens, exactly the loss of the whole sequence), as without sequence parallel.

Initialisation: the gate and every global expert draw their weights from generators seeded by
(the rank's seed, layer, expert), so a model is the same whatever the expert-parallel size.

The balance loss is attached to the layer's output with an autograd function that feeds
``balance_loss_weight * scale`` as its gradient: it reaches the gate through the ordinary backward
pass, through the pipeline schedule, without being part of the returned loss. The training loop
sets the scale (1 / number of microbatches) with ``set_balance_loss_scale``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import gates as gates_mod
from ..layers import FMoETransformerMLP, key_seed
from .stats import record_layer_stats

GATES = {
    "naive": gates_mod.NaiveGate,
    "noisy": gates_mod.NoisyGate,
    "gshard": gates_mod.GShardGate,
    "switch": gates_mod.SwitchGate,
    "dc": gates_mod.DCGate,
    "swipe": gates_mod.SwipeGate,
}
CAPACITY_GATES = ("gshard", "switch", "dc")
#: Gates that count the demand over the expert-parallel group (capacity over all workers, SWIPE's
#: balancing): they must not see one batch from several ranks (see MegatronMLP).
GROUP_COUNTING_GATES = ("switch", "dc", "swipe")


@dataclasses.dataclass
class FMoEConfig:
    """What MegatronMLP needs beyond megatron-core's TransformerConfig."""

    num_experts: int  # global experts (all EP ranks together)
    top_k: int = 2
    gate: str = "naive"
    hidden_size: Optional[int] = None  # expert FFN width; default: the config's ffn_hidden_size
    capacity_factor: Optional[float] = None  # (train, eval) = (f, 2f); gates with capacity only
    z_loss_weight: float = 0.0
    expert_bias_update_rate: float = 0.0
    balance_loss_weight: float = 1.0

    def validate(self, ep_size: int = 1):
        if self.gate not in GATES:
            raise ValueError(f"--balance-strategy {self.gate!r} is not valid; allowed values: "
                             f"{', '.join(sorted(GATES))}")
        if self.num_experts < 1:
            raise ValueError(f"--fmoe-num-experts must be >= 1, got {self.num_experts}")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ValueError(f"--hidden-hidden-size must be >= 1, got {self.hidden_size}")
        if self.num_experts % ep_size:
            raise ValueError(f"--fmoe-num-experts {self.num_experts} is not divisible by the "
                             f"expert-parallel size {ep_size} (--expert-model-parallel-size)")
        if self.gate == "switch" and self.top_k != 1:
            raise ValueError("--balance-strategy switch routes to one expert: use --fmoe-top-k 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"--fmoe-top-k {self.top_k} must be between 1 and --fmoe-num-experts "
                             f"{self.num_experts}")
        if self.capacity_factor is not None:
            if not 0 < self.capacity_factor < float("inf"):
                raise ValueError(f"--fmoe-capacity-factor must be > 0, got {self.capacity_factor}")
            if self.gate not in CAPACITY_GATES:
                raise ValueError(f"--fmoe-capacity-factor needs a gate with capacity "
                                 f"(--balance-strategy {', '.join(CAPACITY_GATES)}), not {self.gate!r}")
        if not all(0 <= w < float("inf") for w in (self.z_loss_weight, self.expert_bias_update_rate,
                                                    self.balance_loss_weight)):
            raise ValueError("--fmoe-z-loss-weight, --fmoe-expert-bias-update-rate and "
                             "--balance-loss-weight must be >= 0")
        return self


class _BalanceLoss(torch.autograd.Function):
    """Identity on ``out``; the backward gives ``aux`` the gradient ``scale``."""

    scale = 1.0

    @staticmethod
    def forward(ctx, out, aux):
        ctx.save_for_backward(aux)
        return out

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, _BalanceLoss.scale)


def set_balance_loss_scale(scale: float) -> None:
    """The factor on every balance loss's gradient (e.g. 1 / number of microbatches, times the
    loss scale under fp16); MegatronMLP multiplies it by its ``balance_loss_weight``."""
    _BalanceLoss.scale = float(scale)


class MegatronMLP(MegatronModule):
    """An MoE feed-forward block for megatron-core's TransformerLayer (see the module doc)."""

    def __init__(self, config: TransformerConfig, fmoe: Optional[FMoEConfig] = None,
                 layer_number: int = 0, **unused):
        super().__init__(config=config)
        fmoe = fmoe or getattr(config, "fmoe", None)
        if fmoe is None:
            raise ValueError("MegatronMLP needs an FMoEConfig (fmoe=..., or config.fmoe)")
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        self.fmoe_config = fmoe.validate(ep_size)
        for field, default in (("glu_linear_offset", 0.0), ("activation_func_clamp_value", None)):
            if getattr(config, field, default) != default:
                raise ValueError(f"fastmoe_megatron experts do not implement the config's {field} "
                                 f"({getattr(config, field)!r}): leave it at {default!r}")
        if parallel_state.get_expert_tensor_parallel_world_size() != 1:
            raise ValueError("fastmoe_megatron experts are not tensor parallel: initialise megatron "
                             "with --expert-tensor-parallel-size 1")
        self.layer_number = layer_number
        self.ep_size = ep_size
        self.ep_rank = parallel_state.get_expert_model_parallel_rank()
        self.num_local_experts = fmoe.num_experts // ep_size
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        slice_group = (parallel_state.get_tensor_model_parallel_group()
                       if tp_size > 1 and not config.sequence_parallel else None)
        if slice_group is not None and ep_size > 1 and fmoe.gate in GROUP_COUNTING_GATES:
            self._refuse_shared_batch_in_ep_group(fmoe.gate, tp_size, ep_size)
        gate_cls = GATES[fmoe.gate]
        gate_kwargs = {}
        if fmoe.capacity_factor is not None:
            gate_kwargs["capacity"] = (fmoe.capacity_factor, 2 * fmoe.capacity_factor)
        if fmoe.z_loss_weight:
            gate_kwargs["z_loss_weight"] = fmoe.z_loss_weight
        if fmoe.expert_bias_update_rate:
            gate_kwargs["expert_bias_update_rate"] = fmoe.expert_bias_update_rate

        def gate(d_model, num_expert, world_size, top_k):
            return gate_cls(d_model, num_expert, world_size, top_k, **gate_kwargs)

        self.moe = FMoETransformerMLP(
            num_expert=self.num_local_experts,
            d_model=config.hidden_size,
            d_hidden=config.ffn_hidden_size if fmoe.hidden_size is None else fmoe.hidden_size,
            activation=config.activation_func,
            # as megatron-core's MLP: --disable-bias-linear, and --swiglu (gated, [a, b] layout)
            bias=config.add_bias_linear,
            gated_linear_unit=config.gated_linear_unit,
            expert_dp_comm="none",
            world_size=ep_size,
            moe_group=parallel_state.get_expert_model_parallel_group() if ep_size > 1 else None,
            slice_group=slice_group,
            top_k=fmoe.top_k,
            gate=gate,
        )
        self._init_weights()
        for p in self.moe.experts.parameters():
            p.allreduce = False  # reduced over the expert-data-parallel group by megatron's DDP
            # No other rank of the tensor-parallel group holds these experts. megatron-core's
            # optimizer drops "tensor-parallel duplicates" (params without this flag, on TP ranks
            # other than 0) from the gradient norm, using the dense TP group even for its expert
            # optimizer: untagged, the experts of TP rank 1 would be missing from the norm.
            p.tensor_model_parallel = True
            p.partition_dim = 0
            p.partition_stride = 1
        # Under sequence parallel the gate's gradients are summed over TP (below), so each rank's
        # balance loss, that of its own shard, counts 1 / TP (see the module doc).
        self._balance_loss_share = 1.0 / tp_size if config.sequence_parallel else 1.0
        if config.sequence_parallel:
            for p in self.moe.gate.parameters():
                p.sequence_parallel = True  # all-reduced over TP by finalize_model_grads

    def set_layer_number(self, layer_number: int) -> None:
        """megatron-core's TransformerLayer calls this right after building its MLP from a layer
        spec, with its (global) layer number: it replaces the spec's placeholder number, and the
        weights are drawn again from the seeds of the real layer, as fmoefy would draw them (the
        placeholder seeds gave another model, the same weights to layers of different pipeline
        stages, and per-layer stats filed under numbers past the last layer)."""
        if layer_number != self.layer_number:
            self.layer_number = layer_number
            self._init_weights()

    @staticmethod
    def _refuse_shared_batch_in_ep_group(gate: str, tp_size: int, ep_size: int) -> None:
        """Tensor parallel without sequence parallel: the TP ranks hold one batch, and each runs
        the gate on all of it. The switch and dc gates' capacity and SWIPE's balancing sum the
        demand over the expert-parallel group, which (expert TP 1: megatron lays EP out over
        adjacent ranks) holds TP ranks of one batch: each token was counted once per such rank and
        the capacity granted to them in rank order, so the routing was neither the EP=1 one nor
        the same on those ranks. Raises ValueError naming the flags."""
        import torch.distributed as dist

        ep = set(dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()))
        tp = set(dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()))
        if len(ep & tp) > 1:
            raise ValueError(
                f"--balance-strategy {gate} counts tokens over the expert-parallel group, which "
                f"holds {len(ep & tp)} tensor-parallel ranks of one batch "
                f"(--tensor-model-parallel-size {tp_size} without --sequence-parallel, "
                f"--expert-model-parallel-size {ep_size}): they would be counted once per rank. "
                "Add --sequence-parallel (each TP rank then routes its own tokens), use "
                f"--expert-model-parallel-size 1, or another gate (allowed here: "
                f"{', '.join(g for g in sorted(GATES) if g not in GROUP_COUNTING_GATES)})")

    @torch.no_grad()
    def _init_weights(self):
        """Megatron's init methods (normal, std from the config) on every gate matrix and every
        expert, each drawn from its own seed, with zero biases."""
        base = torch.initial_seed()
        experts = self.moe.experts
        # One seed per gate matrix: the noisy gate has two (w_gate, w_noise), which drew the
        # same numbers from one seed (the noise scale then mirrored the clean logits).
        params = [(w, self.config.init_method, key_seed(base, self.layer_number, 0, i))
                  for i, w in enumerate(p for p in self.moe.gate.parameters() if p.dim() > 1)]
        for e in range(self.num_local_experts):
            g_idx = self.ep_rank * self.num_local_experts + e
            params.append((experts.htoh4.weight[e], self.config.init_method,
                           key_seed(base, self.layer_number, 1, g_idx)))
            params.append((experts.h4toh.weight[e], self.config.output_layer_init_method,
                           key_seed(base, self.layer_number, 2, g_idx)))
        # The init methods draw from the default CPU generator; torch.manual_seed would also
        # reseed every GPU's generator, which megatron-core seeded alike on the ranks of a TP group
        # (their dropout masks must agree) and these seeds differ by expert-parallel rank.
        state = torch.get_rng_state()
        try:
            for w, init, seed in params:
                torch.default_generator.manual_seed(seed)
                fresh = torch.empty(w.shape, dtype=torch.float32)
                init(fresh)
                w.copy_(fresh)
        finally:
            torch.set_rng_state(state)
        for name, p in self.moe.named_parameters():
            if name.endswith("bias"):
                p.zero_()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        s, b, h = hidden_states.shape
        out = self.moe(hidden_states.reshape(s * b, h)).reshape(s, b, h)
        gate = self.moe.gate
        loss = gate.get_loss(clear=True)
        if torch.is_grad_enabled() and loss is not None and loss.requires_grad:
            weight = self.fmoe_config.balance_loss_weight
            if weight > 0:
                out = _BalanceLoss.apply(out, loss * (weight * self._balance_loss_share))
        if self.training:  # the logged balance loss and load are those of training
            record_layer_stats(self.layer_number, loss, self.moe.last_expert_count)
        return out, None

    # ------------------------------------------------------------------ checkpoints

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Experts get a global expert axis (this rank's slice at ``ep_rank * local``) and are
        replicated only over the expert-data-parallel group; everything else (the gate) is
        replicated as megatron-core's default does. Without this, dist_checkpointing would treat
        every rank's experts as copies of one tensor and silently keep only one rank's."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        edp_rank = parallel_state.get_expert_data_parallel_rank()
        axis = len(sharded_offsets)
        for name, tensor in self.moe.experts.state_dict(keep_vars=True).items():
            key = f"{prefix}moe.experts.{name}"
            sharded[key] = ShardedTensor.from_rank_offsets(
                key, tensor, *sharded_offsets, (axis, self.ep_rank, self.ep_size),
                replica_id=(0, 0, edp_rank), prepend_axis_num=len(sharded_offsets))
        return sharded
