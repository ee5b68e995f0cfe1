"""DreamZero 14B (Wan2.1-I2V-14B backbone) on DROID: the paper's main model."""
from configs import base


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.postprocess.gripper_dims = (7,)  # DROID's gripper position, binarised at 0.5
  return c
