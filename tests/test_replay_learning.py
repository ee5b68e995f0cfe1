"""The whole loop learns: trained on a few expert episodes, the policy replays them successfully.

Data, normalisation, the latent cache, the objective, the sampler, un-normalisation, smoothing and
the environment wiring all have to be right at once for a replayed episode to succeed: a broken
sampler or a mis-scaled action gives 0 of 4 (a random policy also gives 0: tests/test_eval.py).
Slow: about 5 minutes on 2 CPU cores.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('metaworld')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_policy_trained_on_expert_episodes_replays_them(tmp_path):
  data = str(tmp_path / 'data')
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
  r = run('-m', 'dreamzero_jax.datasets', 'build', 'metaworld', '--out', data, '--tasks', 'plate-slide-v3',
          '--episodes', '4', '--image_size', '32', '--max_steps', '200')
  assert r.returncode == 0, r.stderr[-2000:]
  workdir = str(tmp_path / 'train')
  overrides = [f'--config.data.dir={data}', '--config.train.steps=1000', '--config.train.checkpoint_every=1000']
  r = run('train.py', '--config', 'configs/metaworld_cpu.py', '--workdir', workdir, *overrides)
  assert r.returncode == 0, r.stderr[-2000:]
  out = str(tmp_path / 'eval')
  r = run('eval.py', '--checkpoint', workdir, '--out', out, '--tasks', '', '--unseen_tasks', '', '--replay', '4',
          '--max_steps', '150')
  assert r.returncode == 0, r.stderr[-2000:]
  replay = json.load(open(os.path.join(out, 'report.json')))['replay']
  assert len(replay['episodes']) == 4 and replay['success_rate'] >= 0.75, replay
