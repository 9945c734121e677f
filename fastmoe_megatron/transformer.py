"""FastMoE's ``fmoe.transformer`` module path: ``FMoETransformerMLP`` (defined in ``layers``)."""
from .layers import FMoETransformerMLP, _Expert

__all__ = ["FMoETransformerMLP", "_Expert"]
