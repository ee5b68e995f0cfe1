"""The frozen CLIP ViT-H/14 image encoder: the penultimate layer's hidden states of the first frame.

Wan2.1-I2V conditions on open-clip xlm-roberta-large ViT-H/14 features taken after block 31 of
32 (the official `use_31_block=True`), with the pre-transformer LayerNorm and exact-erf GELU. The
model therefore holds only the num_layers - 1 blocks it runs; the last block, the final LayerNorm
and the projection head of a checkpoint are skipped (weights/clip_keys.py: `unused_keys`). Layers are stacked on a
leading 'layers' axis and scanned. Output [B, (image_size/patch)^2 + 1, width] (257 x 1280).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamzero_jax.models import layers
from dreamzero_jax.settings import ImageEncoderSettings

# OpenAI CLIP pixel statistics (RGB, on [0, 1] pixels), used by open-clip ViT-H/14 and by the
# official Wan2.1 CLIP transforms.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Per-layer parameters, stacked on a leading 'layers' axis: name -> logical axes.
_LAYER_AXES = {
    'norm1_scale': ('layers', 'norm'), 'norm1_bias': ('layers', 'norm'),
    'q_kernel': ('layers', 'embed', 'heads'), 'q_bias': ('layers', 'heads'),
    'k_kernel': ('layers', 'embed', 'heads'), 'k_bias': ('layers', 'heads'),
    'v_kernel': ('layers', 'embed', 'heads'), 'v_bias': ('layers', 'heads'),
    'o_kernel': ('layers', 'heads', 'embed'), 'o_bias': ('layers', 'embed'),
    'norm2_scale': ('layers', 'norm'), 'norm2_bias': ('layers', 'norm'),
    'fc1_kernel': ('layers', 'embed', 'mlp'), 'fc1_bias': ('layers', 'mlp'),
    'fc2_kernel': ('layers', 'mlp', 'embed'), 'fc2_bias': ('layers', 'embed'),
}


def _layer_shapes(width: int, mlp_dim: int) -> dict[str, tuple[int, ...]]:
  d, m = width, mlp_dim
  return {'norm1_scale': (d,), 'norm1_bias': (d,), 'q_kernel': (d, d), 'q_bias': (d,),
          'k_kernel': (d, d), 'k_bias': (d,), 'v_kernel': (d, d), 'v_bias': (d,),
          'o_kernel': (d, d), 'o_bias': (d,), 'norm2_scale': (d,), 'norm2_bias': (d,),
          'fc1_kernel': (d, m), 'fc1_bias': (m,), 'fc2_kernel': (m, d), 'fc2_bias': (d,)}


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 (PyTorch's a = -0.75)."""
  def near(x):   # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):    # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] bicubic resampling matrix of torch `interpolate(mode='bicubic',
  align_corners=False)`: half-pixel centres, no antialiasing, edge taps clamped."""
  src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
  base = np.floor(src)
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, size_in - 1)
  matrix = np.zeros((size_out, size_in))
  rows = np.repeat(np.arange(size_out), 4)
  np.add.at(matrix, (rows, taps.ravel()), _cubic_weights(src - base).ravel())
  return matrix.astype(np.float32)


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """Pixels [B, H, W, 3] in [-1, 1] -> CLIP input [B, S, S, 3] as the official Wan2.1 pipeline:
  bicubic resize to S x S (aspect not kept), map to [0, 1], normalise by CLIP_MEAN / CLIP_STD."""
  _, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  x = jnp.einsum('oh,bhwc->bowc', bicubic_matrix(h, image_size), x)
  x = jnp.einsum('pw,bowc->bopc', bicubic_matrix(w, image_size), x)
  x = x * 0.5 + 0.5
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _layer(x: jax.Array, p: dict[str, jax.Array], num_heads: int, eps: float) -> jax.Array:
  """One pre-norm ViT block: x += Attn(LN(x)); x += MLP(LN(x)) with exact GELU."""
  b, l, _ = x.shape
  w = {name: value.astype(x.dtype) for name, value in p.items()}
  h = layer_norm(x, p['norm1_scale'], p['norm1_bias'], eps)
  q, k, v = ((h @ w[f'{n}_kernel'] + w[f'{n}_bias']).reshape(b, l, num_heads, -1) for n in 'qkv')
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(x.dtype)
  attn = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, l, -1)
  x = x + attn @ w['o_kernel'] + w['o_bias']
  h = layer_norm(x, p['norm2_scale'], p['norm2_bias'], eps)
  h = jax.nn.gelu(h @ w['fc1_kernel'] + w['fc1_bias'], approximate=False)
  return x + h @ w['fc2_kernel'] + w['fc2_bias']


class CLIPVision(nnx.Module):
  """Normalised images [B, S, S, 3] -> penultimate-layer hidden states [B, (S/p)^2 + 1, width]."""

  def __init__(self, cfg: ImageEncoderSettings, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, eps: float = 1e-5):
    if cfg.image_size % cfg.patch_size or cfg.width % cfg.num_heads:
      raise ValueError(f'image_encoder: image_size {cfg.image_size} must be a multiple of '
                       f'patch_size {cfg.patch_size} and width {cfg.width} a multiple of '
                       f'num_heads {cfg.num_heads}')
    self.image_size, self.patch_size, self.num_heads = cfg.image_size, cfg.patch_size, cfg.num_heads
    self.dtype, self.eps = dtype, eps
    n, d, m, p = cfg.num_layers - 1, cfg.width, cfg.mlp_dim, cfg.patch_size
    tokens = (cfg.image_size // p) ** 2 + 1
    self.patch_kernel = layers.param(rngs, layers.normal(0.02), (p, p, 3, d),
                                     ('kernel_h', 'kernel_w', 'conv_in', 'embed'), param_dtype)
    self.class_embedding = layers.param(rngs, layers.normal(d ** -0.5), (d,), ('embed',), param_dtype)
    self.pos_embedding = layers.param(rngs, layers.normal(d ** -0.5), (tokens, d), (None, 'embed'),
                                      param_dtype)
    self.pre_norm_scale = layers.param(rngs, layers.ones, (d,), ('norm',), param_dtype)
    self.pre_norm_bias = layers.param(rngs, layers.zeros, (d,), ('norm',), param_dtype)
    shapes = _layer_shapes(d, m)
    for name, axes in _LAYER_AXES.items():
      shape = shapes[name]
      if name.endswith('kernel'):
        init = layers.normal(shape[0] ** -0.5)
      else:
        init = layers.ones if name.endswith('scale') else layers.zeros
      setattr(self, name, layers.param(rngs, init, (n, *shape), axes, param_dtype))

  def __call__(self, pixels: jax.Array) -> jax.Array:
    b, h, w, c = pixels.shape
    if (h, w, c) != (self.image_size, self.image_size, 3):
      raise ValueError(f'CLIP expects [B, {self.image_size}, {self.image_size}, 3] pixels (see '
                       f'preprocess), got {tuple(pixels.shape)}')
    p = self.patch_size
    patches = pixels.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    x = patches @ self.patch_kernel[...].reshape(p * p * c, -1).astype(self.dtype)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(self.dtype)
    x = layer_norm(x, self.pre_norm_scale[...], self.pre_norm_bias[...], self.eps)
    stacked = {name: getattr(self, name)[...] for name in _LAYER_AXES}
    x, _ = jax.lax.scan(lambda x, p: (_layer(x, p, self.num_heads, self.eps), None), x, stacked)
    return x


def encode_first_frame(model: CLIPVision, frames: jax.Array) -> jax.Array:
  """Canvas video [B, T, H, W, 3] in [-1, 1] -> CLIP features of frame 0 [B, tokens, width]."""
  return model(preprocess(frames[:, 0], model.image_size))

