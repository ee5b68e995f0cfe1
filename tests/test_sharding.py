"""Sharding: golden PartitionSpecs of the 14B model, and a sharded train step equal to one device.

The golden file records the PartitionSpec of every parameter (and batch field) of
configs/dreamzero_14b_droid.py on a data=1, fsdp=8, context=1, tensor=4 mesh; specs come from
logical axes and rules alone, so no devices are needed. After an intended change of names or
rules, regenerate it and review the diff:

  python tests/test_sharding.py --regenerate

The equality test needs 8 devices: XLA_FLAGS must be set before JAX starts, so it runs
this file as a script in a fresh process (`python tests/test_sharding.py --sharded-check CASE`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'dreamzero_14b_droid_fsdp8_tensor4.json')
GOLDEN_CONFIG = 'configs/dreamzero_14b_droid.py'
GOLDEN_MESH = dict(data=1, fsdp=8, context=1, tensor=4)
GOLDEN_BATCH = 16


def current_specs() -> dict:
  """Parameter and batch specs of the golden config, as JSON-ready dicts keyed by path."""
  import jax
  from flax import nnx
  from jax.sharding import PartitionSpec

  from dreamzero_jax import sharding
  from dreamzero_jax.config import load_config
  from dreamzero_jax.training import train_aot, trainer

  cfg = load_config(os.path.join(ROOT, GOLDEN_CONFIG))
  model = trainer.abstract_model(cfg)
  params = sharding.param_specs(model, sharding.config_rules(cfg), GOLDEN_MESH)
  shapes = nnx.state(model).to_pure_dict()
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, PartitionSpec))
  abstract = train_aot.abstract_batch(cfg, GOLDEN_BATCH)
  batch = sharding.batch_specs(abstract, sharding.config_rules(cfg), GOLDEN_MESH)
  entry = lambda spec, x: dict(spec=[list(e) if isinstance(e, tuple) else e for e in spec], shape=list(x.shape))
  return dict(
      config=GOLDEN_CONFIG, mesh=GOLDEN_MESH, batch_size=GOLDEN_BATCH,
      params={'/'.join(k.key for k in path): entry(s, _get(shapes, path)) for path, s in flat},
      batch={name: entry(s, getattr(abstract, name)) for name, s in batch._asdict().items() if s is not None})


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def _dump(golden: dict) -> str:
  """JSON with one line per parameter, so a changed spec is a one-line diff."""
  lines = []
  for key, value in golden.items():
    if key in ('params', 'batch'):
      body = ',\n'.join(f'  {json.dumps(k)}: {json.dumps(v)}' for k, v in sorted(value.items()))
      lines.append(f' {json.dumps(key)}: {{\n{body}\n }}')
    else:
      lines.append(f' {json.dumps(key)}: {json.dumps(value)}')
  return '{\n' + ',\n'.join(lines) + '\n}\n'


def test_param_specs_match_the_golden_file():
  with open(GOLDEN) as f:
    golden = json.load(f)
  now = current_specs()
  changed = {k: (golden['params'].get(k), v) for k, v in now['params'].items() if golden['params'].get(k) != v}
  missing = sorted(set(golden['params']) - set(now['params']))
  assert not changed and not missing, (
      f'parameter specs differ from {GOLDEN} (golden, now): {changed}; gone: {missing}. '
      'If intended: python tests/test_sharding.py --regenerate')
  assert now['batch'] == golden['batch']


def test_golden_shards_the_big_matrices_over_fsdp_and_tensor():
  """The rules do what docs/data_and_sharding.md says, so the golden file cannot silently go replicated."""
  with open(GOLDEN) as f:
    params = json.load(f)['params']
  embed = ['fsdp', 'context']
  assert params['blocks/self_attn/q/kernel']['spec'] == [None, embed, 'tensor']
  assert params['blocks/self_attn/o/kernel']['spec'] == [None, 'tensor', embed]
  assert params['blocks/ffn1/kernel']['spec'] == [None, embed, 'tensor']
  assert params['blocks/ffn2/kernel']['spec'] == [None, 'tensor', embed]
  assert params['blocks/norm3/scale']['spec'] == [None, None]


def test_dimensions_that_do_not_divide_fall_back_to_replication():
  from jax.sharding import PartitionSpec as P

  from dreamzero_jax.sharding import fit_spec
  sizes = dict(data=2, fsdp=4, tensor=3)
  assert fit_spec(P(('data', 'fsdp'), 'tensor'), (16, 9), sizes) == P(('data', 'fsdp'), 'tensor')
  assert fit_spec(P(('data', 'fsdp'), 'tensor'), (6, 10), sizes) == P('data', None)   # prefix 'data' divides
  assert fit_spec(P(('data', 'fsdp'), None), (3, 10), sizes) == P(None, None)
  assert fit_spec(P('fsdp'), (8, 5), sizes) == P('fsdp', None)


# name: (mesh shape over data, fsdp, context, tensor), batch size, config overrides
SHARDED_CASES = {
    'data2_fsdp2_tensor2': ((2, 2, 1, 2), 4, ()),
    'fsdp2_context2_tensor2_lora_ema': ((1, 2, 2, 2), 2, ('train.lora_rank=2', 'train.ema_decay=0.5')),
}


@pytest.mark.parametrize('case', [
    'data2_fsdp2_tensor2',
    pytest.param('fsdp2_context2_tensor2_lora_ema', marks=pytest.mark.slow),
])
def test_sharded_train_step_equals_one_device(case):
  """Two sharded steps on 8 CPU devices match two unsharded steps (fp32, exact matmuls)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  res = subprocess.run([sys.executable, os.path.abspath(__file__), '--sharded-check', case], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]
  r = json.loads(res.stdout.strip().splitlines()[-1])
  assert r['loss_rel'] < 1e-5 and r['grad_norm_rel'] < 1e-5, r
  # Adam divides each gradient by its own magnitude, so where a true gradient is ~0 (weights of
  # masked-out action dims, LoRA factors at init) summation-order noise becomes part of an lr-sized
  # update (measured: 2e-3 of lr, where loss and grad norm agree exactly). Bound the parameter
  # difference by 1% of the largest step Adam can take.
  assert r['params_diff_per_lr'] < 1e-2 and r['ema_diff_per_lr'] < 1e-2, r
  assert r['sharded_leaves'] > 0, r     # something really was split across devices


