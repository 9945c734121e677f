"""Workers for test_megatron_lm: a Megatron-LM checkout's own pretrain_gpt.py path on CPU/gloo.

Each worker puts the checkout first on ``sys.path`` (so ``megatron`` is the checkout's), applies
``cpu_compat`` and the launcher's runtime patches (``megatron_lm.apply()``), and then runs, with
``sys.argv`` set to pretrain_gpt.py flags, what ``pretrain()`` runs, with the checkout's code:

* ``initialize_megatron(allow_no_cuda=True, skip_mpu_initialization=True)``: the checkout's
  ``parse_args`` (with our flags), ``validate_args``, ``set_global_variables`` (NullTokenizer,
  microbatch calculator, timers) and the rerun state machine.
* **bypassed**: the CUDA assertion of ``initialize_megatron`` (``allow_no_cuda``) and its
  ``finish_mpu_init`` / ``_initialize_distributed``: on a machine without CUDA devices
  (``torch.cuda.device_count() == 0``) it skips ``initialize_model_parallel`` altogether and
  ``_set_random_seed`` skips the model-parallel RNG tracker. Here ``torch.distributed`` is already
  a gloo group (tests/dist_utils.py), and we call ``initialize_model_parallel`` with the sizes from
  the parsed args (as ``_initialize_distributed`` passes them) and
  ``model_parallel_cuda_manual_seed`` (CPU tracker from cpu_compat). Also skipped: ``_compile_dependencies`` (it compiles the dataset
  index helpers with ``make`` into the checkout and loads fused CUDA kernels).
* ``setup_model_and_optimizer(partial(model_provider, gpt_builder), ModelType.encoder_or_decoder)``:
  the script's provider, the checkout's ``get_model`` (patched: fmoefy before DDP),
  ``get_megatron_optimizer`` and the LR scheduler.
* ``train_step(pretrain_gpt.forward_step, ...)``: the checkout's training step (patched: balance
  loss scale, expert-bias update, "balance loss" in the loss dict) with the script's own
  ``forward_step`` / ``get_batch`` / ``loss_func``, megatron-core's schedule, DDP, optimizer and
  gradient clipping. The batches come from a small iterator of ours with the dataset's keys
  (GPTDataset's index builder is the C++ helper we do not compile), wrapped in
  ``RerunDataIterator`` as Megatron-LM does; ``--rerun-mode disabled`` (the rerun state machine
  saves ``torch.cuda.get_rng_state()`` every step otherwise).
* megatron.training's own CUDA calls (which cpu_compat, a megatron-core layer, does not cover)
  go through ``_cpu_training_shim()`` during initialisation, setup and each step:
  ``torch.cuda.current_device()`` (get_model's ``module.cuda(...)``, train_step's
  ``logical_and_across_model_parallel_group`` / ``reduce_max_stat_across_model_parallel_group``),
  CUDA streams (get_model builds DDP on a side stream) and ``get_device_arch_version()``
  (validate_args with TP or CP > 1).

The legacy model runs with ``--normalization RMSNorm``: its LayerNorm is Apex's
``fused_layer_norm_cuda``, not installable here.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

TINY = [
    "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
    "--num-attention-heads", "4", "--seq-length", "16", "--max-position-embeddings", "16",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-2", "--train-iters", "4",
    "--clip-grad", "1.0",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
    "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
    "--no-bias-dropout-fusion", "--no-bias-gelu-fusion", "--no-masked-softmax-fusion",
    "--no-persist-layer-norm", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--distributed-backend", "gloo", "--seed", "1234", "--num-workers", "0",
    "--no-load-optim", "--no-load-rng", "--rerun-mode", "disabled",
]
CORE = ["--transformer-impl", "local"]
# Legacy GPT: LayerNorm is apex's fused_layer_norm_cuda (not installable here): RMSNorm is torch.
LEGACY = ["--use-legacy-models", "--ckpt-format", "torch", "--normalization", "RMSNorm",
          "--transformer-impl", "local"]
FMOE = ["--fmoefy", "--fmoe-num-experts", "4", "--fmoe-top-k", "2",
        "--balance-strategy", "gshard", "--balance-loss-weight", "0.01"]


def _enter_checkout(checkout: str):
    sys.path.insert(0, checkout)
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    # A wheel's megatron.core must not be the one imported: the checkout's megatron comes first.
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        del sys.modules[name]


_PARSED = ("fmoefy", "fmoe_num_experts", "fmoe_top_k", "top_k", "balance_strategy",
           "balance_loss_weight", "hidden_hidden_size", "fmoe_capacity_factor",
           "fmoe_z_loss_weight", "fmoe_expert_bias_update_rate")
_VALIDATED = ("expert_model_parallel_size", "expert_tensor_parallel_size", "num_experts",
              "moe_ffn_hidden_size", "data_parallel_size")


def parse_cases(rank, world_size, checkout, cases, world_size_env):
    """The checkout's parse_args + validate_args (patched) on each ``argv`` of ``cases``, as a
    job of ``world_size_env`` processes would see them; plus "sampling-top_k": a script whose
    extra_args_provider adds the sampling ``--top_k`` (as tools/run_text_generation_server.py
    does). Returns {case: {"parsed": ..., "validated": ..., "error": ...}}."""
    _enter_checkout(checkout)
    os.environ["WORLD_SIZE"] = str(world_size_env)
    from fastmoe_megatron.megatron import megatron_lm

    megatron_lm.apply()
    from megatron.training.arguments import parse_args, validate_args

    def sampling_args(parser):
        parser.add_argument_group("text generation").add_argument("--top_k", type=int, default=1)
        return parser

    cases = dict(cases)
    cases["sampling-top_k"] = TINY + CORE + FMOE + ["--top_k", "7"]
    results = {}
    for name, argv in cases.items():
        sys.argv = ["pretrain_gpt.py", *argv]
        args = parse_args(sampling_args if name == "sampling-top_k" else None)
        out = {"parsed": {k: getattr(args, k, "<absent>") for k in _PARSED}}
        try:
            with _cpu_training_shim():
                validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
        except (AssertionError, ValueError) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["validated"] = {k: getattr(args, k, "<absent>") for k in _VALIDATED}
        results[name] = out
    return results


def version_gate(rank, world_size, checkout):
    """apply() on an unchecked version (refused, nothing patched; applied with the override) and
    with a megatron.core that is not the checkout's (refused)."""
    import warnings

    _enter_checkout(checkout)
    from fastmoe_megatron.megatron import megatron_lm

    os.environ.pop(megatron_lm.UNCHECKED_ENV, None)
    import megatron.training.training as training

    out = {}
    original_get_model = training.get_model
    real_version = megatron_lm.megatron_lm_version
    megatron_lm.megatron_lm_version = lambda: "0.99.0"
    try:
        megatron_lm.apply()
    except megatron_lm.UnsupportedMegatronLM as exc:
        out["unchecked"] = str(exc)
    out["unchecked_applied"] = megatron_lm.is_applied()
    out["get_model_untouched"] = training.get_model is original_get_model
    os.environ[megatron_lm.UNCHECKED_ENV] = "1"
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        megatron_lm.apply()
    out["override_applied"] = (megatron_lm.is_applied()
                               and training.get_model is not original_get_model)
    megatron_lm.remove()
    del os.environ[megatron_lm.UNCHECKED_ENV]
    megatron_lm.megatron_lm_version = real_version
    from megatron.core import package_info

    package_info.__version__ = "0.99.0"
    try:
        megatron_lm.apply()
    except megatron_lm.UnsupportedMegatronLM as exc:
        out["mixed"] = str(exc)
    return out


