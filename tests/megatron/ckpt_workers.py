"""Worker bodies of the checkpoint tests (gloo processes, see tests/dist_utils.py).

They train the tiny GPT-MoE in-process through ``pretrain_gpt.run``, save, load at other
expert-parallel sizes, and compare losses, weights and outputs.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torch.distributed as dist

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2",
        "--lr", "5e-3", "--lr-decay-style", "cosine", "--log-interval", "100",
        "--default-corpus-bytes", "300000", "--fmoefy", "--fmoe-num-experts", "4",
        "--balance-strategy", "gshard", "--balance-loss-weight", "0.01", "--threads", "1",
        "--seed", "7"]
# Dropout on (the RNG state matters), noisy routing (gshard's random routing), aux-loss-free bias.
RESUME = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1",
          "--fmoe-expert-bias-update-rate", "0.01"]


def _inner(model):
    from fastmoe_megatron.megatron.fmoefy import unwrap

    return unwrap(model)


def full_weights(model) -> dict:
    """Every model tensor, with experts gathered over the expert-parallel group (so the dict is
    the same whatever the EP size)."""
    from megatron.core import parallel_state as ps

    out = {}
    inner = _inner(model)
    group = ps.get_expert_model_parallel_group()
    ep = ps.get_expert_model_parallel_world_size()
    for name, t in inner.state_dict().items():
        if not torch.is_tensor(t):
            continue
        t = t.detach().clone()
        if ".mlp.moe.experts." in name and ep > 1:
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts)
        out[name] = t
    return out


def fixed_batch(vocab=256, seq=32, batch=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    position = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
    mask = torch.tril(torch.ones(seq, seq, dtype=torch.bool)).logical_not().view(1, 1, seq, seq)
    return tokens, position, mask


@torch.no_grad()
def outputs(model) -> torch.Tensor:
    """Logits of the fixed batch in eval mode (no dropout, no random routing). Every rank gets the
    same batch, so every rank returns the same logits."""
    inner = _inner(model)
    inner.eval()
    try:
        from fastmoe_megatron.megatron import cpu_compat

        with cpu_compat.cuda_means_cpu():
            return inner(*fixed_batch()).float().clone()
    finally:
        inner.train()


def _equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b)))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max diff {(a[k] - b[k]).abs().max()})"


def resume_equality(rank, world, folder, fmt, extra):
    """6 uninterrupted iterations vs 3 + save + resume 3: losses and weights bitwise equal."""
    from fastmoe_megatron.megatron.pretrain_gpt import run

    base = TINY + RESUME + ["--train-iters", "6", "--ckpt-format", fmt] + list(extra)
    full = run(base)
    w_full = full_weights(full.model)
    first = run(base + ["--save", folder, "--exit-interval", "3"])
    assert len(first.losses) == 3
    assert first.losses == full.losses[:3], (first.losses, full.losses[:3])
    second = run(base + ["--load", folder])
    assert len(second.losses) == 3
    losses = first.losses + second.losses
    assert losses == full.losses, f"resumed {losses} != uninterrupted {full.losses}"
    _equal(full_weights(second.model), w_full, "final weights")
    # Control: without the RNG states (dropout, random routing) the resumed run differs.
    third = run(base + ["--load", folder, "--no-load-rng"])
    assert third.losses != second.losses, "the RNG states made no difference: the test is void"
    return losses


def expert_adam_state(model, optimizer) -> dict:
    """Adam's state of every expert parameter, gathered over expert parallel: ``exp_avg``,
    ``exp_avg_sq`` and, where the optimizer keeps fp32 main copies of the parameters (bf16), the
    main copy; keyed ``<name>:<what>``. Both moments: a reshard that lost or swapped one would
    resume with another effective step size."""
    from megatron.core import parallel_state as ps

    states, mains = {}, {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        states.update(opt.optimizer.state)
        for group16, group32 in zip(getattr(opt, "float16_groups", []),
                                    getattr(opt, "fp32_from_float16_groups", [])):
            mains.update(zip(group16, group32))
    group = ps.get_expert_model_parallel_group()
    ep = ps.get_expert_model_parallel_world_size()
    out = {}
    for name, p in _inner(model).named_parameters():
        if ".mlp.moe.experts." not in name:
            continue
        state = states[mains.get(p, p)]
        found = {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
        if p in mains:
            found["main"] = mains[p]
        for what, t in found.items():
            t = t.detach().clone()
            if ep > 1:
                parts = [torch.empty_like(t) for _ in range(ep)]
                dist.all_gather(parts, t.contiguous(), group=group)
                t = torch.cat(parts)
            out[f"{name}:{what}"] = t
    return out


def trained_checkpoints(rank, world, dist_root, torch_root, fmoefy_root):
    """The source of the checkpoint tests, at EP=2: resume equality in both formats (their
    checkpoints at iteration 3 are the reshard sources), the fixed-batch outputs and expert
    optimizer states at iteration 3, and the fmoefy API (save_fmoe/load_fmoe in an own loop)."""
    from fastmoe_megatron.megatron.pretrain_gpt import run

    losses = {}
    for fmt, root in (("torch_dist", dist_root), ("torch", torch_root)):
        losses[fmt] = resume_equality(rank, world, root, fmt, ["--expert-model-parallel-size", "2"])
    # megatron-core's distributed optimizer (EP=1, DP=2: its state is sharded over the ranks).
    losses["distributed_optimizer"] = resume_equality(
        rank, world, dist_root + "_distopt", "torch_dist",
        ["--expert-model-parallel-size", "1", "--use-distributed-optimizer"])
    # The state at the checkpoints (iteration 3), for the reshard tests: load it and look.
    res = run(TINY + RESUME + ["--train-iters", "6", "--load", dist_root, "--skip-train",
                               "--expert-model-parallel-size", "2"])
    ref = {"outputs": outputs(res.model), "adam": expert_adam_state(res.model, res.optimizer),
           "weights": full_weights(res.model), "moe_outputs": moe_layer_outputs(res.model),
           "losses": losses}
    ref["fmoefy"] = fmoefy_own_loop(rank, world, fmoefy_root)
    return portable(ref)


def portable(x):
    """Tensors as numpy arrays (torch's multiprocessing queue passes tensors through shared
    memory that dies with the worker)."""
    if torch.is_tensor(x):
        return x.numpy()
    if isinstance(x, dict):
        return {k: portable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(portable(v) for v in x)
    return x


def tensors(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, dict):
        return {k: tensors(v) for k, v in x.items()}
    if isinstance(x, list):
        return [tensors(v) for v in x]
    return x


def _own_model(seed, **config):
    """A user's own megatron-core GPT, fmoefy'd (EP from parallel_state), with a torch Adam;
    ``config``: TransformerConfig fields to set."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fastmoe_megatron.megatron.fmoefy import fmoefy

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                            use_cpu_initialization=True, hidden_dropout=0.1, attention_dropout=0.0,
                            bias_activation_fusion=False, bias_dropout_fusion=False,
                            masked_softmax_fusion=False, persist_layer_norm=False,
                            gradient_accumulation_fusion=False, **config)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=256,
                     max_sequence_length=32)
    fmoefy(model, fmoe_num_experts=4, top_k=2, gate="gshard", balance_loss_weight=0.01)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _own_steps(model, opt, steps, start):
    from fastmoe_megatron.megatron import cpu_compat

    losses = []
    for i in range(start, start + steps):
        tokens, position, mask = fixed_batch(seed=100 + i + dist.get_rank())
        with cpu_compat.cuda_means_cpu():
            loss = model(tokens, position, mask, labels=tokens).float().mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # data parallel by hand: average the non-expert gradients
            if p.grad is not None and getattr(p, "allreduce", True):
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def fmoefy_own_loop(rank, world, root):
    """save_fmoe/load_fmoe in a user's own loop (megatron-core model, torch Adam, EP=2): 4 steps
    vs 2 + save + load into a fresh model + 2, bitwise."""
    from megatron.core import parallel_state as ps

    from fastmoe_megatron.megatron import cpu_compat
    from fastmoe_megatron.megatron.checkpointing import load_fmoe, save_fmoe

    cpu_compat.apply()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(expert_model_parallel_size=world, expert_tensor_parallel_size=1)
    model, opt = _own_model(3)
    full = _own_steps(model, opt, 4, 0)
    w_full = full_weights(model)
    model, opt = _own_model(3)
    part = _own_steps(model, opt, 2, 0)
    save_fmoe(root, 2, model, opt)
    model, opt = _own_model(11)  # another seed: everything must come from the checkpoint
    assert load_fmoe(root, model, opt) == 2
    part += _own_steps(model, opt, 2, 2)
    assert part == full, (part, full)
    _equal(full_weights(model), w_full, "fmoefy own loop")
    return part


