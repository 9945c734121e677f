"""FastMoE's ``fmoe.linear`` module path: ``FMoELinear`` (defined in ``layers``)."""
from .layers import FMoELinear

__all__ = ["FMoELinear"]
