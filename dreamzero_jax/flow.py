"""Flow matching: the one noise convention, shifted schedules, training timesteps, loss weights.

Convention (the official Wan / DreamZero one, used everywhere in this package):
  sigma in [0, 1], 0 = clean data, 1 = pure noise.
  x_t = (1 - sigma) * x0 + sigma * eps,           eps ~ N(0, I)
  the model predicts the velocity  v = eps - x0  (so dx_t / dsigma = v)
  the model's timestep input is    t = sigma * num_train_timesteps  (0..1000)
  sampling integrates from sigma ~ 1 down to sigma = 0:  x0 = x_t - sigma * v.

The paper writes z_t = t z1 + (1 - t) z0 with z0 the noise and z1 the data, t in [0, 1]
(t = 1 clean). Converting: t_paper = 1 - sigma, z_t = x_t, and the paper's velocity
z1 - z0 = x0 - eps = -v. Only the training-timestep samplers below speak the paper's
language ('flash'); they convert on the spot.

Shift (resolution-dependent in Wan, 5 for DreamZero): sigma' = shift*s / (1 + (shift-1)*s)
pushes a uniform s towards high noise.

Training grid (official FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True) at
1000 steps): s_i = 1 - i/N for i = 0..N-1, sigma_i = shift(s_i); index 0 is the noisiest.
Loss weight (official `training=True` schedule): y(t) = exp(-2 ((t - N/2) / N)^2) on the
grid's timesteps, shifted so that its minimum over the grid is 0 and scaled so that its mean
over the grid is 1. The official code looks weights up at the nearest grid timestep; we evaluate
the same closed form at any t, which equals the lookup on the grid.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

TIMESTEP_SCHEDULES = ('shared', 'decoupled', 'flash')
# Video noise of the non-default schedules, Beta(a, 1) (not config fields: they define them).
# 'decoupled' (official decouple_video_action_noise): r ~ Beta(3, 1), grid index (1 - r) * N.
DECOUPLED_VIDEO_BETA_A = 3.0
# 'flash' (paper, DreamZero-Flash): t_paper = 1 - eta, eta ~ Beta(7, 1)  =>  sigma = eta.
FLASH_VIDEO_BETA_A = 7.0


def shift_sigma(sigma, shift: float):
  """Wan's timestep shift: more of the schedule spent at high noise as shift grows."""
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sigma_to_timestep(sigma, num_train_timesteps: int):
  """The DiT's timestep input for a noise level."""
  return sigma * num_train_timesteps


def training_sigma_grid(num_train_timesteps: int, shift: float) -> np.ndarray:
  """The N shifted training noise levels, noisiest first (index 0 is sigma = 1)."""
  s = np.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
  return shift_sigma(s, shift)


def sampling_sigmas(num_steps: int, shift: float, num_train_timesteps: int) -> np.ndarray:
  """The inference schedule: num_steps shifted levels from 1 - 1/N down, then a final 0.

  Matches Wan's FlowUniPCMultistepScheduler.set_timesteps (the official DreamZero sampler):
  its unshifted training table tops out at 1 - 1/N, and the last step lands on sigma = 0.
  """
  if num_steps < 1:
    raise ValueError(f'sampler.num_steps must be >= 1, got {num_steps}')
  s = np.linspace(1.0 - 1.0 / num_train_timesteps, 0.0, num_steps + 1)[:-1]
  return np.concatenate([shift_sigma(s, shift), [0.0]])


def _gaussian_bump(timesteps, num_train_timesteps: int):
  half = num_train_timesteps / 2
  return jnp.exp(-2.0 * ((timesteps - half) / num_train_timesteps) ** 2)


def loss_weight(timesteps: jax.Array, num_train_timesteps: int, shift: float) -> jax.Array:
  """Per-token loss weight w(t): a bump at t = N/2, min 0 and mean 1 over the training grid."""
  grid = sigma_to_timestep(training_sigma_grid(num_train_timesteps, shift), num_train_timesteps)
  grid_y = np.exp(-2.0 * ((grid - num_train_timesteps / 2) / num_train_timesteps) ** 2)
  floor = grid_y.min()
  scale = (grid_y - floor).mean()
  return (_gaussian_bump(jnp.asarray(timesteps, jnp.float32), num_train_timesteps) - floor) / scale