def load_at(rank, world, ep, sources, ref, save_to=None, extra=()):
    """Loads each (root, format) of ``sources`` at expert-parallel size ``ep``; returns the
    largest output difference from the reference and checks the expert optimizer state. Saves
    the first source again at this EP size under ``save_to``."""
    from fastmoe_megatron.megatron.pretrain_gpt import run

    ref = tensors(ref)
    diffs = {}
    for i, root in enumerate(sources):
        argv = TINY + RESUME + ["--train-iters", "6", "--load", root, "--skip-train",
                                "--expert-model-parallel-size", str(ep)] + list(extra)
        if i == 0 and save_to:
            argv += ["--save", save_to]
        res = run(argv)
        out = outputs(res.model)
        diffs[root] = float((out - ref["outputs"]).abs().max())
        weights = full_weights(res.model)
        for k, v in ref["weights"].items():
            torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-6, msg=f"{root}: {k}")
        if "--no-load-optim" not in extra:
            adam = expert_adam_state(res.model, res.optimizer)
            assert adam.keys() == ref["adam"].keys(), sorted(set(adam) ^ set(ref["adam"]))
            assert any(k.endswith(":exp_avg_sq") for k in adam), sorted(adam)
            for k, v in ref["adam"].items():
                torch.testing.assert_close(adam[k], v, rtol=0, atol=1e-7, msg=f"{root}: Adam {k}")
    return diffs


