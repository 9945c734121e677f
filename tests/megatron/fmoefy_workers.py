"""Worker bodies of the fmoefy / checkpoint tests (gloo processes, see tests/dist_utils.py)."""
from __future__ import annotations

import dataclasses

import torch

from tests.megatron.ptg_workers import TINY, _gather, _inner


def _megatron_setup(seed=123):
    from fastmoe_megatron.megatron import cpu_compat

    cpu_compat.apply()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1,
                                             expert_tensor_parallel_size=1)
    model_parallel_cuda_manual_seed(seed)


def _config(**moe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        use_cpu_initialization=True, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, **moe)


def _batch(seq=16, vocab=128):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab, (2, seq), generator=g)
    position = torch.arange(seq).unsqueeze(0).expand(2, -1)
    mask = torch.triu(torch.ones(1, 1, seq, seq), 1).bool()
    return tokens, position, mask


def matches_megatron_moelayer(rank, world, gated=False):
    """A GPT fmoefy'd with the naive (top-k softmax) gate equals megatron-core's own MoELayer GPT
    (top-k softmax router, no capacity, no aux loss) loaded with the same router and expert
    weights: logits and the gradients of the router and experts. Both without linear biases
    (megatron-core's MoE needs that), so the experts have none; ``gated``: SwiGLU experts
    (``gated_linear_unit``, SiLU: Megatron's ``--swiglu``)."""
    _megatron_setup()
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from fastmoe_megatron.megatron.fmoefy import fmoefy

    glu = dict(gated_linear_unit=True, activation_func=F.silu) if gated else {}
    cfg = _config(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                  moe_grouped_gemm=False, moe_router_load_balancing_type="none",
                  moe_aux_loss_coeff=0.0, **glu)
    theirs = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(
        num_experts=4, moe_grouped_gemm=False), vocab_size=128, max_sequence_length=16)
    dense = dataclasses.replace(cfg, num_moe_experts=None, moe_ffn_hidden_size=None)
    ours = GPTModel(config=dense, transformer_layer_spec=get_gpt_layer_local_spec(),
                    vocab_size=128, max_sequence_length=16)
    assert type(theirs.decoder.layers[0].mlp).__name__ == "MoELayer"
    fmoefy(ours, fmoe_num_experts=4, top_k=2, gate="naive", balance_loss_weight=0.0)
    named = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".mlp." not in name:
                p.copy_(named[name])
        for la, lb in zip(theirs.decoder.layers, ours.decoder.layers):
            moe = lb.mlp.moe
            assert moe.experts.htoh4.bias is None and moe.experts.h4toh.bias is None
            assert moe.experts.htoh4.weight.shape[1] == (2 if gated else 1) * cfg.ffn_hidden_size
            moe.gate.gate.weight.copy_(la.mlp.router.weight)
            moe.gate.gate.bias.zero_()
            for e, expert in enumerate(la.mlp.experts.local_experts):
                moe.experts.htoh4.weight[e].copy_(expert.linear_fc1.weight)
                moe.experts.h4toh.weight[e].copy_(expert.linear_fc2.weight)
    tokens, position, mask = _batch()
    ya, yb = theirs(tokens, position, mask), ours(tokens, position, mask)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    ya.square().mean().backward()
    yb.square().mean().backward()
    for la, lb in zip(theirs.decoder.layers, ours.decoder.layers):
        torch.testing.assert_close(lb.mlp.moe.gate.gate.weight.grad, la.mlp.router.weight.grad,
                                   rtol=1e-5, atol=1e-7)
        for e, expert in enumerate(la.mlp.experts.local_experts):
            torch.testing.assert_close(lb.mlp.moe.experts.htoh4.weight.grad[e],
                                       expert.linear_fc1.weight.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(lb.mlp.moe.experts.h4toh.weight.grad[e],
                                       expert.linear_fc2.weight.grad, rtol=1e-5, atol=1e-7)
    return float((ya - yb).abs().max())


def fmoefy_wrappers_and_spec(rank, world):
    """fmoefy looks through Float16Module/DDP-style wrappers and lists of chunks and tags the
    experts; the layer-spec entry point builds the same structure."""
    _megatron_setup()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    from fastmoe_megatron.megatron.fmoefy import (fmoefy, get_gpt_layer_with_fmoe_spec,
                                                  moe_modules, number_moe_layers)
    from fastmoe_megatron.megatron.layer import FMoEConfig, MegatronMLP

    cfg = _config(bf16=True, params_dtype=torch.bfloat16)
    chunks = [Float16Module(cfg, GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                                          vocab_size=128, max_sequence_length=16)) for _ in range(2)]
    fmoefy(chunks, fmoe_num_experts=4, top_k=2, gate="gshard")
    for chunk in chunks:
        layers = chunk.module.decoder.layers
        assert all(isinstance(layer.mlp, MegatronMLP) for layer in layers)
        for m in moe_modules(chunk):
            for p in m.moe.experts.parameters():
                assert p.allreduce is False and p.tensor_model_parallel is True
            for p in m.moe.gate.parameters():
                assert getattr(p, "allreduce", True) is True
    # A second fmoefy would re-initialise the experts: refused, naming the layer.
    try:
        fmoefy(chunks, fmoe_num_experts=4, top_k=2, gate="gshard")
    except ValueError as exc:
        assert "already an MoE layer" in str(exc), exc
    else:
        raise AssertionError("fmoefy of an fmoefied model did not raise")
    # Same seeds, same layer numbers: the two chunks got identical MoE weights.
    a, b = (moe_modules(c)[0].moe.experts.htoh4.weight for c in chunks)
    assert torch.equal(a, b)
    spec_model = GPTModel(config=_config(), transformer_layer_spec=get_gpt_layer_with_fmoe_spec(
        FMoEConfig(num_experts=4, top_k=2)), vocab_size=128, max_sequence_length=16)
    number_moe_layers(spec_model)
    mods = moe_modules(spec_model)
    assert [m.layer_number for m in mods] == [1, 2]
    tokens, position, mask = _batch()
    out = spec_model(tokens, position, mask)
    assert out.shape == (2, 16, 128) and torch.isfinite(out).all()
    return True


