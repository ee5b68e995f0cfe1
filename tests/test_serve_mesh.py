"""The control step over a serving mesh (serve.mesh) equals it on one device, and a sharded policy serves.

The multi-device checks run this file as a script in a fresh process with fake CPU devices (the
device count is read when JAX starts).
"""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from dreamzero_jax import settings
from dreamzero_jax.config import load_config
from dreamzero_jax.inference import rollout
from tests import helpers

TINY = ['video.height=32', 'video.width=32', 'video.max_chunks=2', 'sampler.num_steps=2',
        'sampler.dit_step_mask="11"', 'sampler.cfg_scale=5.0']
# Wide enough that every split is a real one (8 heads of 32, an FFN of 1024, 4 layers), still CPU seconds.
MID = TINY + ['model.dim=256', 'model.num_heads=8', 'model.ffn_dim=1024', 'model.num_layers=4']
# name: (config overrides, serve.mesh)
CASES = {
    'tiny_tensor2': (TINY, 'tensor=2'),
    'tiny_tensor4': (TINY + ['model.num_heads=4'], 'tensor=4'),
    'tiny_data2_tensor2': (TINY, 'data=2,tensor=2'),
    'mid_tensor2': (MID, 'tensor=2'),
    'mid_tensor4': (MID, 'tensor=4'),
}


@pytest.mark.parametrize('mesh, message', [
    ('tensor=x', "serve.mesh='tensor=x': expected comma-separated AXIS=SIZE"),
    ('fsdp=2', "serve.mesh='fsdp=2': expected comma-separated AXIS=SIZE with AXIS one of data, tensor"),
    ('tensor=3', "serve.mesh='tensor=3': tensor=3 does not divide model.num_heads=2"),
    ('data=4', "serve.mesh='data=4': data splits the 2 CFG branches"),
    ('tensor=4', 'serve.mesh needs 4 devices, found 1'),
])
def test_a_bad_mesh_is_refused_naming_the_field(mesh, message):
  cfg = load_config('configs/tiny.py', [*TINY, 'model.num_heads=4', f'serve.mesh={mesh!r}'] if mesh == 'tensor=4'
                    else [*TINY, f'serve.mesh={mesh!r}'])
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    rollout.device_mesh(rollout.RolloutSpec.from_config(settings.from_config(cfg)))


def test_serve_flag_error_is_one_line():
  out = subprocess.run([sys.executable, '-m', 'dreamzero_jax.serve', '--config', 'configs/tiny.py', '--mesh',
                        'tensor=two', '--compile_only'], cwd=helpers.ROOT, capture_output=True, text=True,
                       timeout=120, env=helpers.fake_devices_env(1))
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      "error: --mesh='tensor=two': expected comma-separated AXIS=SIZE with AXIS one of data, tensor (each once) "
      'and SIZE >= 1, e.g. tensor=4'], out.stderr


# Default CI runs one 4-device case, both axes at once (the CFG branches over data=2, heads and MLP over
# tensor=2); the served test below covers tensor=2 end to end; the rest (~35 s each) run with -m slow.
@pytest.mark.parametrize('case', [
    pytest.param('tiny_tensor2', marks=pytest.mark.slow),
    pytest.param('tiny_tensor4', marks=pytest.mark.slow),
    'tiny_data2_tensor2',
    pytest.param('mid_tensor2', marks=pytest.mark.slow),
    pytest.param('mid_tensor4', marks=pytest.mark.slow),
])
def test_sharded_control_step_equals_one_device(case):
  out = helpers.run_with_fake_devices(__file__, ['--control-step', case], 4, '"case"', timeout=600)
  r = json.loads(out.strip().splitlines()[-1])
  assert max(r['rel_diff'].values()) < 1e-5, r
  assert r['heads_per_device'] == r['num_heads'] // r['tensor'], r   # the cache really is split by head
  assert r['ffn_per_device'] == r['ffn_dim'] // r['tensor'], r       # and the MLP by its hidden width


def test_sharded_tiny_policy_is_served_and_answers():
  helpers.run_with_fake_devices(__file__, ['--serve'], 2, 'served over tensor=2 ok', timeout=600)


def test_hlo_cost_counts_each_loop_iteration_and_collective():
  helpers.run_with_fake_devices(__file__, ['--hlo-cost'], 2, 'hlo cost ok', timeout=300)


# ---- the checks (run in their own process) ----------------------------------------------------------

def _policy(overrides, mesh):
  from flax import nnx

  from dreamzero_jax.inference.policy import Policy
  from dreamzero_jax.models import encoders
  cfg = settings.from_config(load_config('configs/tiny.py', [*overrides, f'serve.mesh={mesh!r}']))
  return Policy(cfg, helpers.random_dit(cfg), encoders.FrozenEncoders(cfg, rngs=nnx.Rngs(1)), helpers.STATS)


def _frames(n, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)


