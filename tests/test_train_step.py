"""The train step: loss falls, LoRA trains only its factors, EMA tracks, sharded equals unsharded."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamzero_jax.config import load_config
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.training import objective, trainer
from tests.helpers import ROOT


def fixed_batch(cfg, batch_size=2, seed=0, full=False):
  """A random LatentBatch; unless `full`, example 0 is one chunk short (padded and masked)."""
  m, v = cfg.model, cfg.video
  k, lf = v.max_chunks, v.frames_per_chunk // v.vae_temporal
  f, h, w = 1 + k * lf, v.height // v.vae_spatial, v.width // v.vae_spatial
  rng = np.random.default_rng(seed)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  chunk_mask = np.ones((batch_size, k), bool)
  chunk_mask[0, -1] = full  # a clip with one chunk fewer: padded and masked
  action_mask = np.zeros((batch_size, k * v.action_horizon, m.action_dim), bool)
  action_mask[..., :cfg.data.action_dim] = np.repeat(chunk_mask, v.action_horizon, 1)[..., None]
  return objective.LatentBatch(
      latents=arr(batch_size, f, h, w, v.latent_channels),
      i2v_cond=(arr(batch_size, f, h, w, m.in_channels - v.latent_channels)
                if m.in_channels > v.latent_channels else None),
      text=arr(batch_size, m.text_len, m.text_dim),
      image=arr(batch_size, m.image_tokens, m.image_dim) if m.image_dim else None,
      actions=jnp.clip(arr(batch_size, k * v.action_horizon, m.action_dim), -1, 1) * action_mask,
      action_mask=jnp.asarray(action_mask), state=arr(batch_size, k, m.state_dim),
      chunk_mask=jnp.asarray(chunk_mask), embodiment_id=jnp.asarray(np.arange(batch_size) % 2, jnp.int32))


def _setup(overrides=()):
  cfg = load_config('configs/tiny.py', list(overrides))
  model = build_dit(cfg.model, rngs=nnx.Rngs(0))
  graphdef, state = trainer.init_train_state(model, cfg, jax.random.key(0))
  return cfg, graphdef, state, jax.jit(trainer.make_train_step(graphdef, cfg))


def test_a_few_updates_lower_both_losses_on_a_fixed_batch():
  """Fixed batch and noise draws: 20 updates lower the video and the action loss by 20%."""
  cfg, graphdef, state, _ = _setup(['train.lr=1e-2', 'train.warmup_fraction=0.0', 'train.steps=1000'])
  update = jax.jit(trainer.make_update(graphdef, cfg))
  batch, rng = fixed_batch(cfg), jax.random.key(3)
  history = []
  for _ in range(20):
    state, metrics = update(state, batch, rng)
    history.append((float(metrics['video_loss']), float(metrics['action_loss'])))
  assert np.isfinite(history).all()
  (video0, action0), (video1, action1) = history[0], history[-1]
  assert video1 < 0.8 * video0 and action1 < 0.8 * action0, history
  assert int(state.step) == 20


def test_train_step_draws_noise_from_the_step():
  cfg, graphdef, state, step = _setup()
  batch = fixed_batch(cfg)
  _, m0 = step(state, batch)
  _, m1 = step(state._replace(step=state.step + 1), batch)
  _, m0_again = step(state, batch)
  assert float(m0['loss']) == float(m0_again['loss']) != float(m1['loss'])


def test_lora_trains_only_its_factors():
  cfg, graphdef, state, step = _setup(['train.lora_rank=2', 'train.lr=1e-2', 'train.warmup_fraction=0.0'])
  assert set(state.params) == {f'blocks/{a}/{p}/kernel' for a in ('self_attn', 'cross_attn') for p in 'qkvo'} | {
      'blocks/ffn1/kernel', 'blocks/ffn2/kernel'}
  frozen_before = jax.tree.map(np.asarray, state.frozen)
  merged0 = trainer.full_params(state, cfg.train)
  jax.tree.map(np.testing.assert_array_equal, merged0, frozen_before)   # B = 0: starts as the base
  state, _ = step(state, fixed_batch(cfg))
  state, _ = step(state, fixed_batch(cfg))
  jax.tree.map(np.testing.assert_array_equal, state.frozen, frozen_before)
  merged = trainer.full_params(state, cfg.train)
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), merged, frozen_before)
  assert diff['blocks']['self_attn']['q']['kernel'] > 0
  assert diff['head']['kernel'] == 0


def test_ema_follows_the_parameters():
  cfg, _, state, step = _setup(['train.ema_decay=0.5', 'train.lr=1e-2', 'train.warmup_fraction=0.0'])
  p0 = state.params
  state, _ = step(state, fixed_batch(cfg))
  want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, p0, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.ema, want)


def test_gradient_accumulation_equals_one_update_of_the_whole_batch():
  """k micro-batches of b then one update == one update of k*b: parameters, applied lr and EMA
  after 3 updates (the schedule and EMA count updates, each example keeps its noise)."""
  common = ['train.lr=1e-2', 'train.warmup_fraction=0.5', 'train.steps=6', 'train.ema_decay=0.5']
  runs = {}
  for accum, micro in ((2, 2), (1, 4)):
    cfg, _, state, step = _setup(common + [f'train.grad_accum_steps={accum}', f'train.batch_size={micro}'])
    lrs = []
    for i in range(3):
      state, metrics = step(state, fixed_batch(cfg, batch_size=4, seed=i, full=True))
      lrs.append(float(metrics['lr']))
    runs[accum] = state, lrs, cfg
  (s2, lr2, cfg), (s1, lr1, _) = runs[2], runs[1]
  assert int(s2.step) == int(s1.step) == 3
  schedule = trainer.learning_rate(cfg.train)
  np.testing.assert_allclose(lr2, [float(schedule(i)) for i in range(3)], rtol=1e-6)   # what was applied
  np.testing.assert_allclose(lr2, lr1, rtol=1e-6)
  assert lr2[0] == 0.0 < lr2[1]   # warmup counts updates: 3 of 6 steps
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  jax.tree.map(close, s2.params, s1.params)
  jax.tree.map(close, s2.ema, s1.ema)


@pytest.mark.slow
def test_tiny_model_overfits_one_fixed_batch():
  """Both losses fall by at least 10x within a few hundred CPU steps on one batch and noise draw."""
  cfg, graphdef, state, _ = _setup(['train.lr=3e-3', 'train.warmup_fraction=0.0', 'train.steps=300',
                                    'model.dim=64', 'model.ffn_dim=256', 'model.num_heads=4', 'video.height=32',
                                    'video.width=32', 'video.max_chunks=2'])
  update = jax.jit(trainer.make_update(graphdef, cfg))
  batch, rng = fixed_batch(cfg), jax.random.key(3)
  first = None
  for _ in range(300):
    state, metrics = update(state, batch, rng)
    first = first or (float(metrics['video_loss']), float(metrics['action_loss']))
  last = (float(metrics['video_loss']), float(metrics['action_loss']))
  assert last[0] < first[0] / 10 and last[1] < first[1] / 10, (first, last)


@pytest.mark.slow  # 26 s; the train step itself is tested at tiny sizes above
def test_metaworld_config_trains_at_its_own_batch_size():
  """configs/metaworld.py at its batch of 16 (one layer: the crash was per dot, not per depth). XLA's
  CPU YNNPACK dots died with SIGSEGV here; a fresh process, so a crash fails the test, not the run."""
  cfg = load_config('configs/metaworld.py')
  assert cfg.train.batch_size == 16
  out = subprocess.run([sys.executable, 'bench/train_step.py', '--config', 'configs/metaworld.py', '--layers', '1',
                        '--batch', str(cfg.train.batch_size), '--runs', '1'], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'loss=' in out.stdout
