"""q/k RMSNorm (over all heads, learned weight) and RoPE in one pass over the projection output.

Unfused, the self-attention reads and writes q and k twice (norm, then rotation). The kernel runs
one token per program: the sum of squares over the full width, then per chunk of heads the norm,
the weight and the rotation of channel pairs (x[2i], x[2i+1]) by that token's angles [Dh/2], with
the roundings of layers.RMSNorm (normed value and weight product in x's dtype) and of
rope.apply_rope (rotation in fp32).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dreamzero_jax.kernels import registry

_MAX_CHUNK = 1024  # widest vector a program holds at once (Triton wants power-of-two sizes)


def qk_norm_rope_reference(x, weight, angles, *, eps: float = 1e-6):
  """RMSNorm over heads x channels then RoPE: x [B, L, H, Dh], weight [H*Dh], angles [L, Dh/2] or
  [B, L, Dh/2] -> [B, L, H, Dh] in x's dtype. Also the 'xla' path."""
  b, length, h, dh = x.shape
  dtype = x.dtype
  x32 = x.reshape(b, length, h * dh).astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
  y = (y.astype(dtype) * weight.astype(dtype)).reshape(x.shape)
  if angles.ndim == 2:
    angles = angles[None]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  yf = y.astype(jnp.float32).reshape(b, length, h, dh // 2, 2)
  re, im = yf[..., 0], yf[..., 1]
  return jnp.stack([re * cos - im * sin, re * sin + im * cos], -1).reshape(x.shape).astype(dtype)


def _heads_per_chunk(h: int, pairs: int) -> int:
  """The most heads, a power of two dividing h, whose pairs fit one vector of _MAX_CHUNK."""
  hc = h & -h
  while hc * pairs > _MAX_CHUNK and hc > 1:
    hc //= 2
  return hc


def _unsupported(x, weight, angles, *, eps=1e-6):
  del eps
  if x.ndim != 4:
    return f'x must be [B, L, H, Dh], got {x.shape}'
  b, length, h, dh = x.shape
  pairs = dh // 2
  if dh % 2 or pairs & (pairs - 1):
    return f'head_dim/2 must be a power of two, got head_dim {dh}'
  if weight.shape != (h * dh,):
    return f'weight must be [{h * dh}], got {weight.shape}'
  if angles.shape not in ((length, pairs), (b, length, pairs)):
    return f'angles must be [L, {pairs}] or [B, L, {pairs}], got {angles.shape}'
  if h // _heads_per_chunk(h, pairs) > 64:
    return f'{h} heads split into more than 64 chunks'
  return None


def _kernel_body(x_ref, w_ref, a_ref, o_ref, *, eps, heads_per_chunk):
  h, pairs, _ = x_ref.shape
  dtype = o_ref.dtype
  chunks = [pl.ds(c, heads_per_chunk) for c in range(0, h, heads_per_chunk)]
  # Real and imaginary channels are read apart (stride 2), so no in-kernel reshape is needed.
  re = [x_ref[c, :, 0].astype(jnp.float32) for c in chunks]
  im = [x_ref[c, :, 1].astype(jnp.float32) for c in chunks]
  ms = sum(jnp.sum(r * r) + jnp.sum(i * i) for r, i in zip(re, im)) / (h * pairs * 2)
  inv = jax.lax.rsqrt(ms + eps)
  angles = a_ref[...].astype(jnp.float32)[None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)

  def normed(v, w):  # RMSNorm's roundings: the normed value and its product with the weight in dtype
    v = (v * inv).astype(dtype).astype(jnp.float32) * w.astype(dtype).astype(jnp.float32)
    return v.astype(dtype).astype(jnp.float32)

  for c, r, i in zip(chunks, re, im):
    r, i = normed(r, w_ref[c, :, 0]), normed(i, w_ref[c, :, 1])
    o_ref[c, :, 0] = (r * cos - i * sin).astype(dtype)
    o_ref[c, :, 1] = (r * sin + i * cos).astype(dtype)


def _kernel(x, weight, angles, *, eps=1e-6, interpret=False):
  b, length, h, dh = x.shape
  pairs = dh // 2
  xp = x.reshape(b, length, h, pairs, 2)  # free: channel pairs on their own axis
  row = pl.BlockSpec((None, None, h, pairs, 2), lambda i, l: (i, l, 0, 0, 0))
  ang = (pl.BlockSpec((None, pairs), lambda i, l: (l, 0)) if angles.ndim == 2
         else pl.BlockSpec((None, None, pairs), lambda i, l: (i, l, 0)))
  out = pl.pallas_call(
      functools.partial(_kernel_body, eps=eps, heads_per_chunk=_heads_per_chunk(h, pairs)),
      grid=(b, length),
      in_specs=[row, pl.BlockSpec((h, pairs, 2), lambda i, l: (0, 0, 0)), ang],
      out_specs=row,
      out_shape=jax.ShapeDtypeStruct(xp.shape, x.dtype),
      interpret=interpret,
      compiler_params=registry.triton_params(4 if h * dh >= 1024 else 1),
      name='qk_norm_rope',
  )(xp, weight.reshape(h, pairs, 2), angles)
  return out.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _differentiable(x, weight, angles, eps, interpret):
  return _kernel(x, weight, angles, eps=eps, interpret=interpret)


def _fwd(x, weight, angles, eps, interpret):
  return _kernel(x, weight, angles, eps=eps, interpret=interpret), (x, weight, angles)


def _bwd(eps, interpret, res, dy):
  # An inference kernel; training through it gets the reference's gradient (no backward kernel).
  del interpret
  _, vjp = jax.vjp(functools.partial(qk_norm_rope_reference, eps=eps), *res)
  return vjp(dy)


_differentiable.defvjp(_fwd, _bwd)


def _registered_kernel(x, weight, angles, *, eps=1e-6, interpret=False):
  return _differentiable(x, weight, angles, eps, interpret)


QK_NORM_ROPE = registry.Kernel('qk_norm_rope', xla=qk_norm_rope_reference, kernel=_registered_kernel,
                               unsupported=_unsupported)


def qk_norm_rope(x: jax.Array, weight: jax.Array, angles: jax.Array, *, eps: float = 1e-6,
                 impl: str = 'auto') -> jax.Array:
  """RMSNorm over all heads (weight [H*Dh]) then RoPE by angles [L, Dh/2] or [B, L, Dh/2]:
  x [B, L, H, Dh] -> [B, L, H, Dh] in x's dtype, through the registry chain `impl`."""
  return QK_NORM_ROPE(x, weight, angles, eps=eps, impl=impl)
