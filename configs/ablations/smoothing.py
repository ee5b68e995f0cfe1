"""Smoothed action chunks (paper: 2x linear upsample + Savitzky-Golay + downsample; docs/inference.md).

The release, and so the baseline, returns the chunk unsmoothed.
"""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'postprocess.smooth': True}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
