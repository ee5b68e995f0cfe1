"""Parameter-carrying building blocks shared by the models, with logical axis names on every weight."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes,
          dtype=jnp.float32) -> nnx.Param:
  """A parameter with its logical axis names (mapped to mesh axes by dreamzero_jax.sharding)."""
  assert len(axes) == len(shape), (shape, axes)
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def normal(std: float) -> Callable:
  return jax.nn.initializers.normal(std)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel [in, out]."""

  def __init__(self, din: int, dout: int, axes: Axes, *, rngs: nnx.Rngs, bias: bool = True,
               init: Callable | None = None, dtype=jnp.float32):
    init = init or jax.nn.initializers.xavier_uniform()
    self.kernel = param(rngs, init, (din, dout), axes, dtype)
    self.bias = param(rngs, zeros, (dout,), (axes[1],), dtype) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum('...i,io->...o', x, self.kernel[...].astype(x.dtype))
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm computed in fp32; `affine=False` is the modulated norm of the Wan blocks."""

  def __init__(self, dim: int, *, eps: float, affine: bool, rngs: nnx.Rngs | None = None,
               axis_name: str = 'norm'):
    self.eps = eps
    self.scale = param(rngs, ones, (dim,), (axis_name,)) if affine else None
    self.bias = param(rngs, zeros, (dim,), (axis_name,)) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...] + self.bias[...]
    return y.astype(dtype)


class RMSNorm(nnx.Module):
  """RMS norm over the last axis (q/k norm over all heads at once, as in Wan)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs | None = None, axis_name: str = 'norm'):
    self.eps = eps
    self.scale = param(rngs, ones, (dim,), (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y.astype(dtype) * self.scale[...].astype(dtype))


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)
