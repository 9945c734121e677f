"""megatron-core 0.16.1 on the CPU with gloo, through fastmoe_megatron.megatron.cpu_compat.

In-process tests check the patch mechanics (idempotent, version guard, all-or-nothing, remove).
The distributed tests spawn gloo workers (tests/dist_utils.py) that build a tiny GPTModel from
megatron-core's own parts (parallel_state, the local layer spec, DistributedDataParallel,
get_megatron_optimizer with Adam, the pipeline schedules), train it for 10 iterations on a fixed
synthetic batch and check that the loss goes down and that weights which must agree across ranks
do. Layouts: TP=2 with sequence parallel, PP=2 (bf16, activation recompute), PP=2 interleaved
(2 virtual stages), DP=2 with the distributed optimizer (plus a checkpoint resume), EP=2 with
megatron-core's own MoE (alltoall dispatcher), and (marked slow, 4 processes) TP=2 x EP=2 with
sequence parallel.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import tempfile

import pytest
import torch

try:
    importlib.import_module("megatron.core")
except ImportError as exc:  # not installed, or an install that does not import
    pytest.skip(f"megatron-core is not importable ({exc}); pip install -e .[megatron]",
                allow_module_level=True)

from fastmoe_megatron.megatron import cpu_compat  # noqa: E402
from tests.dist_utils import run_workers  # noqa: E402

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES, ITERS = 128, 32, 4, 2, 10
TIMEOUT = 240  # seconds per layout, start-up included; each takes 10-30 s on 2 busy cores


# ------------------------------------------------------------------------------------------------
# In-process: the patch mechanics
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def unpatched():
    """Run a test with megatron-core unpatched; leave it patched afterwards iff it was before."""
    was_applied = cpu_compat.is_applied()
    cpu_compat.remove()
    try:
        yield
    finally:
        cpu_compat.remove()
        if was_applied:
            cpu_compat.apply(force=True)


def _current(target):
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return vars(owner).get(attr, "<absent>")


def test_every_patch_names_target_reason_and_checked_versions():
    patches = cpu_compat.describe()
    assert patches
    targets = [p["target"] for p in patches]
    assert len(targets) == len(set(targets)), "one patch per Megatron function"
    for p in patches:
        assert p["target"].startswith("megatron.core.") and ":" in p["target"]
        assert p["why"] and p["checked"]
        assert set(p["checked"]) <= set(cpu_compat.CHECKED_VERSIONS)


def test_apply_is_idempotent_and_remove_restores(unpatched):
    originals = {p["target"]: _current(p["target"]) for p in cpu_compat.describe()}
    first = cpu_compat.apply(force=True)
    assert first and cpu_compat.is_applied()
    changed = {t for t in originals if _current(t) is not originals[t]}
    assert changed == set(first)
    assert cpu_compat.apply(force=True) == []  # second call: nothing to do
    assert all(_current(t) is not originals[t] for t in first)
    cpu_compat.remove()
    assert not cpu_compat.is_applied()
    assert all(_current(t) is originals[t] for t in originals)


def test_noop_when_cuda_is_available(unpatched, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply() == []
    assert not cpu_compat.is_applied()


def test_unknown_version_raises_unless_overridden(unpatched, monkeypatch):
    monkeypatch.setattr(cpu_compat, "_megatron_version", lambda: "0.99.0")
    monkeypatch.delenv(cpu_compat.UNCHECKED_ENV, raising=False)
    with pytest.raises(cpu_compat.UnsupportedMegatronVersion, match="0.99.0"):
        cpu_compat.apply(force=True)
    assert not cpu_compat.is_applied()
    monkeypatch.setenv(cpu_compat.UNCHECKED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="checked only against"):
        assert cpu_compat.apply(force=True)
    assert cpu_compat.is_applied()


def test_missing_target_patches_nothing(unpatched, monkeypatch):
    bogus = cpu_compat._Patch("megatron.core.utils:no_such_function", lambda original: None,
                              "test", cpu_compat.CHECKED_VERSIONS)
    monkeypatch.setattr(cpu_compat, "_PATCHES", cpu_compat._PATCHES + [bogus])
    originals = {p.target: _current(p.target) for p in cpu_compat._PATCHES[:-1]}
    with pytest.raises(cpu_compat.UnsupportedMegatronVersion, match="no_such_function"):
        cpu_compat.apply(force=True)
    assert not cpu_compat.is_applied()
    assert all(_current(t) is originals[t] for t in originals)


def test_cuda_means_cpu_scope_nests_and_restores():
    t = torch.zeros(2)
    current_device = torch.cuda.current_device
    with cpu_compat.cuda_means_cpu():
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        with cpu_compat.cuda_means_cpu():  # patched functions call each other
            assert t.type() == "torch.cuda.FloatTensor"
            assert t.cuda() is t and t.to("cuda:0").device.type == "cpu"
        assert torch.cuda.current_device() == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
    assert torch.cuda.current_device is current_device
    assert t.type() == "torch.FloatTensor"


# ------------------------------------------------------------------------------------------------
# Worker side (runs in the gloo processes)
# ------------------------------------------------------------------------------------------------


def _setup(tp=1, pp=1, ep=1, vpp=None, moe=False, sequence_parallel=False, dropout=0.0,
           recompute=False, bf16=False):
    """Patch, initialise model parallel, return (config, spec) of a tiny GPT (2 layers per
    pipeline stage or virtual stage)."""
    applied = cpu_compat.apply()
    assert applied, "cpu_compat.apply() patched nothing: does this worker see a GPU?"

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp,
                                 expert_model_parallel_size=ep)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    extra = {}
    if moe:
        extra = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                     moe_grouped_gemm=False, moe_aux_loss_coeff=1e-2, moe_ffn_hidden_size=128,
                     moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                     add_bias_linear=False)  # megatron's local MoE fails with biases
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    if vpp:
        # As Megatron-LM sets them for interleaving. The core defaults (batched p2p, no overlap)
        # silently swap activations and gradients when both go to the same peer (PP=2).
        extra.update(virtual_pipeline_model_parallel_size=vpp, batch_p2p_comm=False,
                     overlap_p2p_comm=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(
        num_layers=2 * (vpp or 1), hidden_size=64, num_attention_heads=4,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, sequence_parallel=sequence_parallel,
        bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
        hidden_dropout=dropout, attention_dropout=dropout, **extra)
    spec = get_gpt_layer_local_spec(num_experts=4 if moe else None, moe_grouped_gemm=False)
    return config, spec


def _build(config, spec, use_distributed_optimizer=False, log_num_zeros_in_grad=False):
    """DDP-wrapped GPTModel (a list of chunks with virtual pipeline stages) and its optimizer."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    vpp = config.virtual_pipeline_model_parallel_size
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer)
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        gpt = GPTModel(
            config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, vp_stage=vp_stage,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
        if config.bf16:
            gpt = Float16Module(config, gpt)
        chunks.append(DistributedDataParallel(config, ddp_config, gpt))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0, bf16=config.bf16,
                        params_dtype=config.params_dtype,
                        use_distributed_optimizer=use_distributed_optimizer,
                        log_num_zeros_in_grad=log_num_zeros_in_grad),
        chunks)
    config.finalize_model_grads_func = finalize_model_grads
    if vpp:
        config.no_sync_func = [chunk.no_sync for chunk in chunks]
        return chunks, optimizer
    config.no_sync_func = chunks[0].no_sync
    return chunks[0], optimizer


