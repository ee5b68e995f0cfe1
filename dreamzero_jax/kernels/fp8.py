"""fp8 (e4m3) weights and GEMM: per-output-channel weight scales, per-token activation scales.

A weight w [K, N] is stored as w_q = w / s_w in float8_e4m3fn with s_w[n] = max_k |w[k, n]| / 448
(448: e4m3's largest finite value), half the bytes of bf16 (16.4 GB of 14B DiT weights instead of 32.8 GB). At each call
the activations are quantised per token the same way (s_x[m] = max_k |x[m, k]| / 448, one XLA
fusion), the kernel multiplies the fp8 tiles with fp32 accumulation and applies s_x[m] * s_w[n]
(and the bias) to the accumulator before the one write. Inference only: no gradient.

Error against the unquantised product (`error_bound`): e4m3 keeps 3 mantissa bits, so rounding a
scaled value v moves it by at most u|v| + a with u = 2^-4 (normal range) and a = 2^-10 (half the
subnormal spacing 2^-9). With |dx| <= u|x| + a s_x and |dw| <= u|w| + a s_w, per output
|y_fp8 - y| <= (2u + u^2) (|x| @ |w|) + (1 + u) a (s_x sum_k |w| + s_w sum_k |x|) + K a^2 s_x s_w,
plus fp32 accumulation (K 2^-23 |x| @ |w|, counted in). Relative to |x| @ |w| that is ~13% in the
worst case; rounding errors of random sign make the typical error a few percent of max |y|.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dreamzero_jax import sharding
from dreamzero_jax.kernels import registry

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
_U = 2.0 ** -4 + 2.0 ** -22  # relative rounding of a normal e4m3 value (+ the fp32 division before it)
_A = 2.0 ** -10  # absolute rounding of a subnormal e4m3 value, in units of the scale
_HIGHEST = jax.lax.Precision.HIGHEST


class Fp8Weight(NamedTuple):
  """qweight [..., K, N] float8_e4m3fn and scale [..., N] fp32: w ~= qweight * scale."""
  qweight: jax.Array
  scale: jax.Array


def _quantize(x, axis: int):
  """x / s in e4m3 with s = amax / 448 over `axis` (1 where the amax is 0), and s without `axis`."""
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
  # The fp32 division can land a hair above 448; e4m3fn has no infinity (overflow is NaN).
  q = jnp.clip(x32 / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)
  return q, jnp.squeeze(scale, axis)


def quantize_weight(w: jax.Array) -> Fp8Weight:
  """w [..., K, N] (a Dense kernel, stacked layers allowed) -> per-output-channel fp8 weight."""
  return Fp8Weight(*_quantize(w, -2))


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., K] -> (x_q [..., K] e4m3, per-token scale [...] fp32)."""
  return _quantize(x, -1)


def dequantize(q: jax.Array, scale: jax.Array, axis: int) -> jax.Array:
  return q.astype(jnp.float32) * jnp.expand_dims(scale, axis)


def fp8_matmul_reference(x, w: Fp8Weight, bias=None, *, out_dtype=jnp.float32):
  """The dequantised product: (x_q s_x) @ (w_q s_w) (+ bias) in fp32, cast to out_dtype."""
  xq, sx = quantize_activations(x)
  y = jnp.matmul(dequantize(xq, sx, -1), dequantize(w.qweight, w.scale, -2), precision=_HIGHEST)
  return (y if bias is None else y + bias.astype(jnp.float32)).astype(out_dtype)


def _xla(x, w: Fp8Weight, bias=None, *, out_dtype=jnp.float32):
  """The XLA path: an fp8 dot with fp32 accumulation, the scales applied to its output."""
  xq, sx = quantize_activations(x)
  y = jnp.matmul(xq, w.qweight, preferred_element_type=jnp.float32) * sx[..., None] * w.scale
  return (y if bias is None else y + bias.astype(jnp.float32)).astype(out_dtype)


def error_bound(x: jax.Array, w: jax.Array) -> jax.Array:
  """Elementwise bound on |fp8_matmul(x, quantize_weight(w)) - x @ w| (fp32 output), [..., N]."""
  x32, w32 = jnp.abs(x.astype(jnp.float32)), jnp.abs(w.astype(jnp.float32))
  k = x.shape[-1]
  sx = quantize_activations(x)[1][..., None]
  sw = quantize_weight(w).scale
  return ((2 * _U + _U * _U + k * 2.0 ** -23) * jnp.matmul(x32, w32, precision=_HIGHEST)
          + (1 + _U) * _A * (sx * w32.sum(-2) + sw * x32.sum(-1, keepdims=True)) + k * _A * _A * sx * sw)


