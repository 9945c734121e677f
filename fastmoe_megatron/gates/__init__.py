"""Gates: each routes tokens to experts and records its balance loss (FastMoE's ``fmoe.gates``)."""
from .base_gate import BaseGate
from .dc_gate import DCGate
from .gshard_gate import GShardGate
from .naive_gate import NaiveGate
from .noisy_gate import NoisyGate
from .swipe_gate import SwipeGate
from .switch_gate import SwitchGate
from .utils import limit_by_capacity, prune_gate_by_capacity
from .zero_gate import ZeroGate

__all__ = [
    "BaseGate", "NaiveGate", "NoisyGate", "GShardGate", "SwitchGate", "DCGate", "SwipeGate",
    "ZeroGate", "limit_by_capacity", "prune_gate_by_capacity",
]
