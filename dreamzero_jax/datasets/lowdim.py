"""The low-dimensional arrays of a built dataset (lowdim.npz: states, actions, language, episode
boundaries): written at build, read and checked by the data pipeline and the normalisation
statistics. numpy only, so the policy's normalisation (serving) imports without the TFDS readers."""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import numpy as np

from dreamzero_jax.errors import DataError

LOWDIM_FILE = 'lowdim.npz'


def save_lowdim(version_dir: str, episodes: list[dict[str, Any]]) -> None:
  lengths = np.array([len(e['state']) for e in episodes], np.int64)
  ids = [e['episode_id'] if isinstance(e['episode_id'], bytes) else str(e['episode_id']).encode()
         for e in episodes]
  np.savez(os.path.join(version_dir, LOWDIM_FILE),
           episode_id=np.array(ids, dtype=np.bytes_),   # plain bytes: loads without pickle
           offsets=np.concatenate([[0], np.cumsum(lengths)]),
           state=np.concatenate([e['state'] for e in episodes]),
           action=np.concatenate([e['action'] for e in episodes]),
           language=np.concatenate([e['language'] for e in episodes]),
           has_action=np.array([e['has_action'] for e in episodes]),
           success=np.array([e['success'] for e in episodes]))


@dataclasses.dataclass
class LowDim:
  """All episodes' low-dimensional arrays, concatenated; episode i is rows offsets[i]:offsets[i+1]."""
  episode_id: np.ndarray
  offsets: np.ndarray
  state: np.ndarray
  action: np.ndarray
  language: np.ndarray
  has_action: np.ndarray
  success: np.ndarray

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def episode(self, i: int) -> dict[str, np.ndarray]:
    s = slice(self.offsets[i], self.offsets[i + 1])
    return dict(state=self.state[s], action=self.action[s], language=self.language[s])


LOWDIM_FIELDS = {'episode_id': 'S', 'offsets': 'i', 'state': 'f', 'action': 'f', 'language': 'i',
                 'has_action': 'b', 'success': 'b'}


def _first_nonfinite(values: np.ndarray, offsets: np.ndarray) -> int | None:
  """The episode holding the first non-finite row of `values`, if any."""
  rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
  return None if not len(rows) else int(np.searchsorted(offsets, rows[0], side='right') - 1)


def _where_row(episode_id: np.ndarray, offsets: np.ndarray, row: int) -> tuple[int, str, int]:
  """(episode index, 'episode <id>', step within it) of concatenated row `row`."""
  i = int(np.searchsorted(offsets, row, side='right') - 1)
  return i, f'episode {episode_id[i].decode(errors="replace")}', int(row - offsets[i])


