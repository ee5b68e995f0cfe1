"""Shared test helpers."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_model(factory, seed: int = 0, scale: float = 0.3):
  """factory() built abstractly, every parameter filled with scale * N(0, 1) numpy draws.

  Skips jax.random's per-shape compiles, and gives zero-initialised layers (output heads) real
  values so that outputs react to their inputs.
  """
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype),
                                          state))
