"""Our stored episode format: one ArrayRecord record per episode with STACKED low-dimensional
arrays and encoded images (decoding a stacked record is several times faster than nested steps),
written through TFDS without TensorFlow and read back with `tfds` data sources.

Record fields (T steps, C cameras, A alternative phrasings per instruction):
  episode_id    bytes
  images/<cam>  T encoded JPEG/PNG frames: the observation BEFORE the step's action
  state         float32 [T, state_dim]   proprioception at each observation
  action        float32 [T, action_dim]  absolute action taken at the step (last step: padding)
  language      int32   [T, A]  per step, indices into `instructions` (-1: no such alternative)
  instructions  the distinct instruction strings of the episode
  has_action    bool    False for video-only episodes
  success       bool

Next to the records, `lowdim.npz` holds every episode's state/action/language concatenated, so
that sample indexing and norm statistics never read an image. It is read without pickle (episode
ids are a plain bytes array): a dataset from someone else runs no code. At open it is checked
against the episode lengths and instruction counts the builder recorded in the TFDS metadata
(`episode_lengths`, `episode_instructions`; datasets built before the second are checked without it).
"""
from __future__ import annotations

import abc
import dataclasses
import io
import os
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dreamzero_jax.errors import DataError  # noqa: F401  (raised here; importers use either path)
from dreamzero_jax.datasets.lowdim import (  # noqa: F401  (re-exported: the low-dim layer reads without TFDS)
    LOWDIM_FILE, LowDim, load_lowdim, save_lowdim)

SPLIT = 'train'


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a built dataset declares about its episodes (saved as TFDS metadata)."""
  embodiment: str
  cameras: tuple[str, ...]
  image_shapes: dict[str, tuple[int, int]]   # camera -> (height, width)
  control_hz: int
  state_dim: int
  action_dim: int
  num_alternatives: int                       # phrasings per instruction (the `language` width)
  source: str = ''

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['image_shapes'] = {k: list(v) for k, v in self.image_shapes.items()}
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'DatasetSpec':
    d = dict(d)
    d['cameras'] = tuple(d['cameras'])
    d['image_shapes'] = {k: tuple(v) for k, v in d['image_shapes'].items()}
    return cls(**d)


def episode_features(spec: DatasetSpec) -> tfds.features.FeaturesDict:
  encoded = lambda: tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
  return tfds.features.FeaturesDict({
      'episode_id': tfds.features.Tensor(shape=(), dtype=np.object_),
      'images': tfds.features.FeaturesDict({cam: encoded() for cam in spec.cameras}),
      'state': tfds.features.Tensor(shape=(None, spec.state_dim), dtype=np.float32),
      'action': tfds.features.Tensor(shape=(None, spec.action_dim), dtype=np.float32),
      'language': tfds.features.Tensor(shape=(None, spec.num_alternatives), dtype=np.int32),
      'instructions': tfds.features.Sequence(tfds.features.Text()),
      'has_action': tfds.features.Scalar(dtype=np.bool_),
      'success': tfds.features.Scalar(dtype=np.bool_),
  })


def encode_image(image: np.ndarray, fmt: str = 'jpeg', quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt.upper(), **({'quality': quality} if fmt == 'jpeg' else {}))
  return buf.getvalue()


def image_size(encoded: bytes) -> tuple[int, int]:
  """(height, width) from the header only: checking sizes must not cost a decode."""
  with Image.open(io.BytesIO(encoded)) as im:
    return im.size[1], im.size[0]


def check_episode(ep: dict[str, Any], spec: DatasetSpec) -> None:
  """Raises DataError naming the first field of `ep` that breaks `spec`."""
  eid = ep.get('episode_id', b'?')
  eid = eid.decode() if isinstance(eid, bytes) else str(eid)
  def fail(field, msg):
    raise DataError(f'episode {eid}: {field}: {msg}')
  state, action, language = ep['state'], ep['action'], ep['language']
  t = len(state)
  if t < 2:
    fail('state', f'needs at least 2 steps, got {t}')
  if state.shape != (t, spec.state_dim):
    fail('state', f'expected shape ({t}, {spec.state_dim}), got {state.shape}')
  if action.shape != (t, spec.action_dim):
    fail('action', f'expected shape ({t}, {spec.action_dim}), got {action.shape}')
  if language.shape != (t, spec.num_alternatives):
    fail('language', f'expected shape ({t}, {spec.num_alternatives}), got {language.shape}')
  if language.max() >= len(ep['instructions']) or (language[:, 0] < 0).any():
    fail('language', 'indexes an instruction that does not exist')
  for name, values in (('state', state), ('action', action)):
    if not np.isfinite(values).all():
      fail(name, 'contains NaN or inf')
  for cam in spec.cameras:
    frames = ep['images'].get(cam)
    if frames is None:
      fail(f'images/{cam}', 'missing camera')
    if len(frames) != t:
      fail(f'images/{cam}', f'{len(frames)} frames for {t} steps')
    for i in (0, t - 1):
      try:
        hw = image_size(frames[i])
      except Exception as e:  # PIL raises several types for undecodable bytes.
        fail(f'images/{cam}', f'frame {i} is not a decodable image ({type(e).__name__})')
      if hw != spec.image_shapes[cam]:
        fail(f'images/{cam}', f'frame {i} is {hw[0]}x{hw[1]}, expected '
             f'{spec.image_shapes[cam][0]}x{spec.image_shapes[cam][1]}')


class EpisodeBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """Base of every data/<name> builder: subclasses say what they declare and yield episodes."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stacked episodes, encoded images, per-step language.'}
  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    # Nothing is downloaded; TFDS' checksum lookup would need `importlib_resources`.
    return None

  @abc.abstractmethod
  def dataset_spec(self) -> DatasetSpec:
    """What every episode of this dataset satisfies."""

  @abc.abstractmethod
  def episodes(self) -> Iterator[dict[str, Any]]:
    """Yields episode dicts in the record layout (module docstring)."""

  def _info(self) -> tfds.core.DatasetInfo:
    spec = self.dataset_spec()
    return tfds.core.DatasetInfo(builder=self, features=episode_features(spec),
                                 metadata=tfds.core.MetadataDict(spec=spec.to_json()),
                                 disable_shuffling=True)  # records keep the order of lowdim.npz

  def _split_generators(self, dl_manager):
    del dl_manager
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    spec = self.dataset_spec()
    self._lowdim, self._instruction_counts = [], []
    for i, ep in enumerate(self.episodes()):
      check_episode(ep, spec)
      self._instruction_counts.append(len(ep['instructions']))
      self._lowdim.append({k: ep[k] for k in ('episode_id', 'state', 'action', 'language',
                                              'has_action', 'success')})
      yield i, ep   # integer keys: without shuffling, TFDS writes records in key order
    if not self._lowdim:
      raise DataError('no episodes were produced')
    # Written with dataset_info.json after generation: the index lowdim.npz is checked against.
    self.info.metadata['episode_lengths'] = [len(e['state']) for e in self._lowdim]
    self.info.metadata['episode_instructions'] = self._instruction_counts