def _batch(seed):
    """A fixed synthetic batch: tokens, labels, positions, causal mask (True = masked)."""
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1),
                           generator=torch.Generator().manual_seed(seed))
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).repeat(MICRO_BATCH, 1),
        "attention_mask": torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1),
    }


def _forward_step(batch):
    """forward_step_func of the schedules; its loss function returns the 0.16.1 triple
    (summed loss, number of tokens, {name: [summed loss, number of tokens]})."""

    def forward_step(data_iterator, model):
        losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                       labels=batch["labels"])  # [b, s] per-token loss on the last stage

        def loss_func(output):
            total = output.float().sum()
            num_tokens = torch.tensor(output.numel(), dtype=torch.int)
            return total, num_tokens, {"lm loss": torch.stack([total.detach(), num_tokens.float()])}

        return losses, loss_func

    return forward_step


def _train(model, optimizer, batch, iters=ITERS, after_step=None,
           num_microbatches=MICRO_BATCHES):
    """Train; return (mean loss per iteration (last stage only, else []), grad norms).
    ``model``: one DDP module, or the list of chunks of an interleaved pipeline."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model if isinstance(model, list) else [model]
    forward_backward = get_forward_backward_func()
    losses, norms = [], []
    for _ in range(iters):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=_forward_step(batch),
            data_iterator=[None] * len(chunks) if len(chunks) > 1 else None, model=chunks,
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=False)
        ok, grad_norm, num_zeros = optimizer.step()
        assert ok and (num_zeros is not None) == optimizer.config.log_num_zeros_in_grad
        norms.append(float(grad_norm))
        if after_step is not None:
            after_step()
        if ps.is_pipeline_last_stage():
            total = sum(r["lm loss"] for r in reports)
            losses.append(float(total[0] / total[1]))
    return losses, norms


def _direct_forward_backward(model, batch):
    """Forward and backward called directly, not through a schedule; leaves no gradient."""
    losses = model.module(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                          labels=batch["labels"])
    losses.float().mean().backward()
    model.zero_grad_buffer()


@contextlib.contextmanager
def _rng_tracker_warnings():
    """Collect what megatron's RNG tracker logs (it warns when the CPU generator changes inside
    a fork, which the CPU tracker must not do)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _max_spread(tensors, group):
    """Largest |difference| of the concatenated tensors between the ranks of ``group``."""
    flat = torch.cat([t.detach().float().flatten() for t in tensors]) if tensors else torch.zeros(1)
    hi, lo = flat.clone(), flat.clone()
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
    return float((hi - lo).abs().max())


