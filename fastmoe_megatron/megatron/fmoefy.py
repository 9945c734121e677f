"""fmoefy: turn a Megatron GPT's dense MLPs into MegatronMLP (FastMoE's entry point), and a
layer spec that builds the model with the MoE in place.

Model families:

- megatron-core ``GPTModel``: ``model.decoder.layers[i].mlp``;
- Megatron-LM's legacy ``GPTModel`` (``--use-legacy-models``, up to core_v0.17.1):
  ``model.language_model.encoder.layers[i].mlp`` (a ``ParallelMLP``).

Both MLPs return ``(output, bias)`` from ``[s, b, h]``, as MegatronMLP does. Wrappers
(``Float16Module``, anything with ``.module``) are looked through, and a list of model chunks
(virtual pipeline) is handled chunk by chunk; each MoE layer takes the device and dtype of the MLP
it replaces. Call it before the model is wrapped in data parallel (megatron-core's DDP or FSDP,
torch's DDP), so that DDP sees the expert parameters (and their ``allreduce = False``): a wrapped
model is refused (its gradient buffers and hooks know only the dense MLPs' parameters, so the
experts' gradients were never reduced over data parallel, or the distributed optimizer failed
with a ``KeyError``).
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterable

import torch
import torch.nn as nn

from .layer import FMoEConfig, MegatronMLP

#: megatron-core releases fmoefy was checked against. Others raise unless megatron_version names
#: one of these explicitly (FastMoE's way to force a version).
SUPPORTED_VERSIONS = ("0.16",)


def megatron_core_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", None) or megatron.core.package_info.__version__


def check_version(megatron_version: str | None = None) -> str:
    """The megatron-core version fmoefy works with: the installed one when it was checked, else
    ``megatron_version`` when that names a checked one, else (with FMOE_MEGATRON_UNCHECKED=1, as
    for cpu_compat and the Megatron-LM launcher) the installed one, with a warning."""
    import warnings

    from .cpu_compat import UNCHECKED_ENV, unchecked_ok

    found = megatron_core_version()
    wanted = megatron_version or found
    if not any(wanted == v or wanted.startswith(v + ".") for v in SUPPORTED_VERSIONS):
        if unchecked_ok():
            warnings.warn(f"fmoefy: {UNCHECKED_ENV}=1: megatron-core {found} was not checked "
                          f"(checked: {', '.join(SUPPORTED_VERSIONS)}.x)", stacklevel=2)
            return found
        raise RuntimeError(
            f"fmoefy was checked against megatron-core {', '.join(SUPPORTED_VERSIONS)}.x, found "
            f"{found}; pass megatron_version='0.16' (or set {UNCHECKED_ENV}=1) to try anyway")
    return wanted


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / Float16Module / other ``.module`` wrappers."""
    while not (hasattr(model, "decoder") or hasattr(model, "language_model")) and hasattr(model, "module"):
        model = model.module
    return model


def _data_parallel_wrapper(model: nn.Module):
    """The first data-parallel wrapper (megatron-core's DDP / FSDP, torch's DDP) around the
    model, or None."""
    try:
        from megatron.core.distributed.data_parallel_base import _BaseDataParallel
    except ImportError:  # pragma: no cover - other megatron-core layouts
        _BaseDataParallel = ()
    wrappers = (torch.nn.parallel.DistributedDataParallel,) + (
        (_BaseDataParallel,) if isinstance(_BaseDataParallel, type) else ())
    while True:
        if isinstance(model, wrappers):
            return model
        if hasattr(model, "decoder") or hasattr(model, "language_model") \
                or not hasattr(model, "module"):
            return None
        model = model.module


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a (possibly wrapped) megatron-core or legacy GPT model."""
    inner = unwrap(model)
    decoder = getattr(inner, "decoder", None)
    if decoder is not None and hasattr(decoder, "layers"):
        return list(decoder.layers)
    encoder = getattr(getattr(inner, "language_model", None), "encoder", None)
    if encoder is not None and hasattr(encoder, "layers"):
        return list(encoder.layers)
    raise TypeError(f"{type(inner).__name__} has neither decoder.layers (megatron-core GPT) nor "
                    "language_model.encoder.layers (legacy GPT)")


def _args_default(name: str):
    """A value from Megatron-LM's parsed arguments, when a training script set them up."""
    try:
        from megatron.training import get_args

        return getattr(get_args(), name, None)
    except Exception:  # noqa: BLE001 - no Megatron-LM, or arguments not parsed
        return None


