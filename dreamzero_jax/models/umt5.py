"""The frozen umT5-XXL text encoder and its sentencepiece tokenizer (key maps: weights/umt5_keys.py).

umT5 differs from T5 in one way that matters here: every layer owns its relative-position bias
table (T5 shares the first layer's). Layers are stacked on a leading 'layers' axis and scanned,
so a 24-layer 4096-wide encoder compiles once. Outputs past each prompt's true length are zeroed
per sample (docs/model.md; the official release gets this wrong for batch > 1).
"""
from __future__ import annotations

import html
import math
import os
import re
from typing import Callable, Sequence

import ftfy
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece
from flax import nnx

from dreamzero_jax.models import layers
from dreamzero_jax.settings import TextEncoderSettings

# Per-layer parameters, all stacked on a leading 'layers' axis: name -> logical axes.
_LAYER_AXES = {
    'attn_norm': ('layers', 'norm'),
    'q': ('layers', 'embed', 'heads'),
    'k': ('layers', 'embed', 'heads'),
    'v': ('layers', 'embed', 'heads'),
    'o': ('layers', 'heads', 'embed'),
    'rel_bias': ('layers', None, 'heads'),
    'ffn_norm': ('layers', 'norm'),
    'gate': ('layers', 'embed', 'mlp'),   # the GELU branch of the gated FFN
    'up': ('layers', 'embed', 'mlp'),     # the linear branch
    'down': ('layers', 'mlp', 'embed'),
}
LINEAR = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')    # the linear layers' kernels [in, out]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets [length, length] of (key - query), computed as the references do.

  Each direction gets num_buckets/2 buckets: half for exact small distances, the rest log-spaced
  up to max_distance. The log is taken in float32 like the PyTorch references: at umT5-XXL's
  settings distances 16, 32, 64 and 128 land exactly on bucket edges, where precision decides.
  """
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  max_exact = half // 2
  side = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  with np.errstate(divide='ignore'):
    log_ratio = (np.log(dist.astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.where(dist < max_exact, 0, log_ratio).astype(np.int64)
  large = np.minimum(large, half - 1)
  return side + np.where(dist < max_exact, dist, large)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """T5 LayerNorm: no mean subtraction, no bias, statistics in fp32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _layer(x: jax.Array, p: dict[str, jax.Array], buckets: np.ndarray, valid: jax.Array,
           num_heads: int, eps: float) -> jax.Array:
  """One pre-norm umT5 block: self-attention with this layer's own bias, then the gated FFN."""
  b, l, _ = x.shape
  w = {name: p[name].astype(x.dtype) for name in LINEAR}
  h = rms_norm(x, p['attn_norm'], eps)
  q, k, v = (jnp.einsum('bld,de->ble', h, w[n]).reshape(b, l, num_heads, -1) for n in 'qkv')
  # T5 folds the scale into its initialisation: no 1/sqrt(head_dim) here.
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  bias = jnp.take(p['rel_bias'].astype(jnp.float32), buckets, axis=0)   # [L, L, H]
  logits = logits + jnp.transpose(bias, (2, 0, 1))[None]
  logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
  attn = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, l, -1)
  x = x + jnp.einsum('ble,ed->bld', attn, w['o'])
  h = rms_norm(x, p['ffn_norm'], eps)
  gated = jax.nn.gelu(h @ w['gate'], approximate=True) * (h @ w['up'])
  return x + gated @ w['down']