def moe_layer_outputs(model) -> list:
    """Each MoE layer's FMoETransformerMLP on a fixed [tokens, hidden] input, eval mode."""
    from fastmoe_megatron.megatron.fmoefy import moe_modules

    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(9))
    outs = []
    with torch.no_grad():
        for m in moe_modules(_inner(model)):
            m.eval()
            outs.append(m.moe(x).clone())
            m.train()
    return outs


def _error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def ep1_suite(rank, world, sources, ref, save_to, merged_path, corrupt_root):
    """At EP=1 (one process): loads each source (checks outputs, weights and expert Adam state),
    saves the first again; merges the torch_dist source and compares plain FMoETransformerMLP
    layers with the model's MoE layers; and collects the errors of bad loads and of NaN."""
    from fastmoe_megatron.megatron import reshard
    from fastmoe_megatron.megatron.pretrain_gpt import run

    result = {"diffs": load_at(rank, world, 1, sources, ref, save_to)}
    ref_t = tensors(ref)

    # merge (torch_dist source) -> plain FMoETransformerMLP layers, read with weights_only.
    reshard.merge(sources[0], merged_path)
    merged = torch.load(merged_path, weights_only=True)
    layers = reshard.build_fmoe_layers(merged)
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(9))
    merged_diffs = []
    with torch.no_grad():
        for (prefix, layer), want in zip(layers.items(), ref_t["moe_outputs"]):
            layer.eval()
            merged_diffs.append(float((layer(x) - want).abs().max()))
    result["merged"] = {"diffs": merged_diffs, "layers": list(layers),
                        "num_experts": merged["fmoe"]["num_experts"]}
    # The merged model dict holds the one-process model's tensors under their checkpoint keys
    # (the module's keys, but for the norms megatron-core's local spec renames).
    res = run(TINY + RESUME + ["--train-iters", "6", "--load", sources[0], "--skip-train",
                               "--expert-model-parallel-size", "1"])
    sd = _inner(res.model).state_dict()
    missing = [k for k in merged["model"] if k not in sd]
    assert all(".layer_norm_" in k for k in missing), missing
    assert len(merged["model"]) - len(missing) >= 20
    for k, v in merged["model"].items():
        if k in sd:
            assert torch.equal(sd[k], v), k

    base = TINY + RESUME + ["--train-iters", "6", "--skip-train", "--expert-model-parallel-size", "1"]
    result["errors"] = {
        "hidden_size": _error_of(lambda: run(base + ["--load", sources[0], "--hidden-size", "64"])),
        "num_experts": _error_of(lambda: run(base + ["--load", sources[0], "--fmoe-num-experts", "8"])),
        "corrupt": _error_of(lambda: run(base + ["--load", corrupt_root])),
        "to_distributed_optimizer": _error_of(lambda: run(
            base + ["--load", sources[0], "--use-distributed-optimizer"])),
        "from_distributed_optimizer": _error_of(lambda: run(
            base + ["--load", sources[0] + "_distopt"])),
        "nan": _error_of(lambda: run(TINY + ["--train-iters", "4", "--lr", "1e30",
                                             "--expert-model-parallel-size", "1"])),
        "untracked": _error_of(lambda: run(base + ["--load", str(Path(corrupt_root).parent / "untracked")])),
        "partial": _error_of(lambda: run(
            base + ["--load", str(Path(corrupt_root).parent / "partial" / "iter_0000003")])),
        # A first run: a --load folder that does not exist yet starts from scratch; a conversion
        # (--skip-train) of it is a flag error (it saved a fresh model as the converted one).
        "missing": _error_of(lambda: run(
            TINY + RESUME + ["--train-iters", "1", "--expert-model-parallel-size", "1",
                             "--load", str(Path(corrupt_root).parent / "new")])),
        "missing_skip_train": _error_of(lambda: run(
            base + ["--load", str(Path(corrupt_root).parent / "new")])),
        # The shapes fit; the attention heads do not.
        "heads": _error_of(lambda: run(base + ["--load", sources[0],
                                               "--num-attention-heads", "8"])),
        # A manifest written before the architecture was recorded: the saved arguments tell.
        "old_manifest": _error_of(lambda: run(
            base + ["--load", str(Path(corrupt_root).parent / "old_manifest")])),
        "old_manifest_heads": _error_of(lambda: run(
            base + ["--load", str(Path(corrupt_root).parent / "old_manifest"),
                    "--num-attention-heads", "8"])),
    }
    # The reshard command's checkpoint holds no RNG states: a resume keeps its own, and says so.
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run(base + ["--load", sources[2]])
    result["rng_note"] = [line for line in log.getvalue().splitlines() if "RNG" in line]
    done = {}
    error = _error_of(lambda: done.update(res=run(
        base + ["--load", str(Path(corrupt_root).parent / "first_save_killed")])))
    result["first_save_killed"] = {
        "error": error, "want": run(base + ["--load", sources[0]]).consumed_samples,
        "consumed_samples": done["res"].consumed_samples if "res" in done else None}
    return portable(result)