def _same_on_all_ranks(value):
    t = torch.tensor([value], dtype=torch.float64)
    return _max_spread([t], None) == 0.0


def tp2_sequence_parallel_worker(rank, world_size):
    config, spec = _setup(tp=2, sequence_parallel=True, dropout=0.1)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    model, optimizer = _build(config, spec)
    # The batch is made on TP rank 0 only and broadcast, as Megatron's get_batch does.
    keys = ["tokens", "labels", "position_ids"]
    made = _batch(seed=7) if ps.get_tensor_model_parallel_rank() == 0 else None
    batch = tensor_parallel.broadcast_data(keys, made, torch.int64)
    batch["attention_mask"] = _batch(seed=7)["attention_mask"]
    assert torch.equal(batch["tokens"], _batch(seed=7)["tokens"])

    # Outside the schedules, first (before the schedules fill megatron's shared buffers): a plain
    # forward and backward.
    _direct_forward_backward(model, batch)
    with _rng_tracker_warnings() as rng_warnings:  # dropout runs inside the tracker's fork
        losses, norms = _train(model, optimizer, batch)
    assert not rng_warnings, rng_warnings[:1]

    # Weights replicated over tensor parallel (norms, row-parallel biases, position embeddings)
    # saw different sequence slices: they stay equal only if their grads were all-reduced.
    tp_group = ps.get_tensor_model_parallel_group()
    replicated = [p for p in model.module.parameters()
                  if not getattr(p, "tensor_model_parallel", False)]
    norm_weights = [p for n, p in model.module.named_parameters() if "layernorm" in n]
    assert norm_weights and all(getattr(p, "sequence_parallel", False) for p in norm_weights)
    spread = _max_spread(replicated, tp_group)

    # Logits gathered over the tensor-parallel vocabulary shards, as for generation.
    with torch.no_grad():
        model.module.eval()
        logits = model.module(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                              runtime_gather_output=True)
        model.module.train()
    assert logits.shape == (MICRO_BATCH, SEQ, VOCAB) and torch.isfinite(logits).all()
    return {"losses": losses, "norms": norms, "tp_spread": spread,
            "norms_agree": _same_on_all_ranks(norms[-1])}


def pp2_worker(rank, world_size):
    from megatron.core import parallel_state as ps

    config, spec = _setup(pp=2, dropout=0.1, recompute=True, bf16=True)
    model, optimizer = _build(config, spec)
    queued = len(getattr(torch.cuda, "_queued_calls", []))
    losses, norms = _train(model, optimizer, _batch(seed=11))
    # Recomputation restores RNG states; nothing may pile up in torch.cuda's lazy-call queue.
    assert len(getattr(torch.cuda, "_queued_calls", [])) == queued
    return {"losses": losses, "norms": norms, "last_stage": ps.is_pipeline_last_stage(),
            "norms_agree": _same_on_all_ranks(norms[-1])}


