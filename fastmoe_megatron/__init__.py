"""fastmoe_megatron: Mixture-of-Experts layers for PyTorch and Megatron, drop-in compatible with
FastMoE (``fmoe``). Megatron support lives in ``fastmoe_megatron.megatron`` and is imported only
from there."""
from . import gates
from .distributed import DistributedGroupedDataParallel, update_expert_biases
from .layers import FMoE, FMoELinear, FMoETransformerMLP
from .moefy import moefy

__version__ = "0.1.0"

__all__ = [
    "FMoE", "FMoELinear", "FMoETransformerMLP", "DistributedGroupedDataParallel",
    "update_expert_biases", "moefy", "gates",
]
