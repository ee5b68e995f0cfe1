"""DreamZero's per-embodiment action encoder, state encoder and action decoder (docs/model.md).

Each weight is a table indexed by embodiment id, so a new embodiment adds a row without touching
the others (the official release forces one shared set). Initialised 0.02 * randn, biases zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreamzero_jax.models.layers import param, normal, zeros


class EmbodimentLinear(nnx.Module):
  """y = x @ W[e] + b[e] with one (W, b) per embodiment."""

  def __init__(self, num: int, din: int, dout: int, axes: tuple[str | None, str | None], *,
               rngs: nnx.Rngs):
    self.kernel = param(rngs, normal(0.02), (num, din, dout), ('embodiment', *axes))
    self.bias = param(rngs, zeros, (num, dout), ('embodiment', axes[1]))

  def __call__(self, x: jax.Array, embodiment_id: jax.Array) -> jax.Array:
    """x [B, L, din], embodiment_id int [B] -> [B, L, dout]."""
    w = self.kernel[...][embodiment_id].astype(x.dtype)
    b = self.bias[...][embodiment_id].astype(x.dtype)
    return jnp.einsum('bli,bio->blo', x, w) + b[:, None, :]


def sin_cos_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[sin, cos] embedding of (action) timesteps t [...] -> [..., dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


class ActionEncoder(nnx.Module):
  """Noisy actions + their timestep -> tokens: W1 a, concat [sin, cos](t), W2, swish, W3."""

  def __init__(self, num: int, action_dim: int, dim: int, *, rngs: nnx.Rngs):
    self.dim = dim
    self.w1 = EmbodimentLinear(num, action_dim, dim, ('input', 'embed'), rngs=rngs)
    self.w2 = EmbodimentLinear(num, 2 * dim, dim, (None, 'embed'), rngs=rngs)
    self.w3 = EmbodimentLinear(num, dim, dim, (None, 'embed'), rngs=rngs)

  def __call__(self, actions: jax.Array, t: jax.Array, embodiment_id: jax.Array) -> jax.Array:
    """actions [B, N, A], t [B, N] in [0, 1000] -> [B, N, D]."""
    a = self.w1(actions, embodiment_id)
    tau = sin_cos_embedding(t, self.dim).astype(a.dtype)
    h = jax.nn.swish(self.w2(jnp.concatenate([a, tau], -1), embodiment_id))
    return self.w3(h, embodiment_id)


class EmbodimentMLP(nnx.Module):
  """Two-layer ReLU MLP per embodiment (state encoder 64->1024->D, action decoder D->1024->32)."""

  def __init__(self, num: int, din: int, hidden: int, dout: int, axes: tuple[str | None, str | None], *,
               rngs: nnx.Rngs):
    self.layer1 = EmbodimentLinear(num, din, hidden, (axes[0], 'mlp'), rngs=rngs)
    self.layer2 = EmbodimentLinear(num, hidden, dout, ('mlp', axes[1]), rngs=rngs)

  def __call__(self, x: jax.Array, embodiment_id: jax.Array) -> jax.Array:
    return self.layer2(jax.nn.relu(self.layer1(x, embodiment_id)), embodiment_id)
