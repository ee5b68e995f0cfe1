"""LoRA instead of full fine-tuning (paper: LoRA was "not very effective"; docs/objective.md).

Rank-4 factors on q, k, v, o and the FFN of every block; the base DiT is frozen; DreamZero's new
action/state modules still train in full. Learning rate 1e-4 as the official LoRA recipe.
"""
from configs import ablations

BASELINE = 'dreamzero_14b_droid'
CHANGES = {'train.lora_rank': 4, 'train.lr': 1e-4}


def get_config(arg=None):
  return ablations.derive(BASELINE, CHANGES, arg)
