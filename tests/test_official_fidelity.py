"""DreamZero's own logic as the official release has it (docs/fidelity.md): the state token's
timestep, what a state query sees at inference, latent frame 0 in training, the action-loss mean."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamzero_jax import flow
from dreamzero_jax.config import load_config
from dreamzero_jax.models import dit, masks
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.training import objective
from tests.helpers import cache_rollout_errors, random_model
from tests.test_train_step import fixed_batch

K, LF, TPF, HA = 3, 2, 4, 5


def _model(overrides=()):
  cfg = load_config('configs/tiny.py', list(overrides))
  return cfg, random_model(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0)), seed=1)


def test_state_token_runs_at_its_chunks_action_timestep():
  video_t = jnp.asarray([[7.0, 100.0, 100.0, 200.0, 200.0, 300.0, 300.0]])
  action_t = jnp.repeat(jnp.asarray([[900.0, 500.0, 50.0]]), HA, axis=1)
  t = dit.teacher_forcing_timesteps(video_t, action_t, TPF, K)
  layout = masks.teacher_forcing_layout(K, LF, TPF, HA)
  g = layout.group
  np.testing.assert_array_equal(t[0, g == masks.Group.STATE], [900.0, 500.0, 50.0])
  np.testing.assert_array_equal(t[0, (g == masks.Group.CLEAN0) | (g == masks.Group.CLEAN)], 0.0)
  np.testing.assert_array_equal(t[0, g == masks.Group.NOISY0], 7.0)
  # Video levels never reach the state token; chunk 1's action level reaches only chunk 1's.
  moved = dit.teacher_forcing_timesteps(video_t + 11.0, action_t.at[:, HA:2 * HA].add(33.0), TPF, K)
  np.testing.assert_array_equal(moved[0, g == masks.Group.STATE], [900.0, 533.0, 50.0])


def test_state_modulation_and_outputs_follow_the_action_timestep():
  """Chunk k's action level changes its state token's modulation (e0) and, through the state token,
  the outputs of chunk k's noisy frames; the clean tokens' level (0) is not the state's."""
  cfg, model = _model()
  m = cfg.model
  state_t = lambda a: dit.teacher_forcing_timesteps(jnp.zeros((1, 1 + K * LF)), jnp.repeat(a, HA, axis=1), TPF, K)
  base_t, moved_t = state_t(jnp.asarray([[900.0, 500.0, 50.0]])), state_t(jnp.asarray([[900.0, 250.0, 50.0]]))
  layout = masks.teacher_forcing_layout(K, LF, TPF, HA)
  state_pos = np.flatnonzero(layout.group == masks.Group.STATE)
  e0_base, e0_moved = model.time_embed(base_t)[1], model.time_embed(moved_t)[1]
  assert float(jnp.abs(e0_base[0, state_pos[1]] - e0_moved[0, state_pos[1]]).max()) > 1e-3
  np.testing.assert_array_equal(e0_base[0, state_pos[[0, 2]]], e0_moved[0, state_pos[[0, 2]]])
  clean_e0 = model.time_embed(jnp.zeros((1, 1)))[1][0, 0]
  assert float(jnp.abs(e0_base[0, state_pos[1]] - clean_e0).max()) > 1e-3

  # Only the state token's level differs between the two runs: chunk 1's noisy frames see it.
  n = len(layout.group)
  x = jax.random.normal(jax.random.key(0), (1, n, m.dim))
  t_only_state = base_t.at[0, state_pos[1]].set(moved_t[0, state_pos[1]])
  mask = masks.attention_mask(layout, layout)
  kv = model.cross_kv(*model.embed_context(jnp.ones((1, m.text_len, m.text_dim)),
                                           jnp.ones((1, m.image_tokens, m.image_dim))))
  angles = jnp.zeros((n, m.dim // m.num_heads // 2))
  run = jax.jit(lambda t: model.backbone(x, t, angles, mask, cross_kv=kv)[0])
  changed = np.asarray(jnp.abs(run(t_only_state) - run(base_t)).max(-1)[0] > 1e-6)
  noisy1 = (layout.group == masks.Group.NOISY) & (layout.chunk == 1)
  assert changed[noisy1].all() and changed[state_pos[1]]
  assert not changed[layout.chunk != 1].any()


def test_state_query_sees_the_whole_cache_under_the_official_rule():
  cache = masks.video_layout(range(1 + 2 * LF), TPF, LF, clean=True)   # frame 0 + chunks 0, 1
  queries = masks.inference_layout(2, LF, TPF, HA)
  keys = masks.TokenLayout.concat(cache, queries)
  official = masks.attention_mask(queries, keys, state_attention='all')
  consistent = masks.attention_mask(queries, keys, state_attention='self')
  assert official[-1].all()                       # every cache key and every new token
  np.testing.assert_array_equal(consistent[-1], np.arange(len(keys.group)) == len(keys.group) - 1)
  np.testing.assert_array_equal(official[:-1], consistent[:-1])   # other queries: unchanged
  with pytest.raises(ValueError, match='inference_state_attention'):
    masks.attention_mask(queries, keys, state_attention='some')


def _rollout_vs_teacher_forcing(rule):
  """Max relative difference of a 2-chunk cache rollout's outputs from the teacher-forcing forward."""
  cfg, model = _model([f'model.inference_state_attention={rule}'])
  return max(max(e) for e in cache_rollout_errors(cfg, model, [800.0, 300.0])[0])


def test_cache_rollout_equals_teacher_forcing_under_the_consistent_rule_only():
  assert _rollout_vs_teacher_forcing('self') < 1e-5
  assert _rollout_vs_teacher_forcing('all') > 1e-4   # the official model is not train/inference consistent


class _Spy:
  """Stands in for the DiT: returns given velocities and records what the objective fed it."""

  def __init__(self, video_v, action_v):
    self.video_v, self.action_v = video_v, action_v

  def teacher_forcing(self, clean, noisy, video_t, actions, action_t, *rest):
    self.seen = dict(clean=clean, noisy=noisy, video_t=video_t, action_t=action_t)
    return self.video_v, self.action_v


def _loss_and_spy(cfg, batch, video_v, action_v):
  spy = _Spy(video_v, action_v)
  total, metrics = objective.flow_matching_loss(spy, batch, jax.random.key(5), cfg.train)
  return total, metrics, spy


def test_latent_frame_0_is_noised_at_its_own_level_and_in_the_video_loss():
  cfg = load_config('configs/tiny.py')
  batch = fixed_batch(cfg, batch_size=2, full=True)
  velocity = lambda b: (jnp.zeros(b.latents.shape), jnp.zeros(b.actions.shape))
  _, _, spy = _loss_and_spy(cfg, batch, *velocity(batch))
  t = spy.seen['video_t']
  assert float(jnp.abs(spy.seen['noisy'][:, 0] - batch.latents[:, 0]).max()) > 1e-3   # noised
  assert (t[:, 0] > 0).all() and (t[:, 0] != t[:, 1]).all()                             # its own level
  grad = jax.grad(lambda v: _loss_and_spy(cfg, batch, v, velocity(batch)[1])[1]['video_loss'])(velocity(batch)[0])
  assert float(jnp.abs(grad[:, 0]).max()) > 0       # frame 0's term is part of the loss


def test_action_loss_norm_padded_is_the_official_mean_over_every_padded_element():
  cfg = load_config('configs/tiny.py', ['train.action_loss_norm=padded'])
  batch = fixed_batch(cfg, batch_size=2)
  action_v = jax.random.normal(jax.random.key(1), batch.actions.shape)
  video_v = jnp.zeros(batch.latents.shape)
  _, padded, spy = _loss_and_spy(cfg, batch, video_v, action_v)
  cfg_valid = load_config('configs/tiny.py', ['train.action_loss_norm=valid'])
  _, valid, _ = _loss_and_spy(cfg_valid, batch, video_v, action_v)
  mask = np.asarray(batch.action_mask, np.float32)
  # Same noise draws (same key): the two means differ by the share of valid elements exactly.
  np.testing.assert_allclose(float(padded['action_loss']), float(valid['action_loss']) * mask.mean(), rtol=1e-5)
  # And by hand: the official mean of mask * w(t) * squared error over every element of every sample.
  ts, _, noise = objective.example_noise(jax.random.key(5), jnp.arange(2), cfg.train, batch.chunk_mask.shape[1],
                                         batch.latents.shape[1:], batch.actions.shape[1:])
  ha = cfg.video.action_horizon
  w = np.repeat(np.asarray(flow.loss_weight(ts.action_timestep[:, 1:], 1000, cfg.train.shift)), ha, 1)[..., None]
  err = np.square(np.asarray(action_v) - (np.asarray(noise) - np.asarray(batch.actions)))
  np.testing.assert_allclose(float(padded['action_loss']), (err * w * mask).mean(), rtol=1e-5)
  assert load_config('configs/dreamzero_14b_droid.py').train.action_loss_norm == 'padded'
