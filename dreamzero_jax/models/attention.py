"""Attention kernels behind one registry, with a fallback chain.

`attend(q, k, v, mask, impl=...)` tries the requested implementation and falls back along
FALLBACK[impl] to the first one that supports the platform, dtype and mask at trace time; 'xla'
supports everything and ends every chain. 'auto' (the default) is TPU splash attention on TPUs,
cuDNN flash attention on GPUs and XLA elsewhere. The platform is that of the active mesh's devices
(sharding.use_mesh_rules), so an ahead-of-time compile for a TPU slice on a CPU host uses splash.

Layout: q [B, Lq, H, Dh], k/v [B, Lk, H, Dh]; mask is None or boolean [Lq, Lk] / [B, Lq, Lk]
(True = may attend). Masks here are static (built from token layouts), which is what lets TPU
splash attention compile its block-sparse schedule.

The 'xla' path materialises fp32 scores [B, H, Lq, Lk]: for a 14B training clip (16,000 tokens, 40
heads) that is 41 GB per example, forward and again in the backward recompute. With block_q > 0
it walks the queries in blocks of that many rows (lax.map, each block rematerialised in the
backward pass), so only [B, H, block_q, Lk] scores live at once, on any backend and under any
sharding GSPMD can propagate (batch, heads), at the cost of a loop the fused kernels do not need.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dreamzero_jax import sharding

AttentionFn = Callable[..., jax.Array]
# supports(q, k, mask) says at trace time whether an implementation can run these inputs.
_REGISTRY: dict[str, tuple[AttentionFn, Callable[..., bool]]] = {}
FALLBACK = {
    'auto': ('splash', 'cudnn', 'xla'),  # the fused kernel of the platform, else XLA
    'cudnn': ('cudnn', 'xla'),
    'splash': ('splash', 'xla'),
    'xla': ('xla',),
}


_USED: contextvars.ContextVar = contextvars.ContextVar('dreamzero_attention_used', default=None)


@contextlib.contextmanager
def record():
  """Collects the names of the implementations `attend` resolves to while tracing inside."""
  names: set[str] = set()
  token = _USED.set(names)
  try:
    yield names
  finally:
    _USED.reset(token)


def register(name: str, supports: Callable[..., bool]):
  def wrap(fn):
    _REGISTRY[name] = (fn, supports)
    return fn
  return wrap


def _platform() -> str:
  """The platform the code is being traced for: the devices of the active mesh (which, for an
  ahead-of-time compile, are TPU devices while the host backend is the CPU), else the backend."""
  ctx = sharding.current()
  return ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()


def _expand_mask(mask):
  mask = jnp.asarray(mask)
  return mask[None, None] if mask.ndim == 2 else mask[:, None]


def _dense_attention(q, k, v, mask=None):
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(_expand_mask(mask), logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(q.dtype)


@register('xla', supports=lambda q, k, mask: True)
def xla_attention(q, k, v, mask=None, block_q: int = 0):
  """Softmax attention with fp32 logits and softmax, output in q's dtype; query-blocked if block_q."""
  b, lq, h, d = q.shape
  if not block_q or lq <= block_q:
    return _dense_attention(q, k, v, mask)
  nb = -(-lq // block_q)
  pad = nb * block_q - lq
  # Padded query rows attend to everything (a fully masked row would be all -inf) and are dropped.
  qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, block_q, h, d)
  xs = [jnp.moveaxis(qb, 1, 0)]
  if mask is not None:
    mask = jnp.asarray(mask)
    rows = [(0, pad, 0), (0, 0, 0)] if mask.ndim == 2 else [(0, 0, 0), (0, pad, 0), (0, 0, 0)]
    mask = jax.lax.pad(mask, jnp.array(True), rows)
    mask = mask.reshape(nb, block_q, -1) if mask.ndim == 2 else jnp.moveaxis(
        mask.reshape(b, nb, block_q, -1), 1, 0)
    xs.append(mask)

  @jax.checkpoint
  def one_block(x):
    return _dense_attention(x[0], k, v, x[1] if len(x) > 1 else None)

  out = jax.lax.map(one_block, xs)  # [nb, B, block_q, H, Dh]
  return jnp.moveaxis(out, 0, 1).reshape(b, nb * block_q, h, d)[:, :lq]


@register('cudnn', supports=lambda q, k, mask: _platform() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16))
def cudnn_attention(q, k, v, mask=None):
  return even_length_attention(q, k, v, mask, implementation='cudnn')


