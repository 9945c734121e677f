"""Megatron-LM checkout integration: ``--fmoefy`` for an unmodified ``pretrain_gpt.py``.

The only module of fastmoe_megatron that imports ``megatron.training`` / ``megatron.legacy``
(always lazily: importing this module imports no Megatron code).

Two ways in, one set of hooks:

* **hooks** (``add_arguments``, ``prepare_args``, ``fmoefy_model``, ``before_train_step``,
  ``after_train_step``): the plugin's side of each integration point. The source patch
  (``patches/megatron-lm-core_v0.16.1.patch``) calls them from Megatron-LM's code.
* **runtime patches** (``apply()``, used by ``python -m fastmoe_megatron.launch``): the same hooks
  put in place by replacing Megatron-LM functions before the training script runs, so that a
  checkout needs no change.

What ``--fmoefy`` changes (both ways):

1. arguments: our flags (``arguments.add_fmoe_args``) are added to Megatron's parser, after the
   script's own ``extra_args_provider`` (so ``--top-k`` is an alias only where the script has no
   sampling ``--top_k``, see ``arguments``);
2. validation: ``--fmoe-num-experts`` is required and checked against
   ``--expert-model-parallel-size``; ``--expert-tensor-parallel-size`` defaults to (and must be) 1;
   Megatron's own MoE (``--num-experts``), FSDP and meta-device initialisation are refused; and
   Megatron's "expert parallelism needs --num-experts" checks (``validate_args`` and
   ``TransformerConfig.__post_init__``) are relaxed for --fmoefy only. The expert-parallel size
   is Megatron's ``--expert-model-parallel-size`` as given (Megatron's default 1, *not* FastMoE's
   "whole data-parallel group"); it reaches ``parallel_state`` through Megatron's own
   ``initialize_model_parallel``; the model's ``TransformerConfig`` keeps
   ``expert_model_parallel_size = 1``, as our own trainer does (that field only steers
   megatron-core's own expert layers, of which an fmoefy'd model has none);
3. model: every model chunk the provider returns is fmoefy'd (core ``decoder.layers[i].mlp`` or
   legacy ``language_model.encoder.layers[i].mlp``) inside ``get_model``, before ``.cuda()``,
   ``Float16Module`` and DDP; after ``get_model`` the expert parameters are checked to carry
   ``allreduce=False`` and ``tensor_model_parallel=True`` and, under megatron-core DDP, to sit in
   its expert-parallel buffers. The optimizer (``get_megatron_optimizer``: separate expert param
   groups) and gradient clipping (``ChainedOptimizer.get_grad_norm``) read those same attributes;
4. each training step: the balance-loss gradient scale is set to the loss scale (fp16) divided
   by the number of microbatches (under ``--calculate-per-token-loss``: times the tokens per
   microbatch instead, as megatron-core scales its own MoE aux loss; see
   ``balance_loss_scale``); after the optimizer step the gates' aux-loss-free expert biases are
   updated and the mean balance loss over MoE layers goes into the step's loss dict as
   ``balance loss`` (Megatron prints and logs it with ``lm loss``).

Runtime patches: each names the Megatron-LM function it replaces and the versions it was checked
against (``describe()``, ``python -m fastmoe_megatron.launch --list-patches``). ``apply()`` checks
the version first (megatron-core's ``package_info`` of the checkout, which must also be the
``megatron.core`` actually imported), then looks up every target, and only then replaces any: an
unknown version or a missing target raises ``UnsupportedMegatronLM`` and leaves Megatron-LM
untouched. ``FMOE_MEGATRON_UNCHECKED=1`` applies them to an unchecked version anyway (each target
is still looked up). Besides the target itself, every already-imported module that bound the
original by name (``from megatron.training import get_model``) is rebound; modules imported later
(the training script) find the replacement.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

# UNCHECKED_ENV (FMOE_MEGATRON_UNCHECKED=1) applies the patches to a Megatron-LM version they were
# not checked against: one variable for every version check of the Megatron integration.
from .cpu_compat import UNCHECKED_ENV
from .cpu_compat import unchecked_ok as _unchecked_ok

__all__ = [
    "CHECKED_VERSIONS",
    "UNCHECKED_ENV",
    "UnsupportedMegatronLM",
    "add_arguments",
    "after_train_step",
    "apply",
    "balance_loss_scale",
    "before_train_step",
    "check_expert_params",
    "describe",
    "fmoefy_model",
    "is_applied",
    "megatron_lm_version",
    "prepare_args",
    "remove",
]

#: Megatron-LM releases (git tag core_vX.Y.Z; megatron-core X.Y.Z) the patches were checked against.
CHECKED_VERSIONS: Tuple[str, ...] = ("0.16.1",)

_MARK = "__fmoe_megatron_lm__"


class UnsupportedMegatronLM(RuntimeError):
    """A Megatron-LM version (or layout) the runtime patches were not checked against."""


def _get_args():
    from megatron.training.global_vars import get_args

    return get_args()


def _fmoefy_enabled(args) -> bool:
    return bool(getattr(args, "fmoefy", False))


# =============================================================================================
# Hooks: called by the runtime patches below and by the source patch.
# =============================================================================================


def add_arguments(parser):
    """Adds the ``--fmoefy`` flags to Megatron's parser (once: a no-op when they are there)."""
    from .arguments import add_fmoe_args

    if any(action.dest == "fmoefy" for action in parser._actions):
        return parser
    return add_fmoe_args(parser)


