"""`python -m dreamzero_jax.convert --config C --src PATH [--src PATH ...] --out DIR`: official Wan2.1 /
Wan2.2 / DreamZero checkpoints (safetensors or torch .pth, original or diffusers / transformers / open_clip
names; DiT, VAE, umT5, CLIP) into an Orbax checkpoint of our parameters.

Streaming: the models are built only abstractly (nnx.eval_shape) and every tensor is read, transformed,
cast to its parameter dtype and written into its slot of the output (a layer of a stacked parameter is
one slice) before the next is read, so host memory is bounded by the largest tensor, not the model.
Names are checked before any data is read: a tensor we have no place for, a parameter no source fills,
or (while streaming) a tensor of the wrong shape refuses the conversion naming every offending key.
The output appears at DIR only when complete: it is written into DIR.tmp-* and renamed at the end.
A tensor holding NaN or inf (as read, or after the cast to its parameter dtype) refuses the conversion
naming it, unless --allow_nonfinite.

DIR holds config.json, manifest.json and params/ (models/weights/release.py, which reads it back).
`--components dit,vae,text,image` picks what to convert (default: what the sources hold): a DiT-only
release converts alone, and the config of an absent component is never read.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Callable, Iterable, Iterator

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from dreamzero_jax import embodiments, torch_files
from dreamzero_jax import settings as settings_lib
from dreamzero_jax.config import ConfigError, load_config, split_config_args
from dreamzero_jax.models.weights import clip_keys
from dreamzero_jax.models.weights import dit_keys
from dreamzero_jax.models.weights import dreamzero as dreamzero_weights
from dreamzero_jax.models.weights import umt5_keys
from dreamzero_jax.models.weights import vae_keys
from dreamzero_jax.models.weights.common import Target, WeightMismatchError
from dreamzero_jax.models.weights.release import COMPONENTS, MANIFEST, abstract_params, config_components, flatten
# Re-exported for inference/policy.py until it reads models/weights/release.py itself (issue 12: being moved).

# Wrappers the official trainers save around the modules (DreamZero's VLA, DiT-only and ComfyUI saves):
# stripped before the names are matched. Longest first.
PREFIXES = ('action_head.image_encoder.model.', 'action_head.text_encoder.', 'action_head.vae.model.',
            'action_head.model.', 'model.diffusion_model.', 'model.')
CHUNK_BYTES = 64 << 20   # output chunk (and write block) size: bounds the write buffers
_M_MMAP_THRESHOLD = -3   # glibc mallopt parameter
LISTED = 50              # offending names an error message lists


@dataclasses.dataclass(frozen=True)
class Format:
  """One naming scheme of one component, recognised by a key only it has."""
  component: str
  name: str
  signature: str                                          # regex matched at the start of a key
  key_map: Callable[[str], Target | None]
  rename: Callable[[Iterable], Iterator] = iter           # streaming renamer into key_map's names
  ignore: Callable[[str], bool] = lambda key: False       # tensors the model does not use


def formats(settings: settings_lib.Settings, embodiment_id: int) -> list[Format]:
  """Every naming scheme we read, most specific first (the first whose signature matches wins)."""
  actions = dreamzero_weights.key_map(embodiment_id)

  def with_actions(backbone):
    return lambda key: actions(key) if dreamzero_weights.is_checkpoint_key(key) else backbone(key)

  clip_unused = clip_keys.unused_keys(settings.image_encoder.num_layers)
  return [
      Format('dit', 'diffusers', r'condition_embedder\.|blocks\.\d+\.attn1\.',
             with_actions(dit_keys.diffusers_key_map)),
      Format('dit', 'wan', r'blocks\.\d+\.(self_attn|cross_attn)\.|(action_encoder|state_encoder|action_decoder)\.',
             with_actions(dit_keys.wan_key_map)),
      Format('vae', 'diffusers', r'(post_)?quant_conv\.|(en|de)coder\.(down|up)_blocks\.',
             vae_keys.diffusers_key_map(settings.vae)),
      Format('vae', 'wan', r'(en|de)coder\.(downsamples|upsamples|middle|head)\.',
             vae_keys.official_key_map(settings.vae)),
      Format('image', 'open_clip', r'visual\.transformer\.resblocks\.', clip_keys.transformers_key_map,
             clip_keys.open_clip_to_transformers, clip_unused),
      Format('image', 'wan', r'visual\.transformer\.\d+\.', clip_keys.transformers_key_map,
             clip_keys.wan_to_transformers, clip_unused),
      Format('image', 'transformers', r'(vision_model\.)?(embeddings\.patch_embedding|encoder\.layers\.\d+\.)',
             clip_keys.transformers_key_map, ignore=clip_unused),
      Format('text', 'transformers', r'shared\.weight|encoder\.block\.\d+\.', umt5_keys.transformers_key_map,
             ignore=umt5_keys.transformers_unused),
      Format('text', 'wan', r'token_embedding\.weight|blocks\.\d+\.attn\.', umt5_keys.wan_key_map),
  ]


@dataclasses.dataclass
class Group:
  """The tensors of one source under one prefix, in one format (None: not recognised)."""
  source: str
  prefix: str
  fmt: Format | None
  refs: dict[str, torch_files.TensorRef]   # prefix-stripped name -> where the data is

  def label(self, key: str) -> str:
    return f'{self.prefix}{key} ({os.path.basename(self.source)})'


def read_sources(sources: Iterable[str], fmts: list[Format]) -> list[Group]:
  """Reads every source's table of contents and tells which component and naming each part holds."""
  groups = []
  for source in sources:
    parts: dict[str, dict] = {}
    for key, ref in torch_files.tensor_refs(source).items():
      prefix = next((p for p in PREFIXES if key.startswith(p)), '')
      parts.setdefault(prefix, {})[key[len(prefix):]] = ref
    for prefix, refs in parts.items():
      fmt = next((f for f in fmts if any(re.match(f.signature, k) for k in refs)), None)
      groups.append(Group(source, prefix, fmt, refs))
  return groups