class ChunkTimesteps(NamedTuple):
  """Noise levels of one training batch, one per (sample, chunk); [B, K] each."""
  video_sigma: jax.Array
  action_sigma: jax.Array
  video_timestep: jax.Array
  action_timestep: jax.Array


def _grid_sigma(index: jax.Array, num_train_timesteps: int, shift: float) -> jax.Array:
  grid = jnp.asarray(training_sigma_grid(num_train_timesteps, shift), jnp.float32)
  return grid[index]


def _uniform_grid_index(rng: jax.Array, shape, num_train_timesteps: int) -> jax.Array:
  return jax.random.randint(rng, shape, 0, num_train_timesteps)


def _beta_a_1(rng: jax.Array, a: float, shape) -> jax.Array:
  """Beta(a, 1) by inverting its CDF x^a: exact, and no rejection loop to compile."""
  return jax.random.uniform(rng, shape) ** (1.0 / a)


def _beta_grid_index(rng: jax.Array, shape, a: float, num_train_timesteps: int) -> jax.Array:
  """Official decoupled sampling: r ~ Beta(a, 1), index (1 - r) * N, so large r = noisy."""
  r = _beta_a_1(rng, a, shape)
  index = jnp.floor((1.0 - r) * num_train_timesteps).astype(jnp.int32)
  return jnp.clip(index, 0, num_train_timesteps - 1)


def chunk_timesteps(rng: jax.Array, cfg_train: ml_collections.ConfigDict, batch_size: int,
                    num_chunks: int) -> ChunkTimesteps:
  """Samples the noise level of every noisy chunk per `cfg_train.timestep_schedule`.

  'shared': one uniform index on the shifted training grid per chunk, used by the chunk's
    video latents and its actions alike (official default).
  'decoupled': video index (1 - r) * N with r ~ Beta(3, 1) (mostly noisy); actions an
    independent uniform grid index (official decouple_video_action_noise, drawn per chunk here).
  'flash': video sigma = eta ~ Beta(7, 1) directly (paper: t = 1 - eta, unshifted, continuous);
    actions an independent uniform grid index.
  Clean (history) tokens are not sampled here: they always carry t = 0.
  A caller that also noises latent frame 0 on its own asks for one more chunk.
  """
  schedule = cfg_train.timestep_schedule
  n = cfg_train.num_train_timesteps
  shift = cfg_train.shift
  shape = (batch_size, num_chunks)
  video_rng, action_rng = jax.random.split(rng)
  if schedule == 'shared':
    video_sigma = _grid_sigma(_uniform_grid_index(video_rng, shape, n), n, shift)
    action_sigma = video_sigma
  elif schedule == 'decoupled':
    video_index = _beta_grid_index(video_rng, shape, DECOUPLED_VIDEO_BETA_A, n)
    video_sigma = _grid_sigma(video_index, n, shift)
    action_sigma = _grid_sigma(_uniform_grid_index(action_rng, shape, n), n, shift)
  elif schedule == 'flash':
    video_sigma = _beta_a_1(video_rng, FLASH_VIDEO_BETA_A, shape)
    action_sigma = _grid_sigma(_uniform_grid_index(action_rng, shape, n), n, shift)
  else:
    raise ValueError(f'train.timestep_schedule={schedule!r}: expected one of {TIMESTEP_SCHEDULES}')
  return ChunkTimesteps(video_sigma, action_sigma, sigma_to_timestep(video_sigma, n),
                        sigma_to_timestep(action_sigma, n))


def _broadcast_sigma(sigma: jax.Array, x: jax.Array) -> jax.Array:
  """[B, K] (or any leading shape) -> trailing singleton dims to broadcast against x."""
  sigma = jnp.asarray(sigma)
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)).astype(x.dtype)


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
  """x_t = (1 - sigma) x0 + sigma eps; sigma's shape is a prefix of x0's."""
  s = _broadcast_sigma(sigma, x0)
  return (1 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The regression target v = eps - x0 (independent of sigma on a straight path)."""
  return noise - x0


def predict_x0(x_t: jax.Array, velocity: jax.Array, sigma: jax.Array) -> jax.Array:
  """The clean estimate implied by a velocity: x0 = x_t - sigma v."""
  return x_t - _broadcast_sigma(sigma, x_t) * velocity
