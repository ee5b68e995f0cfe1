"""q01/q99 normalisation to [-1, 1] (with clipping), from low-dimensional arrays only.

Actions are normalised in model space: the `relative_action_dims` taken relative to the same
dims of the state at the chunk's anchor, the rest as stored. Relative values depend on the
horizon, so statistics record the settings they were computed for and refuse to load under others.
Dims whose q01 equals q99 pass through unchanged (then clipped), as in the release.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from dreamzero_jax.datasets.lowdim import LowDim, check_lowdim
from dreamzero_jax.errors import DataError

STATS_FILE = 'norm_stats.json'


def _dims(rel: int | Sequence[int]) -> list[int]:
  """Relative dims as a list (an int N: the leading N, as statistics files before tuples say)."""
  return list(range(rel)) if isinstance(rel, (int, np.integer)) else [int(d) for d in rel]


def relative_actions(state: np.ndarray, action: np.ndarray, horizon: int,
                     rel: int | Sequence[int]) -> np.ndarray:
  """Every action in model space, under every anchor that may precede it within a chunk."""
  steps = len(state) - 1   # the last step carries no action
  dims = _dims(rel)
  if not dims:
    return action[:steps]
  out = []
  for h in range(min(horizon, steps)):
    a = action[h:steps].copy()
    a[:, dims] -= state[:steps - h, dims]
    out.append(a)
  return np.concatenate(out)


def _summary(x: np.ndarray) -> dict[str, list[float]]:
  return dict(q01=np.quantile(x, 0.01, axis=0).tolist(), q99=np.quantile(x, 0.99, axis=0).tolist(),
              mean=x.mean(0).tolist(), std=x.std(0).tolist())


def compute_stats(lowdim: LowDim, horizon: int, relative_action_dims: Sequence[int]) -> dict[str, Any]:
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
              settings=dict(action_horizon=horizon, relative_action_dims=_dims(relative_action_dims)))


def save_stats(stats: dict[str, Any], path: str) -> None:
  with open(path, 'w') as f:
    json.dump(stats, f, indent=1)


def check_stats(stats: dict[str, Any], state_dim: int, action_dim: int, horizon: int,
                relative_action_dims: Sequence[int], where: str) -> None:
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
  saved_dims = settings.get('relative_action_dims')
  for key, saved, value in (('action_horizon', settings.get('action_horizon'), horizon),
                            ('relative_action_dims', None if saved_dims is None else _dims(saved_dims),
                             _dims(relative_action_dims))):
    if saved != value:
      raise DataError(f'{where}: settings.{key}={saved} but the config has {value}: '
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
  except FileNotFoundError:
    raise DataError(f'{path}: no such file') from None
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not valid JSON ({e.msg})') from None


def stats_for(version_dir: str, lowdim: LowDim, state_dim: int, action_dim: int, horizon: int,
              relative_action_dims: Sequence[int]) -> dict[str, Any]:
  """The dataset's saved statistics, checked; computed in memory when none are saved."""
  path = os.path.join(version_dir, STATS_FILE)
  if os.path.isfile(path):
    stats = load_stats(path)
  else:
    stats = compute_stats(lowdim, horizon, relative_action_dims)
  check_stats(stats, state_dim, action_dim, horizon, relative_action_dims, path)
  return stats


_SUMMARY = ('q01', 'q99', 'mean', 'std')


def _read_json(path: str, what: str) -> Any:
  if not os.path.isfile(path):
    raise DataError(f'--from_official: {path} not found ({what})')
  return load_stats(path)


def _join(per_key: dict[str, dict], keys: Sequence[str], group: str, where: str) -> dict[str, list[float]]:
  """Our summary of `group` from per-key statistics, concatenated in `keys` order."""
  out = {name: [] for name in _SUMMARY}
  for key in keys:
    if key not in per_key:
      raise DataError(f'{where}: {group}.{key} is missing (have: {", ".join(per_key) or "none"})')
    for name in _SUMMARY:
      values = np.asarray(per_key[key].get(name), np.float64).reshape(-1)
      if per_key[key].get(name) is None or values.size == 0:
        raise DataError(f'{where}: {group}.{key}.{name} is missing')
      out[name] += values.tolist()
  return out


