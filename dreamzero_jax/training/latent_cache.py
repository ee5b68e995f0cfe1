"""The frozen encoders off the training hot path: every distinct clip encoded once (data.latent_cache).

The frozen VAE (and CLIP) would otherwise run over every clip of every step: measured on 2 CPU
cores, ~2.2 s of VAE against 27 ms of DiT per tiny step. With data.latent_cache the training loop
first encodes each distinct (episode, start, k) clip of every dataset member, unaugmented, exactly
as the on-the-fly path would (same canvas, same padded frames, same jitted encoder), stores the
arrays under data.latent_cache_dir (default WORKDIR/latent_cache/<fingerprint>), and then trains on
rows gathered from them. The Wan VAE is causal from a clip's own frame 0, so a clip's latents are not
a slice of its episode's: the cache holds clips, and data.anchor_stride (e.g. video.action_horizon)
keeps their number small.

The fingerprint covers the encoder weights, the clip layout, the canvas and the dataset's episodes,
so a changed VAE or dataset builds a new cache and never reads a stale one. Written to a temporary
directory and renamed into place; read back with allow_pickle=False and checked against its
metadata. Single host (each host would otherwise encode everything).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from dreamzero_jax import settings as settings_lib
from dreamzero_jax.datasets import pipeline
from dreamzero_jax.datasets.episodes import DataError

VERSION = 2  # 2: the I2V condition's array renamed to i2v_cond.npy, so older caches are rebuilt
ENCODE_BATCH = 8
_AUGMENT_OFF = (('augment_crop_scale', 1.0), ('augment_brightness', 0.0), ('augment_contrast', 0.0),
                ('augment_saturation', 0.0), ('augment_hue', 0.0))


@dataclasses.dataclass
class LatentCache:
  """The encoded clips of every member of the data mixture, row-aligned."""
  path: str
  latents: np.ndarray           # [N, F, h, w, C] (memory-mapped)
  i2v_cond: np.ndarray | None   # [N, F, h, w, 20] the I2V condition, or None
  image: np.ndarray | None      # [N, Li, image_dim] CLIP features, or None
  valid: np.ndarray             # [N] bool: False where the clip's images did not decode (skip)
  member_rows: list[tuple[np.ndarray, np.ndarray]]  # per member: (rows of its distinct clips, valid)

  def gather(self, rows: np.ndarray):
    """(latents, i2v_cond, image) of the given rows, as host arrays."""
    rows = np.asarray(rows)
    take = lambda a: None if a is None else np.ascontiguousarray(a[rows])
    return take(self.latents), take(self.i2v_cond), take(self.image)


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """The cache holds unaugmented clips: training on it with augmentation on would silently drop it."""
  for field, off in _AUGMENT_OFF:
    if cfg.data[field] != off:
      raise DataError(f'data.{field}: {cfg.data[field]} but data.latent_cache holds unaugmented clips '
                      f'(set data.{field}={off}, or data.latent_cache=False)')
  if jax.process_count() > 1:
    raise DataError('data.latent_cache: single-host only (each host would encode every clip)')


def _members(cfg):
  settings = settings_lib.from_config(cfg)
  return [pipeline.open_member(settings, name, weight, train=False)
          for name, weight in pipeline.mixture(settings.data)]


def fingerprint(cfg: ml_collections.ConfigDict, encoders, members, distinct: list[np.ndarray]) -> str:
  """A hash of everything a cached row depends on: encoder weights, layout, canvas, episodes and
  the members' distinct clips (`distinct`, pipeline.distinct_clips per member)."""
  h = hashlib.sha256()
  keys = ('cameras', 'canvas_layout', 'frame_stride', 'anchor_stride', 'idle_threshold', 'name', 'mixture',
          'relative_action_dims')
  h.update(json.dumps(dict(version=VERSION, video=cfg.video.to_dict(),
                           data={k: cfg.data[k] for k in keys}), sort_keys=True, default=str).encode())
  for module in (encoders.vae, encoders.image):
    if module is not None:
      for path, leaf in sorted(nnx.state(module).flat_state(), key=lambda kv: str(kv[0])):
        h.update(str(path).encode())
        h.update(np.ascontiguousarray(jax.device_get(leaf.get_value() if hasattr(leaf, 'get_value')
                                                      else leaf.value)).tobytes())
  for member, clips in zip(members, distinct):
    h.update(member.loader.dataset.path.encode())
    h.update(member.loader.dataset.lowdim.episode_id.tobytes())
    h.update(np.asarray(member.loader.dataset.lowdim.offsets).tobytes())
    h.update(clips.tobytes())
  return h.hexdigest()[:20]