@dataclasses.dataclass(frozen=True)
class Slot:
  """One parameter of the output."""
  shape: tuple[int, ...]
  dtype: np.dtype


def _component_params(abstract: dict) -> dict[str, dict[tuple, Slot]]:
  """Component -> (path inside the component's module -> Slot), for the components the config has."""
  flat = flatten(abstract)
  out = {}
  for component, (root, _) in COMPONENTS.items():
    params = {path[len(root):]: Slot(tuple(v.shape), np.dtype(v.dtype)) for path, v in flat.items()
              if path[:len(root)] == root}
    if params:
      out[component] = params
  return out


def _may_stay(component: str, path: tuple) -> bool:
  """DreamZero's action/state tables: a plain Wan checkpoint has none, so they keep their initialisation."""
  return component == 'dit' and dit_keys.is_dreamzero_key(path)


def _placeholders(groups: list[Group]) -> Iterator[tuple[Group, str, Target | None]]:
  """(group, renamed key, target) for every tensor the model uses, from names and shapes only: the
  renamers see zero-stride stand-ins, so planning reads no data."""
  for group in groups:
    if group.fmt is None:
      for key in group.refs:
        yield group, key, None
      continue
    stand_ins = ((k, np.broadcast_to(np.zeros((), r.dtype), r.shape)) for k, r in group.refs.items())
    for key, _ in group.fmt.rename(stand_ins):
      if not group.fmt.ignore(key):
        yield group, key, group.fmt.key_map(key)


def _listing(title: str, names: list[str]) -> str:
  """`title (n): a, b, ...`, cut after LISTED names (a wrong 14B file would list thousands)."""
  more = f' (+{len(names) - LISTED} more)' if len(names) > LISTED else ''
  return f'{title} ({len(names)}): ' + ', '.join(names[:LISTED]) + more


