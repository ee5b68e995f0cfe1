"""The grain pipeline: built episodes -> clips -> normalised, padded, collatable batches.

THE BATCH CONTRACT (K = video.max_chunks, Hz = video.action_horizon, T = 1 + K * frames_per_chunk,
canvas H x W = video.height x video.width; chunk/frame timing in chunks.py):
  video           float32 [B, T, H, W, 3] in [-1, 1]; frames of padded chunks are 0
  actions         float32 [B, K*Hz, model.action_dim] normalised to [-1, 1], zero-padded
  action_mask     bool    [B, K*Hz, model.action_dim] real dim AND real chunk AND has_real_action
  state           float32 [B, K, model.state_dim] normalised, zero-padded; state_mask the same shape
  chunk_mask      bool    [B, K] real chunks (always at least the first)
  has_real_action bool    [B]
  embodiment_id   int32   [B]
  instruction     object  [B] UTF-8 bytes, one phrasing drawn among the step's alternatives
With data.latent_cache the batch carries no `video`: instead
  latent_row      int64   [B] the clip's row in the latent cache (training/latent_cache.py)
The iterator's state (get_state/set_state) restores the exact batch sequence.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import chex
import grain
import jax
import numpy as np

from dreamzero_jax import checks, embodiments
from dreamzero_jax.datasets import canvas, chunks, episodes, normalization
from dreamzero_jax.datasets.episodes import DataError
from dreamzero_jax.settings import DataSettings, Settings

# The contract's dtypes, by kind (chex.assert_type: float = any floating, int = any integer).
BATCH_TYPES = dict(video=float, actions=float, action_mask=bool, state=float, state_mask=bool, chunk_mask=bool,
                   has_real_action=bool, embodiment_id=int, latent_row=int)


def check_batch(batch: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
  """A batch against THE BATCH CONTRACT: each field of `shapes` present, of that shape and of its
  BATCH_TYPES kind; a mismatch is a one-line ValueError naming the field."""
  for name, shape in shapes.items():
    if name not in batch:
      raise ValueError(f'batch is missing {name!r}')
    value = np.asarray(batch[name]) if isinstance(batch[name], (list, tuple)) else batch[name]
    checks.check(f'batch[{name!r}]', chex.assert_shape, value, shape)
    if name in BATCH_TYPES:
      checks.check(f'batch[{name!r}]', chex.assert_type, value, BATCH_TYPES[name])


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """Everything that turns one (episode, start, k) into one sample."""
  layout: chunks.ChunkLayout
  cameras: tuple[str, ...]
  image_shapes: tuple[tuple[int, int], ...]
  canvas_layout: str
  height: int
  width: int
  state_dim: int
  action_dim: int
  relative_action_dims: tuple[int, ...]
  model_state_dim: int
  model_action_dim: int
  embodiment_id: int
  augment: canvas.Augment
  on_corrupt: str
  max_corrupt: int


class ClipLoader(grain.transforms.RandomMap):
  """Reads one episode record and cuts, renders and normalises one clip from it."""

  def __init__(self, dataset: episodes.StoredDataset, spec: ClipSpec, stats: dict[str, Any],
               train: bool, with_video: bool = True):
    self.dataset, self.spec, self.stats, self.train = dataset, spec, stats, train
    # False: the video is already encoded (latent cache); items carry their cache row as column 3.
    self.with_video = with_video
    # on_corrupt=skip bookkeeping (per process): repeated data would otherwise retry bad records forever.
    self._bad: set[int] = set()
    self._failures_in_a_row = 0

  def random_map(self, item: np.ndarray, rng: np.random.Generator) -> dict[str, Any] | None:
    ep, start, k = (int(x) for x in item[:3])
    record = self.record(ep)
    if record is None:
      return None
    out = self.clip(record, ep, start, k, rng)
    if out is not None:
      self._failures_in_a_row = 0
      if not self.with_video:
        out['latent_row'] = np.int64(item[3])
    return out

  def record(self, ep: int) -> dict[str, Any] | None:
    """Episode `ep`'s record; None (logged once) for one that does not parse under
    data.on_corrupt=skip, a DataError otherwise."""
    try:
      return self.dataset.source[ep]
    except Exception as e:  # noqa: BLE001  the record itself does not parse
      return self.corrupt(ep, f'record does not parse ({type(e).__name__}: {e})')

  def corrupt(self, ep: int, why: str) -> None:
    """Reports episode `ep` as unreadable: a DataError, or under data.on_corrupt=skip a warning
    (once per episode) until data.max_corrupt is passed."""
    eid = self.dataset.lowdim.episode_id[ep]
    message = f'{self.dataset.path}: episode {eid.decode()}: {why}'
    if self.spec.on_corrupt != 'skip':
      raise DataError(message)
    if ep not in self._bad:  # each bad record is logged once, however often it is drawn
      self._bad.add(ep)
      logging.warning('skipping corrupted record: %s', message)
    self._failures_in_a_row += 1
    limit = self.spec.max_corrupt
    if len(self._bad) > limit or self._failures_in_a_row > limit or len(self._bad) == len(self.dataset.lowdim):
      raise DataError(f'{self.dataset.path}: giving up (data.on_corrupt=skip): {len(self._bad)} unreadable '
                      f'records, {self._failures_in_a_row} failed reads in a row (data.max_corrupt={limit}); '
                      f'last: episode {eid.decode()}: {why}')
    return None

  def clip(self, record: dict[str, Any], ep: int, start: int, k: int,
           rng: np.random.Generator) -> dict[str, Any] | None:
    s, lay = self.spec, self.spec.layout
    if record['episode_id'] != self.dataset.lowdim.episode_id[ep]:
      raise DataError(f'{self.dataset.path}: record {ep} is {record["episode_id"]!r} but '
                      f'{episodes.LOWDIM_FILE} says {self.dataset.lowdim.episode_id[ep]!r}')
    length = self.dataset.lowdim.offsets[ep + 1] - self.dataset.lowdim.offsets[ep]
    if len(record['state']) != length:
      raise DataError(f'{self.dataset.path}: record {ep} has {len(record["state"])} steps but '
                      f'{episodes.LOWDIM_FILE} says {length}: rebuild the dataset')
    video = None
    if self.with_video:
      frame_steps = lay.frame_steps(start, k)
      frames = [[record['images'][cam][t] for t in frame_steps] for cam in s.cameras]
      video = np.empty((lay.num_frames, s.height, s.width, 3), np.float32)
      video[len(frame_steps):] = 0.0   # padded chunks
      try:
        canvas.compose(frames, s.canvas_layout, video, list(s.image_shapes),
                       rng if self.train else None, s.augment)
      except Exception as e:  # PIL raises many types on bad bytes; report them all the same way
        return self.corrupt(ep, f'images: {e}')

    has_action = bool(record['has_action'])
    state = record['state'][lay.anchor_steps(start, k)]                       # [k, S]
    action = record['action'][lay.action_steps(start, k)].astype(np.float32)  # [k*Hz, A]
    r = list(s.relative_action_dims)
    action[:, r] -= np.repeat(state[:, r], lay.action_horizon, axis=0)
    hz_k = lay.max_chunks * lay.action_horizon
    actions = np.zeros((hz_k, s.model_action_dim), np.float32)
    actions[:len(action), :s.action_dim] = normalization.normalize(action, self.stats['action'])
    action_mask = np.zeros_like(actions, bool)
    action_mask[:len(action), :s.action_dim] = has_action
    if not has_action:
      actions[:] = 0.0
    states = np.zeros((lay.max_chunks, s.model_state_dim), np.float32)
    states[:k, :s.state_dim] = normalization.normalize(state, self.stats['state'])
    state_mask = np.zeros_like(states, bool)
    state_mask[:k, :s.state_dim] = True

    phrasings = [i for i in record['language'][start] if i >= 0]
    choice = phrasings[rng.integers(len(phrasings))] if self.train else phrasings[0]
    out = dict(
        actions=actions, action_mask=action_mask, state=states,
        state_mask=state_mask, chunk_mask=np.arange(lay.max_chunks) < k,
        has_real_action=np.bool_(has_action), embodiment_id=np.int32(s.embodiment_id),
        instruction=np.array(record['instructions'][choice], dtype=object))
    if video is not None:
      out['video'] = video
    return out


def augment(data_cfg: DataSettings) -> canvas.Augment:
  """The view preprocessing of data.augment_*: the crop also applies at evaluation and serving."""
  aug = canvas.Augment(data_cfg.augment_crop_scale, data_cfg.augment_brightness, data_cfg.augment_contrast,
                       data_cfg.augment_saturation, data_cfg.augment_hue)
  if not 0.0 < aug.crop_scale <= 1.0:
    raise DataError(f'data.augment_crop_scale: {aug.crop_scale} must be in (0, 1]')
  if not 0.0 <= aug.hue <= 0.5:
    raise DataError(f'data.augment_hue: {aug.hue} must be in [0, 0.5]')
  return aug


@dataclasses.dataclass
class Member:
  """One dataset of the (possibly single-member) mixture."""
  loader: ClipLoader
  index: np.ndarray      # [N, 3] (episode, start, k)
  weight: float


def mixture(data_cfg: DataSettings) -> list[tuple[str, float]]:
  """(dataset name, weight) per member of data.mixture ('name:w,name:w'), or data.name alone."""
  text = data_cfg.mixture
  if not text:
    return [(data_cfg.name, 1.0)]
  out = []
  for part in text.split(','):
    name, _, weight = part.strip().rpartition(':')
    try:
      out.append((name, float(weight)))
    except ValueError:
      raise DataError(f'data.mixture: {part!r} is not name:weight') from None
    if not name or out[-1][1] <= 0:
      raise DataError(f'data.mixture: {part!r} needs a name and a positive weight')
  return out


def dataset_embodiment(dataset: episodes.StoredDataset) -> embodiments.Embodiment:
  """The embodiment a dataset was built with: its copy of the file, or (older builds) the built-in."""
  path = os.path.join(dataset.path, embodiments.DATASET_FILE)
  return embodiments.load_file(path) if os.path.isfile(path) else embodiments.get(dataset.spec.embodiment)


def open_member(settings: Settings, name: str, weight: float, train: bool,
                with_stats: bool = True) -> Member:
  """Opens dataset `name` under data.dir and checks it against the config; with_stats=False skips
  its saved statistics (for `datasets stats`, which replaces them)."""
  if not settings.data.dir:
    raise DataError('data.dir: not set (pass --settings.data.dir=DIR)')
  dataset = episodes.open_dataset(settings.data.dir, name)
  ds_spec = dataset.spec
  primary = name == settings.data.name
  emb = embodiments.get(settings.data.embodiment) if primary else dataset_embodiment(dataset)
  if emb.name != ds_spec.embodiment:
    raise DataError(f'data.embodiment: config says {emb.name!r}, {dataset.path} holds {ds_spec.embodiment!r}')
  d = dataclasses.asdict(settings.data if primary else emb)
  cameras = tuple(d['cameras'])
  for cam in cameras:
    if cam not in ds_spec.cameras:
      raise DataError(f'data.cameras: {cam!r} is not in {dataset.path} '
                      f'(it has {", ".join(ds_spec.cameras)})')
  checks = [('state_dim', ds_spec.state_dim), ('action_dim', ds_spec.action_dim)]
  if primary:   # a stride means something only at the rate the data was recorded
    checks.append(('control_hz', ds_spec.control_hz))
  for field, have in checks:
    if d[field] != have:
      raise DataError(f'data.{field}: config says {d[field]}, {dataset.path} stores {have}')
  try:
    relative = embodiments.relative_dims(d['relative_action_dims'], ds_spec.action_dim, ds_spec.state_dim)
  except ValueError as e:
    raise DataError(str(e)) from None
  m = settings.model
  if ds_spec.action_dim > m.action_dim or ds_spec.state_dim > m.state_dim:
    raise DataError(f'model.action_dim/state_dim: {m.action_dim}/{m.state_dim} cannot hold '
                    f'{name} ({ds_spec.action_dim}/{ds_spec.state_dim})')
  if emb.id >= m.num_embodiments:
    raise DataError(f'model.num_embodiments: {m.num_embodiments} has no row for {emb.name} (id {emb.id})')
  v = settings.video
  if v.height % 2 or v.width % 4:
    raise DataError(f'video.height/width: {v.height}x{v.width} must split into 2x2 views (and a doubled wrist)')
  try:
    layout = chunks.ChunkLayout(v.max_chunks, v.action_horizon, v.frames_per_chunk, d['frame_stride'])
  except ValueError as e:
    raise DataError(str(e)) from None
  stats = normalization.stats_for(dataset.path, dataset.lowdim, ds_spec.state_dim, ds_spec.action_dim,
                                  v.action_horizon, relative) if with_stats else None
  spec = ClipSpec(
      layout=layout, cameras=cameras, image_shapes=tuple(ds_spec.image_shapes[c] for c in cameras),
      canvas_layout=d['canvas_layout'], height=v.height, width=v.width,
      state_dim=ds_spec.state_dim, action_dim=ds_spec.action_dim,
      relative_action_dims=relative, model_state_dim=m.state_dim,
      model_action_dim=m.action_dim, embodiment_id=emb.id,
      augment=augment(settings.data),
      on_corrupt=settings.data.on_corrupt, max_corrupt=settings.data.max_corrupt)
  if spec.on_corrupt not in ('fail', 'skip'):
    raise DataError(f"data.on_corrupt: {spec.on_corrupt!r} (expected 'fail' or 'skip')")
  canvas.placements(spec.canvas_layout, len(cameras), v.height, v.width)  # layout errors now
  index = chunks.clip_index(dataset.lowdim, layout, settings.data.idle_threshold, settings.data.anchor_stride)
  if not len(index):
    raise DataError(f'{dataset.path}: no episode is long enough for one chunk of '
                    f'{v.action_horizon} actions (plus its final frame)')
  return Member(ClipLoader(dataset, spec, stats, train), index, weight)


def distinct_clips(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(the distinct (episode, start, k) rows of a member's clip index, sorted; each index row's
  position among them): what a latent cache encodes once, and how the pipeline finds it."""
  distinct, inverse = np.unique(index, axis=0, return_inverse=True)
  return distinct, inverse.reshape(-1)