def prepare_args(args) -> None:
    """Before Megatron's ``validate_args``, with --fmoefy: rejects what cannot work together and
    sets ``expert_tensor_parallel_size`` (Megatron's default would be the TP size) to 1. Without
    --fmoefy: rejects fastmoe flags given a value (they would be ignored). Raises ValueError
    naming the flag to fix."""
    from .arguments import check_unused_fmoe_flags, fmoe_config_from_args

    check_unused_fmoe_flags(args)
    if not _fmoefy_enabled(args):
        return

    if getattr(args, "num_experts", None):
        raise ValueError("--fmoefy replaces the MLPs with fastmoe_megatron experts; it cannot be "
                         "combined with Megatron's own MoE (--num-experts). Use --fmoe-num-experts")
    etp = getattr(args, "expert_tensor_parallel_size", None)
    if etp not in (None, 1):
        raise ValueError(f"--fmoefy experts are not tensor parallel: --expert-tensor-parallel-size "
                         f"must be 1 (or unset), got {etp}")
    args.expert_tensor_parallel_size = 1
    for flag in ("use_torch_fsdp2", "use_megatron_fsdp", "init_model_with_meta_device"):
        if getattr(args, flag, False):
            raise ValueError(f"--fmoefy was not checked with --{flag.replace('_', '-')}")
    ep = getattr(args, "expert_model_parallel_size", None)
    ep = 1 if ep is None else ep
    if ep < 1:
        raise ValueError(f"--expert-model-parallel-size must be >= 1, got {ep}")
    world, pp = getattr(args, "world_size", None), getattr(args, "pipeline_model_parallel_size", 1)
    if world is not None and pp and pp > 0 and world % (ep * pp):
        # megatron-core's initialize_model_parallel would fail later, naming no flag.
        raise ValueError(f"--expert-model-parallel-size {ep} x --pipeline-model-parallel-size {pp} "
                         f"must divide the world size {world} (the experts are not tensor "
                         "parallel: --expert-tensor-parallel-size is 1)")
    fmoe_config_from_args(args).validate(ep)
    if getattr(args, "use_legacy_models", False) and not hasattr(args, "apply_layernorm_1p"):
        # Megatron-LM core_v0.16.1/0.17.1: the legacy model's get_norm() reads
        # args.apply_layernorm_1p, a flag the parser no longer defines (AttributeError for every
        # --use-legacy-models GPT). The removed flag's default was False.
        args.apply_layernorm_1p = False


