"""The frozen Wan video VAE with an explicit feature cache: Wan2.1 (z16, 8x spatial, 4x temporal)
and Wan2.2 (z48, 16x spatial: 2x2 pixel patches, residual stages), chosen by vae.kind.

Wan encodes a clip as its first frame alone, then groups of 4 frames; every causal conv sees the
last 2 frames of its input from the previous group (the "feature cache"). Here that cache is a
pytree passed in and returned, so streaming encode is a pure, jit-able function and gives the same
latents as whole-clip encode. Layout is channels-last: video [B, T, H, W, 3] with pixels in
[-1, 1], latents [B, F, h, w, z] with F = 1 + (T - 1) / 4, normalised per channel.

A cache of `None` marks the start of a clip: causal convs then see zeros before the first frame,
and the temporal down/upsamplers pass the first frame through on its own, as Wan does.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamzero_jax.models import layers
from dreamzero_jax.settings import VAESettings

# Published per-channel statistics of Wan2.1 VAE latents: latents = (mu - mean) / std.
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# The same for the Wan2.2 VAE (z48).
WAN22_LATENT_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382,
                     0.0542, 0.2813, 0.0891, 0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207,
                     -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109,
                     0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
                     -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573,
                     -0.0548, -0.1681, -0.0667)
WAN22_LATENT_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344,
                    0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
                    0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
                    0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                    0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

CACHE_FRAMES = 2        # input frames a 3-tap causal conv keeps from the previous chunk
FRAMES_PER_LATENT = 4   # pixel frames per latent frame after the first
I2V_MASK_CHANNELS = 4   # mask channels in front of the first-frame latent in Wan2.1's I2V y

Cache = Any  # nested dicts/tuples of arrays mirroring the module tree; None = clip start


@dataclasses.dataclass(frozen=True)
class _Kind:
  mean: tuple[float, ...]
  std: tuple[float, ...]
  patch: int       # pixels are folded p x p into channels before the encoder (Wan2.2)
  residual: bool   # stages carry Wan2.2's parameter-free space-time <-> channel shortcut


_KINDS = {'wan2.1': _Kind(WAN21_LATENT_MEAN, WAN21_LATENT_STD, patch=1, residual=False),
          'wan2.2': _Kind(WAN22_LATENT_MEAN, WAN22_LATENT_STD, patch=2, residual=True)}


def latent_statistics(kind: str) -> tuple[np.ndarray, np.ndarray]:
  """The per-channel (mean, std) a `kind` VAE normalises mu with: latents = (mu - mean) / std."""
  return np.asarray(_KINDS[kind].mean), np.asarray(_KINDS[kind].std)


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """torch's default conv/linear init U(+-1/sqrt(fan_in)), kernels laid out [..., in, out].

  The VAE is frozen and loaded from a checkpoint; random weights only serve tests, benchmarks and
  the tiny config. Eager jax.random compiles one program per shape (seconds each on a CPU), so a
  concrete key draws on the host instead; a traced key (abstract or jitted init) uses jax.random.
  """
  bound = 1 / np.sqrt(np.prod(shape[:-1]))
  try:
    seed = np.asarray(jax.random.key_data(key))
  except jax.errors.TracerArrayConversionError:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return jnp.asarray(np.random.default_rng(seed).uniform(-bound, bound, shape).astype(dtype))


def _time_folded_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
                      padding: str | tuple) -> jax.Array:
  """The 3-D convolution (no padding in time) as a 2-D one whose input channels are its kt time taps.

  The same sum: XLA:CPU runs 3-D convolutions and their gradients through a generic loop several
  times slower than its 2-D convolution.
  """
  kt, kh, kw, din, dout = kernel.shape
  st, sh, sw = strides
  if not isinstance(padding, str):
    if tuple(padding[0]) != (0, 0):
      raise ValueError(f'time padding {padding[0]}: causal convolutions pad time with the cache')
    padding = tuple(padding[1:])
  b, t, h, w, _ = x.shape
  frames = (t - kt) // st + 1
  taps = [x[:, i:i + st * (frames - 1) + 1:st] for i in range(kt)]
  folded = jnp.concatenate(taps, axis=-1).reshape(b * frames, h, w, kt * din)
  kernel_2d = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * din, dout)
  y = jax.lax.conv_general_dilated(folded, kernel_2d, (sh, sw), padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y.reshape(b, frames, *y.shape[1:])


def _sub(cache: Cache, key: str | int) -> Cache:
  return None if cache is None else cache[key]


class Conv(nnx.Module):
  """A 2-D or 3-D convolution over channels-last input, kernel [*k, in, out] (torch_conv layout)."""

  def __init__(self, din: int, dout: int, kernel_size: tuple[int, ...], *, rngs: nnx.Rngs):
    spatial = ('kernel_t', 'kernel_h', 'kernel_w')[-len(kernel_size):]
    self.kernel = layers.param(rngs, _conv_init, (*kernel_size, din, dout),
                               (*spatial, 'conv_in', 'conv_out'))
    self.bias = layers.param(rngs, layers.zeros, (dout,), ('conv_out',))

  def __call__(self, x: jax.Array, *, strides: tuple[int, ...] | None = None,
               padding: str | tuple = 'VALID') -> jax.Array:
    kernel = self.kernel[...].astype(x.dtype)
    nd = kernel.ndim - 2
    if nd == 3 and jax.default_backend() == 'cpu':
      y = _time_folded_conv(x, kernel, strides or (1, 1, 1), padding)
    else:
      dims = ('NDHWC', 'DHWIO', 'NDHWC') if nd == 3 else ('NHWC', 'HWIO', 'NHWC')
      y = jax.lax.conv_general_dilated(x, kernel, strides or (1,) * nd, padding,
                                       dimension_numbers=dims)
    return y + self.bias[...].astype(x.dtype)

  def causal(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Time-causal 3-D conv: the cached frames (zeros at clip start) stand in for the past."""
    b, _, h, w, c = x.shape
    if cache is None:
      cache = jnp.zeros((b, CACHE_FRAMES, h, w, c), x.dtype)
    seq = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    _, kh, kw = self.kernel.shape[:3]
    y = self(seq, padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    return y, seq[:, -CACHE_FRAMES:]


class RMSNorm(nnx.Module):
  """Wan's channel norm: x / max(||x||, 1e-12) * sqrt(C) * gamma, computed in fp32."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.gamma = layers.param(rngs, layers.ones, (dim,), ('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * np.sqrt(x.shape[-1]) * self.gamma[...]
    return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
  """RMSNorm-SiLU-CausalConv twice, plus a 1x1x1 shortcut when the width changes."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(din, rngs=rngs)
    self.conv1 = Conv(din, dout, (3, 3, 3), rngs=rngs)
    self.norm2 = RMSNorm(dout, rngs=rngs)
    self.conv2 = Conv(dout, dout, (3, 3, 3), rngs=rngs)
    self.shortcut = Conv(din, dout, (1, 1, 1), rngs=rngs) if din != dout else None

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    h = x if self.shortcut is None else self.shortcut(x)
    y, c1 = self.conv1.causal(jax.nn.silu(self.norm1(x)), _sub(cache, 'conv1'))
    y, c2 = self.conv2.causal(jax.nn.silu(self.norm2(y)), _sub(cache, 'conv2'))
    return y + h, {'conv1': c1, 'conv2': c2}


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the pixels of each frame (no temporal mixing, no cache)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, rngs=rngs)
    self.qkv = layers.Dense(dim, 3 * dim, ('conv_in', 'conv_out'), rngs=rngs, init=_conv_init)
    self.proj = layers.Dense(dim, dim, ('conv_in', 'conv_out'), rngs=rngs, init=_conv_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
    return x + self.proj(y)


class Resample(nnx.Module):
  """2x spatial down/upsampling per frame, optionally with 2x temporal down/upsampling.

  Temporal downsampling keeps the first frame of a clip and then halves the rest with a stride-2
  conv whose window reaches one frame into the previous chunk; temporal upsampling keeps the first
  latent frame once and turns every later frame into two with a causal conv of doubled width.
  """

  def __init__(self, din: int, dout: int, mode: str, *, rngs: nnx.Rngs):
    if mode not in ('downsample2d', 'downsample3d', 'upsample2d', 'upsample3d'):
      raise ValueError(f'unknown resample mode {mode!r}')
    self.mode = mode
    self.conv = Conv(din, dout, (3, 3), rngs=rngs)
    time_width = {'downsample3d': din, 'upsample3d': 2 * din}.get(mode)
    self.time_conv = Conv(din, time_width, (3, 1, 1), rngs=rngs) if time_width else None

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    new_cache = None
    if self.mode == 'upsample3d':
      x, new_cache = self._double_frames(x, cache)
    b, t, h, w, c = x.shape
    x = x.reshape(b * t, h, w, c)
    if self.mode.startswith('up'):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, exact for a factor of 2
      x = self.conv(x, padding=((1, 1), (1, 1)))
    else:
      x = self.conv(x, strides=(2, 2), padding=((0, 1), (0, 1)))
    x = x.reshape(b, t, *x.shape[1:])
    if self.mode == 'downsample3d':
      x, new_cache = self._halve_frames(x, cache)
    return x, new_cache

  def _halve_frames(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    if cache is None:
      kept, seq = x[:, :1], x
    else:
      kept, seq = x[:, :0], jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    if seq.shape[1] >= 3:
      y = self.time_conv(seq, strides=(2, 1, 1))
      kept = jnp.concatenate([kept, y], axis=1)
    return kept, x[:, -1:]

  def _double_frames(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    b, _, h, w, c = x.shape
    kept = x[:, :0]
    if cache is None:
      kept, x = x[:, :1], x[:, 1:]
      cache = jnp.zeros((b, CACHE_FRAMES, h, w, c), x.dtype)
    if x.shape[1] == 0:
      return kept, cache
    y, cache = self.time_conv.causal(x, cache)
    # Channel k * c + i of the doubled conv is channel i of output frame 2t + k.
    t = y.shape[1]
    y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
    return jnp.concatenate([kept, y], axis=1), cache


def _fold_to_channels(x: jax.Array, dout: int, ft: int, fs: int) -> jax.Array:
  """Wan2.2's down shortcut: ft x fs x fs blocks into channels, averaged in groups down to dout.

  A chunk with a frame count not divisible by ft gets zero frames in front, so a clip's first
  frame forms its own group, as Wan pads each chunk.
  """
  b, t, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), ((-t) % ft, 0), (0, 0), (0, 0), (0, 0)))
  x = x.reshape(b, -1, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
  return x.reshape(*x.shape[:4], dout, -1).mean(axis=-1)


def _unfold_from_channels(x: jax.Array, dout: int, ft: int, fs: int, start: bool) -> jax.Array:
  """Wan2.2's up shortcut: channels repeated and unfolded into ft x fs x fs blocks; a clip's first
  latent frame yields one frame (the first ft - 1 are dropped), like the temporal upsampler."""
  b, t, h, w, c = x.shape
  x = jnp.repeat(x, dout * ft * fs * fs // c, axis=-1)
  x = x.reshape(b, t, h, w, dout, ft, fs, fs).transpose(0, 1, 5, 2, 6, 3, 7, 4)
  x = x.reshape(b, t * ft, h * fs, w * fs, dout)
  return x[:, ft - 1:] if start else x


class Stage(nnx.Module):
  """One resolution level: residual blocks, then an optional resampler.

  Wan2.2 adds a parameter-free shortcut around the whole stage, `(direction, ft, fs)`, that trades
  space-time resolution for channels (see _fold_to_channels / _unfold_from_channels).
  """

  def __init__(self, din: int, dout: int, num_blocks: int, resample: Resample | None,
               shortcut: tuple[str, int, int] | None, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(din if i == 0 else dout, dout, rngs=rngs)
                             for i in range(num_blocks)])
    self.resample = resample
    self.shortcut = shortcut

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    x_in = x
    c_resnets = []
    for i, block in enumerate(self.resnets):
      x, c = block(x, None if cache is None else cache['resnets'][i])
      c_resnets.append(c)
    c_resample = None
    if self.resample is not None:
      x, c_resample = self.resample(x, _sub(cache, 'resample'))
    if self.shortcut is not None:
      direction, ft, fs = self.shortcut
      if direction == 'down':
        x = x + _fold_to_channels(x_in, x.shape[-1], ft, fs)
      else:
        x = x + _unfold_from_channels(x_in, x.shape[-1], ft, fs, start=cache is None)
    return x, {'resnets': tuple(c_resnets), 'resample': c_resample}


class Encoder(nnx.Module):
  """Pixels (patchified in Wan2.2) [B, T, H, W, C] -> [B, F, h, w, 2z] (mu, log-variance)."""

  def __init__(self, cfg_vae: VAESettings, in_channels: int, residual: bool, *,
               rngs: nnx.Rngs):
    mult = tuple(cfg_vae.dim_mult)
    dims = [cfg_vae.base_dim * m for m in (1, *mult)]
    self.conv_in = Conv(in_channels, dims[0], (3, 3, 3), rngs=rngs)
    stages = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      last = i == len(mult) - 1
      temporal = not last and cfg_vae.temporal_downsample[i]
      resample = None if last else Resample(
          dout, dout, 'downsample3d' if temporal else 'downsample2d', rngs=rngs)
      shortcut = ('down', 2 if temporal else 1, 1 if last else 2) if residual else None
      stages.append(Stage(din, dout, cfg_vae.num_res_blocks, resample, shortcut, rngs=rngs))
    self.stages = nnx.List(stages)
    self.mid_block1 = ResidualBlock(dims[-1], dims[-1], rngs=rngs)
    self.mid_attn = AttentionBlock(dims[-1], rngs=rngs)
    self.mid_block2 = ResidualBlock(dims[-1], dims[-1], rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], rngs=rngs)
    self.conv_out = Conv(dims[-1], 2 * cfg_vae.z_dim, (3, 3, 3), rngs=rngs)

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    x, c_in = self.conv_in.causal(x, _sub(cache, 'conv_in'))
    c_stages = []
    for i, stage in enumerate(self.stages):
      x, c = stage(x, None if cache is None else cache['stages'][i])
      c_stages.append(c)
    x, c_mid1 = self.mid_block1(x, _sub(cache, 'mid_block1'))
    x, c_mid2 = self.mid_block2(self.mid_attn(x), _sub(cache, 'mid_block2'))
    x, c_out = self.conv_out.causal(jax.nn.silu(self.norm_out(x)), _sub(cache, 'conv_out'))
    return x, {'conv_in': c_in, 'stages': tuple(c_stages), 'mid_block1': c_mid1,
               'mid_block2': c_mid2, 'conv_out': c_out}