def plan(groups: list[Group], params: dict[str, dict[tuple, Slot]]) -> dict[str, dict[tuple, set]]:
  """Which rows of which parameter each source fills; raises WeightMismatchError naming every tensor
  with no place (or placed twice) and every parameter left unfilled."""
  filled = {component: {} for component in params}
  unexpected, twice = [], []
  for group, key, target in _placeholders(groups):
    component = group.fmt.component if group.fmt else None
    if target is None or component not in params or tuple(target.path) not in params[component]:
      unexpected.append(group.label(key))
      continue
    rows = filled[component].setdefault(tuple(target.path), set())
    if target.layer in rows or (rows and (target.layer is None or None in rows)):
      twice.append(group.label(key))
    rows.add(target.layer)
  missing = []
  for component, slots in params.items():
    if not filled[component]:
      missing.append(f'no --src holds {COMPONENTS[component][1]} ({component})')
      continue
    for path, slot in slots.items():
      rows = filled[component].get(path, set())
      if None in rows or (slot.shape and rows >= set(range(slot.shape[0]))) or _may_stay(component, path):
        continue
      name = f'{component}/' + '/'.join(map(str, path))
      missing.append(name + (f' (layers {sorted(rows)} of {slot.shape[0]})' if rows else ''))
  lines = [_listing(title, names) for title, names in (('unexpected keys', unexpected),
                                                         ('tensors given twice', twice),
                                                         ('missing parameters', missing)) if names]
  if lines:
    raise WeightMismatchError('\n'.join(lines))
  return filled