def _fmoefy_version_override():
    return "0.16" if _unchecked_ok() else None


def fmoefy_model(model, args=None):
    """fmoefy every chunk of ``model`` (a module or the list ``get_model`` builds) in place, with
    the flags of ``args`` (default: Megatron's global args). Call it before DDP wrapping."""
    args = args if args is not None else _get_args()
    if not _fmoefy_enabled(args):
        return model
    from .arguments import fmoe_config_from_args
    from .fmoefy import fmoefy

    cfg = fmoe_config_from_args(args)
    fmoefy(model, cfg.num_experts, top_k=cfg.top_k, gate=cfg.gate,
           hidden_hidden_size=cfg.hidden_size, capacity_factor=cfg.capacity_factor,
           z_loss_weight=cfg.z_loss_weight, expert_bias_update_rate=cfg.expert_bias_update_rate,
           balance_loss_weight=cfg.balance_loss_weight,
           megatron_version=_fmoefy_version_override())
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        if hasattr(chunk, "language_model") and not hasattr(chunk, "vp_stage"):
            # Megatron-LM core_v0.16.1/0.17.1: pretrain_gpt.py's forward_step reads the model's
            # vp_stage (get_attr_wrapped_model raises when absent), which legacy GPTModel lacks
            # outside virtual pipelining; None is what a core GPTModel holds there.
            chunk.vp_stage = None
    return model


def check_expert_params(model) -> int:
    """Raises unless every expert parameter of ``model`` (chunks, possibly wrapped) carries
    ``allreduce=False`` and ``tensor_model_parallel=True`` and, under megatron-core DDP, sits in
    the expert-parallel buffers (reduced over the expert-data-parallel group) and not in the dense
    ones. Returns the number of expert parameters."""
    from .fmoefy import moe_modules

    chunks = model if isinstance(model, (list, tuple)) else [model]
    count = 0
    for chunk in chunks:
        experts = {id(p): p for m in moe_modules([chunk]) for p in m.moe.experts.parameters()}
        count += len(experts)
        for p in experts.values():
            if getattr(p, "allreduce", True) is not False or not getattr(p, "tensor_model_parallel",
                                                                         False):
                raise RuntimeError("fastmoe_megatron: an expert parameter lost its allreduce=False "
                                   "/ tensor_model_parallel=True tags after get_model")
        dense = getattr(chunk, "buffers", None)
        expert = getattr(chunk, "expert_parallel_buffers", None)
        if isinstance(dense, list) and isinstance(expert, list):
            in_expert = {id(p) for b in expert for p in b.params}
            in_dense = {id(p) for b in dense for p in b.params}
            trainable = {k for k, p in experts.items() if p.requires_grad}
            if not trainable <= in_expert or trainable & in_dense:
                raise RuntimeError("fastmoe_megatron: DDP did not put the expert parameters in its "
                                   "expert-parallel buffers")
    return count


def balance_loss_scale(config, args=None) -> float:
    """The balance-loss gradient factor for one training step, by megatron-core's convention for
    its own MoE aux loss (``forward_step_calc_loss`` and the router): the loss scale
    (``grad_scale_func``, fp16) divided by the number of microbatches; under
    ``--calculate-per-token-loss``, where ``finalize_model_grads`` divides every gradient by the
    global token count, the loss scale times this rank's tokens per microbatch instead
    (micro batch size x sequence length / context-parallel size). No context-parallel factor
    otherwise: each rank's balance loss covers its own tokens and is averaged over CP by the
    gradient reduction, like the LM loss."""
    import torch
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    args = args if args is not None else _get_args()
    scale = 1.0
    grad_scale_func = getattr(config, "grad_scale_func", None)
    if grad_scale_func is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scale = float(grad_scale_func(torch.ones(1, device=device)))
    if getattr(config, "calculate_per_token_loss", False):
        return scale * args.micro_batch_size * args.seq_length / (args.context_parallel_size or 1)
    return scale / get_num_microbatches()