class Decoder(nnx.Module):
  """Latents [B, F, h, w, z] (after post_quant_conv) -> pixels [B, 1 + 4 (F - 1), H, W, C]."""

  def __init__(self, cfg_vae: VAESettings, base_dim: int, out_channels: int,
               residual: bool, *, rngs: nnx.Rngs):
    mult = tuple(cfg_vae.dim_mult)
    dims = [base_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_upsample = tuple(cfg_vae.temporal_downsample)[::-1]
    self.conv_in = Conv(cfg_vae.z_dim, dims[0], (3, 3, 3), rngs=rngs)
    self.mid_block1 = ResidualBlock(dims[0], dims[0], rngs=rngs)
    self.mid_attn = AttentionBlock(dims[0], rngs=rngs)
    self.mid_block2 = ResidualBlock(dims[0], dims[0], rngs=rngs)
    stages = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0 and not residual:
        din //= 2  # Wan2.1's upsamplers halve the width
      last = i == len(mult) - 1
      temporal = not last and temporal_upsample[i]
      resample = None if last else Resample(
          dout, dout if residual else dout // 2, 'upsample3d' if temporal else 'upsample2d',
          rngs=rngs)
      shortcut = ('up', 2 if temporal else 1, 2) if residual and not last else None
      stages.append(Stage(din, dout, cfg_vae.num_res_blocks + 1, resample, shortcut, rngs=rngs))
    self.stages = nnx.List(stages)
    self.norm_out = RMSNorm(dims[-1], rngs=rngs)
    self.conv_out = Conv(dims[-1], out_channels, (3, 3, 3), rngs=rngs)

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    x, c_in = self.conv_in.causal(x, _sub(cache, 'conv_in'))
    x, c_mid1 = self.mid_block1(x, _sub(cache, 'mid_block1'))
    x, c_mid2 = self.mid_block2(self.mid_attn(x), _sub(cache, 'mid_block2'))
    c_stages = []
    for i, stage in enumerate(self.stages):
      x, c = stage(x, None if cache is None else cache['stages'][i])
      c_stages.append(c)
    x, c_out = self.conv_out.causal(jax.nn.silu(self.norm_out(x)), _sub(cache, 'conv_out'))
    return x, {'conv_in': c_in, 'mid_block1': c_mid1, 'mid_block2': c_mid2,
               'stages': tuple(c_stages), 'conv_out': c_out}


def _patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, T, H, W, C] -> [B, T, H/p, W/p, C p p], channel order (c, w offset, h offset) as Wan2.2."""
  if p == 1:
    return x
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
  return x.reshape(b, t, h // p, w // p, c * p * p)


def _unpatchify(x: jax.Array, p: int) -> jax.Array:
  if p == 1:
    return x
  b, t, h, w, cpp = x.shape
  x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
  return x.reshape(b, t, h * p, w * p, cpp // (p * p))


class WanVAE(nnx.Module):
  """The Wan VAE: encode (streaming or whole clip) to normalised mu, decode, and the I2V y."""

  def __init__(self, cfg_vae: VAESettings, *, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if cfg_vae.kind not in _KINDS:
      raise ValueError(f'vae.kind={cfg_vae.kind!r} is not supported (supported: {list(_KINDS)})')
    kind = _KINDS[cfg_vae.kind]
    if cfg_vae.z_dim != len(kind.mean):
      raise ValueError(f'vae.z_dim={cfg_vae.z_dim}: the {cfg_vae.kind} latent statistics have '
                       f'{len(kind.mean)} channels')
    self.kind = cfg_vae.kind
    self.z_dim = cfg_vae.z_dim
    self.patch = kind.patch
    self.spatial_factor = 2 ** (len(cfg_vae.dim_mult) - 1) * kind.patch
    self.dtype = dtype
    pixels = 3 * kind.patch ** 2
    self.encoder = Encoder(cfg_vae, pixels, kind.residual, rngs=rngs)
    self.quant_conv = Conv(2 * cfg_vae.z_dim, 2 * cfg_vae.z_dim, (1, 1, 1), rngs=rngs)
    self.post_quant_conv = Conv(cfg_vae.z_dim, cfg_vae.z_dim, (1, 1, 1), rngs=rngs)
    # Wan2.2's decoder is wider than its encoder (256 vs 160); unset or 0 means base_dim.
    decoder_dim = cfg_vae.decoder_base_dim or cfg_vae.base_dim
    self.decoder = Decoder(cfg_vae, decoder_dim, pixels, kind.residual, rngs=rngs)

  def _check_frames(self, frames: jax.Array) -> None:
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f'expected video [B, T, H, W, 3], got shape {frames.shape}')
    h, w = frames.shape[2:4]
    if h % self.spatial_factor or w % self.spatial_factor:
      raise ValueError(f'frame size {h}x{w} is not a multiple of {self.spatial_factor}')

  def _encode_chunk(self, frames: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    return self.encoder(_patchify(frames.astype(self.dtype), self.patch), cache)

  def _mu(self, x: jax.Array) -> jax.Array:
    """Encoder output -> normalised mu in fp32 (encoding never samples, so the log-variance is left
    uncomputed; `posterior` gives both for training)."""
    kernel, bias = self.quant_conv.kernel[...], self.quant_conv.bias[...]
    mu = jnp.einsum('...i,io->...o', x.astype(jnp.float32), kernel[0, 0, 0, :, :self.z_dim])
    mu = mu + bias[:self.z_dim]
    kind = _KINDS[self.kind]
    return (mu - jnp.asarray(kind.mean)) * (1.0 / jnp.asarray(kind.std, jnp.float32))

  def init_encode_cache(self, batch: int, height: int, width: int) -> Cache:
    """The empty cache (all zeros) for a stream of [batch, T, height, width, 3] frames."""
    frame = jax.ShapeDtypeStruct((batch, 1, height, width, 3), self.dtype)
    shapes = jax.eval_shape(lambda x: self._encode_chunk(x, None)[1], frame)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def encode_stream(self, cache: Cache, frames: jax.Array) -> tuple[jax.Array, Cache]:
    """Encodes the next frames of a clip; T = 1 + 4k starts a clip (the cache is not read).

    T = 4k continues the clip whose cache is given. Returns (latents [B, T // 4 (+1), h, w, z],
    the cache for the next call). Chained calls equal one whole-clip `encode`.
    """
    self._check_frames(frames)
    t = frames.shape[1]
    if t % FRAMES_PER_LATENT not in (0, 1):
      raise ValueError(f'{t} frames: a chunk is 1 + 4k frames (clip start) or 4k (continuation)')
    if t % FRAMES_PER_LATENT == 1:  # a clip's start: its first frame alone, then 4-frame chunks
      first, cache = self._encode_chunk(frames[:, :1], None)
      if t == 1:
        return self._mu(first), cache
      rest, cache = self._encode_chunks(cache, frames[:, 1:])
      return self._mu(jnp.concatenate([first, rest], axis=1)), cache
    x, cache = self._encode_chunks(cache, frames)
    return self._mu(x), cache

  def _encode_chunks(self, cache: Cache, frames: jax.Array) -> tuple[jax.Array, Cache]:
    """Frames [B, 4k, H, W, 3] continuing a clip, 4 at a time (memory bounded by one chunk's
    activations: 8 DROID frames at once held 2 GiB of fp32 convolution inputs more) -> (encoder
    output [B, k, h, w, .], cache)."""
    b, t, h, w, c = frames.shape
    if t == FRAMES_PER_LATENT:
      return self._encode_chunk(frames, cache)
    chunks = frames.reshape(b, -1, FRAMES_PER_LATENT, h, w, c).swapaxes(0, 1)

    def step(cache, chunk):
      out, cache = self._encode_chunk(chunk, cache)
      return cache, out

    cache, out = jax.lax.scan(step, cache, chunks)
    return out.swapaxes(0, 1).reshape(b, -1, *out.shape[3:]), cache

  def encode(self, video: jax.Array) -> jax.Array:
    """Whole clip [B, 1 + 4k, H, W, 3] -> latents [B, 1 + k, h, w, z], as Wan: 1 frame, then 4s."""
    self._check_frames(video)
    if video.shape[1] % FRAMES_PER_LATENT != 1:
      raise ValueError(f'a clip has 1 + 4k frames, got {video.shape[1]}')
    return self.encode_stream(None, video)[0]

  def decode(self, latents: jax.Array) -> jax.Array:
    """Latents [B, F, h, w, z] -> video [B, 1 + 4 (F - 1), H, W, 3] in [-1, 1], frame by frame."""
    if latents.ndim != 5 or latents.shape[-1] != self.z_dim:
      raise ValueError(f'expected latents [B, F, h, w, {self.z_dim}], got {latents.shape}')
    kind = _KINDS[self.kind]
    std = jnp.asarray(kind.std, jnp.float32)
    z = latents.astype(jnp.float32) / (1.0 / std) + jnp.asarray(kind.mean, jnp.float32)
    x = self.post_quant_conv(z).astype(self.dtype)
    first, cache = self.decoder(x[:, :1], None)
    if x.shape[1] > 1:

      def step(cache, frame):
        out, cache = self.decoder(frame[:, None], cache)
        return cache, out

      _, rest = jax.lax.scan(step, cache, x[:, 1:].swapaxes(0, 1))
      rest = rest.swapaxes(0, 1).reshape(x.shape[0], -1, *rest.shape[3:])
      first = jnp.concatenate([first, rest], axis=1)
    return jnp.clip(_unpatchify(first, self.patch).astype(jnp.float32), -1.0, 1.0)

  # Training (training/vae_training.py) needs the posterior before normalisation and gradients through the
  # decoder. Every layer is causal in time and the temporal resamplers treat a clip's first frame
  # alone whatever the chunking, so one pass over the whole clip equals encode's and decode's
  # chunk-by-chunk scans; XLA:CPU differentiates it several times faster than a scan.

  def posterior(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Whole clip [B, 1 + 4k, H, W, 3] -> the posterior's (mu, log-variance) [B, 1 + k, h, w, z]
    in fp32, unnormalised (`encode` gives mu normalised)."""
    self._check_frames(video)
    if video.shape[1] % FRAMES_PER_LATENT != 1:
      raise ValueError(f'a clip has 1 + 4k frames, got {video.shape[1]}')
    x = self._encode_chunk(video, None)[0].astype(jnp.float32)
    kernel, bias = self.quant_conv.kernel[...], self.quant_conv.bias[...]
    moments = jnp.einsum('...i,io->...o', x, kernel[0, 0, 0]) + bias
    return moments[..., :self.z_dim], moments[..., self.z_dim:]

  def decode_unnormalised(self, z: jax.Array) -> jax.Array:
    """A sample z [B, F, h, w, z] of the `posterior` -> video [B, 1 + 4 (F - 1), H, W, 3] in fp32,
    not clipped to [-1, 1] (the reconstruction loss needs gradients past the range)."""
    x = self.post_quant_conv(z.astype(jnp.float32)).astype(self.dtype)
    return _unpatchify(self.decoder(x, None)[0], self.patch).astype(jnp.float32)

  def i2v_condition(self, first_frame: jax.Array, num_frames: int) -> jax.Array:
    """Wan2.1 I2V y [B, F, h, w, 4 + z]: mask (1 on latent frame 0) + VAE(first frame, zeros)."""
    if self.kind != 'wan2.1':
      raise ValueError(f'the I2V condition y is a Wan2.1 input; this VAE is {self.kind}')
    b, h, w, c = first_frame.shape
    video = jnp.concatenate(
        [first_frame[:, None].astype(self.dtype),
         jnp.zeros((b, num_frames - 1, h, w, c), self.dtype)], axis=1)
    latents = self.encode(video)
    f = latents.shape[1]
    mask = (jnp.arange(f) == 0).astype(latents.dtype)[None, :, None, None, None]
    mask = jnp.broadcast_to(mask, (*latents.shape[:-1], I2V_MASK_CHANNELS))
    return jnp.concatenate([mask, latents], axis=-1)

