"""The self-attention KV cache of real observed frames, as an explicit pytree.

Slots hold the per-layer K/V of clean latent-frame tokens, with each slot's token group and chunk
id so the chunk-mask rules (masks.py) decide visibility exactly as in training. Empty slots are
PAD and invisible. Capacity is static (1 + K*frames_per_chunk latent frames of tokens), so every
step compiles once.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dreamzero_jax.models import masks
from dreamzero_jax.settings import ModelSettings


class KVCache(NamedTuple):
  k: jax.Array        # [layers, B, capacity, H, Dh]
  v: jax.Array        # [layers, B, capacity, H, Dh]
  group: jax.Array    # int8 [capacity] (masks.Group)
  chunk: jax.Array    # int32 [capacity]
  length: jax.Array   # int32 [] filled slots (a prefix)

  @property
  def layout(self) -> masks.TokenLayout:
    return masks.TokenLayout(self.group, self.chunk)

  @property
  def capacity(self) -> int:
    return self.k.shape[2]


KV_CACHE_DTYPES = ('auto', 'float32', 'bfloat16', 'float8_e4m3fn')


def cache_dtype(model_cfg: ModelSettings) -> jnp.dtype:
  """model.kv_cache_dtype: 'auto' = e4m3 under model.quantization='fp8', else model.dtype; or a
  dtype by name. fp8 halves the cache (6.5 GB per CFG branch in bf16 for the 14B DROID step)."""
  name = model_cfg.kv_cache_dtype
  if name not in KV_CACHE_DTYPES:
    raise ValueError(f'model.kv_cache_dtype {name!r} unknown (known: {", ".join(KV_CACHE_DTYPES)})')
  if name == 'auto':
    return jnp.dtype(jnp.float8_e4m3fn if model_cfg.quantization == 'fp8' else model_cfg.dtype)
  return jnp.dtype(name)


def stored(x: jax.Array, dtype) -> jax.Array:
  """x in the cache's dtype; fp8 is saturated first (e4m3fn has no infinity: overflow is NaN).
  Stored without a scale: keys are RMS-normalised, so their entries sit well inside e4m3's range."""
  if x.dtype == jnp.dtype(dtype):
    return x
  if jnp.dtype(dtype).itemsize == 1:
    bound = float(jnp.finfo(dtype).max)
    x = jnp.clip(x.astype(jnp.float32), -bound, bound)
  return x.astype(dtype)


def empty_cache(num_layers: int, batch: int, capacity: int, num_heads: int, head_dim: int,
                dtype=jnp.float32) -> KVCache:
  shape = (num_layers, batch, capacity, num_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.full((capacity,), masks.Group.PAD, jnp.int8), jnp.zeros((capacity,), jnp.int32),
                 jnp.zeros((), jnp.int32))


def append(cache: KVCache, k: jax.Array, v: jax.Array, layout: masks.TokenLayout) -> KVCache:
  """Writes new tokens' K/V [layers, B, n, H, Dh] and layout after the filled prefix.

  The caller guarantees room (policy.py resets a full cache before writing).
  """
  start = cache.length
  idx = (0, 0, start, 0, 0)
  return KVCache(
      jax.lax.dynamic_update_slice(cache.k, stored(k, cache.k.dtype), idx),
      jax.lax.dynamic_update_slice(cache.v, stored(v, cache.v.dtype), idx),
      jax.lax.dynamic_update_slice(cache.group, jnp.asarray(layout.group, jnp.int8), (start,)),
      jax.lax.dynamic_update_slice(cache.chunk, jnp.asarray(layout.chunk, jnp.int32), (start,)),
      start + k.shape[2])


def reset(cache: KVCache) -> KVCache:
  """Marks every slot empty (K/V values are left; PAD slots are never attended)."""
  return cache._replace(group=jnp.full_like(cache.group, masks.Group.PAD), length=jnp.zeros((), jnp.int32))
