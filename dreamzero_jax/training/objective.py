"""Chunk-wise joint flow matching with teacher forcing (docs/objective.md).

The model sees [clean video | noisy video | noisy actions | states] under the chunk mask. Each
chunk's video latents and actions are noised at that chunk's level (flow.chunk_timesteps); the
noisy copy of latent frame 0 at a level of its own; the clean history runs at t=0. Losses regress
the velocity eps - x0 (flow.py's convention), weighted per token by w(t): video MSE per latent
frame over frame 0 and the real chunks, action MSE over action_mask (which already folds in real
dims, real chunks and has_real_action), normalised per train.action_loss_norm.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections

from dreamzero_jax import checks, flow
from dreamzero_jax.models.encoders import LatentBatch  # the encoders' output, this objective's input


ACTION_LOSS_NORMS = ('padded', 'valid')


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def check_batch(batch: LatentBatch) -> None:
  """The latent batch against LatentBatch's contract: each field's shape against the latents' [B, F,
  h, w] and the chunk mask's K, masks bool, embodiment ids integer, the rest floating; a mismatch is
  a one-line ValueError naming the field. Static (shapes and dtypes): under jit it runs at trace time."""
  checks.check('batch.latents', chex.assert_rank, batch.latents, 5)
  checks.check('batch.chunk_mask', chex.assert_rank, batch.chunk_mask, 2)
  checks.check('batch.actions', chex.assert_rank, batch.actions, 3)
  (b, f, h, w, _), k = batch.latents.shape, batch.chunk_mask.shape[1]
  if (f - 1) % k or batch.actions.shape[1] % k:
    raise ValueError(f'batch.latents/actions: {f} latent frames and {batch.actions.shape[1]} actions are not '
                     f'1 + {k} and {k} chunks (batch.chunk_mask has K = {k})')
  want = dict(latents=((b, f, h, w, None), float), i2v_cond=((b, f, h, w, None), float),
              text=((b, None, None), float), image=((b, None, None), float),
              actions=((b, None, None), float), action_mask=(batch.actions.shape, bool),
              state=((b, k, None), float), chunk_mask=((b, k), bool), embodiment_id=((b,), int))
  for name, (shape, kind) in want.items():
    x = getattr(batch, name)
    if x is None and name in ('i2v_cond', 'image'):   # T2V / TI2V, no CLIP
      continue
    checks.check(f'batch.{name}', chex.assert_shape, x, shape)
    checks.check(f'batch.{name}', chex.assert_type, x, kind)


def example_noise(rng: jax.Array, example_index: jax.Array, cfg_train: ml_collections.ConfigDict,
                  num_chunks: int, video_shape: tuple, action_shape: tuple):
  """Every example's noise levels and noise from its own key, fold_in(rng, index in the update's batch).

  So an example draws the same noise whether its update runs as one batch or as micro-batches
  (gradient accumulation), and whatever the other examples are. Returns (ChunkTimesteps [B, 1 + K]:
  column 0 is latent frame 0's level, drawn like a chunk's video level; video noise; action noise).
  """
  def one(i):
    t_rng, v_rng, a_rng = jax.random.split(jax.random.fold_in(rng, i), 3)
    ts = jax.tree.map(lambda x: x[0], flow.chunk_timesteps(t_rng, cfg_train, 1, 1 + num_chunks))
    return ts, jax.random.normal(v_rng, video_shape), jax.random.normal(a_rng, action_shape)

  return jax.vmap(one)(example_index)


def flow_matching_loss(model, batch: LatentBatch, rng: jax.Array, cfg_train: ml_collections.ConfigDict,
                       example_index: jax.Array | None = None):
  """Returns (total loss, metrics dict) for one batch.

  example_index [B]: each example's index in the update's whole batch (default 0..B-1), which
  picks its noise (example_noise). The batch is checked first (check_batch).
  """
  check_batch(batch)
  b, f = batch.latents.shape[:2]
  k = batch.chunk_mask.shape[1]
  lf, ha = (f - 1) // k, batch.actions.shape[1] // k
  n_steps, shift = cfg_train.num_train_timesteps, cfg_train.shift
  if cfg_train.action_loss_norm not in ACTION_LOSS_NORMS:
    raise ValueError(f'train.action_loss_norm={cfg_train.action_loss_norm!r}: expected one of {ACTION_LOSS_NORMS}')
  latents = batch.latents.astype(jnp.float32)
  actions = batch.actions.astype(jnp.float32)
  index = jnp.arange(b) if example_index is None else example_index
  ts, video_noise, action_noise = example_noise(rng, index, cfg_train, k, latents.shape[1:], actions.shape[1:])

  # Latent frame 0 (the conditioning frame) is noised too, at its own level, and counts in the video
  # loss, as in the official trainer; chunk k's frames and actions share column 1 + k.
  def per_frame(x):
    return jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], lf, axis=1)], 1)       # [B, 1+K] -> [B, F]

  frame_sigma = per_frame(ts.video_sigma)
  action_sigma = jnp.repeat(ts.action_sigma[:, 1:], ha, axis=1)                    # [B, K*Ha]
  noisy = flow.add_noise(latents, video_noise, frame_sigma)
  noisy_actions = flow.add_noise(actions, action_noise, action_sigma)

  video_t = flow.sigma_to_timestep(frame_sigma, n_steps)
  action_t = flow.sigma_to_timestep(action_sigma, n_steps)
  video_v, action_v = model.teacher_forcing(
      latents, noisy, video_t, noisy_actions, action_t, batch.state, batch.embodiment_id,
      batch.text, batch.image, batch.i2v_cond)

  # Video: MSE per latent frame, weighted by its level's w(t), over frame 0 and the real chunks.
  video_err = jnp.square(video_v - flow.velocity_target(latents, video_noise)).mean(axis=(2, 3, 4))
  frame_w = per_frame(flow.loss_weight(ts.video_timestep, n_steps, shift))
  frame_mask = jnp.concatenate([jnp.ones((b, 1), bool), jnp.repeat(batch.chunk_mask, lf, axis=1)], 1)
  video_loss = _masked_mean(video_err * frame_w, frame_mask)

  # Actions: MSE per element, weighted by its chunk's w(t), over the action mask; 'padded' divides by
  # every padded element of every sample (the official normalisation), 'valid' by the masked ones.
  action_err = jnp.square(action_v - flow.velocity_target(actions, action_noise))
  action_w = jnp.repeat(flow.loss_weight(ts.action_timestep[:, 1:], n_steps, shift), ha, axis=1)[..., None]
  if cfg_train.action_loss_norm == 'padded':
    action_loss = (action_err * action_w * batch.action_mask).mean()
  else:
    action_loss = _masked_mean(action_err * action_w, batch.action_mask)

  total = cfg_train.video_loss_weight * video_loss + cfg_train.action_loss_weight * action_loss
  return total, dict(loss=total, video_loss=video_loss, action_loss=action_loss)
