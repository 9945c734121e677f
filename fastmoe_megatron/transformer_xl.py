"""Transformer-XL with MoE feed-forward blocks, on Hugging Face transformers' implementation.

FastMoE's second integration: every ``PositionwiseFF`` of a ``TransfoXLModel`` /
``TransfoXLLMHeadModel`` becomes an ``MoEPositionwiseFF`` whose experts are the position-wise
feed-forward network. transformers is imported lazily; install the ``transformerxl`` extra, which
pins ``transformers==4.37.2``: Transformer-XL was deprecated in 4.35 (moved under
``models/deprecated/``) and shipped until 4.57, but from 4.38 on its forward calls
``Tensor.type_as(dtype=...)``, which no PyTorch release accepts, so 4.37.2 is the newest release
whose Transformer-XL runs.

    model = TransfoXLLMHeadModel(byte_level_config())
    moefy_transformer_xl(model, num_expert=4, top_k=2)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .gates import NaiveGate
from .layers import FMoETransformerMLP, key_seed
from .moefy import DenseFFN, moe_layers, moefy

TRANSFORMERS_VERSION = "4.37.2"

__all__ = [
    "TRANSFORMERS_VERSION", "MoEPositionwiseFF", "positionwise_ff_adapter", "moefy_transformer_xl",
    "byte_level_config", "transfo_xl_module",
]


def transfo_xl_module():
    """transformers' ``modeling_transfo_xl`` module (where ``PositionwiseFF`` lives)."""
    try:
        from transformers.models.deprecated.transfo_xl import modeling_transfo_xl
    except ImportError:
        try:  # before 4.35 the model was not yet deprecated
            from transformers.models.transfo_xl import modeling_transfo_xl
        except ImportError as e:
            raise ImportError(
                "Transformer-XL needs Hugging Face transformers with TransfoXL (<= 4.37.2 runs): "
                f"pip install 'fastmoe-megatron[transformerxl]' (transformers=={TRANSFORMERS_VERSION})"
            ) from e
    return modeling_transfo_xl


class MoEPositionwiseFF(nn.Module):
    """``PositionwiseFF(d_model, d_inner, dropout, pre_lnorm)`` with an MoE layer as its core.

    transformers' block computes ``CoreNet = Linear -> ReLU -> Dropout -> Linear -> Dropout`` and

        pre_lnorm:  out = CoreNet(layer_norm(x)) + x
        otherwise:  out = layer_norm(x + CoreNet(x))

    Here each expert is ``Linear -> ReLU -> Dropout -> Linear`` and the output dropout, the
    residual and the layer norm are where they were. ``moe`` is a ready ``FMoETransformerMLP``
    (as ``moefy`` builds it); without one, ``num_expert``, ``top_k``, ``gate`` and ``moe_kwargs``
    build a fresh one. ``d_inner`` is the experts' hidden width (``moe.d_hidden`` when ``moe`` is
    given, whatever ``d_inner`` says).
    """

    def __init__(self, d_model, d_inner, dropout, pre_lnorm=False, layer_norm_epsilon=1e-5, *,
                 moe: Optional[FMoETransformerMLP] = None, num_expert: int = 4, top_k: int = 2,
                 gate=NaiveGate, **moe_kwargs):
        super().__init__()
        if moe is None:
            moe = FMoETransformerMLP(num_expert=num_expert, d_model=d_model, d_hidden=d_inner,
                                     activation=nn.Sequential(nn.ReLU(), nn.Dropout(dropout)),
                                     top_k=top_k, gate=gate, **moe_kwargs)
        self.d_model, self.d_inner, self.pre_lnorm = d_model, moe.d_hidden, pre_lnorm
        self.moe = moe
        self.drop = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_epsilon)

    def forward(self, inp):
        if self.pre_lnorm:
            return self.drop(self.moe(self.layer_norm(inp))) + inp
        return self.layer_norm(inp + self.drop(self.moe(inp)))


def positionwise_ff_adapter(ff: nn.Module) -> Optional[DenseFFN]:
    """moefy adapter: a transformers ``PositionwiseFF`` -> ``MoEPositionwiseFF`` that keeps its
    layer norm (with its weights), ``pre_lnorm`` and dropout rate."""
    if not isinstance(ff, transfo_xl_module().PositionwiseFF):
        return None
    fc1, act, inner_drop, fc2, out_drop = ff.CoreNet
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
            and isinstance(out_drop, nn.Dropout)):
        raise TypeError(f"unexpected PositionwiseFF.CoreNet layout: {ff.CoreNet}")

    def install(moe: FMoETransformerMLP) -> nn.Module:
        new = MoEPositionwiseFF(ff.d_model, ff.d_inner, out_drop.p, bool(ff.pre_lnorm),
                                ff.layer_norm.eps, moe=moe)
        new.layer_norm = ff.layer_norm
        return new.train(ff.training)

    return DenseFFN(fc1, fc2, nn.Sequential(act, inner_drop), install)


