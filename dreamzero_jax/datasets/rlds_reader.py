"""RLDS (TFDS TFRecord) episodes read WITHOUT TensorFlow, mapped into our episode layout.

The TFRecord framing is parsed here; each record is a tf.train.Example that TFDS' NumPy
parser (the protobuf classes TFDS ships) turns into nested arrays using the dataset's own
features.json. Images stay encoded: we keep the original JPEG/PNG bytes.

A mapping spec (JSON) says where our fields come from, by flattened feature path:
  {"name": "droid", "embodiment": "droid",
   "cameras": {"wrist_image_left": "steps/observation/wrist_image_left", ...},
   "state":  ["steps/observation/joint_position", "steps/observation/gripper_position"],
   "action": ["steps/action_dict/joint_position", "steps/action_dict/gripper_position"],
   "language": ["steps/language_instruction", "steps/language_instruction_2"],
   "episode_id": "episode_metadata/file_path",
   "success": {"path": "episode_metadata/recording_folderpath", "contains": "/success/"}}
"action" may be empty (video-only data); "episode_id" is optional (default shard:record).
"success" is optional (default: every episode False): a feature path whose last value > 0 means
success (a reward or a flag), or {"path", "contains"} for a text feature holding a marker.
`--src` is the version folder holding features.json, or the folder one gives `tfds.load` as
data_dir (holding <name>/<version>/).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import struct
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_parser
from tensorflow_datasets.core.utils import py_utils

from dreamzero_jax import embodiments
from dreamzero_jax.datasets import episodes
from dreamzero_jax.datasets.episodes import DataError

SPEC_KEYS = ('name', 'embodiment', 'cameras', 'state', 'action', 'language')


def read_tfrecord(path: str) -> Iterator[bytes]:
  """Yields the records of one TFRecord file (length, crc, data, crc framing; crcs not checked)."""
  with open(path, 'rb') as f:
    i = 0
    while True:
      header = f.read(12)
      if not header:
        return
      if len(header) < 12:
        raise DataError(f'{path}: record {i}: truncated header')
      (length,) = struct.unpack('<Q', header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        raise DataError(f'{path}: record {i}: truncated ({len(data)} of {length} bytes)')
      yield data
      i += 1


def load_spec(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise DataError(f'--spec: file not found: {path}') from None
  except json.JSONDecodeError as e:
    raise DataError(f'--spec: {path} is not valid JSON ({e.msg})') from None
  for key in SPEC_KEYS:
    if key not in spec:
      raise DataError(f'--spec: {path} lacks the field {key!r}')
  embodiments.get(spec['embodiment'])
  return spec


def resolve_src(src: str, names: tuple[str, ...]) -> str:
  """The version folder (holding features.json) for `src`: itself, or the newest <name>/<version>/
  under it for the first of `names` present (a TFDS data_dir)."""
  if os.path.isfile(os.path.join(src, 'features.json')):
    return src
  for name in names:
    root = os.path.join(src, name)
    versions = [v for v in (os.listdir(root) if os.path.isdir(root) else ())
                if os.path.isfile(os.path.join(root, v, 'features.json'))]
    if versions:
      key = lambda v: tuple(int(x) if x.isdigit() else -1 for x in v.split('.'))
      return os.path.join(root, max(versions, key=key))
  raise DataError(f'--src: {src} has no features.json, nor a {" or ".join(n + "/<version>/" for n in names)} '
                  'holding one (give the TFDS version folder or its data_dir)')


class RldsEpisodes:
  """The episodes of one RLDS directory, as our episode dicts."""

  def __init__(self, src: str, spec: dict[str, Any], on_corrupt: str = 'fail'):
    self.src, self.spec, self.on_corrupt = src, spec, on_corrupt
    if not os.path.isfile(os.path.join(src, 'features.json')):
      raise DataError(f'--src: {src} has no features.json (not a TFDS/RLDS dataset directory)')
    self.features = tfds.features.FeatureConnector.from_config(src)
    flat = py_utils.flatten_nest_dict(self.features.get_serialized_info())
    self._parser = example_parser.ExampleParserNp(self.features.get_serialized_info())
    feature_of = py_utils.flatten_nest_dict(self._leaf_features(self.features))
    def need(path, role):
      if path not in flat:
        raise DataError(f'features.json: missing feature {path} (needed for {role})')
      return feature_of[path]
    self.image_shapes = {}
    for cam, path in spec['cameras'].items():
      feature = need(path, f'cameras.{cam}')
      shape = getattr(feature, 'shape', None)
      if not isinstance(feature, tfds.features.Image) or shape is None or None in shape[:2]:
        raise DataError(f'features.json: {path} must be an Image feature of fixed size (for cameras.{cam})')
      self.image_shapes[cam] = tuple(shape[:2])
    self.state_dim = sum(self._width(need(p, 'state')) for p in spec['state'])
    self.action_dim = sum(self._width(need(p, 'action')) for p in spec['action'])
    for p in spec['language']:
      need(p, 'language')
    if spec.get('episode_id'):
      need(spec['episode_id'], 'episode_id')
    success = spec.get('success')
    if success is not None:
      if isinstance(success, dict) and not {'path', 'contains'} <= set(success):
        raise DataError('--spec: success must be a feature path or {"path": ..., "contains": ...}')
      need(success['path'] if isinstance(success, dict) else success, 'success')
    emb = embodiments.get(spec['embodiment'])
    if self.state_dim != emb.state_dim:
      raise DataError(f'--spec: state gives {self.state_dim} dims, {emb.name} needs {emb.state_dim}')
    if spec['action'] and self.action_dim != emb.action_dim:
      raise DataError(f'--spec: action gives {self.action_dim} dims, {emb.name} needs {emb.action_dim}')
    self.action_dim = emb.action_dim
    self.shards = sorted(glob.glob(os.path.join(src, '*.tfrecord*')))
    if not self.shards:
      raise DataError(f'--src: {src} holds no *.tfrecord* shards')

  @staticmethod
  def _leaf_features(feature):
    """Nested dict of the leaf feature connectors, by the same paths as the parsed example."""
    if isinstance(feature, tfds.features.Dataset):
      return RldsEpisodes._leaf_features(feature.feature)
    if isinstance(feature, tfds.features.FeaturesDict):
      return {k: RldsEpisodes._leaf_features(v) for k, v in feature.items()}
    return feature

  @staticmethod
  def _width(feature) -> int:
    shape = feature.shape
    return 1 if len(shape) == 0 else int(np.prod(shape))

  def dataset_spec(self) -> episodes.DatasetSpec:
    emb = embodiments.get(self.spec['embodiment'])
    return episodes.DatasetSpec(
        embodiment=emb.name, cameras=tuple(self.spec['cameras']), image_shapes=self.image_shapes,
        control_hz=int(self.spec.get('control_hz', emb.control_hz)), state_dim=self.state_dim,
        action_dim=self.action_dim, num_alternatives=len(self.spec['language']),
        source=f'rlds {os.path.abspath(self.src)}')

  def __iter__(self) -> Iterator[dict[str, Any]]:
    spec = self.dataset_spec()
    for shard in self.shards:
      for i, data in enumerate(read_tfrecord(shard)):
        default_id = f'{os.path.basename(shard)}:{i}'
        try:
          flat = py_utils.flatten_nest_dict(self._parser.parse_example(data))
        except Exception as e:  # protobuf raises DecodeError; TFDS wraps others
          self._corrupt(default_id, f'record does not parse ({type(e).__name__})')
          continue
        eid = flat[self.spec['episode_id']] if self.spec.get('episode_id') else default_id
        eid = eid if isinstance(eid, bytes) else str(eid).encode()
        try:
          ep = self._episode(flat, eid)
          episodes.check_episode(ep, spec)
        except DataError as e:
          if 'not a decodable' not in str(e):
            raise   # a layout error (wrong size, missing steps) is never skipped
          self._corrupt(eid.decode(), str(e))
          continue
        yield ep

  def _corrupt(self, eid: str, why: str) -> None:
    if self.on_corrupt == 'skip':
      logging.warning('skipping corrupted episode %s: %s', eid, why)
      return
    raise DataError(why if why.startswith('episode ') else f'episode {eid}: {why}')

  def _episode(self, flat: dict[str, Any], eid: bytes) -> dict[str, Any]:
    def column(path):
      x = np.asarray(flat[path], np.float32)
      return x.reshape(len(x), -1)
    state = np.concatenate([column(p) for p in self.spec['state']], axis=1)
    t = len(state)
    if self.spec['action']:
      action = np.concatenate([column(p) for p in self.spec['action']], axis=1)
    else:
      action = np.zeros((t, self.action_dim), np.float32)
    texts = [[s.decode() if isinstance(s, bytes) else str(s) for s in flat[p]] for p in self.spec['language']]
    table: dict[str, int] = {}
    language = np.full((t, len(texts)), -1, np.int32)
    for step in range(t):
      phrasings = [col[step] for col in texts if col[step]] or ['']
      for a, s in enumerate(phrasings):
        language[step, a] = table.setdefault(s, len(table))
    images = {cam: list(flat[path]) for cam, path in self.spec['cameras'].items()}
    for cam, frames in images.items():
      if len(frames) != t:
        raise DataError(f'episode {eid.decode()}: images/{cam}: {len(frames)} frames for {t} steps')
      for j, frame in enumerate(frames):
        try:
          h, w = episodes.image_size(frame)
        except Exception as e:  # PIL raises several types for undecodable bytes
          raise DataError(f'episode {eid.decode()}: images/{cam}: frame {j} is not a decodable '
                          f'image ({type(e).__name__})') from None
        if (h, w) != self.image_shapes[cam]:
          raise DataError(f'episode {eid.decode()}: images/{cam}: frame {j} is {h}x{w}, '
                          f'features.json declares {self.image_shapes[cam][0]}x{self.image_shapes[cam][1]}')
    return dict(episode_id=eid, images=images, state=state, action=action, language=language,
                instructions=list(table), has_action=bool(self.spec['action']), success=self._success(flat))

  def _success(self, flat: dict[str, Any]) -> bool:
    """The episode's success flag as the spec's "success" field says (False when it names none)."""
    rule = self.spec.get('success')
    if rule is None:
      return False
    path = rule['path'] if isinstance(rule, dict) else rule
    value = np.asarray(flat[path])
    last = value.reshape(-1)[-1] if value.size else None
    if isinstance(rule, dict):
      text = last.decode() if isinstance(last, bytes) else str(last if last is not None else '')
      return rule['contains'] in text
    return bool(last is not None and float(last) > 0)