def _control_step_check(case: str) -> dict:
  """One control tick (rollout.control_step, as the server compiles it) after reset, on one device
  and over the case's mesh: the actions, video latents and the KV cache it wrote."""
  import jax
  import jax.numpy as jnp
  overrides, mesh = CASES[case]
  outs = []
  for serve_mesh in ('', mesh):
    policy = _policy(overrides, serve_mesh)
    ep = policy.reset('reach the goal', _frames(1)[0], np.zeros(4))
    dit, vae, _ = policy.networks
    frames = jnp.asarray(_frames(policy.settings.video.frames_per_chunk, seed=1))[None]
    cache, _, video, actions, _ = rollout.control_step(
        policy.spec, dit, vae, ep.cache, ep.cross_kv, ep.vae_cache, ep.i2v_cond, frames, jnp.int32(0),
        policy.normalised_state(np.full(4, 0.1)), jnp.int32(policy.embodiment.id), jax.random.key(0))
    outs.append(dict(actions=actions, video=video, k=cache.k, v=cache.v))
    ffn = policy.networks[0][1]['blocks']['ffn1']['kernel'].get_value()
  one, sharded = outs
  m = policy.settings.model
  return dict(case=case, tensor=policy.mesh.shape['tensor'], num_heads=m.num_heads, ffn_dim=m.ffn_dim,
              # Each output's largest difference relative to its largest entry (fp32 summation order).
              rel_diff={k: float(np.abs(np.asarray(sharded[k]) - np.asarray(one[k])).max() /
                                 np.abs(np.asarray(one[k])).max()) for k in one},
              heads_per_device=sharded['k'].addressable_shards[0].data.shape[3],
              ffn_per_device=ffn.addressable_shards[0].data.shape[-1])


def _serve_check():
  """A tiny policy over tensor=2 behind the server answers as the one-device policy does."""
  import dreamzero_client

  from dreamzero_jax.serving.adapters import PolicyServerBackend
  from tests.test_serve import _health, running_server
  overrides = [*TINY, 'serve.camera_height=16', 'serve.camera_width=16']
  replies = []
  for mesh in ('', 'tensor=2'):
    backend = PolicyServerBackend(_policy(overrides, mesh))
    meta = backend.metadata
    rng = np.random.default_rng(0)

    def obs(frames):
      o = {k: rng.integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8) for k in meta['observation_spec']
           if k != 'observation/state'}
      return {**o, 'observation/state': np.zeros(4, np.float32), 'prompt': 'reach'}

    with running_server(backend, max_sessions=2) as port:
      deadline = time.monotonic() + 300
      while _health(port) != 200:   # 503 while the control step compiles
        assert time.monotonic() < deadline
        time.sleep(0.05)
      with dreamzero_client.PolicyClient('127.0.0.1', port, session_id='s', timeout_s=120) as c:
        replies.append([c.infer(obs(n))['actions'] for n in (1, 8)])
    ffn = backend.policy.networks[0][1]['blocks']['ffn1']['kernel'].get_value()
    assert len(ffn.sharding.device_set) == (2 if mesh else 1)
  for want, got in zip(*replies):
    assert got.shape == (8, 4) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  print('served over tensor=2 ok')


def _hlo_cost_check():
  """A 10-step scan of [128, 1024] @ [1024, 1024] with the weights split by rows over 2 devices: each
  step is half the multiply-adds on each device and one all-reduce of the [128, 1024] fp32 result."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from dreamzero_jax import sharding
  from dreamzero_jax.inference import hlo_cost
  mesh = sharding.make_mesh((1, 1, 1, 2))
  x = jax.ShapeDtypeStruct((128, 1024), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  w = jax.ShapeDtypeStruct((10, 1024, 1024), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, 'tensor')))
  step = lambda x, w: (jnp.tanh(x @ w), None)
  compiled = jax.jit(lambda x, w: jax.lax.scan(step, x, w)[0]).lower(x, w).compile()
  cost = hlo_cost.program_cost(compiled.as_text())
  assert cost.flops == 10 * 2 * 128 * 512 * 1024, cost
  assert cost.collective_bytes == 10 * 128 * 1024 * 4, cost
  assert cost.unknown_trip_counts == 0
  # Each step reads its layer's half of the weights (2 MiB), not the stacked 20 MiB.
  assert 10 * 2 * 2**20 <= cost.hbm_bytes < 10 * 10 * 2**20, cost
  # A 3x3 convolution: 2 x (each output) x (input channels) x (taps), padding taps included.
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  compiled = jax.jit(conv).lower(jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32),
                                 jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32)).compile()
  assert hlo_cost.program_cost(compiled.as_text()).flops == 2 * 16 * 16 * 4 * 8 * 9
  print('hlo cost ok')


if __name__ == '__main__':
  import jax
  jax.config.update('jax_default_matmul_precision', 'highest')
  if len(sys.argv) == 3 and sys.argv[1] == '--control-step':
    print(json.dumps(_control_step_check(sys.argv[2])))
  elif sys.argv[1:] == ['--serve']:
    _serve_check()
  elif sys.argv[1:] == ['--hlo-cost']:
    _hlo_cost_check()
  else:
    sys.exit(f'usage: python tests/test_serve_mesh.py --control-step {{{"|".join(CASES)}}} | --serve | --hlo-cost')
