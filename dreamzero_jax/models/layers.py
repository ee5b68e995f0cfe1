"""Parameter-carrying building blocks shared by the models, with logical axis names on every weight."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamzero_jax.kernels import fp8

Axes = tuple[str | None, ...]


_STACK: contextvars.ContextVar[int | None] = contextvars.ContextVar('dreamzero_stack', default=None)
_PARAM_DTYPE: contextvars.ContextVar = contextvars.ContextVar('dreamzero_param_dtype', default=jnp.float32)


@contextlib.contextmanager
def param_dtype(dtype):
  """Parameters created inside without an explicit dtype are stored in `dtype` (model.param_dtype)."""
  token = _PARAM_DTYPE.set(dtype)
  try:
    yield
  finally:
    _PARAM_DTYPE.reset(token)


@contextlib.contextmanager
def stacked(num: int):
  """Parameters created inside get a leading 'layers' axis of size `num` (for scanned blocks)."""
  token = _STACK.set(num)
  try:
    yield
  finally:
    _STACK.reset(token)


class Init:
  """An initializer drawn with numpy when the key is concrete (eager jax.random compiles a program
  per shape, seconds each on a CPU) and with jax.random under tracing. Fans come from the last
  two dims, so a stacked [layers, in, out] kernel is initialised like each layer's [in, out]."""

  def __init__(self, kind: str, scale: float = 1.0):
    self.kind, self.scale = kind, scale

  def _limit(self, shape):
    fan_in, fan_out = (shape[-2], shape[-1]) if len(shape) >= 2 else (shape[-1], shape[-1])
    return np.sqrt(6.0 / (fan_in + fan_out))

  def __call__(self, key, shape, dtype=jnp.float32):
    shape = tuple(shape)
    if self.kind in ('zeros', 'ones'):
      return (jnp.zeros if self.kind == 'zeros' else jnp.ones)(shape, dtype)
    if isinstance(key, jax.core.Tracer):
      if self.kind == 'normal':
        return self.scale * jax.random.normal(key, shape, dtype)
      return jax.random.uniform(key, shape, dtype, -self._limit(shape), self._limit(shape))
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    if self.kind == 'normal':
      value = self.scale * rng.standard_normal(shape)
    else:
      value = rng.uniform(-self._limit(shape), self._limit(shape), shape)
    return jnp.asarray(value, dtype)


def normal(std: float) -> Init:
  return Init('normal', std)


xavier_uniform = Init('xavier_uniform')
zeros = Init('zeros')
ones = Init('ones')


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes,
          dtype=None) -> nnx.Param:
  """A parameter with its logical axis names (mapped to mesh axes by dreamzero_jax.sharding)."""
  assert len(axes) == len(shape), (shape, axes)
  dtype = _PARAM_DTYPE.get() if dtype is None else dtype
  stack = _STACK.get()
  if stack is not None:
    shape, axes = (stack, *shape), ('layers', *axes)
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel [in, out]."""

  def __init__(self, din: int, dout: int, axes: Axes, *, rngs: nnx.Rngs, bias: bool = True,
               init: Callable | None = None, dtype=None):
    init = init or xavier_uniform
    self.kernel = param(rngs, init, (din, dout), axes, dtype)
    self.bias = param(rngs, zeros, (dout,), (axes[1],), dtype) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum('...i,io->...o', x, self.kernel[...].astype(x.dtype))
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Fp8Dense(nnx.Module):
  """A Dense layer's inference form with fp8 weights: kernel [..., in, out] as e4m3 plus per-output-
  channel scales (kernels/fp8.py), applied by the fp8 GEMM (activations quantised per token)."""

  def __init__(self, dense: Dense, impl: str):
    axes = dense.kernel.get_metadata()['logical_axes']
    w = fp8.quantize_weight(dense.kernel[...])
    self.qweight = nnx.Param(w.qweight, logical_axes=axes)
    self.scale = nnx.Param(w.scale, logical_axes=(*axes[:-2], axes[-1]))
    self.bias = dense.bias
    self.impl = impl

  def __call__(self, x: jax.Array) -> jax.Array:
    w = fp8.Fp8Weight(self.qweight[...], self.scale[...])
    return fp8.fp8_matmul(x, w, None if self.bias is None else self.bias[...], out_dtype=x.dtype, impl=self.impl)


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
