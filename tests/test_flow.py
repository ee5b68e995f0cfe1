"""Flow-matching convention, schedules, training timestep samplers and loss weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from dreamzero_jax import flow

N = 1000
SHIFT = 5.0


def _train_cfg(schedule):
  cfg = base.get_base_config().train
  cfg.timestep_schedule = schedule
  return cfg


def _unshift(sigma, shift=SHIFT):
  """Inverse of sigma = shift s / (1 + (shift - 1) s), written out by hand."""
  return sigma / (shift - (shift - 1) * sigma)


def test_shift_by_hand():
  np.testing.assert_allclose(flow.shift_sigma(np.array([0.0, 0.5, 1.0]), 5.0),
                             [0.0, 2.5 / 3.0, 1.0], rtol=1e-12)
  s = np.linspace(0, 1, 11)
  np.testing.assert_allclose(flow.shift_sigma(s, 1.0), s)


def test_training_grid_is_the_shifted_1000_step_table():
  grid = flow.training_sigma_grid(N, SHIFT)
  assert grid.shape == (N,)
  assert grid[0] == 1.0 and np.all(np.diff(grid) < 0)
  i = np.array([0, 1, 500, 999])
  s = 1.0 - i / N
  np.testing.assert_allclose(grid[i], 5 * s / (1 + 4 * s), rtol=1e-12)


def test_sampling_sigmas():
  sig = flow.sampling_sigmas(4, SHIFT, N)
  s = np.array([0.999, 0.999 * 3 / 4, 0.999 / 2, 0.999 / 4])
  np.testing.assert_allclose(sig, np.concatenate([5 * s / (1 + 4 * s), [0.0]]), rtol=1e-12)
  with pytest.raises(ValueError, match='num_steps'):
    flow.sampling_sigmas(0, SHIFT, N)


def test_loss_weight_normalised_over_grid():
  grid_t = flow.training_sigma_grid(N, SHIFT) * N
  w = np.asarray(flow.loss_weight(grid_t, N, SHIFT))
  assert abs(w.mean() - 1.0) < 1e-5
  assert abs(w.min()) < 1e-6 and np.all(w >= -1e-6)
  # The official table: bump at N/2, minus its grid minimum, times N / sum.
  y = np.exp(-2 * ((grid_t - 500) / 1000) ** 2)
  expected = (y - y.min()) * (N / (y - y.min()).sum())
  np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
  assert grid_t[np.argmax(w)] == pytest.approx(500, abs=1.0)


@pytest.mark.parametrize('schedule', ['shared', 'decoupled', 'flash'])
def test_chunk_timesteps_shapes_and_ranges(schedule):
  ts = flow.chunk_timesteps(jax.random.key(0), _train_cfg(schedule), 3, 4)
  for name in ts._fields:
    assert getattr(ts, name).shape == (3, 4), name
  for sigma, t in ((ts.video_sigma, ts.video_timestep), (ts.action_sigma, ts.action_timestep)):
    assert jnp.all((sigma >= 0) & (sigma <= 1))
    np.testing.assert_allclose(t, sigma * N, rtol=1e-6)


def test_shared_schedule_one_grid_index_per_chunk():
  ts = jax.jit(lambda k: flow.chunk_timesteps(k, _train_cfg('shared'), 64, 4))(jax.random.key(1))
  np.testing.assert_array_equal(ts.video_sigma, ts.action_sigma)
  grid = flow.training_sigma_grid(N, SHIFT).astype(np.float32)
  dist = np.abs(np.asarray(ts.video_sigma)[..., None] - grid).min(-1)
  assert dist.max() < 1e-6  # every value is a grid level
  assert len(np.unique(np.asarray(ts.video_sigma))) > 100  # chunks draw independently
  s = _unshift(np.asarray(ts.video_sigma, np.float64))
  assert abs(s.mean() - 0.5) < 0.05


def test_decoupled_schedule_beta_video_uniform_actions():
  ts = flow.chunk_timesteps(jax.random.key(2), _train_cfg('decoupled'), 5000, 4)
  video_s = _unshift(np.asarray(ts.video_sigma, np.float64))
  action_s = _unshift(np.asarray(ts.action_sigma, np.float64))
  # s = 1 - floor((1 - r) N) / N with r ~ Beta(3, 1): mean 3/4 (+ 1/(2N) from the floor).
  assert abs(video_s.mean() - 0.75) < 0.01
  assert abs(action_s.mean() - 0.5) < 0.01
  assert abs(np.corrcoef(video_s.ravel(), action_s.ravel())[0, 1]) < 0.05


def test_flash_schedule_mostly_noisy_video():
  ts = flow.chunk_timesteps(jax.random.key(3), _train_cfg('flash'), 5000, 4)
  eta = np.asarray(ts.video_sigma, np.float64)
  assert abs(eta.mean() - 7 / 8) < 0.01  # Beta(7, 1) mean, used directly as sigma
  assert abs(eta.var() - 7 / (64 * 9)) < 0.002
  assert abs((eta < 0.8).mean() - 0.8 ** 7) < 0.02  # the Beta(7, 1) CDF x^7
  assert abs(_unshift(np.asarray(ts.action_sigma, np.float64)).mean() - 0.5) < 0.01


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match='timestep_schedule'):
    flow.chunk_timesteps(jax.random.key(0), _train_cfg('cosine'), 1, 1)


def test_noise_target_and_x0_roundtrip():
  rng = np.random.RandomState(4)
  x0 = jnp.asarray(rng.randn(2, 3, 4, 5, 6), jnp.float32)
  eps = jnp.asarray(rng.randn(*x0.shape), jnp.float32)
  sigma = jnp.asarray(rng.uniform(size=(2, 3)), jnp.float32)
  x_t = flow.add_noise(x0, eps, sigma)
  s = np.asarray(sigma)[:, :, None, None, None]
  np.testing.assert_allclose(x_t, (1 - s) * x0 + s * eps, rtol=1e-6, atol=1e-6)
  v = flow.velocity_target(x0, eps)
  np.testing.assert_allclose(v, eps - x0)
  np.testing.assert_allclose(flow.predict_x0(x_t, v, sigma), x0, atol=1e-5)
  np.testing.assert_allclose(flow.add_noise(x0, eps, jnp.zeros((2, 3))), x0)
  np.testing.assert_allclose(flow.add_noise(x0, eps, jnp.ones((2, 3))), eps)