def before_train_step(config, args=None) -> None:
    """Before ``train_step``: sets this step's balance-loss scale and clears the per-layer stats
    (so that evaluation forwards in between do not count)."""
    args = args if args is not None else _get_args()
    if not _fmoefy_enabled(args):
        return
    from . import stats
    from .layer import set_balance_loss_scale

    set_balance_loss_scale(balance_loss_scale(config, args))
    stats.reset()


def after_train_step(model, loss_dict, args=None) -> None:
    """After ``train_step`` (on every rank): aux-loss-free expert-bias updates, then the mean
    balance loss over MoE layers into ``loss_dict`` (non-empty on the last pipeline stage only)."""
    args = args if args is not None else _get_args()
    if not _fmoefy_enabled(args):
        return
    import torch
    from megatron.core import parallel_state

    from . import stats
    from .fmoefy import moe_modules

    group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    moes = moe_modules(model)
    for m in moes:
        m.moe.gate.update_expert_bias(group)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    layer_stats = stats.collect(args.num_layers, args.fmoe_num_experts, device=device)
    if isinstance(loss_dict, dict) and loss_dict:
        losses = [s["balance_loss"] for s in layer_stats.values()]
        value = sum(losses) / len(losses) if losses else 0.0
        like = next(iter(loss_dict.values()))
        loss_dict["balance loss"] = torch.tensor(
            value, dtype=torch.float32, device=like.device if torch.is_tensor(like) else device)


# =============================================================================================
# Runtime patches.
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class _Patch:
    target: str  # "module:function"
    make: Callable[[Any], Any]  # original -> replacement
    why: str
    checked: Tuple[str, ...] = CHECKED_VERSIONS

    def resolve(self) -> Tuple[Any, str, Any]:
        module_name, _, attr = self.target.partition(":")
        owner = importlib.import_module(module_name)
        if attr not in vars(owner):
            raise AttributeError(f"{attr!r} not found in {module_name}")
        return owner, attr, vars(owner)[attr]


_PATCHES: List[_Patch] = []
# target -> [(module, attribute, original)], filled by apply(), emptied by remove()
_APPLIED: Dict[str, List[Tuple[Any, str, Any]]] = {}


def _patch(target: str, why: str, checked: Tuple[str, ...] = CHECKED_VERSIONS):
    def register(make):
        _PATCHES.append(_Patch(target, make, why, checked))
        return make

    return register


_ARGUMENTS = "megatron.training.arguments"
_TRAINING = "megatron.training.training"


@_patch(f"{_ARGUMENTS}:parse_args",
        "adds the --fmoefy flags to Megatron's parser, after the script's extra_args_provider")
def _parse_args(original):
    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        def provider(parser):
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            return add_arguments(parser)

        return original(provider, ignore_unknown_args)

    return parse_args


@_patch(f"{_ARGUMENTS}:validate_args",
        "with --fmoefy: prepare_args() first (checks, expert TP 1); then, for its 'expert model "
        "parallelism needs --num-experts' assertion only, shows --fmoe-num-experts as "
        "num_experts (and a placeholder moe_ffn_hidden_size, against a misleading warning); both "
        "are put back before it prints the arguments and when it returns")
def _validate_args(original):
    @functools.wraps(original)
    def validate_args(args, defaults={}):  # noqa: B006 - Megatron's signature
        prepare_args(args)  # also refuses fastmoe flags given without --fmoefy
        if not _fmoefy_enabled(args):
            return original(args, defaults)
        if (getattr(args, "expert_model_parallel_size", 1) or 1) == 1:
            return original(args, defaults)
        module = sys.modules[original.__module__]
        saved = {"num_experts": args.num_experts, "moe_ffn_hidden_size": args.moe_ffn_hidden_size}
        print_args = vars(module).get("_print_args")

        def restore():
            for name, value in saved.items():
                setattr(args, name, value)

        def print_args_restored(*a, **kw):
            restore()
            return print_args(*a, **kw)

        args.num_experts = args.fmoe_num_experts
        if args.moe_ffn_hidden_size is None:
            args.moe_ffn_hidden_size = args.hidden_hidden_size or args.ffn_hidden_size or 0
        if print_args is not None:
            module._print_args = print_args_restored
        try:
            return original(args, defaults)
        finally:
            restore()
            if print_args is not None:
                module._print_args = print_args

    return validate_args


