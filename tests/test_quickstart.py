"""The default job's machinery end to end at toy size: data, latent cache, policy, evaluation,
baselines, results files, and the JSON line of the README's first command."""
import json
import os
import shlex
import shutil

import numpy as np
import pytest

pytest.importorskip('metaworld')

from configs import metaworld  # noqa: E402
from dreamzero_jax import checkpoint, quickstart, settings  # noqa: E402
from dreamzero_jax.config import config_from_dict  # noqa: E402
from dreamzero_jax.serving import loading  # noqa: E402

TOY = ['--config.model.dim=32', '--config.model.num_layers=1', '--config.model.num_heads=2',
       '--config.model.ffn_dim=64', '--config.model.freq_dim=16', '--config.model.embodiment_hidden=16',
       '--config.train.steps=2', '--config.train.checkpoint_every=2', '--config.vae.base_dim=4',
       '--config.video.max_chunks=2', '--config.vae_train.steps=2']


def test_quickstart_runs_every_stage_and_prints_the_json_line(tmp_path, capsys):
  out = str(tmp_path / 'qs')
  # Two episodes: the VAE stage holds one out for its PSNR.
  args = ['--out', out, '--tasks', 'plate-slide-v3', '--unseen_tasks', '', '--episodes', '2',
          '--eval_steps', '16', '--replay', '1', '--baselines', *TOY]
  assert quickstart.main(args) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
  assert {'seen', 'unseen', 'replay', 'vae_psnr_db', 'crashed', 'minutes'} <= set(line)
  assert 0 <= line['replay']['success_rate'] <= 1 and line['crashed'] == 0
  assert 'prediction_psnr_db' in line['seen']
  assert isinstance(line['vae_psnr_db'], float) and line['vae_psnr_db'] > 0
  # The policy was trained on the small VAE trained here, and its checkpoint records which.
  vae_dir = os.path.join(out, 'vae', 'vae')
  saved = checkpoint.Checkpointer(os.path.join(out, 'train')).read_config(2)
  assert saved['init']['vae'] == vae_dir and saved['init']['vae_sha256'] == checkpoint.weights_digest(vae_dir)
  # A config naming the VAE's path without its digest (as the claims suite evaluates) loads the policy;
  # other weights under the path it names are refused.
  cfg = config_from_dict(saved)
  cfg.init.vae_sha256 = ''
  served = loading.load_policy(os.path.join(out, 'train'), settings.from_config(cfg))
  assert served.settings.init.vae_sha256 == saved['init']['vae_sha256']
  other = str(tmp_path / 'other_vae')
  shutil.copytree(vae_dir, other)
  with np.load(os.path.join(vae_dir, checkpoint.WEIGHTS_FILE), allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  arrays['decoder/conv_out/bias'] = arrays['decoder/conv_out/bias'] + 1.0
  np.savez(os.path.join(other, checkpoint.WEIGHTS_FILE), **arrays)
  cfg.init.vae = other
  with pytest.raises(ValueError, match=r'incompatible config: init\.vae_sha256: '):
    loading.load_policy(os.path.join(out, 'train'), settings.from_config(cfg))
  for name in ('results.md', 'results.json', 'training_curve.png', 'success.png'):
    assert os.path.isfile(os.path.join(out, name)), name
  table = open(os.path.join(out, 'results.md')).read()
  assert '| task | policy | expert | random |' in table and 'plate-slide-v3' in table
  # Rerunning resumes every stage: nothing is rebuilt or retrained.
  assert quickstart.main(args) == 0


@pytest.mark.slow   # ~130 s on 2 cores; run with -m slow
def test_the_gpu_recipe_command_runs_at_toy_size(tmp_path, capsys):
  """configs/metaworld.py's documented command (its docstring), at toy widths, one task and a few
  steps: its flags parse and its geometry (128x128 canvas, a frame every 2 steps, 16-step chunks)
  runs through every stage until a GPU run is made."""
  command = metaworld.__doc__[metaworld.__doc__.index('python -m dreamzero_jax.quickstart'):]
  command = command.split('\n\n')[0]
  argv = shlex.split(command.replace('\\\n', ' '))[3:]
  out = str(tmp_path / 'gpu')
  toy = {'--tasks': 'plate-slide-v3', '--unseen_tasks': '', '--episodes': '2', '--eval_episodes': '1',
         '--eval_steps': '16', '--replay': '1', '--out': out}
  for flag, value in toy.items():   # the documented flags, at toy size
    assert flag in argv, flag
    argv[argv.index(flag) + 1] = value
  argv += TOY
  assert quickstart.main(argv) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
  assert line['replay']['success_rate'] >= 0 and isinstance(line['vae_psnr_db'], float)
