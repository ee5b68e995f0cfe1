"""LeRobot v2.x datasets (AgiBot World's release layout) read into our episode layout.

Layout: meta/info.json (fps, features, data_path/video_path templates, chunks_size),
meta/episodes.jsonl (episode_index, tasks, length), meta/tasks.jsonl (task_index, task),
one parquet file of per-frame columns per episode, one video per camera per episode.
Video frames are decoded with PyAV (`av`, needed only here) and stored as JPEG per frame.
A state or action column wider than the embodiment's vector (a GEAR dataset whose observation.state
holds more than the model reads) is cut to the embodiment's official keys by meta/modality.json.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np

from dreamzero_jax.datasets import embodiments, episodes
from dreamzero_jax.datasets.episodes import DataError


def _jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise DataError(f'--src: missing {path}')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class LeRobotEpisodes:
  """Episodes of one LeRobot directory; `mapping` names our fields' LeRobot keys."""

  def __init__(self, src: str, embodiment: str, cameras: dict[str, str], state_key: str,
               action_key: str):
    self.src, self.cameras, self.state_key, self.action_key = src, cameras, state_key, action_key
    self.embodiment = embodiments.get(embodiment)
    info_path = os.path.join(src, 'meta', 'info.json')
    if not os.path.isfile(info_path):
      raise DataError(f'--src: {src} has no meta/info.json (not a LeRobot dataset)')
    with open(info_path) as f:
      self.info = json.load(f)
    version = str(self.info.get('codebase_version', ''))
    if not version.startswith('v2'):
      raise DataError(f'meta/info.json: codebase_version {version!r} is not supported (v2.x only)')
    features = self.info.get('features', {})
    def feature(key, role):
      if key not in features:
        raise DataError(f'meta/info.json: features.{key} is missing (needed for {role})')
      return features[key]
    self.columns = {}   # role -> indices into the column (None: the whole column)
    for key, dim, role, keys in ((state_key, self.embodiment.state_dim, 'state', self.embodiment.official_state_keys),
                                 (action_key, self.embodiment.action_dim, 'action',
                                  self.embodiment.official_action_keys)):
      shape = list(feature(key, role)['shape'])
      self.columns[role] = None
      if shape != [dim]:
        self.columns[role] = self._official_slices(role, keys, dim)
        if self.columns[role] is None:
          raise DataError(f'meta/info.json: features.{key} has shape {shape}, {self.embodiment.name} needs '
                          f'[{dim}]' + (f' (or a meta/modality.json naming {role} keys {", ".join(keys)})'
                                        if keys else ''))
    self.image_shapes = {}
    for cam, key in cameras.items():
      f = feature(key, f'cameras.{cam}')
      if f.get('dtype') != 'video':
        raise DataError(f'meta/info.json: features.{key} has dtype {f.get("dtype")!r}, expected video')
      self.image_shapes[cam] = tuple(int(x) for x in f['shape'][:2])
    self.tasks = {t['task_index']: t['task'] for t in _jsonl(os.path.join(src, 'meta', 'tasks.jsonl'))}
    self.episodes = _jsonl(os.path.join(src, 'meta', 'episodes.jsonl'))

  def _official_slices(self, role: str, keys: tuple[str, ...], dim: int) -> np.ndarray | None:
    """Column indices of `keys` (in order) by meta/modality.json, when it names them all to `dim` dims."""
    path = os.path.join(self.src, 'meta', 'modality.json')
    if not keys or not os.path.isfile(path):
      return None
    with open(path) as f:
      entries = json.load(f).get(role, {})
    if not all(k in entries for k in keys):
      return None
    index = np.concatenate([np.arange(entries[k]['start'], entries[k]['end']) for k in keys])
    return index if len(index) == dim else None

  def dataset_spec(self) -> episodes.DatasetSpec:
    return episodes.DatasetSpec(
        embodiment=self.embodiment.name, cameras=tuple(self.cameras),
        image_shapes=self.image_shapes, control_hz=int(self.info['fps']),
        state_dim=self.embodiment.state_dim, action_dim=self.embodiment.action_dim,
        num_alternatives=1, source=f'lerobot {os.path.abspath(self.src)}')

  def _path(self, template_key: str, index: int, **extra) -> str:
    chunk = index // int(self.info.get('chunks_size', 1000))
    return os.path.join(self.src, self.info[template_key].format(
        episode_chunk=chunk, episode_index=index, **extra))

  def _video(self, path: str, cam: str, eid: str) -> list[bytes]:
    import av  # pylint: disable=g-import-not-at-top  (only LeRobot videos need it)
    if not os.path.isfile(path):
      raise DataError(f'episode {eid}: images/{cam}: missing video {path}')
    try:
      with av.open(path) as container:
        return [episodes.encode_image(frame.to_ndarray(format='rgb24'))
                for frame in container.decode(video=0)]
    except av.error.FFmpegError as e:
      raise DataError(f'episode {eid}: images/{cam}: video does not decode ({e})') from None

  def __iter__(self) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for meta in self.episodes:
      index = int(meta['episode_index'])
      eid = f'episode_{index:06d}'
      table = pq.read_table(self._path('data_path', index)).to_pydict()
      for key in (self.state_key, self.action_key):
        if key not in table:
          raise DataError(f'episode {eid}: parquet column {key} is missing')
      state = np.asarray(table[self.state_key], np.float32)
      action = np.asarray(table[self.action_key], np.float32)
      if self.columns['state'] is not None:
        state = state[:, self.columns['state']]
      if self.columns['action'] is not None:
        action = action[:, self.columns['action']]
      # Per-frame task indices give per-step instructions; else the episode's first task.
      if 'task_index' in table:
        texts = [self.tasks[int(i)] for i in table['task_index']]
      else:
        texts = [meta['tasks'][0]] * len(state)
      names, language = episodes_language(texts)
      images = {cam: self._video(self._path('video_path', index, video_key=key), cam, eid)
                for cam, key in self.cameras.items()}
      yield dict(episode_id=eid.encode(), images=images, state=state, action=action,
                 language=language, instructions=names, has_action=True, success=False)


def episodes_language(texts: list[str]) -> tuple[list[str], np.ndarray]:
  """Distinct instructions and the per-step [T, 1] index into them."""
  table: dict[str, int] = {}
  ids = [table.setdefault(t, len(table)) for t in texts]
  return list(table), np.asarray(ids, np.int32)[:, None]