def even_length_attention(q, k, v, mask=None, *, implementation: str | None = None):
  """jax.nn.dot_product_attention with odd query / key lengths padded to even ones: cuDNN's fused
  kernel has no backward pass for odd lengths (jax raises 'Unsupported sequence length Q 16000, KV
  257' at the first training step: the 257 CLIP image tokens of the I2V cross-attention, measured on
  an H200, bench/RESULTS.md). The padding is exact: a zero query row, sliced off the output, and a
  zero key that no query sees (hidden by the kernel's own key_value_seq_lengths, or by a False column
  of `mask` where there is one)."""
  b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
  pad_q, pad_k = lq % 2, lk % 2
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x
  q, k, v = pad(q, pad_q), pad(k, pad_k), pad(v, pad_k)
  lengths = {}
  if mask is not None:
    mask = _expand_mask(mask)
    # The padded query row sees the real keys (never a fully masked row); the padded key is hidden.
    mask = jax.lax.pad(mask, jnp.array(False), [(0, 0, 0)] * 2 + [(0, pad_q, 0), (0, pad_k, 0)])
    if pad_q:
      mask = mask.at[..., lq, :lk].set(True)
  elif pad_k or pad_q:
    lengths = dict(query_seq_lengths=jnp.full((b,), lq, jnp.int32),
                   key_value_seq_lengths=jnp.full((b,), lk, jnp.int32))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation, **lengths)
  return out[:, :lq]


def _splash_layout():
  """(batch spec entry, heads spec entry, batch shards, head shards) of q under the active mesh
  rules, or None when the sequence itself is split (context parallel: not handled here)."""
  ctx = sharding.current()
  if ctx is None:
    return (None, None, 1, 1)
  mesh, rules = ctx
  batch, length, heads, _ = sharding.logical_to_spec(
      ('activation_batch', 'activation_length', 'activation_heads', None), rules)
  size = lambda entry: int(np.prod([mesh.shape[a] for a in (
      () if entry is None else (entry,) if isinstance(entry, str) else entry)]))
  if size(length) != 1:
    return None
  return (batch, heads, size(batch), size(heads))


def _splash_supported(q, k, mask) -> bool:
  # Splash takes the mask as a host array (static: its block-sparse schedule is built at trace
  # time), one mask for the batch, 128-multiple lengths and head_dim, whole local batch and heads.
  layout = _splash_layout()
  return (_platform() == 'tpu' and (mask is None or (isinstance(mask, np.ndarray) and mask.ndim == 2))
          and q.shape[1] % 128 == 0 and k.shape[1] % 128 == 0 and q.shape[-1] % 128 == 0
          and layout is not None and q.shape[0] % layout[2] == 0 and q.shape[2] % layout[3] == 0)


@register('splash', supports=_splash_supported)
def splash_attention(q, k, v, mask=None, *, interpret: bool = False):
  """TPU splash attention (Pallas), per device under the active mesh through shard_map.

  Each device runs the kernel on its examples and heads (batch and heads are split as the rules
  split activations; K/V follow q). `interpret` runs the kernel in the Pallas interpreter (tests
  on the CPU).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  _, lq, h, d = q.shape
  lk = k.shape[1]
  batch, heads, _, head_shards = _splash_layout()
  base = sm.FullMask((lq, lk)) if mask is None else sm.NumpyMask(np.asarray(mask))
  kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * (h // head_shards)), head_shards=1,
                              q_seq_shards=1, interpret=interpret)

  def local(q, k, v):
    to_bhld = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.vmap(kernel)(to_bhld(q) * d ** -0.5, to_bhld(k), to_bhld(v))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)

  ctx = sharding.current()
  if ctx is None:
    return local(q, k, v)
  spec = PartitionSpec(batch, None, heads, None)
  return jax.shard_map(local, mesh=ctx[0], in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def resolve(impl: str, q: jax.Array, k: jax.Array, mask=None) -> str:
  """The first implementation of impl's fallback chain that supports these inputs."""
  if impl not in FALLBACK:
    raise ValueError(f'unknown attention implementation {impl!r} (known: {", ".join(FALLBACK)})')
  for name in FALLBACK[impl]:
    if _REGISTRY[name][1](q, k, mask):
      return name
  return 'xla'


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask=None, *, impl: str = 'xla',
           block_q: int = 0) -> jax.Array:
  """Attention through the first supported implementation of impl's chain.

  block_q bounds the 'xla' path's score memory (see the module docstring); fused kernels ignore it.
  """
  name = resolve(impl, q, k, mask)
  if (used := _USED.get()) is not None:
    used.add(name)
  if name == 'xla':
    return xla_attention(q, k, v, mask, block_q=block_q)
  return _REGISTRY[name][0](q, k, v, mask)