class _NoStream:
    """Stands in for a CUDA stream on a machine without CUDA (test-only)."""

    def wait_stream(self, other):
        return None

    def synchronize(self):
        return None


@contextlib.contextmanager
def _cpu_training_shim():
    """Test-only: what megatron.training (not megatron-core, which cpu_compat covers) needs to
    run on a CPU: ``torch.cuda.current_device()`` answers ``'cpu'`` (get_model's
    ``module.cuda(current_device())``, ``logical_and_across_model_parallel_group`` and
    ``reduce_max_stat_across_model_parallel_group`` in train_step), ``Module.cuda`` keeps the
    module where it is, CUDA streams are no-op stand-ins (get_model builds DDP on a side
    stream), and ``validate_args`` (with TP or CP > 1) reads the GPU architecture as Hopper (9;
    the worker sets CUDA_DEVICE_MAX_CONNECTIONS=1, as Megatron-LM's launch scripts do).
    Deliberately not ``cpu_compat.cuda_means_cpu()``: the cpu_compat patches enter that
    scope themselves, and nested, it names a float tensor ``torch.cuda.cuda.FloatTensor``."""
    import torch
    from megatron.training import arguments

    saved = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.current_stream,
             torch.cuda.stream, torch.nn.Module.cuda)
    saved_arch = arguments.get_device_arch_version
    arguments.get_device_arch_version = lambda: 9
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = lambda *a, **k: _NoStream()
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.nn.Module.cuda = lambda self, device=None: self
    try:
        yield
    finally:
        (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.current_stream,
         torch.cuda.stream, torch.nn.Module.cuda) = saved
        arguments.get_device_arch_version = saved_arch