def make_dataset(settings: Settings, *, train: bool = True,
                 process_index: int | None = None, process_count: int | None = None,
                 latent_rows: list[tuple[np.ndarray, np.ndarray]] | None = None) -> grain.IterDataset:
  """Batches for this host: its shard of every member, mixed by weight, batched per host.

  Training shuffles and repeats forever with augmentation; evaluation reads every clip once,
  in order, unaugmented.

  `latent_rows` (a latent cache's `member_rows`): per member, (the cache row of each distinct clip,
  whether it holds one); batches then carry `latent_row` instead of `video`, and clips the cache
  could not encode (data.on_corrupt=skip) are left out.
  """
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  # One optimiser update's examples (micro-batches of train.batch_size x train.grad_accum_steps).
  batch_size = settings.train.batch_size * settings.train.grad_accum_steps
  if batch_size % process_count:
    raise DataError(f'train.batch_size: {batch_size} examples per update do not split over {process_count} hosts')
  datasets, weights = [], []
  for i, (name, weight) in enumerate(mixture(settings.data)):
    member = open_member(settings, name, weight, train)
    index = member.index
    if latent_rows is not None:
      rows, valid = latent_rows[i]
      _, inverse = distinct_clips(index)
      keep = valid[inverse]
      index = np.concatenate([index, rows[inverse][:, None]], axis=1)[keep]
      member.loader.with_video = False
      if not len(index):
        raise DataError(f'data.latent_cache: no clip of {name} could be encoded')
    ds = grain.MapDataset.source(index)[process_index::process_count]
    if train:
      ds = ds.shuffle(seed=settings.data.seed + i).repeat()
    datasets.append(ds.random_map(member.loader, seed=settings.data.seed + i))
    weights.append(weight)
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  it = ds.to_iter_dataset().batch(batch_size // process_count, drop_remainder=train)
  if settings.data.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings.data.num_workers))
  return it


def stats_path(data_cfg: DataSettings, name: str) -> str:
  return os.path.join(episodes.version_dir(data_cfg.dir, name), normalization.STATS_FILE)