def _gear_meta(path: str, state_keys, action_keys) -> tuple[dict, dict, list[str]]:
  """A LeRobot GEAR meta/ folder (the release's dataset layout): stats.json holds per-column
  statistics, modality.json names each key's column and [start, end), relative_stats_dreamzero.json
  the relative action keys' statistics (action minus the anchor state). Returns per-key state and
  action statistics and the relative keys."""
  meta = os.path.dirname(path)
  relative = _read_json(os.path.join(meta, 'relative_stats_dreamzero.json'), 'relative action statistics')
  columns = _read_json(os.path.join(meta, 'stats.json'), 'per-column statistics')
  modality = _read_json(os.path.join(meta, 'modality.json'), 'the keys\' columns and ranges')
  def sliced(group, keys):
    out = {}
    for key in keys:
      entry = modality.get(group, {}).get(key)
      if entry is None:
        continue   # reported as missing by _join, naming the key
      column = entry.get('original_key') or f'{"observation.state" if group == "state" else "action"}'
      if column not in columns:
        raise DataError(f'{meta}/stats.json: column {column} (of {group}.{key}) is missing')
      out[key] = {name: np.asarray(columns[column][name]).reshape(-1)[entry['start']:entry['end']].tolist()
                  for name in _SUMMARY if name in columns[column]}
    return out
  action = sliced('action', action_keys)
  action.update({k: v for k, v in relative.items() if k in action_keys})
  return sliced('state', state_keys), action, [k for k in action_keys if k in relative]


def from_official(path: str, embodiment, horizon: int, relative_action_dims: Sequence[int]) -> dict[str, Any]:
  """Our statistics from the release's own files, read as they are:
    - meta/relative_stats_dreamzero.json (or stats.json / modality.json) of a LeRobot GEAR dataset, with
      its siblings stats.json and modality.json;
    - a checkpoint's experiment_cfg/metadata.json ({embodiment tag: {statistics: {state, action}}}).
  State and action are the embodiment's official keys in order; the release's relative keys must be
  exactly the config's relative dims. The release records no horizon: the config's is written."""
  e = embodiment
  if not e.state_keys:
    raise DataError(f'data.embodiment: {e.name} has no official statistics layout')
  data = _read_json(path, 'the official statistics')
  if isinstance(data, dict) and e.official_tag in data and 'statistics' in data[e.official_tag]:
    stats = data[e.official_tag]['statistics']
    state, action = stats.get('state', {}), stats.get('action', {})
    relative_keys = None   # metadata.json merges relative statistics in without saying which
  elif os.path.basename(path) in ('relative_stats_dreamzero.json', 'stats.json', 'modality.json'):
    state, action, relative_keys = _gear_meta(path, e.state_keys, e.action_keys)
  else:
    raise DataError(f'--from_official: {path} is neither a GEAR meta/relative_stats_dreamzero.json nor a '
                    f'metadata.json with statistics for {e.official_tag!r}')
  out = dict(state=_join(state, e.state_keys, 'state', path),
             action=_join(action, e.action_keys, 'action', path))
  if relative_keys is not None:
    dims, start = [], 0
    for key in e.action_keys:
      width = len(action[key]['q01'])
      if key in relative_keys:
        dims += range(start, start + width)
      start += width
    if dims != _dims(relative_action_dims):
      raise DataError(f'{path}: relative keys {relative_keys} are action dims {dims}, but '
                      f'data.relative_action_dims is {_dims(relative_action_dims)}')
  out['settings'] = dict(action_horizon=horizon, relative_action_dims=_dims(relative_action_dims))
  out['source'] = os.path.abspath(path)
  return out


def read_stats(path: str, embodiment, horizon: int, relative_action_dims: Sequence[int]) -> dict[str, Any]:
  """A statistics file in our format (`datasets stats` writes one) or in the release's (from_official)."""
  data = load_stats(path)
  ours = isinstance(data, dict) and isinstance(data.get('state'), dict) and 'q01' in data['state']
  return data if ours else from_official(path, embodiment, horizon, relative_action_dims)


def normalize(x: np.ndarray, summary: dict[str, list[float]]) -> np.ndarray:
  """Maps [q01, q99] to [-1, 1] and clips; a dim with q01 == q99 passes through unchanged (then
  clipped), as the release's q99 normaliser does."""
  lo, hi = np.asarray(summary['q01'], np.float32), np.asarray(summary['q99'], np.float32)
  span = hi - lo
  x = np.asarray(x, np.float32)
  y = np.where(span != 0, 2.0 * (x - lo) / np.where(span != 0, span, 1.0) - 1.0, x)
  return np.clip(y, -1.0, 1.0).astype(np.float32)


def unnormalize(y: np.ndarray, summary: dict[str, list[float]]) -> np.ndarray:
  lo, hi = np.asarray(summary['q01'], np.float32), np.asarray(summary['q99'], np.float32)
  return ((y + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)
