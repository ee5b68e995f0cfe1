"""AR vs bidirectional (paper ablation; docs/model.md): the clip is denoised jointly.

Every noisy, action and state token of the clip sees every other one and the conditioning frame
(masks.BIDIRECTIONAL_RULES); teacher forcing's clean history copies would leak the targets, so no
denoised token sees them. Served chunk by chunk the model therefore reads only the first frame and
its own chunk, not the real frames in the KV cache: compare it offline (eval.py --mode offline) as
well as closed loop.
"""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'model.attention_mask': 'bidirectional'}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
