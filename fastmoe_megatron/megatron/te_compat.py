"""megatron-core without Transformer Engine or Apex, on a GPU as on a CPU.

megatron-core 0.16.1 has three gaps that show whenever neither is installed (always on a CPU, and
on a GPU with a plain ``pip install megatron-core``). The first two were seen on an H200; the
third was found on the CPU, and with the fix a GPU resume trains to the same losses as an
uninterrupted run:

* Its MoE router (``RouterGatingLinearFunction`` in ``megatron.core.transformer.moe.moe_utils``)
  tests ``if te_general_gemm is not None``, but that module binds ``te_general_gemm`` only when
  Transformer Engine imports, so megatron-core's own MoE (``--num-experts``) dies in its first
  forward with ``NameError``. The name is bound to ``None``, which is what the test means (the
  gating GEMM then runs in torch).
* The optimizer falls back to ``torch.optim.Adam``/``AdamW``, whose per-parameter state exists only
  after the first step. ``DistributedOptimizer.state_dict()`` asserts exactly one ``step`` value in
  that state, so it fails on an optimizer that has not stepped yet, which is exactly the state a
  checkpoint is loaded into (``--use-distributed-optimizer --load``). ``seed_adam_state`` first
  gives every parameter the state a fresh Adam would create (step 0, zero moments); that changes
  no later update.
* ``DistributedOptimizer.load_state_dict()`` then restores Adam's ``step`` wrongly: one tensor
  shared by every parameter (Adam then adds 1 per parameter per step), later overwritten by the
  loading template's own step. ``restore_adam_steps`` gives each parameter its own step tensor
  holding the iteration saved in the parameter groups.

``apply()`` installs the three for GPU runs (``pretrain_gpt``, the benchmark). On the CPU,
``cpu_compat.apply()`` installs them among its patches, with the same two helpers; after
``cpu_compat.apply()`` this ``apply()`` changes nothing, so a later ``cpu_compat.remove()`` (tests)
leaves none of the fixes in place until ``apply()`` runs again.
"""
from __future__ import annotations

import functools
import importlib

import torch

ROUTER_MODULE = "megatron.core.transformer.moe.moe_utils"
ROUTER_NAME = "te_general_gemm"
_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer"
_MARK = "__fmoe_te_compat__"
_ADAMS = (torch.optim.Adam, torch.optim.AdamW)


def seed_adam_state(optimizer) -> None:
    """Gives every parameter of a torch Adam/AdamW that has not stepped yet the state its first
    step would create (step 0, zero moments). Any other optimizer, or one with state, is left
    alone."""
    if not isinstance(optimizer, _ADAMS) or optimizer.state:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param].update(
                step=torch.tensor(0.0, dtype=torch.float32),
                exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
            )


def restore_adam_steps(optimizer, state_dict: dict) -> None:
    """After ``DistributedOptimizer.load_state_dict(state_dict)``: each parameter of a torch
    Adam/AdamW gets its own ``step`` tensor holding the iteration saved in the parameter groups
    (when they agree on one)."""
    if not isinstance(optimizer, _ADAMS):
        return
    groups = state_dict.get("optimizer", {}).get("param_groups", [])
    saved = {g["step"] for g in groups if g.get("step") is not None}
    if len(saved) != 1:
        return
    iteration = float(saved.pop())
    for param_state in optimizer.state.values():
        if "step" in param_state:
            param_state["step"] = torch.tensor(iteration, dtype=torch.float32)


def seeding_state_dict(original):
    """``DistributedOptimizer.state_dict`` that first seeds a fresh torch Adam's state."""
    def state_dict(self, *args, **kwargs):
        seed_adam_state(self.optimizer)
        return original(self, *args, **kwargs)
    return state_dict


def restoring_load_state_dict(original):
    """``DistributedOptimizer.load_state_dict`` that then gives each parameter its own step."""
    def load_state_dict(self, state_dict, *args, **kwargs):
        out = original(self, state_dict, *args, **kwargs)
        restore_adam_steps(self.optimizer, state_dict)
        return out
    return load_state_dict


def _wrap(cls, name: str, make) -> bool:
    current = vars(cls)[name]
    if getattr(current, _MARK, False) or getattr(current, "__fmoe_cpu_compat__", None):
        return False  # done already (here, or by cpu_compat)
    replacement = functools.wraps(current)(make(current))
    setattr(replacement, _MARK, True)
    setattr(cls, name, replacement)
    return True


def apply() -> list[str]:
    """Installs the three fixes where they are missing; returns what it changed now (nothing the
    second time). Safe with Transformer Engine or Apex installed: the router name is then bound,
    and the optimizer is not a torch Adam."""
    changed = []
    router = importlib.import_module(ROUTER_MODULE)
    if ROUTER_NAME not in vars(router):
        setattr(router, ROUTER_NAME, None)
        changed.append(f"{ROUTER_MODULE}:{ROUTER_NAME}")
    cls = importlib.import_module(_OPTIMIZER).DistributedOptimizer

    for name, make in (("state_dict", seeding_state_dict),
                       ("load_state_dict", restoring_load_state_dict)):
        if _wrap(cls, name, make):
            changed.append(f"{_OPTIMIZER}:DistributedOptimizer.{name}")
    return changed
