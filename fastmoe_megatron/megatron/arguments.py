"""The ``--fmoefy`` flags, for our ``pretrain_gpt`` and for Megatron-LM's own parser.

FastMoE's flags keep their names, except two:

- FastMoE's ``--num-experts`` is Megatron's flag for its own MoE
  (``TransformerConfig.num_moe_experts``), so the expert count is ``--fmoe-num-experts`` only
  (FastMoE accepted both).
- ``--top-k`` is now ``--fmoe-top-k`` (attribute ``args.fmoe_top_k``, formerly ``args.top_k``).
  Megatron-LM's text-generation entry points (``tools/run_text_generation_server.py``,
  ``examples/inference/gpt/utils.py``; ``megatron/inference/utils.py`` in core_v0.17.1) define
  ``--top_k``, the sampling top-k, with the same attribute ``args.top_k``: one parser holding both
  would silently read one for the other. ``--top-k`` stays as an alias of ``--fmoe-top-k`` where it
  is not ambiguous: ``add_fmoe_args`` adds it only when the parser has no ``--top-k``/``--top_k``
  option and no ``top_k`` attribute yet (our ``pretrain_gpt``, Megatron-LM's ``pretrain_gpt.py``),
  and leaves it out otherwise (then only ``--fmoe-top-k`` works).

Checked against Megatron-LM core_v0.16.1 and core_v0.17.1 (``megatron/training/arguments.py``):
no other flag or attribute collides.

| flag | default | meaning |
|---|---|---|
| ``--fmoefy`` | off | replace every transformer layer's MLP with an MoE layer |
| ``--fmoe-num-experts N`` | required with --fmoefy | experts per layer, over all expert-parallel ranks |
| ``--fmoe-top-k K`` (alias ``--top-k``) | 2 | experts per token |
| ``--balance-strategy S`` | naive | gate: naive, noisy, gshard, switch, dc, swipe |
| ``--balance-loss-weight W`` | 1.0 | weight of the gates' balance loss in the training loss |
| ``--hidden-hidden-size H`` | ffn hidden size | width of each expert's hidden layer |
| ``--fmoe-capacity-factor F`` | the gate's | capacity factor (gshard, switch, dc): (train, eval) = (F, 2F) |
| ``--fmoe-z-loss-weight W`` | 0 | router z-loss weight |
| ``--fmoe-expert-bias-update-rate R`` | 0 | aux-loss-free balancing: expert bias step per iteration |

Experts are spread over ``--expert-model-parallel-size`` ranks, with expert-data-parallel
replicas over the rest. In our ``pretrain_gpt`` its default with --fmoefy is the whole
data-parallel group, as in FastMoE; under Megatron-LM (``fastmoe_megatron.launch`` or the source
patch) Megatron's own flag and default apply: 1, i.e. every rank holds all experts unless
``--expert-model-parallel-size`` says otherwise.
"""
from __future__ import annotations

import argparse
import math

from .layer import CAPACITY_GATES, GATES, FMoEConfig


def finite_float(text: str) -> float:
    """argparse type of the float flags: ``nan`` passed every ``value <= 0`` check (and turned
    clipping off), and ``inf`` failed deep inside a library."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _has_top_k(parser: argparse.ArgumentParser) -> bool:
    """Whether ``parser`` already knows a top-k of its own (e.g. sampling's ``--top_k``)."""
    options = getattr(parser, "_option_string_actions", {})
    dests = {action.dest for action in getattr(parser, "_actions", [])}
    return "--top-k" in options or "--top_k" in options or "top_k" in dests


def add_fmoe_args(parser: argparse.ArgumentParser,
                  top_k_alias: bool | None = None) -> argparse.ArgumentParser:
    """Adds the flags of the table above. ``top_k_alias``: also accept ``--top-k`` for
    ``--fmoe-top-k`` (default: when the parser has no top-k of its own, see the module doc)."""
    if top_k_alias is None:
        top_k_alias = not _has_top_k(parser)
    g = parser.add_argument_group("fastmoe-megatron (MoE through --fmoefy)")
    g.add_argument("--fmoefy", action="store_true",
                   help="replace every transformer layer's MLP with a fastmoe_megatron MoE layer")
    g.add_argument("--fmoe-num-experts", type=int, default=None,
                   help="experts per layer over all expert-parallel ranks (FastMoE's --num-experts; "
                        "renamed because Megatron's --num-experts is its own MoE)")
    g.add_argument("--fmoe-top-k", *(["--top-k"] if top_k_alias else []), dest="fmoe_top_k",
                   type=int, default=2,
                   help="experts per token (default 2; FastMoE's --top-k, kept as an alias where "
                        "the parser has no sampling --top_k)")
    g.add_argument("--balance-strategy", default="naive", choices=sorted(GATES),
                   help="the gate (default naive: top-k softmax, no balance loss)")
    g.add_argument("--balance-loss-weight", type=finite_float, default=1.0,
                   help="weight of the balance loss added to the training loss (default 1)")
    g.add_argument("--hidden-hidden-size", type=int, default=None,
                   help="hidden width of each expert (default: --ffn-hidden-size)")
    g.add_argument("--fmoe-capacity-factor", type=finite_float, default=None,
                   help=f"capacity factor for the {', '.join(CAPACITY_GATES)} gates "
                        "(train F, eval 2F; default: the gate's own)")
    g.add_argument("--fmoe-z-loss-weight", type=finite_float, default=0.0,
                   help="router z-loss weight")
    g.add_argument("--fmoe-expert-bias-update-rate", type=finite_float, default=0.0,
                   help="aux-loss-free balancing: per-iteration step of the expert bias (0: off)")
    return parser


def fmoe_flags_set(args) -> list[str]:
    """The fastmoe flags of ``args`` (parsed by a parser with ``add_fmoe_args``) given a value other
    than their default, by name: they take effect only with ``--fmoefy``."""
    reference = add_fmoe_args(argparse.ArgumentParser(), top_k_alias=False)
    found = []
    for action in reference._actions:
        if action.dest in ("help", "fmoefy") or not hasattr(args, action.dest):
            continue
        if getattr(args, action.dest) != action.default:
            found.append(action.option_strings[0])
    return found


def check_unused_fmoe_flags(args) -> None:
    """Without ``--fmoefy``, fastmoe flags given a value would be silently ignored (the model stays
    dense): a ValueError naming them."""
    if getattr(args, "fmoefy", False):
        return
    unused = fmoe_flags_set(args)
    if unused:
        raise ValueError(f"{', '.join(unused)} without --fmoefy: fastmoe's MoE flags take effect "
                         "only with --fmoefy (megatron-core's own MoE: --num-experts)")


def fmoe_config_from_args(args) -> FMoEConfig:
    """FMoEConfig from parsed flags; raises ValueError naming the flag on a bad combination."""
    if not args.fmoefy:
        raise ValueError("fmoe_config_from_args needs --fmoefy")
    if args.fmoe_num_experts is None:
        raise ValueError("--fmoefy needs --fmoe-num-experts N (the number of experts per layer)")
    return FMoEConfig(
        num_experts=args.fmoe_num_experts,
        top_k=args.fmoe_top_k,
        gate=args.balance_strategy,
        hidden_size=args.hidden_hidden_size,
        capacity_factor=args.fmoe_capacity_factor,
        z_loss_weight=args.fmoe_z_loss_weight,
        expert_bias_update_rate=args.fmoe_expert_bias_update_rate,
        balance_loss_weight=args.balance_loss_weight,
    ).validate()
