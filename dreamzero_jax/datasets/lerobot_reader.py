"""LeRobot datasets, v2.x and v3.0, with or without GEAR metadata, read into our episode layout.

  v2.x  meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl; one parquet file per episode
        (info's data_path) and one video per camera and episode (video_path).
  v3.0  meta/info.json, meta/episodes/chunk-*/file-*.parquet (each episode's data file and, per
        camera, its video file and from/to timestamps), meta/tasks.parquet; several episodes per
        parquet and mp4 file.
  GEAR  meta/modality.json (the release's scripts/data/convert_lerobot_to_gear.py): state/action
        sub-keys as {original_key, start, end} and video keys; the embodiment's state_keys and
        action_keys are cut out of their columns and joined in that order, as the release does.

What the embodiment file's `lerobot` block names wins over modality.json; a column as wide as the
embodiment's vector is read whole when its keys are not all named. Video frames are decoded with
PyAV and stored as JPEG per frame; the task text is the frame's task_index in the tasks table.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

import numpy as np

from dreamzero_jax import embodiments
from dreamzero_jax.datasets import episodes
from dreamzero_jax.datasets.episodes import DataError

DEFAULT_COLUMNS = {'state': 'observation.state', 'action': 'action'}


def read_json(path: str, what: str) -> Any:
  if not os.path.isfile(path):
    raise DataError(f'--src: missing {path} ({what})')
  with open(path) as f:
    try:
      return json.load(f) if path.endswith('.json') else [json.loads(line) for line in f if line.strip()]
    except json.JSONDecodeError as e:
      raise DataError(f'{path}: not JSON ({e.msg} at line {e.lineno})') from None


def _parquet(path: str, what: str) -> dict[str, list]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (the [data] extra)
  if not os.path.isfile(path):
    raise DataError(f'--src: missing {path} ({what})')
  table = pq.read_table(path)
  out = table.to_pydict()
  # pandas writes a DataFrame's index (v3.0's tasks.parquet: the task text) as a column of its own.
  for column in (table.schema.pandas_metadata or {}).get('index_columns', []):
    if isinstance(column, str) and column in out:
      out.setdefault('task', out[column])
  return out


def read_modality(src: str) -> dict[str, Any]:
  """meta/modality.json, or {} when the dataset has no GEAR metadata."""
  path = os.path.join(src, 'meta', 'modality.json')
  return read_json(path, 'GEAR modality') if os.path.isfile(path) else {}


class LeRobotEpisodes:
  """Episodes of one LeRobot directory, laid out as `embodiment` says (embodiments.Embodiment)."""

  def __init__(self, src: str, embodiment: embodiments.Embodiment):
    self.src, self.embodiment = src, embodiment
    if not os.path.isfile(os.path.join(src, 'meta', 'info.json')):
      raise DataError(f'--src: {src} has no meta/info.json (not a LeRobot dataset)')
    self.info = read_json(os.path.join(src, 'meta', 'info.json'), 'LeRobot info')
    version = str(self.info.get('codebase_version', ''))
    if not version.startswith(('v2', 'v3')):
      raise DataError(f'meta/info.json: codebase_version {version!r} is not supported (v2.x or v3.0)')
    self.v3 = version.startswith('v3')
    self.features = self.info.get('features', {})
    modality, lerobot = read_modality(src), embodiment.lerobot
    self.columns = {role: self._column_ranges(role, modality, lerobot) for role in ('state', 'action')}
    self.video_keys, self.image_shapes = {}, {}
    for cam in embodiment.cameras:
      key = lerobot.get('video_keys', {}).get(cam) or modality.get('video', {}).get(cam, {}).get(
          'original_key') or f'observation.images.{cam}'
      f = self._feature(key, f'cameras.{cam}')
      if f.get('dtype') != 'video':
        raise DataError(f'meta/info.json: features.{key} has dtype {f.get("dtype")!r}, expected video')
      self.video_keys[cam], self.image_shapes[cam] = key, tuple(int(x) for x in f['shape'][:2])
    if self.v3:
      tasks = _parquet(os.path.join(src, 'meta', 'tasks.parquet'), 'LeRobot v3.0 tasks')
      self.tasks = dict(zip(tasks['task_index'], tasks['task']))
      self.episodes = self._v3_episodes()
    else:
      self.tasks = {t['task_index']: t['task'] for t in read_json(os.path.join(src, 'meta', 'tasks.jsonl'), 'tasks')}
      self.episodes = read_json(os.path.join(src, 'meta', 'episodes.jsonl'), 'episodes')

  def _feature(self, key: str, role: str) -> dict[str, Any]:
    if key not in self.features:
      raise DataError(f'meta/info.json: features.{key} is missing (needed for {role})')
    return self.features[key]

  def _column_ranges(self, role: str, modality: dict, lerobot: dict) -> list[tuple[str, int, int]]:
    """(column, start, end) pieces that make up the embodiment's `role` vector, in order."""
    e = self.embodiment
    dim, keys = (e.state_dim, e.state_keys) if role == 'state' else (e.action_dim, e.action_keys)
    column = lerobot.get(f'{role}_column', DEFAULT_COLUMNS[role])
    named = {**modality.get(role, {}), **lerobot.get(f'{role}_ranges', {})}
    if keys and all(k in named for k in keys):
      pieces = []
      for k in keys:
        entry = named[k]
        col = entry.get('original_key', column)
        width = int(np.prod(self._feature(col, f'{role}.{k}')['shape']))
        if not 0 <= entry['start'] < entry['end'] <= width:
          field = (f'embodiment file: lerobot.{role}_ranges.{k}' if k in lerobot.get(f'{role}_ranges', {})
                   else f'meta/modality.json: {role}.{k}')
          raise DataError(f'{field}: range [{entry["start"]}, {entry["end"]}) runs past features.{col}, '
                          f'{width} wide')
        pieces.append((col, int(entry['start']), int(entry['end'])))
      total = sum(b - a for _, a, b in pieces)
      if total != dim:
        raise DataError(f'meta/modality.json: {role} keys {", ".join(keys)} are {total} wide, {e.name} needs {dim}')
      return pieces
    shape = list(self._feature(column, role)['shape'])
    if shape != [dim]:
      raise DataError(f'meta/info.json: features.{column} has shape {shape}, {e.name} needs [{dim}]'
                      + (f' (or a meta/modality.json naming {role} keys {", ".join(keys)})' if keys else ''))
    return [(column, 0, dim)]

  def _v3_episodes(self) -> list[dict[str, Any]]:
    files = sorted(glob.glob(os.path.join(self.src, 'meta', 'episodes', '*', '*.parquet')))
    if not files:
      raise DataError(f'--src: {self.src}/meta/episodes/ holds no parquet file (LeRobot v3.0 episodes)')
    rows = []
    for path in files:
      table = _parquet(path, 'LeRobot v3.0 episodes')
      rows += [dict(zip(table, values)) for values in zip(*table.values())]
    return sorted(rows, key=lambda r: int(r['episode_index']))

  def dataset_spec(self) -> episodes.DatasetSpec:
    e = self.embodiment
    return episodes.DatasetSpec(
        embodiment=e.name, cameras=tuple(e.cameras), image_shapes=self.image_shapes,
        control_hz=int(self.info['fps']), state_dim=e.state_dim, action_dim=e.action_dim,
        num_alternatives=1, source=f'lerobot {os.path.abspath(self.src)}')

  def _data_path(self, meta: dict[str, Any]) -> str:
    index = int(meta['episode_index'])
    if self.v3:
      fields = dict(chunk_index=int(meta['data/chunk_index']), file_index=int(meta['data/file_index']))
    else:
      fields = dict(episode_chunk=index // int(self.info.get('chunks_size', 1000)), episode_index=index)
    return os.path.join(self.src, self.info['data_path'].format(**fields))

  def _video_path(self, meta: dict[str, Any], key: str) -> str:
    index = int(meta['episode_index'])
    if self.v3:
      fields = dict(video_key=key, chunk_index=int(meta[f'videos/{key}/chunk_index']),
                    file_index=int(meta[f'videos/{key}/file_index']))
    else:
      fields = dict(video_key=key, episode_chunk=index // int(self.info.get('chunks_size', 1000)),
                    episode_index=index)
    return os.path.join(self.src, self.info['video_path'].format(**fields))

  def _frames(self, meta: dict[str, Any], cam: str, eid: str, length: int) -> list[bytes]:
    """The episode's frames of camera `cam`: the whole file (v2.x), or `length` frames from the
    episode's from_timestamp in its shared file (v3.0)."""
    import av  # pylint: disable=g-import-not-at-top  (the [data] extra)
    key = self.video_keys[cam]
    path = self._video_path(meta, key)
    if not os.path.isfile(path):
      raise DataError(f'episode {eid}: images/{cam}: missing video {path}')
    start = float(meta[f'videos/{key}/from_timestamp']) if self.v3 else None
    frames = []
    try:
      with av.open(path) as container:
        for frame in container.decode(video=0):
          if start is not None:
            if frame.time < start - 0.5 / float(self.info['fps']):
              continue
            if len(frames) == length:
              break
          frames.append(episodes.encode_image(frame.to_ndarray(format='rgb24')))
    except av.error.FFmpegError as e:
      raise DataError(f'episode {eid}: images/{cam}: video does not decode ({e})') from None
    if start is not None and len(frames) < length:
      raise DataError(f'episode {eid}: images/{cam}: its frame range ({length} frames from {start:g} s) runs '
                      f'past the video {os.path.relpath(path, self.src)} ({len(frames)} frames from there)')
    return frames

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for meta in self.episodes:
      index = int(meta['episode_index'])
      eid = f'episode_{index:06d}'
      table = _parquet(self._data_path(meta), f'episode {eid} data')
      if self.v3:   # the episode's rows of its shared file
        rows = [i for i, e in enumerate(table['episode_index']) if int(e) == index]
        table = {k: [v[i] for i in rows] for k, v in table.items()}
      vectors = {}
      for role, pieces in self.columns.items():
        parts = []
        for column, a, b in pieces:
          if column not in table:
            raise DataError(f'episode {eid}: parquet column {column} is missing')
          values = np.asarray(table[column], np.float32).reshape(len(table[column]), -1)
          if values.shape[1] < b:
            raise DataError(f'episode {eid}: {role}: column {column} is {values.shape[1]} wide, its range '
                            f'[{a}, {b}) runs past it')
          parts.append(values[:, a:b])
        vectors[role] = np.concatenate(parts, axis=1)
      length = len(vectors['state'])
      # Per-frame task indices give per-step instructions; else the episode's first task.
      if 'task_index' in table:
        unknown = sorted({int(i) for i in table['task_index']} - set(self.tasks))
        if unknown:
          raise DataError(f'episode {eid}: task_index {unknown[0]} is not in the tasks table')
        texts = [self.tasks[int(i)] for i in table['task_index']]
      else:
        texts = [list(meta['tasks'])[0]] * length
      names, language = episodes_language(texts)
      images = {cam: self._frames(meta, cam, eid, length) for cam in self.embodiment.cameras}
      yield dict(episode_id=eid.encode(), images=images, state=vectors['state'], action=vectors['action'],
                 language=language, instructions=names, has_action=True, success=False)


def episodes_language(texts: list[str]) -> tuple[list[str], np.ndarray]:
  """Distinct instructions and the per-step [T, 1] index into them."""
  table: dict[str, int] = {}
  ids = [table.setdefault(t, len(table)) for t in texts]
  return list(table), np.asarray(ids, np.int32)[:, None]
