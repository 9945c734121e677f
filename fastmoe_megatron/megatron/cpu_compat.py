"""Run megatron-core on a machine without CUDA: CPU tensors, gloo process groups.

megatron-core 0.16.1 assumes a GPU in a few places even when every tensor is on the CPU
(``use_cpu_initialization=True``): the RNG tracker reads and writes the CUDA generator; some
buffers, scalars and collective outputs are allocated on ``torch.cuda.current_device()`` or with
``device='cuda'``; a few code paths create CUDA streams or call ``torch.cuda.synchronize()``;
``torch_norm`` refuses sequence parallel; the MoE alltoall dispatcher keeps split sizes as tensors;
and without Apex/Transformer Engine the distributed optimizer cannot checkpoint torch Adam's step
correctly. ``apply()`` replaces exactly the functions involved, one patch per Megatron function.

Three kinds of patch:

* ``_runs_on_cpu``: the original runs unchanged inside ``cuda_means_cpu()``, a scope in which a
  tensor asked for on CUDA is made on the CPU, ``torch.cuda.current_device()`` answers ``'cpu'``,
  ``torch.cuda.synchronize()`` does nothing and ``t.type()`` names the CUDA tensor type (for
  ``param.type() == 'torch.cuda.FloatTensor'`` checks). For functions whose only CUDA dependence is
  where they allocate. The pipeline schedules are among them, so a whole training step (model,
  ``forward_step_func``, loss) runs in that scope.
* ``_replaces``: a CPU rewrite (the RNG tracker, the dispatcher's host copy of split sizes).
* ``_wraps``: a wrapper around the original that fixes its inputs or outputs.

Rules:

* ``apply()`` does nothing when ``torch.cuda.is_available()`` (GPU code paths stay as they are)
  and nothing the second time (idempotent).
* Every patch names its target (``module:function`` / ``module:Class.method``), why it is needed
  and the megatron-core versions it was checked against: ``describe()`` lists them. On any other
  version ``apply()`` raises ``UnsupportedMegatronVersion`` before touching anything, unless the
  environment sets ``FMOE_MEGATRON_UNCHECKED=1``; then it applies them and warns.
* All targets are looked up before the first one is replaced: a missing target raises and leaves
  megatron-core unpatched (never a half-patched library).
* ``remove()`` puts the originals back (for tests). Each replacement carries the attribute
  ``__fmoe_cpu_compat__`` (its target).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import os
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch

from . import te_compat

__all__ = [
    "CHECKED_VERSIONS",
    "UNCHECKED_ENV",
    "UnsupportedMegatronVersion",
    "apply",
    "cuda_means_cpu",
    "describe",
    "is_applied",
    "remove",
    "unchecked_ok",
]

#: megatron-core versions every patch below was checked against (a patch may list fewer).
CHECKED_VERSIONS: Tuple[str, ...] = ("0.16.1",)

#: Set to ``1`` to apply the patches on a megatron-core version they were not checked against.
UNCHECKED_ENV = "FMOE_MEGATRON_UNCHECKED"


def unchecked_ok() -> bool:
    """Whether ``FMOE_MEGATRON_UNCHECKED=1``: then every version check of the Megatron integration
    (these patches, ``fmoefy``, the Megatron-LM launcher's patches) warns instead of raising."""
    return os.environ.get(UNCHECKED_ENV, "") == "1"

_MARK = "__fmoe_cpu_compat__"


class UnsupportedMegatronVersion(RuntimeError):
    """megatron-core is a version the CPU patches were not checked against."""


@dataclasses.dataclass(frozen=True)
class _Patch:
    target: str  # "module:function" or "module:Class.method"
    make: Callable[[Any], Any]  # original -> replacement
    why: str
    checked: Tuple[str, ...]
    # Modules that bound the same function object by name (``from .x import f``): patched too.
    aliases: Tuple[str, ...] = ()
    # The target is a module global that megatron-core reads but (in some set-ups) never defines:
    # the patch defines it when it is absent and does nothing when it is there.
    define_if_missing: bool = False

    def resolve(self) -> List[Tuple[Any, str, Any]]:
        """Return ``[(owner, attribute name, current value)]`` for the target and its aliases;
        raise if the target is missing or an alias is bound to something else."""
        module_name, _, path = self.target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        if self.define_if_missing:
            return [] if attr in vars(owner) else [(owner, attr, _ABSENT)]
        if attr not in vars(owner):
            raise AttributeError(f"{attr!r} not found on {owner!r}")
        original = vars(owner)[attr]
        sites = [(owner, attr, original)]
        for alias in self.aliases:
            module = importlib.import_module(alias)
            if vars(module).get(attr) is not original:
                raise AttributeError(f"{alias}.{attr} is not {self.target}")
            sites.append((module, attr, original))
        return sites


_ABSENT = object()  # "original" of a define_if_missing target
_PATCHES: List[_Patch] = []
# target -> [(owner, attribute, original value)], filled by apply(), emptied by remove()
_APPLIED: Dict[str, List[Tuple[Any, str, Any]]] = {}


def _replaces(target: str, why: str, checked: Tuple[str, ...] = CHECKED_VERSIONS,
              aliases: Tuple[str, ...] = ()):
    """Register the decorated function as the CPU version of ``target`` (a rewrite)."""

    def register(fn):
        _PATCHES.append(_Patch(target, lambda original: fn, why, checked, aliases))
        return fn

    return register


def _wraps(target: str, why: str, checked: Tuple[str, ...] = CHECKED_VERSIONS,
           aliases: Tuple[str, ...] = ()):
    """Register the decorated ``make(original) -> replacement`` for ``target`` (a wrapper that
    calls the original)."""

    def register(make):
        _PATCHES.append(_Patch(target, make, why, checked, aliases))
        return make

    return register


def _runs_on_cpu(target: str, why: str, checked: Tuple[str, ...] = CHECKED_VERSIONS,
                 aliases: Tuple[str, ...] = ()) -> None:
    """Register a patch that runs the original ``target`` unchanged inside ``cuda_means_cpu()``.

    For functions whose only CUDA dependence is where they allocate or synchronise.
    """

    def make(original):
        kind = type(original) if isinstance(original, (staticmethod, classmethod)) else None
        fn = original.__func__ if kind else original

        @functools.wraps(fn)
        def on_cpu(*args, **kwargs):
            with cuda_means_cpu():
                return fn(*args, **kwargs)

        return kind(on_cpu) if kind else on_cpu

    _PATCHES.append(_Patch(target, make, why, checked, aliases))


# ---------------------------------------------------------------------------------------------
# cuda_means_cpu(): the scope the _runs_on_cpu patches run their original in.
# ---------------------------------------------------------------------------------------------


def _names_cuda(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Turn ``device='cuda'`` (or ``cuda:N``, an index) into the CPU, ``t.cuda()`` into ``t``,
    and make ``t.type()`` name the CUDA tensor type of ``t`` (for type-string checks)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # `param.type() == 'torch.cuda.FloatTensor'` checks: report the CUDA twin.
            name = func(*args)
            if name.startswith("torch.cuda."):
                return name
            return name.replace("torch.", "torch.cuda.", 1)
        if _names_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_SCOPE_DEPTH = 0  # how deep cuda_means_cpu() scopes are nested (main thread)


def _cpu_device() -> str:
    return "cpu"


def _no_sync(device: Any = None) -> None:
    return None


@contextlib.contextmanager
def cuda_means_cpu():
    """Inside: tensors asked for on CUDA are made on the CPU (``device='cuda'``, ``cuda:N``, an
    index, ``t.cuda()``, ``t.to('cuda')``), ``torch.cuda.current_device()`` is ``'cpu'``,
    ``torch.cuda.synchronize()`` does nothing, and ``t.type()`` names the CUDA tensor type.

    The patches use it; code of one's own that calls megatron-core outside the patched functions
    (say a batch moved with ``.cuda()`` outside ``forward_step_func``) can use it too. Not
    thread-safe: it swaps two ``torch.cuda`` attributes for its duration (megatron-core calls the
    patched functions from the main thread)."""
    global _SCOPE_DEPTH
    if _SCOPE_DEPTH:  # re-entered (a patched function calling another): one scope is enough
        _SCOPE_DEPTH += 1
        try:
            yield
        finally:
            _SCOPE_DEPTH -= 1
        return
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device, torch.cuda.synchronize = _cpu_device, _no_sync
    _SCOPE_DEPTH = 1
    try:
        with _CudaToCpuMode():
            yield
    finally:
        _SCOPE_DEPTH = 0
        torch.cuda.current_device, torch.cuda.synchronize = saved


def _mark(replacement: Any, target: str) -> None:
    inner = replacement
    if isinstance(replacement, (staticmethod, classmethod)):
        inner = replacement.__func__
    try:
        setattr(inner, _MARK, target)
    except (AttributeError, TypeError):  # None, or an object without a __dict__
        pass


def _megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


# ---------------------------------------------------------------------------------------------
# tensor_parallel/random.py: the RNG tracker keeps CUDA generator states. On the CPU it keeps
# states of the default CPU generator instead: "forking" swaps the CPU generator state in and out.
# ---------------------------------------------------------------------------------------------

_RANDOM = "megatron.core.tensor_parallel.random"


@_replaces(f"{_RANDOM}:_get_cuda_rng_state",
           "reads torch.cuda's generator (initialises CUDA: no driver); activation recomputation "
           "(CheckpointFunction) saves and restores RNG states through it")
def _get_rng_state_cpu(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()  # a fresh tensor already, so `clone` needs nothing


@_replaces(f"{_RANDOM}:_set_cuda_rng_state",
           "writes torch.cuda's generator through torch.cuda._lazy_call, which on a CPU never runs "
           "and keeps every call queued (a leak per recomputed layer); sets the CPU generator")
def _set_rng_state_cpu(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


@_replaces(f"{_RANDOM}:CudaRNGStatesTracker.add",
           "reads torch.cuda.get_rng_state() to make a named state "
           "(model_parallel_cuda_manual_seed fails); a private CPU generator makes it")
def _tracker_add_cpu(self, name, seed):
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self.seeds_.add(seed)
    # A private generator makes the state without disturbing the default one.
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


@_replaces(f"{_RANDOM}:CudaRNGStatesTracker.fork",
           "swaps CUDA states; with the CPU generator standing in, the original also warns "
           "'CPU RNG state changed within GPU RNG context' on every random op inside the fork")
@contextlib.contextmanager
def _tracker_fork_cpu(self, name="model-parallel-rng"):
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    outer_name = self._current_state_name
    outer_state = torch.get_rng_state()
    if outer_name != "default-rng":
        self.states_[outer_name] = outer_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"rng state {self._current_state_name} is current, expected {name}")
        self.states_[name] = torch.get_rng_state()
        if outer_name != "default-rng":
            outer_state = self.states_[outer_name]
        torch.set_rng_state(outer_state)
        self._current_state_name = outer_name


# ---------------------------------------------------------------------------------------------
# transformer/torch_norm.py: without Transformer Engine or Apex the local spec's norms are torch
# norms, and WrappedTorchNorm refuses sequence parallel outright. Under sequence parallel each
# tensor-parallel rank normalises its own slice of the sequence with the same (replicated) weights;
# megatron-core's finalize_model_grads all-reduces the gradients of parameters marked
# `sequence_parallel = True` over the tensor-parallel group, which is all these norms need.
# ---------------------------------------------------------------------------------------------


@_wraps("megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__",
        "asserts `not config.sequence_parallel`; we build the norm as without sequence "
        "parallel and mark its parameters `sequence_parallel = True`")
def _torch_norm_with_sp(original):
    build = original.__func__ if isinstance(original, staticmethod) else original

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return build(cls, config, *args, **kwargs)
        config_without_sp = copy.copy(config)
        config_without_sp.sequence_parallel = False
        norm = build(cls, config_without_sp, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(__new__)


# ---------------------------------------------------------------------------------------------
# transformer/moe: megatron-core's own MoE layer.
# ---------------------------------------------------------------------------------------------

_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher"


class _NoStream:
    """Stands in for the alltoall dispatcher's device-to-host CUDA stream: there is none on a
    CPU, and the only code that used it (_maybe_dtoh_and_synchronize) is replaced below."""

    def __repr__(self) -> str:
        return "<cpu_compat: no CUDA stream>"


@_wraps(f"{_DISPATCHER}.cuda_dtoh_stream",
        "a class attribute that __init__ fills with torch.cuda.Stream() when it is None; a "
        "placeholder keeps __init__ from creating a CUDA stream")
def _no_dtoh_stream(original):
    return _NoStream()


@_replaces(f"{_DISPATCHER}._maybe_dtoh_and_synchronize",
           "copies the split sizes to the host on a side CUDA stream, turning them into numpy "
           "arrays; on a CPU they are not CUDA tensors, stay tensors, and all_to_all_single "
           "rejects tensors as split sizes. Here they become numpy arrays; nothing to wait for")
def _dispatcher_split_sizes_to_host(self, point, tokens_per_expert=None):
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            sizes = getattr(self, name)
            if torch.is_tensor(sizes):
                setattr(self, name, sizes.numpy())
    return tokens_per_expert


_ROUTER = "megatron.core.transformer.moe.router"
_runs_on_cpu(
    f"{_ROUTER}:Router.gating",
    "moves router weights that sit on the CPU (use_cpu_initialization) to "
    "torch.cuda.current_device() on every call",
)
_runs_on_cpu(
    f"{_ROUTER}:TopKRouter.__init__",
    "allocates the expert-bias and global-aux-loss buffers on torch.cuda.current_device()",
)
_runs_on_cpu(
    "megatron.core.transformer.moe.moe_utils:track_moe_metrics",
    "allocates the per-layer aux-loss tracker with device='cuda' (force_initialize=True)",
)
_PATCHES.append(_Patch(
    f"{te_compat.ROUTER_MODULE}:{te_compat.ROUTER_NAME}",  # the name te_compat binds on GPUs
    lambda original: None,
    "read by RouterGatingLinearFunction (`if te_general_gemm is not None`) but only defined when "
    "Transformer Engine imports: a NameError in the router without TE; defined as None",
    CHECKED_VERSIONS,
    define_if_missing=True,
))


# ---------------------------------------------------------------------------------------------
# tensor_parallel/mappings.py: the gather along the first (sequence / token) dim. Besides
# allocating on torch.cuda.current_device(), its uneven variant (output_split_sizes: the MoE token
# exchange over expert-tensor-parallel ranks, e.g. TP=2 x EP=2) calls all_gather with tensors of
# different sizes, which gloo rejects ("ProcessGroupGloo::allgather: invalid tensor size"). The
# even case runs the original; the uneven case pads every piece to the largest and gathers.
# ---------------------------------------------------------------------------------------------

_MAPPINGS = "megatron.core.tensor_parallel.mappings"


@_wraps(f"{_MAPPINGS}:_gather_along_first_dim",
        "allocates on torch.cuda.current_device(); with output_split_sizes it all-gathers "
        "uneven tensors, which gloo rejects")
def _gather_along_first_dim_cpu(original):
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            with cuda_means_cpu():
                return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        rest = tuple(input_.shape[1:])
        padded = input_.new_zeros((longest, *rest))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((group.size() * longest, *rest))
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        pieces = [gathered[r * longest: r * longest + n] for r, n in enumerate(sizes)]
        return torch.cat(pieces, dim=0)

    return gather


_runs_on_cpu(
    f"{_MAPPINGS}:_reduce_scatter_along_first_dim",
    "allocates its output on torch.cuda.current_device() (its uneven variant is fine: gloo's "
    "reduce_scatter takes pieces of different sizes)",
)


# ---------------------------------------------------------------------------------------------
# models/common/language_module: with pipeline parallel and tied embeddings, the first and last
# stages move the word embedding (and the output layer's copy) to CUDA before all-reducing it over
# the embedding group. transformer/utils.py: the causal mask is made on CUDA when the caller gives
# none.
# ---------------------------------------------------------------------------------------------

_runs_on_cpu(
    "megatron.core.models.common.language_module.language_module:"
    "LanguageModule.setup_embeddings_and_output_layer",
    "calls weight.data.cuda() on the shared word embedding before the embedding-group all-reduce "
    "(pipeline parallel with tied embeddings)",
)

_runs_on_cpu(
    "megatron.core.transformer.utils:get_default_causal_mask",
    "builds the default causal mask with device='cuda' (a model called without an attention mask)",
)


# ---------------------------------------------------------------------------------------------
# optimizer/distrib_optimizer.py without Apex or Transformer Engine (always the case on a CPU;
# te_compat.apply() installs the same two fixes for GPU runs, with the same helpers):
# megatron-core falls back to torch.optim.Adam, whose per-parameter state only exists after the
# first step. DistributedOptimizer.state_dict() reads the iteration from that state and asserts
# there is exactly one value, so it fails on an optimizer that has not stepped yet, which is
# exactly the state one loads a checkpoint into (sharded_state_dict(is_loading=True) calls it).
# ---------------------------------------------------------------------------------------------


_wraps("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.state_dict",
       "asserts one 'step' value in torch Adam's per-parameter state, which is empty before "
       "the first step (resuming from a checkpoint); we first give every parameter the state "
       "a fresh Adam would create (step 0, zero moments), which changes no later update",
       )(te_compat.seeding_state_dict)


@_wraps("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
        "(a) allocates placeholder state on torch.cuda.current_device() when the optimizer has "
        "not stepped yet; (b) without Apex/TE it restores torch Adam's 'step' wrongly: one "
        "tensor shared by every parameter (Adam then adds 1 per parameter per step), later "
        "overwritten by the loading template's own step (dp_reshardable keeps 'step' "
        "non-persistent). Runs in cuda_means_cpu(), then gives each parameter its own step "
        "tensor holding the iteration saved in the param groups")
def _distrib_load_state_dict_cpu(original):
    def on_cpu(self, state_dict, *args, **kwargs):
        with cuda_means_cpu():
            return original(self, state_dict, *args, **kwargs)

    return te_compat.restoring_load_state_dict(on_cpu)


# ---------------------------------------------------------------------------------------------
# Functions that only allocate (or synchronise) on the GPU: run unchanged in cuda_means_cpu().
# ---------------------------------------------------------------------------------------------

_runs_on_cpu(
    "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__",
    "allocates the contiguous param and grad buffers on torch.cuda.current_device()",
)
_runs_on_cpu(
    "megatron.core.utils:GlobalMemoryBuffer.get_tensor",
    "allocates the shared scratch buffer (sequence-parallel all-gather) on "
    "torch.cuda.current_device()",
)
_runs_on_cpu(
    f"{_MAPPINGS}:_gather_along_last_dim",
    "allocates its output on torch.cuda.current_device() (gather of tensor-parallel outputs)",
)
_runs_on_cpu(
    f"{_MAPPINGS}:_AllToAll.forward",
    "allocates the all-to-all output on torch.cuda.current_device() (MoE alltoall dispatcher)",
)
_runs_on_cpu(
    "megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication.backward",
    "allocates the sequence-parallel reduce-scatter output on torch.cuda.current_device()",
)
_runs_on_cpu(
    "megatron.core.tensor_parallel.data:broadcast_data",
    "moves the batch to CUDA (.cuda(), device='cuda') before broadcasting it over tensor parallel",
    aliases=("megatron.core.tensor_parallel",),
)
_runs_on_cpu(
    "megatron.core.optimizer.optimizer:FP32Optimizer.__init__",
    "allocates its loss scale with device='cuda'",
)
_runs_on_cpu(
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
    "its base (MixedPrecisionOptimizer) allocates found_inf and friends with device='cuda'; "
    "it checks param.type() against 'torch.cuda.*Tensor'",
)
_runs_on_cpu(
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
    "bf16/fp16 without the distributed optimizer: same as DistributedOptimizer.__init__",
)
_runs_on_cpu(
    "megatron.core.dist_checkpointing.strategies.filesystem_async:"
    "FileSystemWriterAsync.preload_tensors",
    "copies tensors to the host with non_blocking=True, then torch.cuda.synchronize()",
)
_runs_on_cpu(
    "megatron.core.dist_checkpointing.strategies.state_dict_saver:save_state_dict_async_finalize",
    "all-reduces the write-failure flag in a tensor on torch.cuda.current_device()",
    aliases=("megatron.core.dist_checkpointing.strategies.torch",),
)
_CLIP_GRADS = "megatron.core.optimizer.clip_grads"
_OPTIMIZER_USERS = (  # they import the clip_grads functions by name
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.layer_wise_optimizer",
)
_runs_on_cpu(
    f"{_CLIP_GRADS}:get_grad_norm_fp32",
    "reduces the norm in a device='cuda' tensor",
    aliases=_OPTIMIZER_USERS,
)
_runs_on_cpu(
    f"{_CLIP_GRADS}:clip_grad_by_total_norm_fp32",
    "asserts grad.type() == 'torch.cuda.FloatTensor' and allocates with device='cuda'",
    aliases=_OPTIMIZER_USERS[:1],
)
_runs_on_cpu(
    f"{_CLIP_GRADS}:count_zeros_fp32",
    "counts in a device='cuda' tensor (OptimizerConfig.log_num_zeros_in_grad)",
    aliases=_OPTIMIZER_USERS,
)


_SCHEDULES = "megatron.core.pipeline_parallel.schedules"
for _schedule in (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
):
    _runs_on_cpu(
        f"{_SCHEDULES}:{_schedule}",
        "counts tokens in a device='cuda' tensor (the model and the user's forward_step_func "
        "then also run inside cuda_means_cpu())",
    )


# ---------------------------------------------------------------------------------------------
# apply / remove
# ---------------------------------------------------------------------------------------------


def is_applied() -> bool:
    """True when the patches are in place in this process."""
    return bool(_APPLIED)


def describe() -> List[Dict[str, Any]]:
    """One dict per patch: ``target``, ``why``, ``checked`` (versions)."""
    return [{"target": p.target, "why": p.why, "checked": p.checked} for p in _PATCHES]


def apply(force: bool = False) -> List[str]:
    """Install the CPU patches; return the targets patched now (empty when nothing was done).

    Does nothing when CUDA is available (unless ``force``, meant for tests) or when the patches are
    already in place. Raises ``UnsupportedMegatronVersion`` on a megatron-core version the
    patches were not checked against, unless ``FMOE_MEGATRON_UNCHECKED=1``.
    """
    if _APPLIED:
        return []
    if not force and torch.cuda.is_available():
        return []
    version = _megatron_version()
    unchecked = [p for p in _PATCHES if version not in p.checked]
    override = unchecked_ok()
    if unchecked and not override:
        raise UnsupportedMegatronVersion(
            f"fastmoe_megatron.megatron.cpu_compat: megatron-core {version} is not a version the "
            f"CPU patches were checked against ({', '.join(CHECKED_VERSIONS)}); no patch was "
            f"applied. Install a checked version, or set {UNCHECKED_ENV}=1 to apply them anyway "
            f"(each target is still looked up, and a missing one raises)."
        )
    # Resolve everything first: a missing target leaves megatron-core untouched.
    resolved = []
    for patch in _PATCHES:
        try:
            sites = patch.resolve()
        except (ImportError, AttributeError) as exc:
            raise UnsupportedMegatronVersion(
                f"cpu_compat: cannot patch {patch.target} on megatron-core {version}: {exc}; "
                "no patch was applied."
            ) from exc
        if sites:
            resolved.append((patch, sites))
    for patch, sites in resolved:
        replacement = patch.make(sites[0][2])
        _mark(replacement, patch.target)
        for owner, attr, _original in sites:
            setattr(owner, attr, replacement)
        _APPLIED[patch.target] = sites
    applied_unchecked = [p.target for p, _sites in resolved if version not in p.checked]
    if applied_unchecked:
        warnings.warn(
            f"cpu_compat: {UNCHECKED_ENV}=1: applied {len(applied_unchecked)} CPU patches to "
            f"megatron-core {version}, checked only against {', '.join(CHECKED_VERSIONS)}: "
            + ", ".join(applied_unchecked),
            RuntimeWarning,
            stacklevel=2,
        )
    return [p.target for p, _sites in resolved]


def remove() -> None:
    """Undo ``apply()`` in this process."""
    while _APPLIED:
        _target, sites = _APPLIED.popitem()
        for owner, attr, original in sites:
            if original is _ABSENT:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
