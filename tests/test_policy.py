"""The closed-loop policy: real observations (never its own predictions) drive the next chunk."""
import dataclasses
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from dreamzero_jax import settings
from dreamzero_jax.config import load_config
from dreamzero_jax.inference.policy import Policy
from dreamzero_jax.models import encoders
from dreamzero_jax.models.dit import build_dit
from tests import helpers


def _policy(overrides=()):
  cfg = settings.from_config(load_config('configs/tiny.py', [
      'video.height=32', 'video.width=32', 'video.max_chunks=2', 'sampler.num_steps=2', 'sampler.dit_step_mask="11"',
      *overrides]))
  model = build_dit(cfg.model, rngs=nnx.Rngs(0))
  # A trained head is not zero: randomise the zero-initialised output layers so outputs react, and
  # give the action decoder's last layer trained-like (not 0.02-init) weights for the same reason.
  model.head.kernel.set_value(jax.random.normal(jax.random.key(3), model.head.kernel.shape) * 0.3)
  out = model.action_decoder.layer2.kernel
  out.set_value(jax.random.normal(jax.random.key(4), out.shape) * 0.3)
  return cfg, Policy(cfg, model, encoders.FrozenEncoders(cfg, rngs=nnx.Rngs(1)), helpers.STATS)


def _frames(cfg, seed, n):
  return np.random.default_rng(seed).uniform(-1, 1, (n, cfg.video.height, cfg.video.width, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def cfg_policy():
  return _policy(['sampler.cfg_scale=5.0'])


def test_next_actions_follow_real_observations_not_predicted_frames(cfg_policy):
  cfg, policy = cfg_policy
  ep = policy.reset('reach the goal', _frames(cfg, 0, 1)[0], np.zeros(4))
  # Two different predictions of chunk 0 (different sampling noise)...
  a0, video0, ep_a, info = policy.step(policy.fork(ep))
  _, video1, ep_b, _ = policy.step(dataclasses.replace(policy.fork(ep), rng=jax.random.key(99)))
  assert a0.shape == (cfg.video.action_horizon, 4) and np.isfinite(a0).all()
  assert info['dit_evaluations'] == 2
  assert np.abs(video0 - video1).max() > 1e-3
  # ...followed by the same real frames give the same next chunk: predictions never enter the cache.
  real = _frames(cfg, 1, cfg.video.frames_per_chunk)
  ep_a = policy.observe(ep_a, real, np.zeros(4))
  ep_b = dataclasses.replace(policy.observe(ep_b, real, np.zeros(4)), rng=ep_a.rng)
  next_a, _, _, _ = policy.step(ep_a)
  next_b, _, _, _ = policy.step(ep_b)
  np.testing.assert_array_equal(next_a, next_b)
  # Different real frames give different next actions.
  ep_c = policy.observe(dataclasses.replace(policy.fork(ep), chunk=1), _frames(cfg, 2, cfg.video.frames_per_chunk),
                        np.zeros(4))
  next_c, _, _, _ = policy.step(dataclasses.replace(ep_c, rng=ep_a.rng))
  assert np.abs(next_c - next_a).max() > 1e-4


def test_context_window_restarts_after_max_chunks(cfg_policy):
  cfg, policy = cfg_policy
  ep = policy.reset('push the puck', _frames(cfg, 0, 1)[0], np.zeros(4))
  for k in range(cfg.video.max_chunks):
    _, _, ep, _ = policy.step(ep)
    ep = policy.observe(ep, _frames(cfg, 10 + k, cfg.video.frames_per_chunk), np.zeros(4))
    assert (ep.chunk, ep.written) == ((k + 1, k + 1) if k + 1 < cfg.video.max_chunks else (0, 0))
  actions, _, ep, _ = policy.step(ep)   # chunk 0 of the restarted window
  assert ep.chunk == 1 and np.isfinite(actions).all()


def test_out_of_order_calls_are_refused(cfg_policy):
  cfg, policy = cfg_policy
  ep = policy.reset('reach', _frames(cfg, 0, 1)[0], np.zeros(4))
  with pytest.raises(ValueError, match='call step first'):
    policy.observe(ep, _frames(cfg, 1, cfg.video.frames_per_chunk), np.zeros(4))
  _, _, ep, _ = policy.step(ep)
  with pytest.raises(ValueError, match='call observe first'):
    policy.step(ep)
  with pytest.raises(ValueError, match=r'observed frames: has shape \(3, '):
    policy.observe(ep, _frames(cfg, 1, 3), np.zeros(4))


def test_flash_one_step_runs_without_the_unconditional_branch():
  cfg, policy = _policy(['sampler.num_steps=1', 'sampler.dit_step_mask="1"', 'sampler.kind="euler"'])
  assert policy.batch == 1
  ep = policy.reset('reach', _frames(cfg, 0, 1)[0], np.zeros(4))
  actions, _, _, info = policy.step(ep)
  assert info['dit_evaluations'] == 1 and np.isfinite(actions).all()


def test_server_runs_a_trained_checkpoint_end_to_end(tmp_path):
  """train.py workdir -> load_backend -> websocket server -> client: shaped actions, errors survive."""
  import dreamzero_client
  from dreamzero_jax.inference import rollout
  from dreamzero_jax.serving import loading as policy_lib
  from tests.test_serve import _health, raw_connection, raw_infer, running_server
  cfg = load_config('configs/tiny.py', ['video.height=32', 'video.width=32', 'video.max_chunks=2', 'train.steps=1',
                                        'sampler.num_steps=1', 'sampler.dit_step_mask="1"', 'serve.camera_height=24',
                                        'serve.camera_width=20'])
  helpers.train_on_synthetic(cfg, str(tmp_path), n=1)
  # The rollout functions are shared by every policy in this process: count this one's compiles.
  pieces = ('start', 'denoise', 'observe')
  compiles = lambda: {name: getattr(rollout, name)._cache_size() - before[name] for name in pieces}
  before = dict.fromkeys(pieces, 0)
  before = compiles()
  backend = policy_lib.load_backend(str(tmp_path))
  meta = backend.metadata
  assert meta['action_shape'] == [8, 4] and meta['embodiment'] == 'metaworld'
  rng = np.random.default_rng(0)

  def obs(frames):
    o = {k: rng.integers(0, 255, (frames, 24, 20, 3), dtype=np.uint8) for k in meta['observation_spec']
         if k != 'observation/state'}
    o['observation/state'] = np.zeros(4, np.float32)
    return o

  with running_server(backend, max_sessions=4) as port:
    deadline = time.monotonic() + 300
    while _health(port) != 200:   # 503 while the control step compiles
      assert time.monotonic() < deadline
      time.sleep(0.05)
    compiled = compiles()
    assert compiled == dict.fromkeys(pieces, 1)   # all compiled before /healthz said 200
    with raw_connection(port) as ws:   # an openpi client: no session_id, the connection is the session
      for frames in (1, 8):
        assert raw_infer(ws, {**obs(frames), 'prompt': 'reach'})['actions'].shape == (8, 4)
    with dreamzero_client.PolicyClient('127.0.0.1', port, session_id='s1', timeout_s=120) as c:
      reply = c.infer({**obs(1), 'prompt': 'reach'})
      assert reply['actions'].shape == (8, 4) and reply['actions'].dtype == np.float32
      with pytest.raises(dreamzero_client.PolicyServerError, match='observation/state'):
        c.infer({**obs(8), 'observation/state': np.zeros(3, np.float32), 'prompt': 'reach'})
      for _ in range(3):  # past max_chunks: the context window restarts
        reply = c.infer({**obs(8), 'prompt': 'reach'})
        assert reply['actions'].shape == (8, 4) and np.isfinite(reply['actions']).all()
    assert compiles() == compiled   # no call compiled


def test_cfg_parallel_needs_an_unconditional_branch_and_two_devices():
  with pytest.raises(ValueError, match='sampler.cfg_parallel needs 2 devices, found 1'):
    _policy(['sampler.cfg_scale=5.0', 'sampler.cfg_parallel=True'])
  with pytest.raises(ValueError, match='no unconditional branch'):
    _policy(['sampler.cfg_scale=1.0', 'sampler.cfg_parallel=True'])


@pytest.mark.slow   # ~30 s; CI covers the CFG branches over devices in test_serve_mesh (tiny_data2_tensor2)
def test_cfg_branches_on_two_devices_equal_the_batched_forward():
  # Two fake CPU devices must exist before JAX starts: run this file as a script in a fresh process.
  helpers.run_with_fake_devices(__file__, ['--cfg-parallel'], 2, 'cfg parallel ok')


def _cfg_parallel_check():
  rollouts = []
  for parallel in (False, True):
    cfg, policy = _policy(['sampler.cfg_scale=5.0', f'sampler.cfg_parallel={parallel}'])
    ep = policy.reset('reach the goal', _frames(cfg, 0, 1)[0], np.zeros(4))
    a0, v0, ep, _ = policy.step(ep)
    ep = policy.observe(ep, _frames(cfg, 1, cfg.video.frames_per_chunk), np.full(4, 0.1))
    a1, v1, ep, _ = policy.step(ep)
    rollouts.append((a0, v0, a1, v1))
    if parallel:
      # Each device holds one branch of the cache: batch 1 of 2 per shard, on two devices.
      assert len(ep.cache.k.sharding.device_set) == 2
      assert {s.data.shape[1] for s in ep.cache.k.addressable_shards} == {1}
  for want, got in zip(*rollouts):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  print('cfg parallel ok')


if __name__ == '__main__':
  if sys.argv[1:] == ['--cfg-parallel']:
    jax.config.update('jax_default_matmul_precision', 'highest')
    _cfg_parallel_check()