def build(builder: EpisodeBuilder) -> str:
  """Writes the dataset and its `lowdim.npz`; returns the version directory."""
  if os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
    raise DataError(f'--out: a dataset already exists at {builder.data_dir}')
  tfds.disable_progress_bar()
  builder.download_and_prepare(file_format='array_record')
  save_lowdim(builder.data_dir, builder._lowdim)  # pylint: disable=protected-access
  return str(builder.data_dir)


@dataclasses.dataclass
class StoredDataset:
  """A built dataset opened for reading (no TensorFlow)."""
  path: str
  spec: DatasetSpec
  source: Any        # random access: source[i] -> episode dict (images still encoded)
  lowdim: LowDim


def version_dir(data_dir: str, name: str) -> str:
  """The newest version directory of dataset `name` under `data_dir`."""
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    raise DataError(f'data.dir: no dataset {name!r} under {data_dir!r} (expected {root})')
  built = [v for v in os.listdir(root) if os.path.isfile(os.path.join(root, v, 'dataset_info.json'))]
  # Only TFDS version folders (1.0.0) count: a `latest` link or a copy is not a version.
  versions = [v for v in built if re.fullmatch(r'\d+(\.\d+)*', v)]
  if not versions:
    others = f' (version folders are named like 1.0.0; found {", ".join(sorted(built))})' if built else ''
    raise DataError(f'data.dir: {root} holds no built version (no <version>/dataset_info.json){others}')
  return os.path.join(root, max(versions, key=lambda v: tuple(int(x) for x in v.split('.'))))


def open_dataset(data_dir: str, name: str) -> StoredDataset:
  path = version_dir(data_dir, name)
  try:
    builder = tfds.builder_from_directory(path)
  except Exception as e:  # TFDS raises protobuf's ParseError, OSError, KeyError, ... on a bad file
    raise DataError(f'data.dir: {path}/dataset_info.json is unreadable ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""})') from None
  meta = builder.info.metadata or {}
  if 'spec' not in meta:
    raise DataError(f'data.dir: {path} was not built by dreamzero_jax (no metadata spec)')
  spec = DatasetSpec.from_json(meta['spec'])
  lowdim_path = os.path.join(path, LOWDIM_FILE)
  if not os.path.isfile(lowdim_path):
    raise DataError(f'data.dir: {lowdim_path} is missing: rebuild the dataset')
  lowdim = load_lowdim(lowdim_path, meta.get('episode_lengths'), meta.get('episode_instructions'))
  source = builder.as_data_source(split=SPLIT)
  if len(source) != len(lowdim):
    raise DataError(f'data.dir: {path} has {len(source)} records but {LOWDIM_FILE} lists {len(lowdim)}')
  return StoredDataset(path=path, spec=spec, source=source, lowdim=lowdim)