@_patch(f"{_ARGUMENTS}:core_transformer_config_from_args",
        "with --fmoefy and expert parallelism: builds the TransformerConfig with "
        "expert_model_parallel_size=1 (its __post_init__ raises 'num_moe_experts must be non "
        "None to use expert-parallel'); the EP size lives in parallel_state, as in our trainer")
def _core_transformer_config_from_args(original):
    @functools.wraps(original)
    def core_transformer_config_from_args(args, *rest, **kwargs):
        ep = getattr(args, "expert_model_parallel_size", 1)
        if not _fmoefy_enabled(args) or ep == 1:
            return original(args, *rest, **kwargs)
        args.expert_model_parallel_size = 1
        try:
            return original(args, *rest, **kwargs)
        finally:
            args.expert_model_parallel_size = ep

    return core_transformer_config_from_args


@_patch(f"{_TRAINING}:get_model",
        "with --fmoefy: wraps model_provider_func so that each model chunk it builds is "
        "fmoefy'd before get_model moves it to the GPU, wraps it in Float16Module and DDP; then "
        "checks the expert parameters' tags and DDP buffers (check_expert_params)")
def _get_model(original):
    @functools.wraps(original)
    def get_model(model_provider_func, *rest, **kwargs):
        args = _get_args()
        if not _fmoefy_enabled(args):
            return original(model_provider_func, *rest, **kwargs)

        @functools.wraps(model_provider_func)
        def fmoefied_provider(*a, **kw):
            return fmoefy_model(model_provider_func(*a, **kw), args)

        model = original(fmoefied_provider, *rest, **kwargs)
        check_expert_params(model)
        return model

    return get_model


@_patch(f"{_TRAINING}:train_step",
        "with --fmoefy: before_train_step(config) (balance-loss scale) before it, "
        "after_train_step(model, loss_dict) (expert-bias update, 'balance loss' in the loss dict) "
        "after it")
def _train_step(original):
    signature = inspect.signature(original)
    for name in ("model", "config"):
        if name not in signature.parameters:
            raise AttributeError(f"train_step has no parameter {name!r}")

    @functools.wraps(original)
    def train_step(*a, **kw):
        args = _get_args()
        if not _fmoefy_enabled(args):
            return original(*a, **kw)
        bound = signature.bind(*a, **kw).arguments
        before_train_step(bound["config"], args)
        result = original(*a, **kw)
        after_train_step(bound["model"], result[0] if isinstance(result, tuple) else None, args)
        return result

    return train_step


# ---------------------------------------------------------------------------------------------


def _read_version_file(path: Path) -> str | None:
    """megatron-core's version from a ``package_info.py`` (plain constants), without importing
    the package it belongs to."""
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_fmoe_megatron_package_info", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "__version__", None)


