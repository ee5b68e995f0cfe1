"""The attention registry: blocked XLA attention and the splash kernel against a numpy reference."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamzero_jax.models import attention
from tests import helpers


def _inputs(lq=37, lk=45, b=2, h=3, d=8, seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.standard_normal((b, n, h, d)), jnp.float32) for n in (lq, lk, lk))
  return q, k, v, r


def _reference(q, k, v, mask):
  """Softmax attention written out with numpy, independent of the module."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    m = mask[None, None] if mask.ndim == 2 else mask[:, None]
    logits = np.where(m, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', p, v)


@pytest.mark.parametrize('mask_kind', ['none', 'shared', 'per_example'])
@pytest.mark.parametrize('block_q', [0, 8, 37, 64])
def test_blocked_xla_attention_matches_dense(mask_kind, block_q):
  q, k, v, r = _inputs()
  mask = None
  if mask_kind != 'none':
    shape = (37, 45) if mask_kind == 'shared' else (2, 37, 45)
    mask = r.random(shape) < 0.6
    mask[..., 0] = True  # every query row sees something
  got = attention.attend(q, k, v, mask, impl='xla', block_q=block_q)
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_blocked_xla_attention_gradients_match_dense():
  q, k, v, r = _inputs()
  mask = r.random((37, 45)) < 0.6
  mask[:, 0] = True
  cot = jnp.asarray(r.standard_normal(q.shape), jnp.float32)
  loss = lambda block: lambda q, k, v: jnp.sum(attention.attend(q, k, v, mask, block_q=block) * cot)
  want = jax.grad(loss(0), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(8), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mask_kind,lq,lk', [('none', 37, 45), ('none', 36, 45), ('shared', 37, 44),
                                              ('per_example', 37, 45)])
def test_even_length_padding_is_exact(mask_kind, lq, lk):
  """cuDNN's path pads odd lengths (its backward needs even ones); run here through jax's XLA
  implementation of the same call, values and gradients equal the unpadded reference."""
  q, k, v, r = _inputs(lq, lk)
  mask = None
  if mask_kind != 'none':
    mask = r.random((lq, lk) if mask_kind == 'shared' else (2, lq, lk)) < 0.6
    mask[..., 0] = True
  got = attention.even_length_attention(q, k, v, mask, implementation='xla')
  assert got.shape == q.shape
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(r.standard_normal(q.shape), jnp.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cot)
  want = jax.grad(loss(lambda q, k, v: attention.xla_attention(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda q, k, v: attention.even_length_attention(q, k, v, mask, implementation='xla')),
                 argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_blocked_attention_keeps_score_memory_to_one_block():
  # Compiled temp memory of the blocked path must not grow like Lq x Lk.
  q = jax.ShapeDtypeStruct((1, 2048, 2, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 2048, 2, 8), jnp.float32)
  temp = lambda block: jax.jit(lambda q, k, v: attention.attend(q, k, v, block_q=block)).lower(
      q, kv, kv).compile().memory_analysis().temp_size_in_bytes
  dense_scores = 2 * 2048 * 2048 * 4
  assert temp(0) >= dense_scores
  assert temp(256) < dense_scores / 2


def test_unknown_implementation_is_named():
  q, k, v, _ = _inputs()
  with pytest.raises(ValueError, match="unknown attention implementation 'flash3'"):
    attention.attend(q, k, v, impl='flash3')


def _splash_inputs(b=2, lq=256, lk=384, h=4, seed=1):
  q, k, v, r = _inputs(lq, lk, b, h, 128, seed)
  # Block-causal-like structure (rows see a prefix that grows by blocks) plus scattered keys.
  mask = (np.arange(lk)[None] < 128 + (np.arange(lq)[:, None] // 64) * 64) | (r.random((lq, lk)) < 0.1)
  return q, k, v, mask


def test_splash_kernel_matches_reference_in_the_interpreter():
  # The TPU kernel itself, run by the Pallas interpreter on the CPU: values and gradients.
  q, k, v, mask = _splash_inputs()
  got = attention.splash_attention(q, k, v, mask, interpret=True)
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  want = jax.grad(loss(lambda *a: attention.xla_attention(*a, mask)), argnums=(0, 1, 2))(q, k, v)
  grads = jax.grad(loss(lambda *a: attention.splash_attention(*a, mask, interpret=True)),
                   argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_auto_resolves_to_xla_on_the_cpu():
  q, k, _, mask = _splash_inputs()
  assert attention.resolve('auto', q, k, mask) == 'xla'
  with attention.record() as used:
    attention.attend(q, k, k, mask, impl='auto')
  assert used == {'xla'}


def test_splash_under_a_mesh_runs_per_device():
  # 8 fake devices must be set before JAX starts: run this file as a script in a fresh process.
  helpers.run_with_fake_devices(__file__, ['--sharded-splash'], 8, 'sharded splash ok', timeout=600)


def _sharded_splash_check():
  from jax.sharding import NamedSharding, PartitionSpec

  from dreamzero_jax import sharding
  mesh = sharding.make_mesh((1, 2, 1, 4))   # batch over fsdp 2, heads over tensor 4
  q, k, v, mask = _splash_inputs(b=2, h=4)
  spec = NamedSharding(mesh, PartitionSpec('fsdp', None, 'tensor', None))

  def fn(q, k, v):
    with sharding.use_mesh_rules(mesh):
      return attention.splash_attention(q, k, v, mask, interpret=True)

  got = jax.jit(fn, in_shardings=(spec,) * 3, out_shardings=spec)(q, k, v)
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
  text = jax.jit(fn, in_shardings=(spec,) * 3, out_shardings=spec).lower(q, k, v).compile().as_text()
  assert 'all-gather' not in text and 'all_gather' not in text, 'q/k/v were gathered, not split'
  print('sharded splash ok')


if __name__ == '__main__':
  if sys.argv[1:] == ['--sharded-splash']:
    jax.config.update('jax_default_matmul_precision', 'highest')
    _sharded_splash_check()
