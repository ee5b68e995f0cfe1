"""DreamZero 14B (Wan2.1-I2V-14B backbone) on DROID: the paper's main model."""
from configs import base


def get_config(arg=None):
  del arg
  return base.get_base_config()