def _transfo_xl_config(model: nn.Module):
    """The ``TransfoXLConfig`` of ``model`` or of the first submodule that has one (else None)."""
    config_cls = transfo_xl_module().TransfoXLConfig
    for m in model.modules():
        if isinstance(getattr(m, "config", None), config_cls):
            return m.config
    return None


@torch.no_grad()
def _init_like_transfo_xl(weight: torch.Tensor, config, generator: torch.Generator) -> None:
    """``TransfoXLPreTrainedModel._init_weight``, drawing from ``generator``."""
    if config.init == "uniform":
        nn.init.uniform_(weight, -config.init_range, config.init_range, generator=generator)
    elif config.init == "normal":
        nn.init.normal_(weight, 0.0, config.init_std, generator=generator)


@torch.no_grad()
def _reinit_moe_layers(layers: list, config) -> None:
    """Draws the experts' and gates' linear weights as transformers initialises every linear of
    Transformer-XL (``config.init``: N(0, init_std) by default), with zero biases. One draw of the
    global generator seeds them all; each expert draws from (that seed, its layer, its global
    index), so the model is the same at any expert-parallel size."""
    seed = int(torch.randint(0, 2**62, (1,)))
    for layer, moe in enumerate(layers):
        generator = torch.Generator(device=moe.experts.htoh4.weight.device)
        for part, linear in enumerate((moe.experts.htoh4, moe.experts.h4toh)):
            for e in range(moe.num_expert):
                generator.manual_seed(key_seed(seed, layer, part, linear.rank * moe.num_expert + e))
                _init_like_transfo_xl(linear.weight[e], config, generator)
            if linear.bias is not None:
                linear.bias.zero_()
        for i, linear in enumerate(m for m in moe.gate.modules() if isinstance(m, nn.Linear)):
            generator = torch.Generator(device=linear.weight.device)
            generator.manual_seed(key_seed(seed, layer, 2, i))
            _init_like_transfo_xl(linear.weight, config, generator)
            if linear.bias is not None:
                linear.bias.zero_()


def moefy_transformer_xl(model: nn.Module, num_expert: int, top_k: int = 2, gate=NaiveGate,
                         **kwargs) -> nn.Module:
    """Replaces every ``PositionwiseFF`` of a transformers Transformer-XL model with an
    ``MoEPositionwiseFF`` in place; returns the model. ``kwargs`` are ``moefy``'s (``upcycle``,
    ``upcycle_noise``, ``world_size``, ``moe_group``, ``d_hidden``, ...).

    Unless upcycled, the new experts and gates are initialised as transformers initialises the
    model's linears (``config.init``, ``init_std`` / ``init_range``; zero biases), as FastMoE's
    Transformer-XL example did, from the ``TransfoXLConfig`` of ``model`` (or of its first
    submodule that has one; without one, moefy's initialisation stays)."""
    before = {id(m) for _, m in moe_layers(model)}
    model = moefy(model, transfo_xl_module().PositionwiseFF, num_expert=num_expert, top_k=top_k,
                  gate=gate, adapter=positionwise_ff_adapter, **kwargs)
    config = _transfo_xl_config(model)
    if not kwargs.get("upcycle") and config is not None:
        _reinit_moe_layers([m for _, m in moe_layers(model) if id(m) not in before], config)
    return model


def byte_level_config(d_model=128, n_layer=2, n_head=4, d_inner=256, tgt_len=64, mem_len=64,
                      dropout=0.1, pre_lnorm=False, **kwargs):
    """A small ``TransfoXLConfig`` over the 256 byte values: one softmax cluster (no adaptive
    input or softmax), ``d_head = d_model / n_head``."""
    config_cls = transfo_xl_module().TransfoXLConfig
    return config_cls(vocab_size=256, cutoffs=[], adaptive=False, div_val=1, d_model=d_model,
                      d_embed=d_model, n_head=n_head, d_head=d_model // n_head, d_inner=d_inner,
                      n_layer=n_layer, tgt_len=tgt_len, mem_len=mem_len, dropout=dropout,
                      dropatt=0.0, pre_lnorm=pre_lnorm, **kwargs)
