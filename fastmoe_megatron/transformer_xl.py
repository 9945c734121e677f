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

import torch.nn as nn

from .gates import NaiveGate
from .layers import FMoETransformerMLP
from .moefy import DenseFFN, moefy

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
    build a fresh one.
    """

    def __init__(self, d_model, d_inner, dropout, pre_lnorm=False, layer_norm_epsilon=1e-5, *,
                 moe: Optional[FMoETransformerMLP] = None, num_expert: int = 4, top_k: int = 2,
                 gate=NaiveGate, **moe_kwargs):
        super().__init__()
        self.d_model, self.d_inner, self.pre_lnorm = d_model, d_inner, pre_lnorm
        if moe is None:
            moe = FMoETransformerMLP(num_expert=num_expert, d_model=d_model, d_hidden=d_inner,
                                     activation=nn.Sequential(nn.ReLU(), nn.Dropout(dropout)),
                                     top_k=top_k, gate=gate, **moe_kwargs)
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


def moefy_transformer_xl(model: nn.Module, num_expert: int, top_k: int = 2, gate=NaiveGate,
                         **kwargs) -> nn.Module:
    """Replaces every ``PositionwiseFF`` of a transformers Transformer-XL model with an
    ``MoEPositionwiseFF`` in place; returns the model. ``kwargs`` are ``moefy``'s (``upcycle``,
    ``upcycle_noise``, ``world_size``, ``moe_group``, ``d_hidden``, ...)."""
    return moefy(model, transfo_xl_module().PositionwiseFF, num_expert=num_expert, top_k=top_k,
                 gate=gate, adapter=positionwise_ff_adapter, **kwargs)


def byte_level_config(d_model=128, n_layer=2, n_head=4, d_inner=256, tgt_len=64, mem_len=64,
                      dropout=0.1, pre_lnorm=False, **kwargs):
    """A small ``TransfoXLConfig`` over the 256 byte values: one softmax cluster (no adaptive
    input or softmax), ``d_head = d_model / n_head``."""
    config_cls = transfo_xl_module().TransfoXLConfig
    return config_cls(vocab_size=256, cutoffs=[], adaptive=False, div_val=1, d_model=d_model,
                      d_embed=d_model, n_head=n_head, d_head=d_model // n_head, d_inner=d_inner,
                      n_layer=n_layer, tgt_len=tgt_len, mem_len=mem_len, dropout=dropout,
                      dropatt=0.0, pre_lnorm=pre_lnorm, **kwargs)
