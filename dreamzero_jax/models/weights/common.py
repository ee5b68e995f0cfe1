"""Placing named PyTorch tensors (official Wan / diffusers / transformers names) into our modules.

Each module beside this one provides one model's key maps: a function from a checkpoint key to a
`Target` (where the tensor goes in `nnx.state(model)` and how to transform it) or None for a key it
does not know. `load_tensors` streams (key, array) pairs through such a map, so the converter and
the parity tests use one mapping, and refuses unknown, missing or mis-shaped tensors by name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Target:
  path: tuple[str | int, ...]          # path into nnx.state(model)
  transform: Callable[[np.ndarray], np.ndarray] = lambda x: x
  layer: int | None = None              # index on the leading axis of a stacked (scanned) param


class WeightMismatchError(ValueError):
  """A checkpoint whose tensors do not match the model: lists every offending key."""


def torch_linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> our kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def torch_conv(w: np.ndarray) -> np.ndarray:
  """torch ConvNd weight [out, in, *k] -> our kernel [*k, in, out]."""
  return np.ascontiguousarray(np.moveaxis(w, (0, 1), (-1, -2)))


def _flat_params(model: nnx.Module) -> dict[tuple, nnx.Variable]:
  state = nnx.state(model, nnx.Param)
  return {tuple(k): v for k, v in nnx.to_flat_state(state)}


def load_tensors(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]],
                 key_map: Callable[[str], Target | None], *, ignore: Callable[[str], bool] = lambda k: False,
                 may_stay: Callable[[tuple], bool] = lambda path: False) -> None:
  """Writes every tensor into `model` in place. Raises WeightMismatchError naming all bad keys.

  ignore(key): checkpoint keys to skip; may_stay(path): parameters this checkpoint need not fill
  (e.g. DreamZero's action modules when loading a plain Wan checkpoint).
  """
  params = _flat_params(model)
  filled: dict[tuple, set] = {}
  unexpected, bad_shape = [], []
  for key, array in tensors:
    if ignore(key):
      continue
    target = key_map(key)
    if target is None or tuple(target.path) not in params:
      unexpected.append(key)
      continue
    var = params[tuple(target.path)]
    value = np.asarray(target.transform(np.asarray(array)))
    current = var.get_value() if hasattr(var, 'get_value') else var.value
    want = current.shape if target.layer is None else current.shape[1:]
    if value.shape != tuple(want):
      bad_shape.append(f'{key}: checkpoint {value.shape} vs model {tuple(want)}')
      continue
    value = value.astype(current.dtype)
    if target.layer is None:
      new = jax.numpy.asarray(value)
    else:
      new = jax.numpy.asarray(current).at[target.layer].set(value)
    if hasattr(var, 'set_value'):
      var.set_value(new)
    else:
      var.value = new
    filled.setdefault(tuple(target.path), set()).add(target.layer)
  missing = []
  for path, var in params.items():
    got = filled.get(path, set())
    if not got and may_stay(path):
      continue
    current = var.get_value() if hasattr(var, 'get_value') else var.value
    if None in got:
      continue
    stacked = getattr(var, 'get_metadata', lambda: {})().get('logical_axes', (None,))[:1] == ('layers',)
    if stacked and len(got) == current.shape[0]:
      continue
    missing.append('/'.join(map(str, path)) + (f' (layers {sorted(got)} of {current.shape[0]})' if got else ''))
  if unexpected or missing or bad_shape:
    lines = []
    if unexpected:
      lines.append(f'unexpected keys ({len(unexpected)}): ' + ', '.join(unexpected))
    if missing:
      lines.append(f'missing parameters ({len(missing)}): ' + ', '.join(missing))
    if bad_shape:
      lines.append(f'shape mismatches ({len(bad_shape)}): ' + '; '.join(bad_shape))
    raise WeightMismatchError('\n'.join(lines))
