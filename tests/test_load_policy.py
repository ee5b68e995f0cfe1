"""Serving a train.py checkpoint reads the `params` item (EMA parameters), never the optimiser state."""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from dreamzero_jax import checkpoint
from dreamzero_jax.config import load_config
from dreamzero_jax.models import lora
from dreamzero_jax.serving import loading
from tests.helpers import train_on_synthetic

OVERRIDES = ['video.height=32', 'video.width=32', 'video.max_chunks=2', 'train.steps=1', 'train.ema_decay=0.5',
             'train.lr=1e-2', 'train.warmup_fraction=0.0', 'sampler.num_steps=1', 'sampler.dit_step_mask="1"']


def _train(workdir, overrides=()):
  cfg = load_config('configs/tiny.py', OVERRIDES + list(overrides))
  train_on_synthetic(cfg, workdir, n=1)
  ckpt = checkpoint.Checkpointer(workdir)
  step = ckpt.latest_step()
  state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  ckpt.close()
  return cfg, os.path.join(workdir, 'checkpoints', str(step)), state


def _served(workdir):
  return loading.load_policy(workdir)._model_state.to_pure_dict()


def test_serving_reads_the_ema_params_item_and_falls_back_for_older_checkpoints(tmp_path):
  cfg, step_dir, state = _train(str(tmp_path / 'run'))
  assert {'config', 'data', 'norm_stats', 'params', 'state'} <= set(os.listdir(step_dir))
  moved = jax.tree.map(lambda e, p: np.abs(e - p).max(), state['ema'], state['params'])
  assert max(jax.tree.leaves(moved)) > 0   # the EMA differs from the trained parameters
  # A copy without the state item (parameters, optimiser moments): serving never reads it.
  params_only = str(tmp_path / 'params_only')
  shutil.copytree(str(tmp_path / 'run'), params_only)
  shutil.rmtree(os.path.join(params_only, 'checkpoints', os.path.basename(step_dir), 'state'))
  jax.tree.map(np.testing.assert_array_equal, _served(params_only), state['ema'])
  # A checkpoint from before the params item: the whole state is restored and its EMA served.
  older = str(tmp_path / 'older')
  shutil.copytree(str(tmp_path / 'run'), older)
  shutil.rmtree(os.path.join(older, 'checkpoints', os.path.basename(step_dir), 'params'))
  jax.tree.map(np.testing.assert_array_equal, _served(older), state['ema'])


def test_serving_a_lora_checkpoint_reads_only_the_frozen_base_of_the_state(tmp_path, monkeypatch):
  cfg, _, state = _train(str(tmp_path), ['train.lora_rank=2'])
  requested = []
  restore = ocp.CheckpointManager.restore

  def recording(self, step, args=None, **kw):
    requested.append(dict(args.items()))
    return restore(self, step, args=args, **kw)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', recording)
  served = _served(str(tmp_path))
  reads = [r['state'] for r in requested if 'state' in r]
  assert len(reads) == 1 and isinstance(reads[0], ocp.args.PyTreeRestore) and set(reads[0].item) == {'frozen'}
  want = lora.merge_lora(state['frozen'], state['ema'], cfg.train.lora_alpha, cfg.train.lora_rank)
  jax.tree.map(np.testing.assert_allclose, served, want)
