"""DreamZero 14B post-trained on your own robot (README, "Your own robot"): the embodiment file names
the robot (`datasets embodiment --from_lerobot` drafts it), and training starts from a converted
DreamZero-AgiBot or -DROID release (--config.init.converted=DIR, from `python -m dreamzero_jax.convert
... --embodiment_id <the file's id>`), whose shared action/state modules fill the robot's own row.
The recipe is the release's post-training (scripts/train/agibot_training.sh, its guide's Step 5):
full fine-tuning at lr 1e-5, 24-step chunks, batch 128 (its 4 per GPU on 32 GPUs).

  configs/dreamzero_14b_finetune.py:ROBOT.json          the 14B model
  configs/dreamzero_14b_finetune.py:ROBOT.json,tiny     the same recipe on configs/tiny.py's toy model
"""
from configs import base, tiny
from dreamzero_jax import embodiments


def get_config(arg=None):
  path, _, size = (arg or '').partition(',')
  if not path.endswith('.json'):
    raise ValueError('configs/dreamzero_14b_finetune.py: needs the embodiment file, ...finetune.py:ROBOT.json')
  if size not in ('', 'tiny'):
    raise ValueError(f'configs/dreamzero_14b_finetune.py: unknown size {size!r} (known: tiny)')
  c = tiny.get_config() if size == 'tiny' else base.get_base_config()
  e = embodiments.get(path)
  c.data.name = e.name
  c.data.update(embodiments.data_config(path))
  # A fresh row for the robot (its id); the built-ins' rows stay as converted.
  c.model.num_embodiments = max(c.model.num_embodiments, e.id + 1)
  if size != 'tiny':
    c.video.action_horizon = 24
  return c