def checkpoint_restores_experts(rank, world, folder):
    """dist_checkpointing save at EP=2, then load into a fresh model: every rank gets its own
    experts back, bitwise."""
    from fastmoe_megatron.megatron.fmoefy import moe_modules
    from fastmoe_megatron.megatron.pretrain_gpt import run

    base = TINY + ["--seed", "7", "--threads", "1", "--expert-model-parallel-size", "2"]
    first = run(base + ["--train-iters", "3", "--save", folder])
    saved = {f"{i}.{n}": p.detach().clone()
             for i, m in enumerate(moe_modules(_inner(first.model)))
             for n, p in m.moe.state_dict().items()}
    # A fresh model with another seed (different initial weights), resumed from the checkpoint:
    # it is at iteration 3 of 3, so it trains no further.
    second = run(TINY + ["--seed", "99", "--threads", "1", "--expert-model-parallel-size", "2",
                         "--train-iters", "3", "--load", folder])
    assert second.losses == [], second.losses
    loaded = {f"{i}.{n}": p.detach()
              for i, m in enumerate(moe_modules(_inner(second.model)))
              for n, p in m.moe.state_dict().items()}
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), f"{k} differs after loading"
    w = saved["0.experts.htoh4.weight"]
    pieces = _gather(w, None)
    assert not torch.equal(pieces[0], pieces[1]), "the EP ranks saved the same experts"
    return True


def init_leaves_gpu_generators_alone(rank, world):
    """Building MegatronMLP (its per-expert init seeds) reseeds no GPU generator: megatron-core
    seeded them alike on the ranks of a tensor-parallel group, whose dropout masks must agree, and
    the init seeds differ by expert-parallel rank. Without CUDA, a GPU reseed is queued in
    torch.cuda's lazy seed tracker (torch.manual_seed queues one); with CUDA it changes the state."""
    _megatron_setup()
    from fastmoe_megatron.megatron.layer import FMoEConfig, MegatronMLP

    tracker = torch.cuda._lazy_seed_tracker
    before = (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
              tracker.manual_seed_all_cb, tracker.manual_seed_cb)
    MegatronMLP(_config(), FMoEConfig(num_experts=4, top_k=2), layer_number=1)
    after = (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
             tracker.manual_seed_all_cb, tracker.manual_seed_cb)
    assert after[1] is before[1] and after[2] is before[2], "a GPU generator was reseeded"
    if before[0] is not None:
        assert all(torch.equal(a, b) for a, b in zip(after[0], before[0]))


def refuses_glu_options_it_lacks(rank, world):
    """A config's glu_linear_offset or activation_func_clamp_value (which megatron-core's dense
    MLP applies) would silently not reach the experts: MegatronMLP refuses them, naming them."""
    import torch.nn.functional as F

    from fastmoe_megatron.megatron.layer import FMoEConfig, MegatronMLP

    _megatron_setup()
    errors = {}
    for field, value in (("glu_linear_offset", 1.0), ("activation_func_clamp_value", 7.0)):
        cfg = _config(gated_linear_unit=True, activation_func=F.silu, **{field: value})
        try:
            MegatronMLP(cfg, FMoEConfig(num_experts=4, top_k=2), layer_number=1)
            errors[field] = "no error"
        except ValueError as exc:
            errors[field] = str(exc)
    MegatronMLP(_config(gated_linear_unit=True, activation_func=F.silu),
                FMoEConfig(num_experts=4, top_k=2), layer_number=1)  # the defaults build
    return errors


