"""q01/q99 normalisation to [-1, 1] (with clipping), from low-dimensional arrays only.

Actions are normalised in model space: the leading `relative_action_dims` taken relative to
the state at the chunk's anchor, the rest as stored. Relative values depend on the horizon, so
statistics record the settings they were computed for and refuse to load under others.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dreamzero_jax.datasets.episodes import DataError, LowDim, check_lowdim

STATS_FILE = 'norm_stats.json'
_EPS = 1e-6


def relative_actions(state: np.ndarray, action: np.ndarray, horizon: int, rel: int) -> np.ndarray:
  """Every action in model space, under every anchor that may precede it within a chunk."""
  steps = len(state) - 1   # the last step carries no action
  if rel == 0:
    return action[:steps]
  out = []
  for h in range(min(horizon, steps)):
    a = action[h:steps].copy()
    a[:, :rel] -= state[:steps - h, :rel]
    out.append(a)
  return np.concatenate(out)


def _summary(x: np.ndarray) -> dict[str, list[float]]:
  return dict(q01=np.quantile(x, 0.01, axis=0).tolist(), q99=np.quantile(x, 0.99, axis=0).tolist(),
              mean=x.mean(0).tolist(), std=x.std(0).tolist())


def compute_stats(lowdim: LowDim, horizon: int, relative_action_dims: int) -> dict[str, Any]:
  """q01/q99/mean/std of states and model-space actions; refuses non-finite input naming the episode."""
  check_lowdim(lowdim, 'statistics')
  states = lowdim.state.astype(np.float64)
  actions = [relative_actions(lowdim.state[s:e].astype(np.float64), lowdim.action[s:e], horizon,
                              relative_action_dims)
             for i, (s, e) in enumerate(zip(lowdim.offsets[:-1], lowdim.offsets[1:]))
             if lowdim.has_action[i]]
  if actions:
    action_stats = _summary(np.concatenate(actions))
  else:  # video-only data: actions are all masked, so the identity map serves
    dim = lowdim.action.shape[1]
    action_stats = dict(q01=[-1.0] * dim, q99=[1.0] * dim, mean=[0.0] * dim, std=[1.0] * dim)
  return dict(state=_summary(states), action=action_stats,
              settings=dict(action_horizon=horizon, relative_action_dims=relative_action_dims))


def save_stats(stats: dict[str, Any], path: str) -> None:
  with open(path, 'w') as f:
    json.dump(stats, f, indent=1)


def check_stats(stats: dict[str, Any], state_dim: int, action_dim: int, horizon: int,
                relative_action_dims: int, where: str) -> None:
  """Raises DataError naming the first field that does not fit these settings."""
  for group, dim in (('state', state_dim), ('action', action_dim)):
    for key in ('q01', 'q99', 'mean', 'std'):
      values = stats.get(group, {}).get(key)
      if values is None:
        raise DataError(f'{where}: {group}.{key} is missing')
      if len(values) != dim:
        raise DataError(f'{where}: {group}.{key} has {len(values)} dims, the embodiment has {dim}')
      if not np.isfinite(np.asarray(values, np.float64)).all():
        raise DataError(f'{where}: {group}.{key} contains NaN or inf')
  settings = stats.get('settings', {})
  for key, value in (('action_horizon', horizon), ('relative_action_dims', relative_action_dims)):
    if settings.get(key) != value:
      raise DataError(f'{where}: settings.{key}={settings.get(key)} but the config has {value}: '
                      'rerun `python -m dreamzero_jax.datasets stats`')


def stats_differences(a: dict[str, Any], b: dict[str, Any], rtol: float = 1e-6) -> list[str]:
  """`group.key` for every summary of `a` that differs from `b`'s (beyond float round-off)."""
  diffs = []
  for group in ('state', 'action'):
    for key in ('q01', 'q99', 'mean', 'std'):
      x, y = a.get(group, {}).get(key), b.get(group, {}).get(key)
      if x is None or y is None or len(x) != len(y) or not np.allclose(x, y, rtol=rtol, atol=1e-9):
        diffs.append(f'{group}.{key}')
  return diffs


def load_stats(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not valid JSON ({e.msg})') from None


def stats_for(version_dir: str, lowdim: LowDim, state_dim: int, action_dim: int, horizon: int,
              relative_action_dims: int) -> dict[str, Any]:
  """The dataset's saved statistics, checked; computed in memory when none are saved."""
  path = os.path.join(version_dir, STATS_FILE)
  if os.path.isfile(path):
    stats = load_stats(path)
  else:
    stats = compute_stats(lowdim, horizon, relative_action_dims)
  check_stats(stats, state_dim, action_dim, horizon, relative_action_dims, path)
  return stats


def normalize(x: np.ndarray, summary: dict[str, list[float]]) -> np.ndarray:
  """Maps [q01, q99] to [-1, 1] and clips; constant dimensions map to 0."""
  lo, hi = np.asarray(summary['q01'], np.float32), np.asarray(summary['q99'], np.float32)
  span = hi - lo
  y = np.where(span > _EPS, 2.0 * (x - lo) / np.maximum(span, _EPS) - 1.0, 0.0)
  return np.clip(y, -1.0, 1.0).astype(np.float32)


def unnormalize(y: np.ndarray, summary: dict[str, list[float]]) -> np.ndarray:
  lo, hi = np.asarray(summary['q01'], np.float32), np.asarray(summary['q99'], np.float32)
  return ((y + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)
