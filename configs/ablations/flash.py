"""DreamZero-Flash (paper): train with mostly-noisy video, serve in ONE denoising step.

Training draws video t = 1 - eta, eta ~ Beta(7, 1) and action t uniform (docs/objective.md), so
the action head learns to read actions off a barely denoised video. One sampler step leaves the
unconditional branch nothing to change in the actions: the policy skips it (samplers.uses_uncond).
"""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'train.timestep_schedule': 'flash', 'sampler.num_steps': 1, 'sampler.dit_step_mask': '1'}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