def gate_matrices_draw_their_own_numbers(rank, world):
    """Every gate matrix of MegatronMLP gets its own init: the noisy gate's w_gate and w_noise
    were both drawn from the one gate seed, so they started equal (the noise scale a copy of the
    clean logits). Each is still megatron's init (normal, std init_method_std) and the same for
    the same layer number (seeds do not depend on the process)."""
    _megatron_setup()
    from fastmoe_megatron.megatron.layer import GATES, FMoEConfig, MegatronMLP

    out = {}
    for gate in sorted(GATES):
        top_k = 1 if gate == "switch" else 2
        build = lambda: MegatronMLP(_config(), FMoEConfig(num_experts=4, top_k=top_k, gate=gate),  # noqa: E731
                                    layer_number=3)
        a, b = build(), build()
        mats = [p for p in a.moe.gate.parameters() if p.dim() > 1]
        again = [p for p in b.moe.gate.parameters() if p.dim() > 1]
        assert all(torch.equal(x, y) for x, y in zip(mats, again)), gate
        for i in range(len(mats)):
            for j in range(i):
                assert not torch.equal(mats[i], mats[j]), f"{gate}: gate matrices {j} and {i} equal"
        out[gate] = [round(float(m.std()), 3) for m in mats]
    return out


def spec_keeps_a_fused_pre_mlp_norm(rank, world):
    """get_gpt_layer_with_fmoe_spec on a base spec that fuses the pre-MLP norm into the dense
    MLP's linear_fc1 (megatron-core's Transformer Engine spec: pre_mlp_layernorm an IdentityOp):
    the experts must still see normalised inputs; the spec dropped the norm with the dense MLP.
    Transformer Engine is not installable here: the TE spec is simulated by a local spec whose
    linear_fc1 carries TE's class name, and TENorm by megatron-core's torch norm."""
    _megatron_setup()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from fastmoe_megatron.megatron import fmoefy as fmoefy_mod
    from fastmoe_megatron.megatron.layer import FMoEConfig

    fmoefy_mod._standalone_norm_module = lambda: WrappedTorchNorm
    fused_fc1 = type("TELayerNormColumnParallelLinear", (ColumnParallelLinear,), {})
    te_like = get_gpt_layer_local_spec()
    te_like.submodules.pre_mlp_layernorm = IdentityOp
    te_like.submodules.mlp.submodules.linear_fc1 = fused_fc1
    no_norm = get_gpt_layer_local_spec()  # no pre-MLP norm at all, none fused: left so
    no_norm.submodules.pre_mlp_layernorm = IdentityOp
    fmoe = FMoEConfig(num_experts=4, top_k=2)
    out = {}
    for name, base in (("te_like", te_like), ("no_norm", no_norm), ("local", None)):
        spec = fmoefy_mod.get_gpt_layer_with_fmoe_spec(fmoe, base_spec=base)
        model = GPTModel(config=_config(), transformer_layer_spec=spec, vocab_size=128,
                         max_sequence_length=16)
        seen = []
        layer = model.decoder.layers[0]
        layer.mlp.register_forward_hook(lambda m, args, res: seen.append(args[0].detach()))
        tokens, position, mask = _batch()
        model(tokens, position, mask)
        x = seen[0].float()
        out[name] = {"norm": type(layer.pre_mlp_layernorm).__name__,
                     "mean": float(x.mean(-1).abs().max()),
                     "std": [float(x.std(-1, unbiased=False).min()),
                             float(x.std(-1, unbiased=False).max())]}
    return out


