"""adaLN modulation from a per-group table, and the fused LayerNorm + modulate kernel.

A DreamZero sequence carries a handful of distinct timesteps (clean frames, each chunk's video t,
each chunk's action t, state), yet the per-token modulation e0 [B, L, 6, D] stores one row per
token: 219 MB per layer at the inference shape, ~2 GB (+ its gradient) per 16,000-token training
example. Here the time embedding runs on the G distinct timesteps, giving a table [B, G, 6, D],
and each token carries its group id (`TimeGroups`). `gather_groups` turns a table back into
per-token rows where they are consumed (the plain XLA path: a gather XLA can fuse into the
elementwise op that reads it); `layer_norm_modulate` is LN(x) * (1 + scale[g]) + shift[g] through
the kernel registry, whose Pallas kernel normalises one token per program and reads its group's
two table rows directly.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dreamzero_jax.kernels import registry

_MAX_CHUNK = 1024  # widest vector a program holds at once (Triton wants power-of-two sizes)
_MAX_CHUNKS = 16  # chunks per row are unrolled in the kernel


class TimeGroups(NamedTuple):
  """The distinct timesteps of a token sequence and each token's group.

  t [B, G] timesteps of the G groups; group [L] (the same layout for the whole batch, static when
  built from a layout) or [B, L], int32 ids into the G axis.
  """
  t: jax.Array
  group: jax.Array | np.ndarray

  def per_token(self) -> jax.Array:
    """The per-token timesteps [B, L] these groups stand for."""
    return gather_groups(self.t, self.group)

  def padded(self, length: int) -> 'TimeGroups':
    """Extends the sequence to `length` tokens; the padding (masked out) joins group 0."""
    extra = length - self.group.shape[-1]
    widths = [(0, 0)] * (self.group.ndim - 1) + [(0, extra)]
    pad = np.pad if isinstance(self.group, np.ndarray) else jnp.pad
    return TimeGroups(self.t, pad(self.group, widths))


def time_groups(segments: Sequence[tuple[jax.Array, int]]) -> TimeGroups:
  """Groups of a sequence made of segments (values [B, n], tokens per value): each of the n values
  is one group covering that many consecutive tokens.

  E.g. the teacher-forcing sequence [clean video | noisy video | actions | state] is
  [(zeros [B, 1], n), (video_t [B, F], n // F), (action_t [B, K*Ha], 1), (zeros [B, 1], K)].
  The group ids are a static numpy array [L], shared by the batch.
  """
  values, ids, first = [], [], 0
  for v, repeat in segments:
    v = jnp.asarray(v, jnp.float32)
    values.append(v)
    ids.append(first + np.repeat(np.arange(v.shape[1], dtype=np.int32), repeat))
    first += v.shape[1]
  return TimeGroups(jnp.concatenate(values, 1), np.concatenate(ids))


def gather_groups(table: jax.Array, group: jax.Array | np.ndarray) -> jax.Array:
  """Per-token rows of a per-group table: table [B, G, ...], group [L] or [B, L] -> [B, L, ...]."""
  group = jnp.asarray(group)
  if group.ndim == 1:
    return jnp.take(table, group, axis=1)
  return jnp.take_along_axis(table, group.reshape(*group.shape, *[1] * (table.ndim - 2)), axis=1)


def gated_residual(x: jax.Array, y: jax.Array, gate: jax.Array, group) -> jax.Array:
  """x + y * gate[g] in fp32: x [B, L, D] fp32, y [B, L, D], gate table [B, G, D]."""
  return x + y.astype(jnp.float32) * gather_groups(gate.astype(jnp.float32), group)


def layer_norm_modulate_reference(x, shift, scale, group, *, eps: float = 1e-6, out_dtype=None):
  """LN(x) (no affine, fp32) * (1 + scale[g]) + shift[g], cast to out_dtype (x's by default).

  x [B, L, D]; shift, scale [B, G, D] fp32; group [L] or [B, L] int32. Also the 'xla' path.
  """
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  y = y * (1 + gather_groups(scale.astype(jnp.float32), group)) + gather_groups(shift.astype(jnp.float32), group)
  return y.astype(out_dtype or x.dtype)


# ---- the Pallas kernel ---------------------------------------------------------------------------


def _chunk(d: int) -> int:
  """The largest power of two <= _MAX_CHUNK dividing d: a row is read in d / chunk vectors."""
  return min(d & -d, _MAX_CHUNK)


def _unsupported(x, shift, scale, group, *, eps=1e-6, out_dtype=None):
  del eps, out_dtype
  if x.ndim != 3:
    return f'x must be [B, L, D], got {x.shape}'
  b, length, d = x.shape
  if shift.shape != scale.shape or shift.ndim != 3 or shift.shape[0] != b or shift.shape[2] != d:
    return f'shift/scale must be [B, G, D] = [{b}, G, {d}], got {shift.shape} / {scale.shape}'
  if jnp.asarray(group).shape not in ((length,), (b, length)) or not jnp.issubdtype(group.dtype, jnp.integer):
    return f'group must be int [L] or [B, L], got {group.dtype}{list(group.shape)}'
  if d // _chunk(d) > _MAX_CHUNKS:
    return f'width {d} splits into more than {_MAX_CHUNKS} power-of-two vectors'
  return None


def _specs(x, table, group):
  """BlockSpecs over the (B, L) grid: one token row, its batch's table, its group id."""
  _, _, d = x.shape
  row = pl.BlockSpec((None, None, d), lambda b, l: (b, l, 0))
  tab = pl.BlockSpec((None, table.shape[1], d), lambda b, l: (b, 0, 0))
  gid = (pl.BlockSpec((None,), lambda b, l: (l,)) if group.ndim == 1
         else pl.BlockSpec((None, None), lambda b, l: (b, l)))
  stat = pl.BlockSpec((None, None), lambda b, l: (b, l))
  return row, tab, gid, stat


def _num_warps(d: int) -> int:
  return 4 if d >= 1024 else 1


def _forward_kernel(x_ref, shift_ref, scale_ref, group_ref, y_ref, mean_ref, rstd_ref, *, eps, chunk):
  d = x_ref.shape[-1]
  g = group_ref[...]
  # The row is held in registers as d / chunk vectors: two-pass mean and variance, as the
  # reference computes them, then one write of the modulated row.
  xs = [x_ref[pl.ds(c, chunk)].astype(jnp.float32) for c in range(0, d, chunk)]
  mean = sum(jnp.sum(v) for v in xs) / d
  var = sum(jnp.sum(jnp.square(v - mean)) for v in xs) / d
  rstd = jax.lax.rsqrt(var + eps)
  for c, v in zip(range(0, d, chunk), xs):
    scale = scale_ref[g, pl.ds(c, chunk)].astype(jnp.float32)
    shift = shift_ref[g, pl.ds(c, chunk)].astype(jnp.float32)
    y_ref[pl.ds(c, chunk)] = ((v - mean) * rstd * (1 + scale) + shift).astype(y_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _backward_kernel(x_ref, scale_ref, group_ref, mean_ref, rstd_ref, dy_ref, dx_ref, *, chunk):
  """dx of y = xhat * (1 + scale[g]) + shift[g] for one token row."""
  d = x_ref.shape[-1]
  g, mean, rstd = group_ref[...], mean_ref[...], rstd_ref[...]
  xhat, dxhat = [], []
  for c in range(0, d, chunk):
    xhat.append((x_ref[pl.ds(c, chunk)].astype(jnp.float32) - mean) * rstd)
    dxhat.append(dy_ref[pl.ds(c, chunk)].astype(jnp.float32) * (1 + scale_ref[g, pl.ds(c, chunk)].astype(jnp.float32)))
  mean_dxhat = sum(jnp.sum(v) for v in dxhat) / d
  mean_dxhat_xhat = sum(jnp.sum(a * b) for a, b in zip(dxhat, xhat)) / d
  for c, xh, dxh in zip(range(0, d, chunk), xhat, dxhat):
    dx_ref[pl.ds(c, chunk)] = (rstd * (dxh - mean_dxhat - xh * mean_dxhat_xhat)).astype(dx_ref.dtype)


def _forward(x, shift, scale, group, eps, out_dtype, interpret):
  b, length, d = x.shape
  row, tab, gid, stat = _specs(x, shift, group)
  return pl.pallas_call(
      functools.partial(_forward_kernel, eps=eps, chunk=_chunk(d)),
      grid=(b, length),
      in_specs=[row, tab, tab, gid],
      out_specs=[row, stat, stat],
      out_shape=[jax.ShapeDtypeStruct(x.shape, out_dtype), jax.ShapeDtypeStruct((b, length), jnp.float32),
                 jax.ShapeDtypeStruct((b, length), jnp.float32)],
      interpret=interpret,
      compiler_params=registry.triton_params(_num_warps(d)),
      name='layer_norm_modulate',
  )(x, shift, scale, group)


def _backward_dx(x, scale, group, mean, rstd, dy, interpret):
  b, length, d = x.shape
  row, tab, gid, stat = _specs(x, scale, group)
  return pl.pallas_call(
      functools.partial(_backward_kernel, chunk=_chunk(d)),
      grid=(b, length),
      in_specs=[row, tab, gid, stat, stat, row],
      out_specs=row,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      interpret=interpret,
      compiler_params=registry.triton_params(_num_warps(d)),
      name='layer_norm_modulate_dx',
  )(x, scale, group, mean, rstd, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _layer_norm_modulate_pallas(x, shift, scale, group, eps, out_dtype, interpret):
  return _forward(x, shift, scale, group, eps, out_dtype, interpret)[0]


def _fwd(x, shift, scale, group, eps, out_dtype, interpret):
  y, mean, rstd = _forward(x, shift, scale, group, eps, out_dtype, interpret)
  return y, (x, shift, scale, group, mean, rstd)


def _bwd(eps, out_dtype, interpret, res, dy):
  del eps, out_dtype
  x, shift, scale, group, mean, rstd = res
  dx = _backward_dx(x, scale, group, mean, rstd, dy, interpret)
  # Table gradients are per-group sums over tokens: a one-hot [.., L, G] contraction (G is small).
  dy32 = dy.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean[..., None]) * rstd[..., None]
  onehot = (jnp.asarray(group)[..., None] == jnp.arange(shift.shape[1])).astype(jnp.float32)
  spec = 'lg,bld->bgd' if onehot.ndim == 2 else 'blg,bld->bgd'
  per_group = functools.partial(jnp.einsum, spec, onehot, precision=jax.lax.Precision.HIGHEST)
  return dx, per_group(dy32).astype(shift.dtype), per_group(dy32 * xhat).astype(scale.dtype), None


_layer_norm_modulate_pallas.defvjp(_fwd, _bwd)


def _kernel(x, shift, scale, group, *, eps=1e-6, out_dtype=None, interpret=False):
  group = jnp.asarray(group, jnp.int32)
  return _layer_norm_modulate_pallas(x, shift, scale, group, eps, jnp.dtype(out_dtype or x.dtype), interpret)


def _probe(x, shift, scale, group, **kw):
  """The forward and both backward paths, as training compiles them."""
  loss = lambda x, shift, scale: jnp.sum(_kernel(x, shift, scale, group, **kw).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))(x, shift, scale)


LAYER_NORM_MODULATE = registry.Kernel('layer_norm_modulate', xla=layer_norm_modulate_reference, kernel=_kernel,
                                      unsupported=_unsupported, probe=_probe)


def layer_norm_modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, group, *, eps: float = 1e-6,
                        out_dtype=None, impl: str = 'auto') -> jax.Array:
  """LN(x) * (1 + scale[g]) + shift[g] in out_dtype (differentiable in x, shift and scale).

  x [B, L, D] (the fp32 residual stream); shift, scale [B, G, D] per-group tables; group [L] or
  [B, L] int32. impl: a registry chain ('auto', 'pallas', 'interpret', 'xla').
  """
  return LAYER_NORM_MODULATE(x, shift, scale, group, eps=eps, out_dtype=out_dtype, impl=impl)