def pp2_interleaved_worker(rank, world_size):
    from megatron.core import parallel_state as ps

    config, spec = _setup(pp=2, vpp=2)
    chunks, optimizer = _build(config, spec)
    losses, norms = _train(chunks, optimizer, _batch(seed=13), num_microbatches=4)
    return {"losses": losses, "norms": norms, "last_stage": ps.is_pipeline_last_stage(),
            "norms_agree": _same_on_all_ranks(norms[-1])}


def dp2_distributed_optimizer_worker(rank, world_size, checkpoint_dir=None):
    from megatron.core import parallel_state as ps

    config, spec = _setup()
    model, optimizer = _build(config, spec, use_distributed_optimizer=True,
                              log_num_zeros_in_grad=True)
    batch = _batch(seed=100 + ps.get_data_parallel_rank())  # each replica its own data
    losses, norms = _train(model, optimizer, batch)
    dp_group = ps.get_data_parallel_group()
    result = {"losses": losses, "norms": norms,
              "dp_spread": _max_spread(list(model.module.parameters()), dp_group),
              "norms_agree": _same_on_all_ranks(norms[-1])}
    if checkpoint_dir is not None:
        result.update(_resume_matches_straight_run(config, spec, model, optimizer, batch,
                                                   checkpoint_dir))
    return result