def fmoefy(model, fmoe_num_experts=None, distributed_experts=True, hidden_hidden_size=None,
           top_k=None, gate=None, megatron_version=None, **options):
    """Replaces every transformer layer's MLP with MegatronMLP; returns the model.

    ``fmoe_num_experts`` counts experts over all expert-parallel ranks (the global count), spread
    over megatron-core's expert-model-parallel group; ``distributed_experts=False`` requires that
    group to have one rank. Unset arguments come from Megatron-LM's parsed arguments
    (``--fmoe-num-experts``, ``--fmoe-top-k``, ``--balance-strategy``,
    ``--hidden-hidden-size``) when there are any. ``gate`` is a ``--balance-strategy`` name. ``options`` go to FMoEConfig
    (capacity_factor, z_loss_weight, expert_bias_update_rate, balance_loss_weight).
    """
    from megatron.core import parallel_state

    check_version(megatron_version)
    num = fmoe_num_experts or _args_default("fmoe_num_experts")
    if not num:
        raise ValueError("fmoefy needs the number of experts: fmoe_num_experts= or --fmoe-num-experts")
    ep = parallel_state.get_expert_model_parallel_world_size()
    if not distributed_experts and ep != 1:
        raise ValueError(f"distributed_experts=False but the expert-model-parallel size is {ep}")
    defaults = {
        "capacity_factor": _args_default("fmoe_capacity_factor"),
        "z_loss_weight": _args_default("fmoe_z_loss_weight") or 0.0,
        "expert_bias_update_rate": _args_default("fmoe_expert_bias_update_rate") or 0.0,
        "balance_loss_weight": _args_default("balance_loss_weight"),
    }
    defaults.update(options)
    if defaults["balance_loss_weight"] is None:
        defaults["balance_loss_weight"] = 1.0
    cfg = FMoEConfig(
        num_experts=int(num),
        top_k=top_k or _args_default("fmoe_top_k") or 2,
        gate=gate or _args_default("balance_strategy") or "naive",
        hidden_size=hidden_hidden_size or _args_default("hidden_hidden_size"),
        **defaults,
    ).validate(ep)
    chunks: Iterable = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        wrapper = _data_parallel_wrapper(chunk)
        if wrapper is not None:
            raise ValueError(
                f"fmoefy got a model wrapped in {type(wrapper).__name__}: call fmoefy before "
                "wrapping the model in data parallel (its gradient buffers and hooks hold only the "
                "dense MLPs' parameters, so the experts would not be reduced or optimised)")
    for chunk in chunks:
        for layer in transformer_layers(chunk):
            if type(layer.mlp).__name__ == "MoELayer":  # megatron-core's own (num_moe_experts)
                raise ValueError(
                    f"layer {getattr(layer, 'layer_number', '?')}'s MLP is megatron-core's own "
                    "MoELayer: fmoefy replaces dense MLPs; build the model without "
                    "num_moe_experts (--num-experts) to use fmoefy's experts instead")
    for chunk in chunks:
        for layer in transformer_layers(chunk):
            # Legacy ParallelTransformerLayer keeps no config (its MegatronModule gets none): use
            # the model's, which legacy GPTModel holds.
            config = getattr(layer, "config", None) or getattr(unwrap(chunk), "config", None)
            number = getattr(layer, "layer_number", 0)
            if isinstance(layer.mlp, MegatronMLP):
                raise ValueError(f"layer {number}'s MLP is already an MoE layer: fmoefy replaces "
                                 "dense MLPs, once (a second call would re-initialise the experts)")
            like = next((p for p in layer.mlp.parameters() if p.is_floating_point()), None)
            _keep_fused_pre_mlp_norm(layer, config)
            moe = MegatronMLP(config, cfg, layer_number=number)
            if like is not None:
                # Where the dense MLP was: after .cuda() or Float16Module (bf16) the new layer,
                # built on the CPU in the config's dtype, failed its first forward otherwise.
                moe.to(device=like.device, dtype=like.dtype)
            layer.mlp = moe
            if hasattr(layer, "is_moe_layer"):
                layer.is_moe_layer = False  # megatron's own MoE code paths must not engage
    return model


def _standalone_norm_module():
    """The pre-MLP norm megatron-core's Transformer Engine spec uses for an MoE layer."""
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def _standalone_norm(config):
    """The pre-MLP norm megatron-core's Transformer Engine spec builds for an MoE layer."""
    from megatron.core.transformer.spec_utils import build_module

    return build_module(_standalone_norm_module(), config=config, hidden_size=config.hidden_size,
                        eps=config.layernorm_epsilon)