def megatron_lm_version() -> str:
    """The version of the Megatron-LM checkout in use (its ``megatron/core/package_info.py``).

    Raises ``UnsupportedMegatronLM`` when ``megatron.training`` cannot be found, or when the
    ``megatron.core`` that Python imports is not the checkout's (say an installed megatron-core
    wheel of another version ahead of the checkout on ``sys.path``)."""
    spec = importlib.util.find_spec("megatron.training")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedMegatronLM(
            "megatron.training is not importable: put a Megatron-LM checkout on PYTHONPATH (the "
            "launcher does so with the training script's folder)")
    checkout = Path(list(spec.submodule_search_locations)[0]).parent.parent
    checkout_version = _read_version_file(checkout / "megatron" / "core" / "package_info.py")
    from megatron.core import package_info

    imported = package_info.__version__
    if checkout_version is not None and checkout_version != imported:
        raise UnsupportedMegatronLM(
            f"megatron.training comes from {checkout} (megatron-core {checkout_version}) but the "
            f"megatron.core imported is {imported} ({Path(package_info.__file__).parent}): put the "
            "checkout first on PYTHONPATH, or install the matching megatron-core")
    return imported


def is_applied() -> bool:
    return bool(_APPLIED)


def describe() -> List[Dict[str, Any]]:
    """One dict per runtime patch: ``target``, ``why``, ``checked`` (versions)."""
    return [{"target": p.target, "why": p.why, "checked": p.checked} for p in _PATCHES]


def _aliases(original) -> List[Tuple[Any, str]]:
    """(module, name) of every imported module that bound ``original`` by name."""
    sites = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                sites.append((module, name))
    return sites


def apply() -> List[str]:
    """Installs the runtime patches; returns the targets patched now (empty when they already
    are). Raises ``UnsupportedMegatronLM`` (patching nothing) on an unchecked version, unless
    ``FMOE_MEGATRON_UNCHECKED=1``, and on any missing target."""
    if _APPLIED:
        return []
    version = megatron_lm_version()
    training_spec = importlib.util.find_spec(_TRAINING)
    if training_spec is not None and training_spec.origin and \
            "fastmoe_megatron" in Path(training_spec.origin).read_text(errors="replace"):
        raise UnsupportedMegatronLM(
            f"fastmoe_megatron: {training_spec.origin} already carries the fastmoe_megatron source "
            "patch: run the checkout's script directly (python/torchrun pretrain_gpt.py --fmoefy "
            "...), not through fastmoe_megatron.launch, which would apply the hooks twice")
    unchecked = [p.target for p in _PATCHES if version not in p.checked]
    if unchecked and not _unchecked_ok():
        raise UnsupportedMegatronLM(
            f"fastmoe_megatron: Megatron-LM {version} (megatron-core {version}) is not a version "
            f"the --fmoefy patches were checked against ({', '.join(CHECKED_VERSIONS)}, i.e. git "
            f"tag core_v{CHECKED_VERSIONS[-1]}); nothing was patched. Check out a checked tag, or "
            f"set {UNCHECKED_ENV}=1 to try anyway (every target is still looked up first).")
    resolved = []
    for patch in _PATCHES:
        try:
            owner, attr, original = patch.resolve()
            replacement = patch.make(original)
        except (ImportError, AttributeError) as exc:
            raise UnsupportedMegatronLM(
                f"fastmoe_megatron: cannot patch {patch.target} in Megatron-LM {version}: {exc}; "
                "nothing was patched") from exc
        resolved.append((patch, owner, attr, original, replacement))
    for patch, owner, attr, original, replacement in resolved:
        try:
            setattr(replacement, _MARK, patch.target)
        except (AttributeError, TypeError):
            pass
        sites = [(owner, attr)] + [s for s in _aliases(original) if s != (owner, attr)]
        for module, name in sites:
            setattr(module, name, replacement)
        _APPLIED[patch.target] = [(module, name, original) for module, name in sites]
    if unchecked:
        warnings.warn(f"fastmoe_megatron: {UNCHECKED_ENV}=1: patched Megatron-LM {version}, "
                      f"checked only against {', '.join(CHECKED_VERSIONS)}: {', '.join(unchecked)}",
                      RuntimeWarning, stacklevel=2)
    return [p.target for p, *_ in resolved]


def remove() -> None:
    """Undoes ``apply()`` in this process (for tests)."""
    while _APPLIED:
        _target, sites = _APPLIED.popitem()
        for module, name, original in sites:
            setattr(module, name, original)
