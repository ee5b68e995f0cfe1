"""DreamZero 14B on AgiBot as the release trains it (agibot_relative.yaml, scripts/train/agibot_training.sh):
30 Hz control, 24-step chunks with a frame every 3 steps, state 20, action 22 (the 20 position dims
relative to the anchor state), 3 views on a 2x2 grid."""
from configs import base
from dreamzero_jax import embodiments


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.data.name = 'agibot'
  c.data.update(embodiments.data_config('agibot'))
  # AgiBot's row of the per-embodiment tables is its id, 2: `convert` writes the release's single
  # shared action/state module set there and the policy reads it from there.
  c.model.num_embodiments = 3
  # The release uses 24 (the paper's AgiBot horizon is 48: --config.video.action_horizon=48 with
  # --config.data.frame_stride=6 restores it).
  c.video.action_horizon = 24
  return c