# ---- the 8-device check (run in its own process) ---------------------------------------------------

def _sharded_check(case: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  jax.config.update('jax_default_matmul_precision', 'highest')
  from dreamzero_jax import sharding
  from dreamzero_jax.config import load_config
  from dreamzero_jax.models.dit import build_dit
  from dreamzero_jax.training import trainer
  from tests.test_train_step import fixed_batch

  assert jax.device_count() == 8, jax.devices()
  shape, batch_size, overrides = SHARDED_CASES[case]
  cfg = load_config(os.path.join(ROOT, 'configs/tiny.py'), ['train.warmup_fraction=0.0', *overrides])
  graphdef, state = trainer.init_train_state(build_dit(cfg.model, rngs=nnx.Rngs(0)), cfg, jax.random.key(0))
  batch = jax.tree.map(lambda x: jnp.concatenate([x] * (batch_size // 2)), fixed_batch(cfg, batch_size=2))
  step_fn = trainer.make_train_step(graphdef, cfg)
  initial = jax.tree.map(np.asarray, state.params)

  single = jax.jit(step_fn)
  ref_state = state
  for _ in range(2):
    ref_state, ref_metrics = single(ref_state, batch)

  mesh = sharding.make_mesh(shape, devices=jax.devices())
  state_sh, batch_sh = trainer.train_shardings(cfg, mesh, state, batch)
  step = sharding.shard_train_step(step_fn, mesh, state_sh, batch_sh, sharding.config_rules(cfg))
  sharded_state = jax.device_put(state, state_sh)
  global_batch = sharding.global_batch(jax.tree.map(np.asarray, batch), batch_sh)
  for _ in range(2):
    sharded_state, metrics = step(sharded_state, global_batch)

  diff = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
  rel = lambda a, b: diff(a, b) / max(float(np.abs(np.asarray(b)).max()), 1e-30)
  max_rel = lambda x, y: max(jax.tree.leaves(jax.tree.map(rel, x, y)))
  per_lr = lambda x, y: max(jax.tree.leaves(jax.tree.map(diff, x, y))) / (2 * cfg.train.lr)  # 2 steps
  moved = jax.tree.map(diff, ref_state.params, initial)
  assert max(jax.tree.leaves(moved)) > 0  # the reference steps did update the parameters
  return dict(
      loss_rel=rel(metrics['loss'], ref_metrics['loss']),
      grad_norm_rel=rel(metrics['grad_norm'], ref_metrics['grad_norm']),
      params_rel=max_rel(sharded_state.params, ref_state.params),
      params_diff_per_lr=per_lr(sharded_state.params, ref_state.params),
      ema_diff_per_lr=per_lr(sharded_state.ema, ref_state.ema) if ref_state.ema is not None else 0.0,
      sharded_leaves=sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded_state.params)))


def _regenerate() -> None:
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  with open(GOLDEN, 'w') as f:
    f.write(_dump(current_specs()))
  print(f'wrote {GOLDEN}')


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  if sys.argv[1:] == ['--regenerate']:
    _regenerate()
  elif len(sys.argv) == 3 and sys.argv[1] == '--sharded-check':
    print(json.dumps(_sharded_check(sys.argv[2])))
  else:
    sys.exit(f'usage: python tests/test_sharding.py --regenerate | --sharded-check {{{"|".join(SHARDED_CASES)}}}')
