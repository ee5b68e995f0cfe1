"""train.py's loop: exact resume, incompatible-checkpoint refusal, NaN stop, batch checks."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dreamzero_jax import checkpoint
from dreamzero_jax.config import load_config
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.training import loop, train_aot, trainer
from tests import helpers
from tests.helpers import ListIterator, synthetic_batches

CFG_OVERRIDES = ['train.steps=4', 'train.checkpoint_every=2', 'train.lr=1e-2', 'train.warmup_fraction=0.0',
                 'video.max_chunks=2', 'video.height=32', 'video.width=32']


def _params(workdir):
  ckpt = checkpoint.Checkpointer(workdir)
  raw = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return raw['state']['params']


def _logged_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_resume_from_step_2_to_4_equals_4_uninterrupted_steps(tmp_path):
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES + ['train.log_every=1'])
  batches = synthetic_batches(cfg)
  full_dir, resumed_dir = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  # A log left by an earlier run in this folder whose checkpoints are gone: starting afresh drops it.
  os.makedirs(full_dir)
  with open(os.path.join(full_dir, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': 1, 'loss': -1.0}) + '\n')
  assert loop.train(cfg, full_dir, data=ListIterator(batches)) == 0

  assert loop.train(cfg, resumed_dir, data=ListIterator(batches), stop_at=2) == 0
  # As if that run had gone on past its checkpoint and crashed mid-line: step 3 is trained again.
  with open(os.path.join(resumed_dir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': 3, 'loss': -1.0}) + '\n{"step": 4, "lo')
  # A fresh process would rebuild the iterator from scratch; the checkpoint moves it to batch 2.
  assert loop.train(cfg, resumed_dir, data=ListIterator(batches)) == 0

  full, resumed = _params(full_dir), _params(resumed_dir)
  jax.tree.map(np.testing.assert_array_equal, resumed, full)
  # One curve in each log, the same one: every step once, no record from the runs they replaced.
  full_log, resumed_log = _logged_steps(full_dir), _logged_steps(resumed_dir)
  assert [r['step'] for r in full_log] == [r['step'] for r in resumed_log] == [1, 2, 3, 4]
  assert all(r['loss'] > 0 for r in full_log + resumed_log)
  np.testing.assert_allclose([r['loss'] for r in resumed_log], [r['loss'] for r in full_log], rtol=1e-6)
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'full' / 'tb'))


def test_incompatible_checkpoint_is_refused_naming_the_field(tmp_path):
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES)
  assert loop.train(cfg, str(tmp_path), data=ListIterator(synthetic_batches(cfg)), stop_at=1) == 0
  other = load_config('configs/tiny.py', CFG_OVERRIDES + ['train.steps=4', 'model.num_layers=3'])
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r'model\.num_layers: 2 \(checkpoint\) vs 3'):
    loop.train(other, str(tmp_path), data=ListIterator(synthetic_batches(other)))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES)
  batches = synthetic_batches(cfg)
  batches[2]['actions'] = np.full_like(batches[2]['actions'], np.nan)
  assert loop.train(cfg, str(tmp_path), data=ListIterator(batches)) == 3
  out = capsys.readouterr().out
  assert 'step 3: ' in out and 'action_loss is nan' in out and 'last good checkpoint is step 2' in out
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_batch_with_wrong_shape_is_refused_naming_the_field(tmp_path):
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES)
  batches = synthetic_batches(cfg)
  batches[0]['state'] = batches[0]['state'][:, :1]
  with pytest.raises(ValueError, match=r"batch\['state'\]: has shape \(2, 1, 64\) but expected \(2, 2, 64\)"):
    loop.train(cfg, str(tmp_path), data=ListIterator(batches))


@pytest.mark.slow  # 40 s; resuming is also checked by the step 2 -> 4 test
def test_time_budget_checkpoints_and_stops_then_resumes(tmp_path, capsys):
  # A zero-minute budget: the first step crosses it, is checkpointed (off the every-2 schedule),
  # and the run ends; the next run resumes from it.
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES)
  batches = synthetic_batches(cfg)
  assert loop.train(cfg, str(tmp_path), data=ListIterator(batches), max_minutes=0.0) == 0
  assert 'time budget of 0.0 min reached at step 1' in capsys.readouterr().out
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 1
  ckpt.close()
  assert loop.train(cfg, str(tmp_path), data=ListIterator(batches)) == 0
  assert 'resumed from' in capsys.readouterr().out


@pytest.mark.slow  # the two-host test below covers the same path and more
def test_sharded_loop_on_four_devices_resumes_and_matches_one_device(tmp_path):
  # The multi-device path of train.py (mesh from cfg.mesh, sharded state, global batches, sharded
  # checkpoints restored onto the mesh) in a fresh process with 4 fake devices: 1 step, stop,
  # resume to 2; then the same 2 steps here on one device.
  out = helpers.run_with_fake_devices(__file__, ['--sharded-loop', tmp_path / 'sharded'], 4, 'sharded loop ok')
  assert 'resumed from' in out
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES + SHARDED_OVERRIDES)
  assert loop.train(cfg, str(tmp_path / 'single'), data=ListIterator(synthetic_batches(cfg))) == 0
  # The sharded checkpoint restores onto one device (train on a mesh, serve on one accelerator).
  # Sharded reductions sum in another order, and Adam's first steps (lr 1e-2, each moving every
  # weight by up to 1e-2) turn fp32 rounding of near-zero gradients into differences of 1e-6 to
  # 3e-5 in a few weights: allow 1e-4, 0.5% of the two updates; a wrong batch slice, a lost step
  # or a bad restore moves weights by the update size itself.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4),
               _restored_params(str(tmp_path / 'sharded'), cfg), _params(str(tmp_path / 'single')))


# ~36 s on 2 cores: under -m slow for CI time. CI keeps its parts: LoRA training (test_train_step's
# test_lora_trains_only_its_factors), LoRA+EMA serving (test_load_policy), resume (the 2 -> 4 test above).
@pytest.mark.slow
def test_lora_with_ema_trains_and_resumes_keeping_the_base_frozen(tmp_path):
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES + ['train.steps=2', 'train.lora_rank=2', 'train.ema_decay=0.9'])
  batches = synthetic_batches(cfg)
  assert loop.train(cfg, str(tmp_path), data=ListIterator(batches), stop_at=1) == 0
  assert loop.train(cfg, str(tmp_path), data=ListIterator(batches)) == 0
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  raw = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  fresh = nnx.state(build_dit(cfg.model, rngs=nnx.Rngs(cfg.seed))).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, raw['state']['frozen'], fresh)   # the base never moves
  lora = jax.tree.leaves(raw['state']['params'])
  assert lora and all(np.isfinite(x).all() for x in lora) and 'ema' in raw['state']


def test_multihost_flags_need_multihost(capsys):
  import train
  with pytest.raises(SystemExit):
    train.main(['--config', 'configs/tiny.py', '--workdir', '/tmp/unused', '--process_id', '1'])
  assert '--coordinator, --num_processes and --process_id need --multihost' in capsys.readouterr().err


SHARDED_OVERRIDES = ['train.steps=2', 'mesh.shape=(1,2,1,2)']


def _restored_params(workdir, cfg):
  """A (possibly sharded, multi-host) checkpoint's parameters restored onto this one device."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, abstract = trainer.abstract_train_state(cfg)
  abstract = train_aot.with_shardings(abstract, jax.tree.map(lambda _: one, abstract))
  ckpt = checkpoint.Checkpointer(workdir)
  state, _, _ = ckpt.restore(ckpt.latest_step(), abstract, cfg)
  ckpt.close()
  assert int(state.step) == cfg.train.steps
  return state.params