def fmoefy_matches_the_models_dtype_and_refuses_ddp(rank, world):
    """fmoefy of a model already in bf16 (Float16Module, whose wrapper fmoefy looks through): the
    MoE layers are bf16 like the rest, and the model runs forward and backward (its fp32 experts
    failed the first forward: 'mat1 and mat2 must have the same dtype'). A model already wrapped
    in megatron-core's DDP is refused: its buffers knew only the dense MLPs' parameters (the
    experts were never reduced; the distributed optimizer raised KeyError). So is a model with
    megatron-core's own MoE layers."""
    _megatron_setup()
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    from fastmoe_megatron.megatron.fmoefy import fmoefy, moe_modules

    cfg = _config(bf16=True, params_dtype=torch.bfloat16)
    tokens, position, mask = _batch()
    out = {}
    wrapped = Float16Module(cfg, GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                                          vocab_size=128, max_sequence_length=16))
    fmoefy(wrapped, fmoe_num_experts=4, top_k=2, gate="gshard")
    for name, model in (("float16module", wrapped),):
        y = model(tokens, position, mask)
        y.float().square().mean().backward()
        grads = [p.grad for m in moe_modules(model) for p in m.parameters()]
        out[name] = {"dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                     "finite": bool(torch.isfinite(y.float()).all()),
                     "expert_grads": all(g is not None and bool(g.abs().sum() > 0)
                                         for m in moe_modules(model)
                                         for g in [m.moe.experts.htoh4.weight.grad]),
                     "grads": len(grads)}
    ddp = DistributedDataParallel(
        config=_config(), ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=GPTModel(config=_config(), transformer_layer_spec=get_gpt_layer_local_spec(),
                        vocab_size=128, max_sequence_length=16))
    try:
        fmoefy(ddp, fmoe_num_experts=4, top_k=2)
        out["ddp"] = "no error"
    except ValueError as exc:
        out["ddp"] = str(exc)
    out["ddp_mlps"] = [type(layer.mlp).__name__ for layer in ddp.module.decoder.layers]
    # A model with megatron-core's own MoE layers: they were replaced by experts of the dense
    # width without a word (shared experts dropped).
    moe_cfg = _config(num_moe_experts=4, moe_router_topk=2)
    own = GPTModel(config=moe_cfg, vocab_size=128, max_sequence_length=16,
                   transformer_layer_spec=get_gpt_layer_local_spec(num_experts=4))
    try:
        fmoefy(own, fmoe_num_experts=4, top_k=2)
        out["own_moe"] = "no error"
    except ValueError as exc:
        out["own_moe"] = str(exc)
    out["own_moe_mlps"] = [type(layer.mlp).__name__ for layer in own.decoder.layers]
    return out


def spec_layers_take_their_layer_numbers(rank, world):
    """A GPT built from get_gpt_layer_with_fmoe_spec: megatron-core tells each MLP its layer
    number, so every MegatronMLP holds it without number_moe_layers, its MoE weights are those
    fmoefy gives the dense GPT of the same seed, and the per-layer stats are filed under it. The
    spec's placeholder numbers (10001, ...) gave other weights, and stats.collect raised
    IndexError."""
    _megatron_setup()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from fastmoe_megatron.megatron import stats
    from fastmoe_megatron.megatron.fmoefy import fmoefy, get_gpt_layer_with_fmoe_spec, moe_modules
    from fastmoe_megatron.megatron.layer import FMoEConfig

    torch.manual_seed(3)
    spec_model = GPTModel(config=_config(), transformer_layer_spec=get_gpt_layer_with_fmoe_spec(
        FMoEConfig(num_experts=4, top_k=2, gate="gshard")), vocab_size=128, max_sequence_length=16)
    torch.manual_seed(3)
    walked = GPTModel(config=_config(), transformer_layer_spec=get_gpt_layer_local_spec(),
                      vocab_size=128, max_sequence_length=16)
    fmoefy(walked, 4, top_k=2, gate="gshard")
    numbers = [m.layer_number for m in moe_modules(spec_model)]
    for a, b in zip(moe_modules(spec_model), moe_modules(walked)):
        sa, sb = a.moe.state_dict(), b.moe.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"layer {a.layer_number}: {k} differs"
    stats.reset()
    tokens, position, mask = _batch()
    spec_model(tokens, position, mask)
    table = stats.collect(2, 4)
    return {"numbers": numbers, "layers": sorted(table),
            "load_sums": [round(sum(s["load"]), 6) for s in table.values()]}


def group_counting_gates_under_tp_without_sp(rank, world):
    """TP=2 x EP=2 on two ranks without sequence parallel: both TP ranks hold one batch and the
    expert-parallel group is those two ranks. The switch, dc and swipe gates count the demand over
    that group, once per rank: refused, naming the flags. With sequence parallel, or another
    gate, the layer builds."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from fastmoe_megatron.megatron import cpu_compat
    from fastmoe_megatron.megatron.layer import FMoEConfig, MegatronMLP

    cpu_compat.apply()
    parallel_state.initialize_model_parallel(2, 1, expert_model_parallel_size=2,
                                             expert_tensor_parallel_size=1)
    model_parallel_cuda_manual_seed(1)
    out = {}
    for gate in ("switch", "dc", "swipe", "gshard", "naive"):
        for sp in (False, True):
            cfg = _config(tensor_model_parallel_size=2, sequence_parallel=sp)
            try:
                MegatronMLP(cfg, FMoEConfig(num_experts=4, top_k=1 if gate == "switch" else 2,
                                            gate=gate), layer_number=1)
                out[f"{gate}/{sp}"] = "built"
            except ValueError as exc:
                out[f"{gate}/{sp}"] = str(exc)
    return out