def _initialize(checkout, argv, runtime_patches=True):
    """initialize_megatron's CPU-safe part, then model parallel and seeds ourselves.
    ``runtime_patches=False``: a checkout carrying patches/megatron-lm-core_v0.16.1.patch."""
    _enter_checkout(checkout)
    import torch

    from fastmoe_megatron.megatron import cpu_compat, megatron_lm

    cpu_compat.apply()
    if runtime_patches:
        megatron_lm.apply()
    sys.argv = ["pretrain_gpt.py", *argv]
    import pretrain_gpt  # the checkout's script (its __main__ block does not run)
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.training import get_args
    from megatron.training.initialize import _set_random_seed, initialize_megatron

    with _cpu_training_shim():
        initialize_megatron(extra_args_provider=None,
                            args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
                            allow_no_cuda=True, skip_mpu_initialization=True)
    args = get_args()
    assert args.world_size == torch.distributed.get_world_size()
    mpu.initialize_model_parallel(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
        create_gloo_process_groups=getattr(args, "enable_gloo_process_groups", True),
    )
    _set_random_seed(args.seed, args.data_parallel_random_init)
    tensor_parallel.model_parallel_cuda_manual_seed(
        args.seed + 100 * mpu.get_pipeline_model_parallel_rank())
    return args, pretrain_gpt


def _batches(args, dp_rank: int):
    """Endless micro-batches with GPTDataset's keys: a learnable pattern (next = token + 1)."""
    import torch

    g = torch.Generator().manual_seed(1000 + dp_rank)
    s, b, v = args.seq_length, args.micro_batch_size, 50
    mask = torch.tril(torch.ones(s, s)).unsqueeze(0) < 0.5  # True = masked out, as Megatron's
    while True:
        start = torch.randint(0, v - s - 1, (b, 1), generator=g)
        seq = start + torch.arange(s + 1)
        yield {
            "tokens": seq[:, :-1].contiguous(),
            "labels": seq[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s),
            "attention_mask": mask.expand(b, 1, s, s).clone(),
            "position_ids": torch.arange(s).expand(b, s).clone(),
        }