def _resume_matches_straight_run(config, spec, model, optimizer, batch, checkpoint_dir):
    """Save after ITERS steps, load into a fresh model and optimizer, and check that both
    continue with the same losses (weights, Adam moments and step all restored)."""
    from megatron.core import dist_checkpointing

    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    state = {"model": model.module.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    dist_checkpointing.save(state, checkpoint_dir)

    torch.manual_seed(999)  # a different initialisation, to be overwritten by the load
    fresh_model, fresh_optimizer = _build(config, spec, use_distributed_optimizer=True)
    template = {"model": fresh_model.module.sharded_state_dict()}
    template["optimizer"] = fresh_optimizer.sharded_state_dict(template, is_loading=True,
                                                               metadata=metadata)
    loaded = dist_checkpointing.load(template, checkpoint_dir)
    fresh_model.module.load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 main params are views of the model params
        fresh_optimizer.load_state_dict(loaded["optimizer"])
    config.no_sync_func = fresh_model.no_sync
    resumed, _ = _train(fresh_model, fresh_optimizer, batch, iters=3)
    config.no_sync_func = model.no_sync
    continued, _ = _train(model, optimizer, batch, iters=3)
    return {"resumed": resumed, "continued": continued}


def _moe_worker(tp, ep, sequence_parallel):
    config, spec = _setup(tp=tp, ep=ep, moe=True, sequence_parallel=sequence_parallel)
    # Module-level functions imported by name after apply(): a name bound before it is the
    # original.
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    model, optimizer = _build(config, spec, use_distributed_optimizer=True)
    batch = _batch(seed=200 + ps.get_data_parallel_rank())
    metrics = {}

    def log_moe_metrics():  # what Megatron's training_log does each iteration; "z_loss" is
        # a name no layer here produces (as on a pipeline stage without MoE layers)
        track_moe_metrics(loss_scale=1.0, iteration=0, total_loss_dict=metrics,
                          force_initialize=True, track_names=["load_balancing_loss", "z_loss"],
                          num_layers=config.num_layers, moe_layer_freq=1)

    losses, norms = _train(model, optimizer, batch, after_step=log_moe_metrics)
    # Outside the schedules: router and dispatcher. (After training: an aux-loss backward before
    # the first schedule leaves megatron's MoEAuxLossAutoScaler with a 0-dim scale that the
    # schedules' [1]-shaped set_loss_scale then cannot copy into, on any device.)
    _direct_forward_backward(model, batch)
    named = list(model.module.named_parameters())
    experts = [p for _, p in named if getattr(p, "allreduce", True) is False]
    dense = [p for _, p in named if getattr(p, "allreduce", True) is not False]
    # megatron-core marks expert weights allreduce=False (reduced over expert-data-parallel).
    assert experts and all(("experts" in n) == (getattr(p, "allreduce", True) is False)
                           for n, p in named)
    assert "load_balancing_loss" in metrics
    result = {"losses": losses, "norms": norms,
              "dense_spread": _max_spread(dense, ps.get_data_parallel_group()),
              "expert_spread": _max_spread(experts, ps.get_expert_model_parallel_group()),
              "norms_agree": _same_on_all_ranks(norms[-1])}
    return result


def ep2_moe_worker(rank, world_size):
    return _moe_worker(tp=1, ep=2, sequence_parallel=False)


def tp2_ep2_moe_worker(rank, world_size):
    return _moe_worker(tp=2, ep=2, sequence_parallel=True)


# ------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_gpu_for_workers(monkeypatch):
    """The workers inherit this: a CPU test, also on a machine with GPUs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def _assert_learns(losses):
    assert len(losses) == ITERS
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.usefixtures("no_gpu_for_workers")
def test_tp2_sequence_parallel_trains():
    out = run_workers(tp2_sequence_parallel_worker, 2, timeout=TIMEOUT)
    for o in out:
        _assert_learns(o["losses"])
        assert o["tp_spread"] == 0.0
        assert o["norms_agree"]
    assert out[0]["losses"] == out[1]["losses"]


@pytest.mark.usefixtures("no_gpu_for_workers")
def test_pp2_trains():
    out = run_workers(pp2_worker, 2, timeout=TIMEOUT)
    last = [o for o in out if o["last_stage"]]
    assert len(last) == 1
    _assert_learns(last[0]["losses"])
    assert all(o["norms_agree"] for o in out)


@pytest.mark.usefixtures("no_gpu_for_workers")
def test_pp2_interleaved_trains():
    out = run_workers(pp2_interleaved_worker, 2, timeout=TIMEOUT)
    last = [o for o in out if o["last_stage"]]
    assert len(last) == 1
    _assert_learns(last[0]["losses"])
    assert all(o["norms_agree"] for o in out)
    assert max(last[0]["norms"]) < 100, last[0]["norms"]  # swapped p2p tensors make it explode


@pytest.mark.usefixtures("no_gpu_for_workers")
def test_dp2_distributed_optimizer_trains():
    out = run_workers(dp2_distributed_optimizer_worker, 2, timeout=TIMEOUT)
    for o in out:
        _assert_learns(o["losses"])
        assert o["dp_spread"] == 0.0  # the replicas saw different data but stay identical
        assert o["norms_agree"]
    assert out[0]["losses"] != out[1]["losses"]


@pytest.mark.usefixtures("no_gpu_for_workers")
def test_dp2_distributed_optimizer_checkpoint_resume():
    pytest.importorskip("psutil", reason="megatron-core's checkpoint writer needs psutil")
    with tempfile.TemporaryDirectory(prefix="cpu_compat_ckpt_") as directory:
        out = run_workers(dp2_distributed_optimizer_worker, 2, timeout=TIMEOUT, args=(directory,))
    for o in out:
        # Same weights, Adam moments and step: the same next losses (bit-exact in practice).
        assert o["resumed"] == pytest.approx(o["continued"], rel=1e-6), (o["resumed"],
                                                                           o["continued"])


def _assert_moe_layout(out):
    for o in out:
        _assert_learns(o["losses"])
        assert o["dense_spread"] == 0.0  # dense weights: one replica per rank
        assert o["expert_spread"] > 0.0  # experts: each EP rank owns different ones
        assert o["norms_agree"]


@pytest.mark.usefixtures("no_gpu_for_workers")
def test_ep2_megatron_moe_trains():
    _assert_moe_layout(run_workers(ep2_moe_worker, 2, timeout=TIMEOUT))


@pytest.mark.slow
@pytest.mark.usefixtures("no_gpu_for_workers")
def test_tp2_ep2_sequence_parallel_megatron_moe_trains():
    """4 processes: expert-tensor-parallel 2 makes the token gather uneven (gloo needs the
    padded gather of the _gather_along_first_dim patch)."""
    _assert_moe_layout(run_workers(tp2_ep2_moe_worker, 4, timeout=TIMEOUT,
                                   threads_per_worker=1))
