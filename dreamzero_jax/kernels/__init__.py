"""Pallas GPU kernels, each beside its pure-jnp reference, behind one registry (registry.py).

modulation.py: per-group adaLN tables and fused LayerNorm + modulate (training: with backward).
qk_norm_rope.py: q/k RMSNorm + RoPE fused.  fp8.py: e4m3 GEMM with per-channel / per-token scales.
check.py: every kernel against its reference (`python -m dreamzero_jax.kernels.check`).
"""