class UMT5Encoder(nnx.Module):
  """umT5 encoder: token ids [B, L] and true lengths [B] -> embeddings [B, L, dim], zero past length."""

  def __init__(self, cfg: TextEncoderSettings, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, eps: float = 1e-6):
    if cfg.dim % cfg.num_heads:
      raise ValueError(f'text_encoder.dim {cfg.dim} is not a multiple of num_heads {cfg.num_heads}')
    self.num_heads, self.num_buckets = cfg.num_heads, cfg.num_buckets
    self.max_distance = cfg.max_distance
    self.dtype, self.eps = dtype, eps
    n, d, f = cfg.num_layers, cfg.dim, cfg.ffn_dim
    shapes = {'attn_norm': (n, d), 'q': (n, d, d), 'k': (n, d, d), 'v': (n, d, d), 'o': (n, d, d),
              'rel_bias': (n, cfg.num_buckets, cfg.num_heads), 'ffn_norm': (n, d),
              'gate': (n, d, f), 'up': (n, d, f), 'down': (n, f, d)}
    for name, shape in shapes.items():
      init = layers.ones if name.endswith('norm') else layers.normal(shape[-2] ** -0.5)
      setattr(self, name, layers.param(rngs, init, shape, _LAYER_AXES[name], param_dtype))
    self.embedding = layers.param(rngs, layers.normal(1.0), (cfg.vocab_size, d), ('vocab', 'embed'),
                                  param_dtype)
    self.final_norm = layers.param(rngs, layers.ones, (d,), ('norm',), param_dtype)

  def __call__(self, ids: jax.Array, lengths: jax.Array) -> jax.Array:
    if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
      raise ValueError(f'umT5 expects ids [B, L] and lengths [B], got {ids.shape} and {lengths.shape}')
    _, length = ids.shape
    valid = jnp.arange(length)[None, :] < lengths[:, None]
    buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
    stacked = {name: getattr(self, name)[...] for name in _LAYER_AXES}
    x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def body(x, p):
      return _layer(x, p, buckets, valid, self.num_heads, self.eps), None

    x, _ = jax.lax.scan(body, x, stacked)
    x = rms_norm(x, self.final_norm[...], self.eps)
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


def _clean(text: str) -> str:
  """The official pipeline's 'whitespace' cleaning: fix mojibake, unescape HTML, collapse spaces."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r'\s+', ' ', text).strip()


def _find_spiece(path: str) -> str:
  if not path:
    raise FileNotFoundError('umT5 tokenizer: text_encoder.tokenizer is not set (the path of '
                            'spiece.model or of the google/umt5-xxl tokenizer folder)')
  candidates = [path, os.path.join(path, 'spiece.model'),
                os.path.join(path, 'google', 'umt5-xxl', 'spiece.model')]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(
      f'umT5 tokenizer: no sentencepiece model at {path!r} (looked for {", ".join(candidates)}); '
      'point text_encoder.tokenizer at spiece.model or the google/umt5-xxl tokenizer folder')


class UMT5Tokenizer:
  """google/umt5-xxl tokenization: sentencepiece ids + EOS, truncated/padded to text_len.

  Matches the official pipeline (HF T5 tokenizer, padding='max_length', truncation): a prompt
  longer than text_len keeps text_len - 1 pieces and its EOS.
  """

  def __init__(self, path: str, text_len: int):
    self.processor = sentencepiece.SentencePieceProcessor(model_file=_find_spiece(path))
    self.text_len = text_len
    self.pad_id, self.eos_id = self.processor.pad_id(), self.processor.eos_id()
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError(f'umT5 tokenizer {path!r}: the sentencepiece model defines no pad or eos piece')

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ids [B, text_len] int32 and true lengths [B] int32 (EOS included)."""
    ids = np.full((len(prompts), self.text_len), self.pad_id, np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for row, pieces in enumerate(self.processor.encode([_clean(p) for p in prompts])):
      pieces = pieces[:self.text_len - 1] + [self.eos_id]
      ids[row, :len(pieces)] = pieces
      lengths[row] = len(pieces)
    return ids, lengths


def prompt_encoder(model: UMT5Encoder, tokenizer: UMT5Tokenizer
                   ) -> Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]:
  """A host-side `prompts -> (embeddings [B, text_len, dim] numpy, lengths [B])` for caching."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids, lengths: nnx.merge(graphdef, state)(ids, lengths))

  def encode(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, lengths = tokenizer(prompts)
    return np.asarray(forward(state, ids, lengths)), lengths

  return encode

