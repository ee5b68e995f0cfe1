"""Dynamic DiT caching (paper): skip 4 steps when the cosine similarity of the last two action
velocities exceeds 0.95, 2 when it exceeds 0.93, instead of the fixed 8-of-16 mask (docs/inference.md).
"""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'sampler.dynamic_skip': True}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
