"""DreamZero 14B (Wan2.1-I2V-14B backbone) on DROID: the paper's main model.

Served as the release serves it (the defaults): unsmoothed actions and the gripper returned as
predicted; the release's sim client snaps it to 1 above 0.5 (`--config.postprocess.gripper_dims=7,`
does that on the server).
"""
from configs import base


def get_config(arg=None):
  del arg
  return base.get_base_config()