def _chunks(shape: tuple[int, ...], itemsize: int, by_row: bool) -> list[int]:
  """Zarr chunks: one leading index per chunk for arrays filled row by row (a layer, a table row), so a
  row is written without touching its neighbours; then bands of the next axis below CHUNK_BYTES, so no
  chunk buffer is large."""
  lead, rest = ([1], shape[1:]) if by_row else ([], shape)
  if not rest:
    return lead
  band = itemsize * int(np.prod(rest[1:]))
  return lead + [max(1, min(rest[0], CHUNK_BYTES // band))] + list(rest[1:])


class ParamStore:
  """An Orbax PyTree checkpoint (zarr arrays, no OCDBT) whose arrays are filled slice by slice.

  Orbax writes the tree metadata from tiny stand-in arrays; each array is then re-created at its true
  shape with tensorstore (Orbax's own storage layer, same zarr metadata) and written as tensors arrive.
  """

  def __init__(self, directory: str, leaves: dict[tuple, Slot], by_row: set[tuple],
               allow_nonfinite: bool = False):
    self.allow_nonfinite = allow_nonfinite
    stand_ins: dict = {}
    for path, slot in leaves.items():
      node = stand_ins
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = np.zeros((1,) * len(slot.shape), slot.dtype)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
    ocp.Checkpointer(handler).save(directory, args=ocp.args.PyTreeSave(stand_ins))
    self.arrays, self.dtypes = {}, {}
    for path, slot in leaves.items():
      leaf_dir = os.path.join(directory, '.'.join(map(str, path)))
      with open(os.path.join(leaf_dir, '.zarray')) as f:   # Orbax's own zarr metadata, resized
        metadata = json.load(f)
      metadata.update(shape=list(slot.shape), chunks=_chunks(slot.shape, slot.dtype.itemsize, path in by_row))
      spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': leaf_dir}, 'metadata': metadata}
      self.arrays[path] = ts.open(spec, create=True, delete_existing=True).result()
      self.dtypes[path] = slot.dtype

  def write(self, path: tuple, layer: int | None, value: np.ndarray) -> None:
    """Writes `value` (cast to the parameter dtype) at `path` (one leading row when layer is set)."""
    array, dtype = self.arrays[path], self.dtypes[path]
    region = array if layer is None else array[layer]
    if value.ndim == 0:
      region.write(self._checked(value.astype(dtype))).result()
      return
    band = array.chunk_layout.read_chunk.shape[array.rank - value.ndim]
    for start in range(0, value.shape[0], band):
      stop = min(start + band, value.shape[0])
      region[start:stop].write(self._checked(value[start:stop].astype(dtype))).result()

  def _checked(self, block: np.ndarray) -> np.ndarray:
    """A cast block, refused if it holds NaN or inf (checked per band: memory stays bounded)."""
    if not self.allow_nonfinite and block.dtype.kind in 'fV' and not np.isfinite(block).all():
      raise NonFiniteWeightError(f'{int(block.size - np.isfinite(block).sum())} NaN/inf values')
    return block


class NonFiniteWeightError(ValueError):
  """A tensor with NaN or inf values (pass --allow_nonfinite to convert it anyway)."""


def _stream(groups: list[Group], params: dict[str, dict[tuple, Slot]], store: ParamStore) -> list[str]:
  """Reads, transforms and writes every used tensor; returns the shape mismatches."""
  bad_shape = []
  for group in groups:
    component = group.fmt.component
    root = COMPONENTS[component][0]
    print(f'{group.source}: {len(group.refs)} tensors{" under " + group.prefix if group.prefix else ""} -> '
          f'{component} ({group.fmt.name} names)', flush=True)
    tensors = ((k, r.read()) for k, r in group.refs.items())
    for key, array in group.fmt.rename(tensors):
      if group.fmt.ignore(key):
        continue
      target = group.fmt.key_map(key)
      slot = params[component][tuple(target.path)]
      value = np.asarray(target.transform(np.asarray(array)))
      want = slot.shape if target.layer is None else slot.shape[1:]
      if value.shape != tuple(want):
        bad_shape.append(f'{group.label(key)}: checkpoint {value.shape} vs model {tuple(want)}')
        continue
      try:
        with np.errstate(over='ignore', invalid='ignore'):
          store.write(root + tuple(target.path), target.layer, value)
      except NonFiniteWeightError as e:
        raise NonFiniteWeightError(f'{group.label(key)}: {e} (after the cast to {slot.dtype}): refusing to '
                                   'convert (pass --allow_nonfinite to keep them)') from None
      del array, value   # freed before the next tensor is read: one tensor in memory at a time
  return bad_shape


def _initialise_rest(params: dict[str, dict[tuple, Slot]], filled: dict[str, dict[tuple, set]],
                     store: ParamStore, seed: int) -> None:
  """Rows of DreamZero's tables that no checkpoint filled get the model's own initial values."""
  if 'dit' not in params:
    return
  dit = params['dit']
  modules = sorted({path[:-1] for path in dit if _may_stay('dit', path)})
  for module in modules:
    rows = {name: filled['dit'].get(module + (name,), set()) for name in ('kernel', 'bias')}
    num = dit[module + ('kernel',)].shape[0]
    if all(r >= set(range(num)) for r in rows.values()):
      continue
    fresh = dreamzero_weights.initial_table(dit[module + ('kernel',)].shape, seed, module)
    for name, done in rows.items():
      for row in sorted(set(range(num)) - done):
        store.write(('dit',) + module + (name,), row, fresh[name][row])


def _choose(settings: settings_lib.Settings, groups: list[Group], components: Iterable[str] | None) -> set[str]:
  """The components to convert: those named (each must be in the config and in a source), or those
  the sources hold."""
  have = set(config_components(settings))
  held = {g.fmt.component for g in groups if g.fmt is not None}
  if components is None:
    chosen = held & have
    if not chosen:
      raise WeightMismatchError('no --src holds a component of this config (' + ', '.join(sorted(have)) + ')')
    return chosen
  chosen = set(components)
  for name in sorted(chosen):
    if name not in COMPONENTS:
      raise ValueError(f'--components: unknown component {name!r} (known: {", ".join(COMPONENTS)})')
    if name not in have:
      raise ValueError(f'--components: {name} is not part of this config (model.image_dim=0 has no image encoder)')
    if name not in held:
      raise WeightMismatchError(f'--components: no --src holds {COMPONENTS[name][1]} ({name})')
  return chosen


def _filled_rows(filled: dict[str, dict[tuple, set]]) -> list[int]:
  """Rows of the per-embodiment action/state tables that the sources filled."""
  rows = set()
  for path, layers in filled.get('dit', {}).items():
    if dit_keys.is_dreamzero_key(path):
      rows |= layers - {None}
  return sorted(rows)


def convert(cfg: ml_collections.ConfigDict, sources: Iterable[str], out: str, *,
            embodiment_id: int | None = None, components: Iterable[str] | None = None,
            allow_nonfinite: bool = False) -> None:
  """Converts `sources` into a checkpoint for `cfg` at `out` (which must not exist).

  `embodiment_id`: the row of the action/state tables a DreamZero checkpoint's single shared set goes
  into (default: the row of the config's data.embodiment, the one its policy reads). `components`:
  what to convert (default: what the sources hold). `allow_nonfinite`: keep tensors holding NaN or inf.
  """
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise FileExistsError(f'--out {out} already exists (the converter never overwrites)')
  if embodiment_id is None:
    embodiment_id = embodiments.get(cfg.data.embodiment).id
  if not 0 <= embodiment_id < cfg.model.num_embodiments:
    raise ValueError(f'--embodiment_id={embodiment_id} outside model.num_embodiments={cfg.model.num_embodiments}')
  settings = settings_lib.from_config(cfg)
  groups = read_sources(sources, formats(settings, embodiment_id))
  chosen = _choose(settings, groups, components)
  # Tensors of components not chosen are left out; unrecognised ones are still refused by name.
  groups = [g for g in groups if g.fmt is None or g.fmt.component in chosen
            or g.fmt.component not in config_components(settings)]
  abstract = abstract_params(settings, chosen)
  params = _component_params(abstract)
  filled = plan(groups, params)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + '.tmp-', dir=os.path.dirname(out))
  try:
    by_row = {COMPONENTS[c][0] + path for c, paths in filled.items() for path, rows in paths.items()
              if rows - {None}} | {('dit',) + path for path in params.get('dit', {}) if _may_stay('dit', path)}
    leaves = {p: Slot(tuple(v.shape), np.dtype(v.dtype)) for p, v in flatten(abstract).items()}
    store = ParamStore(os.path.join(tmp, 'params'), leaves, by_row, allow_nonfinite)
    bad_shape = _stream(groups, params, store)
    if bad_shape:
      raise WeightMismatchError(_listing('shape mismatches', bad_shape))
    _initialise_rest(params, filled, store, cfg.seed)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      f.write(cfg.to_json(indent=2))
    with open(os.path.join(tmp, MANIFEST), 'w') as f:
      json.dump({'components': sorted(chosen), 'embodiment_rows': _filled_rows(filled)}, f, indent=1)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _return_freed_tensors_to_the_os() -> None:
  """glibc raises its mmap threshold after the first multi-MB free and from then on keeps freed tensor
  buffers in its heaps: measured, a 2 GB conversion's RSS crept up by 430 MB that way. A fixed 1 MiB
  threshold serves every tensor from mmap, so its memory goes back when it is freed."""
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return   # not glibc
  libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog='python -m dreamzero_jax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/NAME.py[:ARG]')
  parser.add_argument('--src', required=True, action='append',
                      help='a checkpoint file (.safetensors, .pth/.pt/.bin, or a *.index.json of shards); repeat')
  parser.add_argument('--out', required=True, help='output directory (must not exist)')
  parser.add_argument('--embodiment_id', type=int, default=None,
                      help="row of the per-embodiment action/state tables that a DreamZero checkpoint's "
                           "single shared set goes into (default: the config's data.embodiment's row)")
  parser.add_argument('--components', default='',
                      help='comma-separated subset of dit,vae,text,image to convert (default: what the sources hold)')
  parser.add_argument('--allow_nonfinite', action='store_true',
                      help='convert tensors holding NaN or inf (refused by default, naming the tensor)')
  args = parser.parse_args(rest)
  _return_freed_tensors_to_the_os()
  try:
    cfg = load_config(args.config, overrides)
    components = [c.strip() for c in args.components.split(',') if c.strip()] or None
    convert(cfg, args.src, args.out, embodiment_id=args.embodiment_id, components=components,
            allow_nonfinite=args.allow_nonfinite)
  except (ConfigError, ValueError, OSError) as e:
    print('error: ' + str(e).replace('\n', '; '), file=sys.stderr)
    return 2
  print(f'wrote {os.path.abspath(args.out)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