# ---- the Pallas kernel ---------------------------------------------------------------------------


def _tile(n: int, cap: int) -> int:
  """The largest power of two <= cap dividing n."""
  return min(n & -n, cap)


def _tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
  """(bm, bn, bk): 128-wide tiles where the shapes allow; rows are padded up to bm."""
  bm = min(128, max(16, 1 << (m - 1).bit_length()))
  return bm, _tile(n, 128), _tile(k, 128)


def _unsupported(x, w, bias=None, *, out_dtype=jnp.float32):
  del out_dtype
  if w.qweight.ndim != 2 or w.qweight.dtype != E4M3 or w.scale.shape != w.qweight.shape[1:]:
    return f'weight must be one e4m3 [K, N] with scale [N], got {w.qweight.dtype}{list(w.qweight.shape)}'
  k, n = w.qweight.shape
  if x.shape[-1] != k:
    return f'x [..., {x.shape[-1]}] does not match the weight [{k}, {n}]'
  if bias is not None and bias.shape != (n,):
    return f'bias must be [{n}], got {bias.shape}'
  if min(_tile(n, 128), _tile(k, 128)) < 16:
    return f'K={k} and N={n} must be multiples of 16 (the tensor-core tile)'
  if sharding.platform() == 'gpu' and (cc := _compute_capability()) < 89:
    return f'fp8 tensor cores need compute capability 8.9+ (this GPU: sm_{cc})'
  return None


def _compute_capability() -> int:
  """sm version of the first GPU as an int (90 for Hopper); 0 if unknown."""
  cc = getattr(jax.devices()[0], 'compute_capability', '0')
  return int(str(cc).replace('.', '')) if str(cc).replace('.', '').isdigit() else 0


def _matmul_kernel(xq_ref, wq_ref, sx_ref, sw_ref, b_ref, o_ref, *, bk):
  def body(i, acc):
    a = xq_ref[:, pl.ds(i * bk, bk)]
    b = wq_ref[pl.ds(i * bk, bk), :]
    return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, xq_ref.shape[1] // bk, body, jnp.zeros(o_ref.shape, jnp.float32))
  acc = acc * sx_ref[...][:, None] * sw_ref[...][None, :] + b_ref[...][None, :]
  o_ref[...] = acc.astype(o_ref.dtype)


def _kernel(x, w: Fp8Weight, bias=None, *, out_dtype=jnp.float32, interpret=False):
  lead, k = x.shape[:-1], x.shape[-1]
  n = w.qweight.shape[1]
  xq, sx = quantize_activations(x.reshape(-1, k))
  m = xq.shape[0]
  bm, bn, bk = _tiles(m, k, n)
  mp = -(-m // bm) * bm
  # Rows padded to whole tiles (Triton's block loads are unmasked); XLA fuses the pad into the
  # quantisation and the slice into the consumer.
  xq, sx = jnp.pad(xq, ((0, mp - m), (0, 0))), jnp.pad(sx, (0, mp - m))
  bias = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  y = pl.pallas_call(
      functools.partial(_matmul_kernel, bk=bk),
      grid=(mp // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                pl.BlockSpec((bm,), lambda i, j: (i,)), pl.BlockSpec((bn,), lambda i, j: (j,)),
                pl.BlockSpec((bn,), lambda i, j: (j,))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      interpret=interpret,
      compiler_params=registry.triton_params(8 if bm * bn >= 128 * 128 else 4, num_stages=3),
      name='fp8_matmul',
  )(xq, w.qweight, sx, w.scale, bias)
  return y[:m].reshape(*lead, n)


FP8_MATMUL = registry.Kernel('fp8_matmul', xla=_xla, kernel=_kernel, unsupported=_unsupported)


def fp8_matmul(x: jax.Array, w: Fp8Weight, bias: jax.Array | None = None, *, out_dtype=jnp.bfloat16,
               impl: str = 'auto') -> jax.Array:
  """x [..., K] (bf16/fp32, quantised per token inside) @ an fp8 weight [K, N] (+ bias [N]) ->
  [..., N] in out_dtype, through the registry chain `impl`."""
  return FP8_MATMUL(x, w, bias, out_dtype=jnp.dtype(out_dtype), impl=impl)