def _spec_module(spec_or_module):
    return getattr(spec_or_module, "module", spec_or_module)


def _spec_fuses_pre_mlp_norm(spec) -> bool:
    """Whether a layer spec fuses the pre-MLP norm into its dense MLP's first linear (megatron-core's
    Transformer Engine spec: ``linear_fc1`` a ``TELayerNormColumnParallelLinear``,
    ``pre_mlp_layernorm`` an IdentityOp)."""
    from megatron.core.transformer.identity_op import IdentityOp

    if _spec_module(getattr(spec.submodules, "pre_mlp_layernorm", None)) is not IdentityOp:
        return False
    fc1 = getattr(getattr(spec.submodules.mlp, "submodules", None), "linear_fc1", None)
    name = getattr(_spec_module(fc1), "__name__", "")
    return "LayerNorm" in name and "Linear" in name


def _keep_fused_pre_mlp_norm(layer, config) -> None:
    """megatron-core's Transformer Engine layer spec (Megatron-LM's default
    ``--transformer-impl transformer_engine``) fuses the pre-MLP norm into the dense MLP's first
    linear (``linear_fc1.layer_norm_weight``, with ``pre_mlp_layernorm`` an IdentityOp).
    Replacing the MLP would silently drop that norm: put a standalone norm (TENorm, as the spec
    does for MoE layers) with the fused norm's weights in ``pre_mlp_layernorm``."""
    fc1 = getattr(getattr(layer, "mlp", None), "linear_fc1", None)
    weight = getattr(fc1, "layer_norm_weight", None)
    if weight is None:
        return
    from megatron.core.transformer.identity_op import IdentityOp

    if not isinstance(getattr(layer, "pre_mlp_layernorm", None), IdentityOp):
        return  # a separate pre-MLP norm is there already
    norm = _standalone_norm(config)
    bias = getattr(fc1, "layer_norm_bias", None)
    with torch.no_grad():
        norm.weight.copy_(weight)
        if bias is not None and getattr(norm, "bias", None) is not None:
            norm.bias.copy_(bias)
    layer.pre_mlp_layernorm = norm


_spec_counter = itertools.count(1)


def get_gpt_layer_with_fmoe_spec(fmoe: FMoEConfig, base_spec=None):
    """A megatron-core GPT layer spec whose MLP is MegatronMLP (the model is built with the MoE in
    place). ``base_spec`` defaults to megatron-core's local (non-Transformer-Engine) spec. A base
    spec that fuses the pre-MLP norm into the dense MLP (megatron-core's Transformer Engine spec)
    gets a standalone pre-MLP norm (TENorm), as megatron-core's own MoE layers have.

    megatron-core's TransformerLayer gives the MLP it built its layer number
    (``set_layer_number``), and MegatronMLP then draws its weights from that layer's seeds: the
    model is the one ``fmoefy`` makes of the dense model. A megatron-core that does not (none
    checked here) leaves each MegatronMLP with the next number of a process-wide counter for its
    seeds; ``number_moe_layers(model)`` then sets the real numbers (used in logs and stats)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = copy.deepcopy(base_spec) if base_spec is not None else get_gpt_layer_local_spec()
    if _spec_fuses_pre_mlp_norm(spec):
        # The norm lived inside the dense MLP that is replaced: without a standalone one the
        # experts would get un-normalised inputs (as fmoefy's _keep_fused_pre_mlp_norm avoids).
        spec.submodules.pre_mlp_layernorm = _standalone_norm_module()
    spec.submodules.mlp = ModuleSpec(module=_SpecMegatronMLP, params={"fmoe": fmoe})
    return spec


class _SpecMegatronMLP(MegatronMLP):
    def __init__(self, config, fmoe=None, **kwargs):
        kwargs.setdefault("layer_number", 10_000 + next(_spec_counter))
        super().__init__(config, fmoe, **kwargs)


def number_moe_layers(model) -> None:
    """Gives every MegatronMLP its transformer layer's number (for logs and stats)."""
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for layer in transformer_layers(chunk):
            if isinstance(layer.mlp, MegatronMLP):
                layer.mlp.layer_number = getattr(layer, "layer_number", layer.mlp.layer_number)


def moe_modules(model) -> list[MegatronMLP]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for c in chunks for m in c.modules() if isinstance(m, MegatronMLP)]