def build_and_step(rank, world_size, checkout, argv, steps=2, runtime_patches=True):
    """Builds the model through the script's provider and the checkout's setup_model_and_optimizer,
    then runs ``steps`` train_step calls. Returns what the test checks.

    ``runtime_patches=False``: the checkout carries the source patch instead; its train-loop hooks
    sit in ``train()`` around ``train_step``, so here they are called around it the same way."""
    args, pretrain_gpt = _initialize(checkout, argv, runtime_patches)
    import torch
    from functools import partial

    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config
    from megatron.training import get_timers
    from megatron.training.training import setup_model_and_optimizer, train_step

    from fastmoe_megatron.megatron import layer as layer_mod
    from fastmoe_megatron.megatron import megatron_lm
    from fastmoe_megatron.megatron.fmoefy import moe_modules, transformer_layers
    from fastmoe_megatron.megatron.layer import MegatronMLP
    from gpt_builders import gpt_builder
    from model_provider import model_provider

    with _cpu_training_shim():
        model, optimizer, scheduler = setup_model_and_optimizer(
            partial(model_provider, gpt_builder), ModelType.encoder_or_decoder)

    out = {"args": {"ep": args.expert_model_parallel_size, "etp": args.expert_tensor_parallel_size,
                    "dp": args.data_parallel_size, "legacy": bool(args.use_legacy_models)}}
    chunk = model[0]
    out["ddp"] = isinstance(chunk, DistributedDataParallel)
    inner = chunk.module
    layers = transformer_layers(inner)
    out["family"] = "legacy" if hasattr(inner, "language_model") else "core"
    out["mlp_types"] = [type(layer.mlp).__name__ for layer in layers]
    out["mlp_is_megatron_mlp"] = all(isinstance(layer.mlp, MegatronMLP) for layer in layers)
    out["legacy_layer_class"] = type(layers[0]).__name__
    # The layer calls self.mlp(x) and takes (output, bias): MegatronMLP keeps that contract.
    x = torch.randn(args.seq_length // args.tensor_model_parallel_size
                    if args.sequence_parallel else args.seq_length, 2, args.hidden_size)
    with torch.no_grad():
        mlp_out = layers[0].mlp(x)
    out["mlp_contract"] = (isinstance(mlp_out, tuple) and len(mlp_out) == 2
                           and tuple(mlp_out[0].shape) == tuple(x.shape) and mlp_out[1] is None)
    moes = moe_modules(model)
    experts = [p for m in moes for p in m.moe.experts.parameters()]
    gates = [p for m in moes for p in m.moe.gate.parameters()]
    out["local_experts"] = [m.num_local_experts for m in moes]
    out["expert_shapes"] = {n: list(p.shape) for n, p in moes[0].moe.experts.named_parameters()}
    out["expert_tags"] = sorted({(getattr(p, "allreduce", True), getattr(p, "tensor_model_parallel",
                                                                          False)) for p in experts})
    out["gate_allreduce"] = sorted({getattr(p, "allreduce", True) for p in gates})
    in_expert_buffers = {id(p) for b in chunk.expert_parallel_buffers for p in b.params}
    in_dense_buffers = {id(p) for b in chunk.buffers for p in b.params}
    out["experts_in_expert_buffers"] = all(id(p) in in_expert_buffers for p in experts)
    out["experts_in_dense_buffers"] = any(id(p) in in_dense_buffers for p in experts)
    out["expert_buffer_params"] = len(in_expert_buffers)
    # The optimizer: one for dense params, one for expert params (allreduce=False).
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    groups = []
    for opt in chained:
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        groups.append(params)
    expert_ids = {id(p) for p in experts}
    out["optimizers"] = len(chained)
    out["expert_optimizer_holds_all_experts"] = any(expert_ids <= g for g in groups)
    out["experts_only_in_one_optimizer"] = sum(bool(expert_ids & g) for g in groups) == 1

    config = get_model_config(chunk)
    config.grad_scale_func = optimizer.scale_loss
    config.timers = get_timers()
    config.finalize_model_grads_func = finalize_model_grads
    out["config_ep"] = config.expert_model_parallel_size
    forward_backward_func = get_forward_backward_func()
    from megatron.core.rerun_state_machine import RerunDataIterator

    # As build_train_valid_test_data_iterators hands them to train().
    data = RerunDataIterator(_batches(args, mpu.get_data_parallel_rank()))
    before = [p.detach().clone() for p in experts]
    losses, norms, balance, scales = [], [], [], []
    for it in range(steps):
        if not runtime_patches:
            megatron_lm.before_train_step(config, args)
        with _cpu_training_shim():
            loss_dict, skipped, _, should_exit, _, grad_norm, _, _ = train_step(
                pretrain_gpt.forward_step, data, model, optimizer, scheduler, config,
                forward_backward_func, iteration=it)
        if not runtime_patches:
            megatron_lm.after_train_step(model, loss_dict, args)
        assert not should_exit and not skipped
        scales.append(layer_mod._BalanceLoss.scale)
        losses.append(float(loss_dict["lm loss"]))
        balance.append(float(loss_dict["balance loss"]) if "balance loss" in loss_dict else None)
        norms.append(float(grad_norm))
        if it == 0:
            # The norm clipping used: dense grads once (identical on every DP rank after the
            # all-reduce) plus every EP rank's experts once.
            dense_sq = sum(float(p.main_grad.float().pow(2).sum())
                           for p in chunk.module.parameters()
                           if id(p) not in expert_ids and p.requires_grad)
            expert_sq = torch.tensor(sum(float(p.main_grad.float().pow(2).sum()) for p in experts),
                                     dtype=torch.float64)
            ep_group = mpu.get_expert_model_parallel_group()
            torch.distributed.all_reduce(expert_sq, group=ep_group)
            out["manual_norm_step0"] = math.sqrt(dense_sq + float(expert_sq))
            out["expert_grad_sq"] = float(expert_sq)
    out["losses"], out["grad_norms"], out["balance"] = losses, norms, balance
    out["balance_scales"] = scales
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    out["num_microbatches"] = get_num_microbatches()
    out["experts_changed"] = any(not torch.equal(a, p.detach()) for a, p in zip(before, experts))
    # Experts differ between EP ranks (each holds its own slice of the global experts).
    first = experts[0].detach().reshape(-1)[:8].double()
    gathered = [torch.zeros_like(first) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, first)
    out["first_expert_rows"] = [g.tolist() for g in gathered]
    out["ep_rank"] = mpu.get_expert_model_parallel_rank()
    out["runtime_patched"] = megatron_lm.is_applied()
    import megatron.training.training as training_module

    out["training_module"] = training_module.__file__
    return out



