"""No classifier-free guidance: conditional branch only (half the DiT batch at inference).

The baseline guides the video with scale 5 against Wan's negative prompt; actions are always
taken from the conditional prediction.
"""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'sampler.cfg_scale': 1.0}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
