"""Raw action chunks: no 2x upsample + Savitzky-Golay + downsample (paper: smoothing; docs/inference.md)."""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'postprocess.smooth': False}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