def _arrays(directory: str) -> dict[str, np.ndarray]:
  return {name[:-4]: np.load(os.path.join(directory, name), mmap_mode='r', allow_pickle=False)
          for name in sorted(os.listdir(directory)) if name.endswith('.npy')}


def _load(directory: str, meta: dict, sizes: list[int]) -> LatentCache:
  with open(os.path.join(directory, 'meta.json')) as f:
    stored = json.load(f)
  if stored != meta:
    raise DataError(f'data.latent_cache_dir: {directory} holds another cache (meta.json differs); delete it')
  arrays = _arrays(directory)
  total = sum(sizes)
  for name in ('latents', 'valid') + tuple(k for k in ('i2v_cond', 'image') if meta['has_' + k]):
    if name not in arrays or len(arrays[name]) != total:
      raise DataError(f'data.latent_cache_dir: {directory}/{name}.npy is missing or has the wrong length; delete '
                      'the directory to rebuild it')
  valid = np.asarray(arrays['valid'], bool)
  member_rows, offset = [], 0
  for n in sizes:
    member_rows.append((np.arange(offset, offset + n), valid[offset:offset + n]))
    offset += n
  return LatentCache(directory, arrays['latents'], arrays.get('i2v_cond'), arrays.get('image'), valid, member_rows)


def build_or_load(cfg: ml_collections.ConfigDict, workdir: str, batch_encoder, encoders) -> LatentCache:
  """The cache for cfg's data and encoders: read from disk if built, else encoded now."""
  check_config(cfg)
  members = _members(cfg)
  distinct = [pipeline.distinct_clips(m.index)[0] for m in members]
  key = fingerprint(cfg, encoders, members, distinct)
  root = cfg.data.latent_cache_dir or os.path.join(workdir, 'latent_cache')
  directory = os.path.join(root, key)
  sizes = [len(d) for d in distinct]
  meta = dict(version=VERSION, fingerprint=key, rows=sum(sizes), members=[m.loader.dataset.path for m in members],
              has_i2v_cond=bool(batch_encoder.i2v), has_image=encoders.image is not None)
  if os.path.isdir(directory):
    return _load(directory, meta, sizes)
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{key}.', dir=root)
  try:
    _encode(members, distinct, batch_encoder, tmp, sum(sizes))
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return _load(directory, meta, sizes)


def _encode(members, distinct, batch_encoder, out: str, total: int) -> None:
  """Encodes every distinct clip (unaugmented) in batches of ENCODE_BATCH into out/*.npy."""
  files: dict[str, np.ndarray] = {}
  valid = np.zeros(total, bool)
  pending: list[tuple[int, np.ndarray]] = []

  def flush():
    if not pending:
      return
    rows = [r for r, _ in pending]
    video = np.stack([v for _, v in pending] + [pending[-1][1]] * (ENCODE_BATCH - len(pending)))
    outputs = dict(zip(('latents', 'i2v_cond', 'image'), jax.device_get(batch_encoder.pixels(video))))
    for name, value in outputs.items():
      if value is None:
        continue
      value = np.asarray(value[:len(rows)], np.float32)
      if not np.isfinite(value).all():
        raise DataError(f'data.latent_cache: the frozen encoders gave non-finite {name} (rows {rows[0]}..)')
      if name not in files:
        files[name] = np.lib.format.open_memmap(os.path.join(out, f'{name}.npy'), 'w+', np.float32,
                                                (total, *value.shape[1:]))
      files[name][rows] = value
    pending.clear()

  bar = tqdm.tqdm(total=total, desc='latent cache', dynamic_ncols=True)
  row = 0
  for member, clips in zip(members, distinct):
    loader = member.loader
    record, record_ep = None, -1
    for ep, start, k in clips.tolist():
      if ep != record_ep:
        record_ep, record = ep, loader.record(ep)
      clip = None if record is None else loader.clip(record, ep, start, k, None)
      if clip is not None:
        valid[row] = True
        pending.append((row, clip['video']))
        if len(pending) == ENCODE_BATCH:
          flush()
      row += 1
      bar.update(1)
  flush()
  bar.close()
  if not valid.any():
    raise DataError('data.latent_cache: no clip could be encoded')
  for f in files.values():
    f.flush()
  np.save(os.path.join(out, 'valid.npy'), valid)
