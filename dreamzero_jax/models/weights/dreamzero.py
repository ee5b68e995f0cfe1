"""Checkpoint key map for DreamZero's action/state modules, as the official release names them.

The release's CategorySpecificLinear stores W [E, in, out] and b [E, out] (already our kernel / bias
layout) under action_encoder.W1/W2/W3, state_encoder.layer1/2 and action_decoder.layer1/2. It forces
one shared set (E = 1); that set goes into one row of our per-embodiment tables, and rows no checkpoint
fills keep the model's own initialisation (a new embodiment starts where DreamZero's modules start).
"""
from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
from flax import nnx

from dreamzero_jax.models import embodiment
from dreamzero_jax.models.weights.common import Target

_MODULES = {
    'action_encoder.W1': ('action_encoder', 'w1'),
    'action_encoder.W2': ('action_encoder', 'w2'),
    'action_encoder.W3': ('action_encoder', 'w3'),
    'state_encoder.layer1': ('state_encoder', 'layer1'),
    'state_encoder.layer2': ('state_encoder', 'layer2'),
    'action_decoder.layer1': ('action_decoder', 'layer1'),
    'action_decoder.layer2': ('action_decoder', 'layer2'),
}
_PARAMS = {'W': 'kernel', 'b': 'bias'}


def is_checkpoint_key(key: str) -> bool:
  """A tensor of DreamZero's action/state modules (vs the Wan backbone) in an official checkpoint."""
  return key.startswith(('action_encoder.', 'state_encoder.', 'action_decoder.'))


def _shared_row(w: np.ndarray) -> np.ndarray:
  """[1, ...] (the release's single shared set) -> one table row; other counts fail the shape check."""
  return w[0] if w.shape[:1] == (1,) else w


def key_map(embodiment_id: int) -> Callable[[str], Target | None]:
  """Official action/state module key -> Target writing row `embodiment_id` of our tables."""

  def place(key: str) -> Target | None:
    module, _, name = key.rpartition('.')
    if module not in _MODULES or name not in _PARAMS:
      return None
    return Target(_MODULES[module] + (_PARAMS[name],), _shared_row, layer=embodiment_id)

  return place


def initial_table(kernel_shape: tuple[int, int, int], seed: int, module_path: tuple) -> dict[str, np.ndarray]:
  """The model's own initial kernel / bias tables of one EmbodimentLinear ([E, in, out], [E, out]).

  Seeded per module path, so a conversion is reproducible and the tables differ from each other.
  """
  num, din, dout = kernel_shape
  rngs = nnx.Rngs(seed + zlib.crc32('/'.join(map(str, module_path)).encode()))
  layer = embodiment.EmbodimentLinear(num, din, dout, (None, None), rngs=rngs)
  return {'kernel': np.asarray(layer.kernel[...]), 'bias': np.asarray(layer.bias[...])}