@pytest.mark.slow   # ~110 s on 2 cores: two processes compile the step; run with -m slow
def test_two_host_loop_matches_one_device(tmp_path):
  # Two processes (2 fake devices each) joined by jax.distributed on localhost, each feeding its
  # half of every global batch, as on a TPU pod: 1 step, stop, resume to 2, then compare.
  import socket
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, __file__, '--multihost-loop', str(tmp_path / 'hosts'), str(port),
                             str(i)], env=helpers.fake_devices_env(2), cwd=helpers.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
    assert 'two-host loop ok' in out
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES + SHARDED_OVERRIDES)
  assert loop.train(cfg, str(tmp_path / 'single'), data=ListIterator(synthetic_batches(cfg))) == 0
  # Tolerance: see the four-device test.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4),
               _restored_params(str(tmp_path / 'hosts'), cfg), _params(str(tmp_path / 'single')))
  with open(tmp_path / 'hosts' / 'metrics.jsonl') as f:   # written once, by process 0
    assert len(f.read().splitlines()) == cfg.train.steps // cfg.train.log_every + 1


def _two_host_loop(workdir, port, process_id):
  import train
  train.initialize_multihost(f'localhost:{port}', 2, process_id)
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES + SHARDED_OVERRIDES)
  assert (jax.process_count(), jax.device_count()) == (2, 4)
  half = cfg.train.batch_size // 2
  local = [{k: v[process_id * half:(process_id + 1) * half] for k, v in b.items()} for b in synthetic_batches(cfg)]
  assert loop.train(cfg, workdir, data=ListIterator(local), stop_at=1) == 0
  assert loop.train(cfg, workdir, data=ListIterator(local)) == 0
  print('two-host loop ok')


