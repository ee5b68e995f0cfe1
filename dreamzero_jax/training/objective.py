"""Chunk-wise joint flow matching with teacher forcing (DESIGN.md section 6).

The model sees [clean video | noisy video | noisy actions | states] under the chunk mask. Each
chunk's video latents and actions are noised at that chunk's level (flow.chunk_timesteps);
clean history and latent frame 0 run at t=0. Losses regress the velocity eps - x0 (flow.py's
convention), weighted per token by w(t): video MSE per latent frame over real chunks, action MSE
over action_mask (which already folds in real dims, real chunks and has_real_action).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from dreamzero_jax import flow


class LatentBatch(NamedTuple):
  """A training batch after the frozen encoders: what the DiT consumes."""
  latents: jax.Array          # [B, F, h, w, C] clean VAE latents, F = 1 + K * lf
  cond: jax.Array | None      # [B, F, h, w, 20] the I2V condition y, or None (T2V / TI2V)
  text: jax.Array             # [B, Lt, text_dim] umT5 embeddings, zero past each prompt
  image: jax.Array | None     # [B, Li, image_dim] CLIP features, or None
  actions: jax.Array          # [B, K*Ha, A] normalised to [-1, 1]
  action_mask: jax.Array      # [B, K*Ha, A] bool
  state: jax.Array            # [B, K, S]
  chunk_mask: jax.Array       # [B, K] bool
  embodiment_id: jax.Array    # [B] int32


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def flow_matching_loss(model, batch: LatentBatch, rng: jax.Array, cfg_train: ml_collections.ConfigDict):
  """Returns (total loss, metrics dict) for one batch."""
  b, f = batch.latents.shape[:2]
  k = batch.chunk_mask.shape[1]
  lf, ha = (f - 1) // k, batch.actions.shape[1] // k
  n_steps, shift = cfg_train.num_train_timesteps, cfg_train.shift
  t_rng, v_rng, a_rng = jax.random.split(rng, 3)
  ts = flow.chunk_timesteps(t_rng, cfg_train, b, k)

  frame_sigma = jnp.concatenate([jnp.zeros((b, 1)), jnp.repeat(ts.video_sigma, lf, axis=1)], 1)     # [B, F]
  action_sigma = jnp.repeat(ts.action_sigma, ha, axis=1)                                           # [B, K*Ha]
  latents = batch.latents.astype(jnp.float32)
  actions = batch.actions.astype(jnp.float32)
  video_noise = jax.random.normal(v_rng, latents.shape)
  action_noise = jax.random.normal(a_rng, actions.shape)
  noisy = flow.add_noise(latents, video_noise, frame_sigma)
  noisy = noisy.at[:, 0].set(latents[:, 0])  # latent frame 0 is the conditioning frame
  noisy_actions = flow.add_noise(actions, action_noise, action_sigma)

  video_t = flow.sigma_to_timestep(frame_sigma, n_steps)
  action_t = flow.sigma_to_timestep(action_sigma, n_steps)
  video_v, action_v = model.teacher_forcing(
      latents, noisy, video_t, noisy_actions, action_t, batch.state, batch.embodiment_id,
      batch.text, batch.image, batch.cond)

  # Video: MSE per latent frame (frames 1..F-1), weighted by its chunk's w(t), over real chunks.
  video_err = jnp.square(video_v - flow.velocity_target(latents, video_noise)).mean(axis=(2, 3, 4))[:, 1:]
  frame_w = jnp.repeat(flow.loss_weight(ts.video_timestep, n_steps, shift), lf, axis=1)
  frame_mask = jnp.repeat(batch.chunk_mask, lf, axis=1)
  video_loss = _masked_mean(video_err * frame_w, frame_mask)

  # Actions: MSE per element, weighted by its chunk's w(t), over the action mask.
  action_err = jnp.square(action_v - flow.velocity_target(actions, action_noise))
  action_w = jnp.repeat(flow.loss_weight(ts.action_timestep, n_steps, shift), ha, axis=1)[..., None]
  action_loss = _masked_mean(action_err * action_w, batch.action_mask)

  total = cfg_train.video_loss_weight * video_loss + cfg_train.action_loss_weight * action_loss
  return total, dict(loss=total, video_loss=video_loss, action_loss=action_loss)