def my_activation(x):
    """An activation of a user's own: the merge cannot name it for build_fmoe_layers."""
    return torch.nn.functional.gelu(x) * 0.5 + x * 0.5


def own_model_activations(rank, world, root):
    """One process, a user's own loop (save_fmoe): experts with megatron-core's squared_relu and
    with an activation of the user's own, merged and rebuilt as plain FMoETransformerMLP layers
    (their outputs against the model's MoE layers); and loads into models with another
    activation or residual placement, whose tensors have the checkpoint's shapes."""
    import megatron.core.activations as A
    from megatron.core import parallel_state as ps

    from fastmoe_megatron.megatron import cpu_compat, reshard
    from fastmoe_megatron.megatron.checkpointing import load_fmoe, save_fmoe

    cpu_compat.apply()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(expert_model_parallel_size=1, expert_tensor_parallel_size=1)
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(9))
    out = {}
    for name, act in (("squared_relu", A.squared_relu), ("own", my_activation)):
        model, _ = _own_model(3, activation_func=act)
        save_fmoe(f"{root}/{name}", 1, model)
        merged = reshard.merge(f"{root}/{name}", f"{root}/{name}.pt")
        out[name] = {"recorded": merged["fmoe"]["activation"], "error": "no error"}
        loaded = reshard.load_merged(f"{root}/{name}.pt")
        try:
            layers = reshard.build_fmoe_layers(loaded)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[name]["error"] = f"{type(exc).__name__}: {exc}"
            layers = reshard.build_fmoe_layers(loaded, activation=act)
        diffs = []
        with torch.no_grad():
            for layer, want in zip(layers.values(), moe_layer_outputs(model)):
                layer.eval()
                diffs.append(float((layer(x) - want).abs().max()))
        out[name]["diffs"] = diffs
    loads = {"gelu": dict(activation_func=torch.nn.functional.gelu),
             "post_layernorm": dict(activation_func=A.squared_relu,
                                    apply_residual_connection_post_layernorm=True),
             "same": dict(activation_func=A.squared_relu)}
    for case, config in loads.items():
        model, _ = _own_model(5, **config)
        out[f"load_{case}"] = _error_of(lambda: load_fmoe(f"{root}/squared_relu", model))
    return out


