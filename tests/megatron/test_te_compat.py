"""fastmoe_megatron.megatron.te_compat: megatron-core without Transformer Engine or Apex.

The router name and the method wrappers are checked in fresh interpreters on real megatron-core
(``apply()`` changes megatron-core for the whole process); the two optimizer helpers against
torch's own Adam and AdamW. The GPU runs that needed them (``--num-experts``, a resume with
``--use-distributed-optimizer``) were run on an H200; on the CPU, ``cpu_compat`` uses the same
helpers, and tests/megatron/test_cpu_compat.py resumes the distributed optimizer through them.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

from fastmoe_megatron.megatron import te_compat  # noqa: E402


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_router_gating_runs_without_transformer_engine():
    """Without TE the router's gating GEMM raised NameError (te_general_gemm); after apply() it
    runs in torch and gives x @ w^T."""
    out = run_python("""
        import importlib.util, torch
        from megatron.core.transformer.moe import moe_utils
        from fastmoe_megatron.megatron import te_compat
        x, w = torch.randn(5, 8), torch.randn(3, 8)
        if importlib.util.find_spec("transformer_engine") is None:
            assert "te_general_gemm" not in vars(moe_utils)
            try:
                moe_utils.router_gating_linear(x, w, None, torch.float32)
                raise SystemExit("expected NameError")
            except NameError as exc:
                assert "te_general_gemm" in str(exc), exc
        changed = te_compat.apply()
        print(changed)
        torch.testing.assert_close(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.t())
        assert te_compat.apply() == []  # idempotent
        print("ok")
    """)
    assert out.strip().endswith("ok")
    assert "DistributedOptimizer.state_dict" in out and "DistributedOptimizer.load_state_dict" in out


def test_state_dict_wrapper_seeds_adam_then_calls_megatron():
    """Without cpu_compat (the GPU set-up), DistributedOptimizer.state_dict first seeds the
    torch Adam's state and then runs megatron-core's own method (here on an object with only an
    optimizer, where megatron-core's method then fails on the missing attributes)."""
    out = run_python("""
        import types, torch
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D
        from fastmoe_megatron.megatron import te_compat
        original = D.state_dict
        te_compat.apply()
        assert D.state_dict is not original and D.state_dict.__wrapped__ is original
        p = torch.nn.Parameter(torch.ones(3))
        holder = types.SimpleNamespace(optimizer=torch.optim.Adam([p]))
        try:
            D.state_dict(holder)
            raise SystemExit("megatron-core's state_dict was not called")
        except AttributeError:
            pass
        assert float(holder.optimizer.state[p]["step"]) == 0.0
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_apply_leaves_cpu_compat_patches_alone():
    """After cpu_compat.apply() (the CPU), te_compat.apply() wraps nothing a second time."""
    out = run_python("""
        from fastmoe_megatron.megatron import cpu_compat, te_compat
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D
        cpu_compat.apply(force=True)
        before = (D.state_dict, D.load_state_dict)
        assert te_compat.apply() == []
        assert (D.state_dict, D.load_state_dict) == before
        print("ok")
    """)
    assert out.strip().endswith("ok")


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def _steps(opt, params, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_seeded_adam_updates_as_a_fresh_one(cls):
    plain, seeded = _params(), _params()
    a, b = cls(plain, lr=0.1), cls(seeded, lr=0.1)
    te_compat.seed_adam_state(b)
    assert len(b.state) == 2 and all(float(s["step"]) == 0 for s in b.state.values())
    _steps(a, plain, 3)
    _steps(b, seeded, 3)
    for p, q in zip(plain, seeded):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert float(b.state[seeded[0]]["step"]) == 3


def test_seed_leaves_other_optimizers_and_stepped_ones_alone():
    sgd = torch.optim.SGD(_params(), lr=0.1)
    te_compat.seed_adam_state(sgd)
    assert not sgd.state
    params = _params()
    adam = torch.optim.Adam(params, lr=0.1)
    _steps(adam, params, 2)
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in adam.state.items()}
    te_compat.seed_adam_state(adam)
    for p, s in adam.state.items():
        for k, v in s.items():
            assert torch.equal(v, before[id(p)][k])


def test_restored_steps_are_per_parameter():
    """Each parameter gets its own step tensor at the saved iteration: a shared one would be
    advanced once per parameter by every Adam step."""
    params = _params()
    adam = torch.optim.Adam(params, lr=0.1)
    te_compat.seed_adam_state(adam)
    shared = torch.tensor(0.0)
    for s in adam.state.values():
        s["step"] = shared  # what megatron-core's load leaves behind
    te_compat.restore_adam_steps(adam, {"optimizer": {"param_groups": [{"step": 7}, {"step": 7}]}})
    steps = [s["step"] for s in adam.state.values()]
    assert all(float(t) == 7 for t in steps) and steps[0] is not steps[1]
    _steps(adam, params, 1)
    assert [float(s["step"]) for s in adam.state.values()] == [8, 8]
    # Disagreeing or missing saved steps: left as they are.
    te_compat.restore_adam_steps(adam, {"optimizer": {"param_groups": [{"step": 1}, {"step": 2}]}})
    assert [float(s["step"]) for s in adam.state.values()] == [8, 8]