def fused_pre_mlp_norm_is_kept(rank, world_size):
    """megatron-core's Transformer Engine spec fuses the pre-MLP norm into mlp.linear_fc1
    (layer_norm_weight / layer_norm_bias) with pre_mlp_layernorm an IdentityOp. Without TE here,
    layer 0 of a local-spec GPT is made to look like that; fmoefy must move the norm out (the
    TENorm builder is replaced by a torch LayerNorm) and leave layer 1's separate norm alone."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fastmoe_megatron.megatron import cpu_compat, fmoefy as fmoefy_mod

    cpu_compat.apply()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(7)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=64, use_cpu_initialization=True,
                            gradient_accumulation_fusion=False, bias_activation_fusion=False,
                            bias_dropout_fusion=False, masked_softmax_fusion=False)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=64, max_sequence_length=16)
    fused, separate = model.decoder.layers
    separate_norm = separate.pre_mlp_layernorm
    fused.pre_mlp_layernorm = IdentityOp()
    fc1 = fused.mlp.linear_fc1
    fc1.layer_norm_weight = torch.nn.Parameter(torch.full((32,), 2.0))
    fc1.layer_norm_bias = torch.nn.Parameter(torch.full((32,), 0.5))
    built = []

    def standalone_norm(config):
        built.append(config.hidden_size)
        return torch.nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

    fmoefy_mod._standalone_norm = standalone_norm
    fmoefy_mod.fmoefy(model, 4, top_k=2)
    norm = fused.pre_mlp_layernorm
    x = torch.randn(16, 2, 32)
    out, _ = fused.mlp(norm(x))
    return {
        "built": built,
        "norm": type(norm).__name__,
        "weight": sorted(set(norm.weight.tolist())),
        "bias": sorted(set(norm.bias.tolist())),
        "separate_untouched": separate.pre_mlp_layernorm is separate_norm,
        "mlps": [type(layer.mlp).__name__ for layer in model.decoder.layers],
        "out_shape": list(out.shape),
    }
