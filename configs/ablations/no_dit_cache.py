"""DiT caching off: evaluate the DiT at all 16 UniPC steps (paper inference ablation).

The baseline evaluates it on 8 of 16 (mask 1110001000100111, skipped steps reuse the last velocity).
"""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'sampler.dit_step_mask': ''}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