def moe_outputs_of(rank, world, argv):
    """``moe_layer_outputs`` of the model that pretrain_gpt builds (and loads) from ``argv``."""
    from fastmoe_megatron.megatron.pretrain_gpt import run

    return portable(moe_layer_outputs(run(argv).model))


def load_and_save(rank, world, ep, sources, ref, save_to):
    return load_at(rank, world, ep, sources, ref, save_to)


def another_batch_size_and_tp(rank, world, root):
    """Saved at TP=2 (DP=1, global batch 2) after 3 iterations; loaded on the same 2 processes at
    TP=1 (DP=2, global batch 4 by default), saved again at iteration 5, and resumed from there
    with global batch 2 to iteration 7. Returns what the test checks: the TP error's hint, the
    samples consumed, the training samples each run asked its data for and got, the resume
    message and the routing warning."""
    from fastmoe_megatron.megatron import data
    from fastmoe_megatron.megatron.pretrain_gpt import run

    asked = []
    real_build = data.build_datasets

    def build_datasets(*a, **kw):  # megatron-core's datasets, recording the samples asked for
        built = real_build(*a, **kw)
        asked.append((a[5][0], len(built[0])))
        return built

    data.build_datasets = build_datasets
    base = TINY + ["--expert-model-parallel-size", "1"]
    first = run(base + ["--tensor-model-parallel-size", "2", "--train-iters", "3", "--save", root])
    out = {"saved_consumed": first.consumed_samples}
    out["tp_error"] = _error_of(lambda: run(base + ["--train-iters", "5", "--load", root,
                                                   "--skip-train"]))
    log = io.StringIO()
    root2 = root + "-batch4"
    # Another batch and train_iters: the schedule's steps (samples) change, so the resumes follow
    # this run's (--override-opt-param-scheduler).
    with contextlib.redirect_stdout(log):
        second = run(base + ["--train-iters", "5", "--load", root, "--override-opt-param-scheduler",
                             "--make-vocab-size-divisible-by", "256", "--save", root2])
    out.update(consumed=second.consumed_samples, losses=len(second.losses), log=log.getvalue(),
               lrs=second.lrs)
    third = run(base + ["--train-iters", "7", "--load", root2, "--make-vocab-size-divisible-by",
                        "256", "--micro-batch-size", "1", "--global-batch-size", "2",
                        "--override-opt-param-scheduler"])
    out.update(smaller_consumed=third.consumed_samples, asked=asked)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run(base + ["--train-iters", "5", "--load", root, "--make-vocab-size-divisible-by", "256",
                    "--fmoe-top-k", "1", "--skip-train"])
    out["routing_warning"] = err.getvalue()
    return out


