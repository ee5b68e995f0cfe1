"""DreamZero 14B on AgiBot: 30 Hz control, state 32, action 22, 3 views on a 2x2 grid."""
from configs import base


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.data.name = 'agibot'
  c.data.embodiment = 'agibot'
  c.data.cameras = ('head', 'hand_left', 'hand_right')
  c.data.canvas_layout = 'grid'
  c.data.control_hz = 30
  c.data.frame_stride = 6
  c.data.action_dim = 22
  c.data.state_dim = 32
  c.data.relative_action_dims = 0
  c.model.num_embodiments = 3  # AgiBot's row in the per-embodiment tables is id 2
  # The paper uses a 48-step horizon at 30 Hz; the official code uses 24 everywhere.
  c.video.action_horizon = 48
  return c
