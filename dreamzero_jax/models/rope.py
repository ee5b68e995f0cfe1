"""Rotary position embeddings: 3-D for video tokens, 1-D for action and state tokens.

A token's rotation is a vector of head_dim/2 angles applied to consecutive channel pairs
(x[2i], x[2i+1]) as complex numbers, the pairing of the official Wan code. Video tokens split
the pairs into (t, h, w) groups of sizes head_dim/2 - 2*(head_dim//6), head_dim//6, head_dim//6
(22/21/21 for head_dim 128), each with its own frequency ladder. 1-D tokens use one ladder over
all pairs (docs/model.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def video_pair_split(head_dim: int) -> tuple[int, int, int]:
  """Complex pairs for (t, h, w): 22/21/21 at head_dim 128."""
  hw = head_dim // 6
  return head_dim // 2 - 2 * hw, hw, hw


def _inv_freq(dim: int, theta: float) -> np.ndarray:
  """theta^(-2i/dim) for i < dim/2: the ladder of a `dim`-channel rotary group."""
  return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def video_angles(frames: int, height: int, width: int, head_dim: int, theta: float,
                 frame_offset: jax.Array | int = 0) -> jax.Array:
  """Angles [frames*height*width, head_dim/2] for tokens in (f, h, w) raster order."""
  ct, ch, cw = video_pair_split(head_dim)
  ft = jnp.asarray(_inv_freq(2 * ct, theta), jnp.float32)
  fh = jnp.asarray(_inv_freq(2 * ch, theta), jnp.float32)
  fw = jnp.asarray(_inv_freq(2 * cw, theta), jnp.float32)
  f = jnp.arange(frames, dtype=jnp.float32) + jnp.asarray(frame_offset, jnp.float32)
  h = jnp.arange(height, dtype=jnp.float32)
  w = jnp.arange(width, dtype=jnp.float32)
  at = jnp.broadcast_to((f[:, None] * ft)[:, None, None, :], (frames, height, width, ct))
  ah = jnp.broadcast_to((h[:, None] * fh)[None, :, None, :], (frames, height, width, ch))
  aw = jnp.broadcast_to((w[:, None] * fw)[None, None, :, :], (frames, height, width, cw))
  return jnp.concatenate([at, ah, aw], -1).reshape(frames * height * width, head_dim // 2)


def linear_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Angles [..., head_dim/2] of 1-D positions over all channel pairs."""
  inv = jnp.asarray(_inv_freq(head_dim, theta), jnp.float32)
  return jnp.asarray(positions, jnp.float32)[..., None] * inv


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates x [B, L, H, Dh] by angles [L, Dh/2] or [B, L, Dh/2] (computed in fp32)."""
  if angles.ndim == 2:
    angles = angles[None]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = xf[..., 0], xf[..., 1]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], -1)
  return out.reshape(x.shape).astype(x.dtype)
