"""Decoupled video/action timesteps (the official code's variant; docs/objective.md).

Video t = (1 - r) * 1000 with r ~ Beta(3, 1); action t uniform, drawn independently per chunk.
The default (shared) schedule gives a chunk's video latents and actions one timestep.
"""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'train.timestep_schedule': 'decoupled'}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