def _sharded_loop(workdir):
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES + SHARDED_OVERRIDES)
  assert jax.device_count() == 4
  batches = synthetic_batches(cfg)
  assert loop.train(cfg, workdir, data=ListIterator(batches), stop_at=1) == 0
  assert loop.train(cfg, workdir, data=ListIterator(batches)) == 0
  print('sharded loop ok')


if __name__ == '__main__':
  jax.config.update('jax_default_matmul_precision', 'highest')
  if sys.argv[1] == '--sharded-loop':
    _sharded_loop(sys.argv[2])
  elif sys.argv[1] == '--multihost-loop':
    _two_host_loop(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))


def test_diverged_update_is_never_saved_and_last_good_is_true(tmp_path, capsys):
  """lr=1e39: the step-1 loss is finite but the update is not; nothing non-finite is written."""
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES + ['train.lr=1e39', 'train.checkpoint_every=1'])
  assert loop.train(cfg, str(tmp_path), data=ListIterator(synthetic_batches(cfg))) == 3
  out = capsys.readouterr().out
  assert 'step 1: ' in out and 'not finite' in out and 'no checkpoint was written' in out, out
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() is None
  ckpt.close()


def test_resume_with_other_dataset_statistics_is_refused(tmp_path):
  cfg = load_config('configs/tiny.py', CFG_OVERRIDES)
  stats = {g: {k: [float(i) for i in range(4)] for k in ('q01', 'q99', 'mean', 'std')} for g in ('state', 'action')}
  assert loop.train(cfg, str(tmp_path), data=ListIterator(synthetic_batches(cfg)), norm_stats=stats, stop_at=1) == 0
  changed = {**stats, 'action': {**stats['action'], 'q99': [9.0] * 4}}
  with pytest.raises(ValueError, match=r'other normalisation statistics .*\(action\.q99 differ\)'):
    loop.train(cfg, str(tmp_path), data=ListIterator(synthetic_batches(cfg)), norm_stats=changed)
  loop.check_resumed_stats(stats, {g: {k: list(v) for k, v in d.items()} for g, d in stats.items()}, 'w', 1)


def test_bad_counts_and_variants_are_one_line_errors(tmp_path):
  for args in (['--config.train.checkpoint_every=0'], ['--config.train.steps=-3'], []):
    config = 'configs/tiny.py' if args else 'configs/tiny.py:bogus'
    r = subprocess.run([sys.executable, 'train.py', '--config', config, '--workdir', str(tmp_path), *args],
                       cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-2000:]
    assert (args[0].split('.', 1)[1].split('=')[0] if args else "unknown variant 'bogus'") in lines[0]