def check_lowdim(lowdim: 'LowDim', where: str, episode_lengths=None, instruction_counts=None) -> None:
  """Raises DataError naming the field (and episode) where `lowdim` is inconsistent: offsets that
  are not the episode boundaries, arrays of other lengths, non-finite state or action, language
  indices past the episode's instructions (`instruction_counts`, recorded at build) or below -1."""
  n, offsets = len(lowdim.episode_id), lowdim.offsets
  if offsets.ndim != 1 or len(offsets) != n + 1 or n == 0:
    raise DataError(f'{where}: offsets has {len(offsets)} entries for {n} episodes')
  lengths = np.diff(offsets)
  if offsets[0] != 0 or (lengths < 2).any():
    raise DataError(f'{where}: offsets are not episode boundaries (start {offsets[0]}, '
                    f'shortest episode {lengths.min()} steps)')
  for name in ('state', 'action', 'language'):
    rows = getattr(lowdim, name)
    if rows.ndim != 2 or len(rows) != offsets[-1]:
      raise DataError(f'{where}: {name} has {len(rows)} rows, the offsets end at {offsets[-1]}')
  for name in ('has_action', 'success'):
    if getattr(lowdim, name).shape != (n,):
      raise DataError(f'{where}: {name} has shape {getattr(lowdim, name).shape}, expected ({n},)')
  if episode_lengths is not None:
    expected = np.asarray(episode_lengths)
    if expected.shape != lengths.shape or (expected != lengths).any():
      i = next((i for i in range(min(len(expected), n)) if expected[i] != lengths[i]), min(len(expected), n))
      raise DataError(f'{where}: episode boundaries disagree with the dataset index at episode {i} '
                      f'({lengths[i] if i < n else "none"} steps vs {expected[i] if i < len(expected) else "none"} '
                      'recorded at build): rebuild the dataset')
  for name in ('state', 'action'):
    bad = _first_nonfinite(getattr(lowdim, name), offsets)
    if bad is not None:
      raise DataError(f'{where}: episode {lowdim.episode_id[bad].decode(errors="replace")}: {name} '
                      'contains NaN or inf')
  language = lowdim.language
  # Each step's first phrasing must exist; -1 marks a missing alternative only.
  low = np.flatnonzero((language[:, 0] < 0) | (language < -1).any(axis=1))
  if len(low):
    _, episode, step = _where_row(lowdim.episode_id, offsets, low[0])
    raise DataError(f'{where}: {episode}: language index {language[low[0]].min()} at step {step} '
                    'is not an instruction')
  if instruction_counts is not None:
    counts = np.asarray(instruction_counts)
    if counts.shape != (n,):
      raise DataError(f'{where}: the dataset index records instructions for {counts.size} episodes, '
                      f'{LOWDIM_FILE} holds {n}: rebuild the dataset')
    limit = np.repeat(counts, lengths)[:, None]
    high = np.flatnonzero((language >= limit).any(axis=1))
    if len(high):
      i, episode, step = _where_row(lowdim.episode_id, offsets, high[0])
      raise DataError(f'{where}: {episode}: language index {language[high[0]].max()} at step {step} '
                      f'is past its {counts[i]} instruction(s)')


def load_lowdim(path: str, episode_lengths=None, instruction_counts=None) -> 'LowDim':
  """Reads and checks lowdim.npz (against the episode lengths and instruction counts recorded at
  build, when given); never unpickles (an object array is refused, not loaded)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in LOWDIM_FIELDS if k not in z.files]
      if missing:
        raise DataError(f'{path}: missing {", ".join(missing)}')
      arrays = {}
      for key, kind in LOWDIM_FIELDS.items():
        try:
          arrays[key] = z[key]
        except ValueError as e:
          if 'allow_pickle' in str(e):
            raise DataError(f'{path}: {key} holds pickled Python objects, which are never loaded '
                            '(rebuild the dataset with this version)') from None
          raise
        if not isinstance(arrays[key], np.ndarray):   # NpzFile hands back a member without a .npy header as bytes
          raise DataError(f'{path}: {key} is not a .npy array (its header is damaged): rebuild the dataset')
        if arrays[key].dtype.kind != kind:
          raise DataError(f'{path}: {key} has dtype {arrays[key].dtype}, expected kind {kind!r}')
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f'{path}: not a readable {LOWDIM_FILE} ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}): rebuild the dataset') from None
  lowdim = LowDim(**arrays)
  check_lowdim(lowdim, path, episode_lengths, instruction_counts)
  return dataclasses.replace(lowdim, state=_as_float32(lowdim, 'state', path),
                             action=_as_float32(lowdim, 'action', path))


def _as_float32(lowdim: LowDim, name: str, path: str) -> np.ndarray:
  """lowdim's state or action in float32, the precision the pipeline reads them in: a finite value
  that float32 cannot hold (a float64 1e39) is refused naming its episode, not turned into inf."""
  values = getattr(lowdim, name)
  if values.dtype == np.float32:
    return values
  with np.errstate(over='ignore'):
    narrowed = values.astype(np.float32)
  overflow = np.flatnonzero((~np.isfinite(narrowed)).any(axis=1))   # check_lowdim: the source is finite
  if len(overflow):
    row = values[overflow[0]]
    _, episode, step = _where_row(lowdim.episode_id, lowdim.offsets, overflow[0])
    raise DataError(f'{path}: {episode}: {name} holds {np.abs(row).max():g} at step {step}, beyond '
                    'float32 range')
  return narrowed