def lr_schedule_on_resume(rank, world, root):
    """A run saved after 4 of 4 iterations (cosine decay to 0) and extended to 8 iterations: by
    default the resume stops, naming the two flags; --override-opt-param-scheduler follows the
    new 8-iteration schedule from iteration 4 on, --use-checkpoint-opt-param-scheduler keeps the
    old one (which has ended: LR 0), and so does a --skip-train conversion. Returns the learning
    rates of each run's steps."""
    from fastmoe_megatron.megatron.pretrain_gpt import run

    base = TINY + ["--expert-model-parallel-size", "1"]
    out = {"first": run(base + ["--train-iters", "4", "--save", root]).lrs}
    out["error"] = _error_of(lambda: run(base + ["--train-iters", "8", "--load", root]))
    out["override"] = run(base + ["--train-iters", "8", "--load", root,
                                  "--override-opt-param-scheduler"]).lrs
    out["checkpoint"] = run(base + ["--train-iters", "8", "--load", root,
                                    "--use-checkpoint-opt-param-scheduler"]).lrs
    out["same"] = run(base + ["--train-iters", "4", "--load", root]).lrs  # nothing left to do
    # A conversion (--skip-train) keeps the checkpoint's schedule: no error.
    out["convert"] = _error_of(lambda: run(base + ["--train-iters", "8", "--load", root,
                                                   "--skip-train"]))
    # With --lr-decay-iters fixed, a longer run keeps the same LR schedule: no flag needed (the
    # weight-decay increment steps follow --train-iters but have no effect, and are not compared).
    fixed = root + "-decay8"
    run(base + ["--train-iters", "2", "--lr-decay-iters", "8", "--save", fixed])
    out["longer"] = run(base + ["--train-iters", "4", "--lr-decay-iters", "8", "--load", fixed]).lrs
    return out


def stop_on_sigterm_or_duration(rank, world, root):
    """--exit-signal-handler: SIGTERM reaches rank 1 only, in iteration 3; both ranks finish that
    iteration, save it and return (the default action would kill rank 1 and lose the run since
    the last checkpoint), and the run resumes from it. --exit-duration-in-mins: a tiny budget
    stops after the first iteration, with a checkpoint."""
    import os
    import signal

    from fastmoe_megatron.megatron import checkpointing as ckpt
    from fastmoe_megatron.megatron.pretrain_gpt import run

    base = TINY + ["--train-iters", "6", "--expert-model-parallel-size", "2"]
    os.environ[ckpt.FAULT_ENV] = "step:3:1:term"
    try:
        first = run(base + ["--save", f"{root}/sig", "--exit-signal-handler"])
    finally:
        del os.environ[ckpt.FAULT_ENV]
    out = {"first": len(first.losses), "handler_restored": signal.getsignal(signal.SIGTERM)
           == signal.SIG_DFL, "latest": ckpt.latest_iteration(f"{root}/sig")}
    out["resumed"] = len(run(base + ["--load", f"{root}/sig"]).losses)
    # SIGTERM during a periodic save: stop right after it (it used to train one more iteration
    # and save that too, which torchrun's grace period may not allow).
    os.environ[ckpt.FAULT_ENV] = "save:2:1:term"
    try:
        during = run(base + ["--save", f"{root}/during", "--save-interval", "2",
                             "--exit-signal-handler"])
    finally:
        del os.environ[ckpt.FAULT_ENV]
    out.update(during=len(during.losses), during_latest=ckpt.latest_iteration(f"{root}/during"),
               during_saved=sorted(p.name for p in Path(f"{root}/during").glob("iter_*")))
    # SIGTERM in an iteration that has an evaluation due: the stop comes first (the evaluation
    # would make the save wait), and the run saves that iteration.
    os.environ[ckpt.FAULT_ENV] = "step:2:1:term"
    try:
        evals = run(base + ["--save", f"{root}/evalstop", "--exit-signal-handler",
                            "--split", "80,20,0", "--eval-interval", "2", "--eval-iters", "1"])
    finally:
        del os.environ[ckpt.FAULT_ENV]
    out.update(evalstop=len(evals.losses), evalstop_valid=evals.valid_losses,
               evalstop_latest=ckpt.latest_iteration(f"{root}/evalstop"))
    timed = run(base + ["--save", f"{root}/time", "--exit-duration-in-mins", "1e-6"])
    out.update(timed=len(timed.losses), timed_latest=ckpt.latest_iteration(f"{root}/time"))
    return out


def exit_signal_handler_off_the_main_thread(rank, world):
    """Python handles signals on the main thread only: run() in another thread with
    --exit-signal-handler trains (with a warning) instead of raising after all the setup."""
    import threading

    from fastmoe_megatron.megatron.pretrain_gpt import run

    out = {}

    def body():
        try:
            out["losses"] = len(run(TINY + ["--train-iters", "2", "--expert-model-parallel-size", "1",
                                            "--exit-signal-handler"]).losses)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["error"] = repr(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out
