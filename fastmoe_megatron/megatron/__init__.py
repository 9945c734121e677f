"""Everything in fastmoe_megatron that imports Megatron lives in this subpackage.

Nothing is imported here on purpose: importing ``fastmoe_megatron.megatron`` must not import
megatron-core. Import the submodules you need, e.g. ``fastmoe_megatron.megatron.cpu_compat``.
"""
