"""Self-describing Orbax checkpoints: train state, config, data-iterator state and norm stats.

Each step holds the items `state` (the whole TrainState: resuming), `params` (what inference
serves: the EMA parameters when train.ema_decay > 0, else the trained ones; under LoRA its
factors, the frozen base staying in `state`), `config`, `norm_stats` and `data`. Serving reads
`params` (restore_params) and never the optimiser moments, twice the parameters' bytes under AdamW.

Written asynchronously by one CheckpointManager per workdir, keeping the newest N. Orbax writes
each step into a temporary directory and renames it when complete, so a crash mid-write leaves
no half checkpoint to resume from. On restore the stored config is compared with the current
one and an incompatible checkpoint is refused naming every differing field.

Small pytrees (the VAE trained here, its optimiser) are also kept as plain .npz files read without
pickle (`save_arrays` / `load_arrays`), and a weights directory (`save_weights` / `load_weights`)
pairs one with a JSON of what made it; both are written whole or not at all, never non-finite.
A run's served parameters exported to a weights directory (`export_model_params`) are what another
run starts from (init.pretrained, `load_model_params`) without the workdir's optimiser state.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

# Fields whose change makes a checkpoint unusable (shapes or meaning of the parameters change).
COMPATIBILITY_FIELDS = ('model', 'video.latent_channels', 'video.action_horizon', 'data.action_dim',
                        'data.state_dim', 'data.embodiment', 'train.lora_rank', 'train.lora_targets',
                        'train.ema_decay', 'train.grad_accum_steps', 'init.vae_sha256')

# Fields that choose how the same parameters run (kernels, inference weight and cache dtypes): a
# checkpoint serves under any value of them.
EXECUTION_FIELDS = ('model.kernels', 'model.quantization', 'model.kv_cache_dtype')


class IncompatibleCheckpointError(ValueError):
  pass


def _get(tree: dict, dotted: str):
  node = tree
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def config_differences(saved: dict, current: ml_collections.ConfigDict | dict,
                       fields: tuple[str, ...] = COMPATIBILITY_FIELDS, ignore: tuple[str, ...] = ()) -> list[str]:
  """`field: checkpoint value vs config value` for every field under `fields` (dotted names of
  values or whole sections) that differs, except those in `ignore`. `current`: a config or its dict
  (settings.as_dict)."""
  now = _jsonable(current if isinstance(current, dict) else current.to_dict())
  diffs = []

  def walk(prefix, a, b):
    if prefix in ignore:
      return
    if isinstance(a, dict) and isinstance(b, dict):
      for key in sorted(set(a) | set(b)):
        walk(f'{prefix}.{key}', a.get(key), b.get(key))
    elif a != b and not (a in (None, '') and b in (None, '')):   # '' = unset, as a missing key
      diffs.append(f'{prefix}: {a!r} (checkpoint) vs {b!r} (config)')

  for field in fields:
    walk(field, _get(saved, field), _get(now, field))
  return diffs


def _state_tree(state) -> dict:
  """TrainState -> a dict without None entries (orbax stores pytrees of arrays)."""
  return {k: v for k, v in state._asdict().items() if v is not None}


def _served(state):
  """The parameters inference runs: the EMA when kept, else the trained ones."""
  return state.ema if state.ema is not None else state.params


def _restore_targets(abstract):
  """ShapeDtypeStructs (with the shardings the caller gave, if any) of an abstract or real pytree."""
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                      jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None)), abstract)


class Checkpointer:
  """Saves and restores training runs in `workdir`."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(os.path.join(self.workdir, 'checkpoints'), options=options)

  def _has_item(self, step: int, name: str) -> bool:
    """Whether checkpoint `step` holds item `name`; read off its directory where Orbax's layout
    is the default one (item_metadata would warn about every item it has no handler for)."""
    step_dir = os.path.join(str(self.manager.directory), str(step))
    if os.path.isdir(step_dir):
      return os.path.isdir(os.path.join(step_dir, name))
    return name in self.manager.item_metadata(step)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, config: ml_collections.ConfigDict, data_state: Any = None,
           norm_stats: Any = None) -> None:
    args = dict(state=ocp.args.StandardSave(_state_tree(state)),
                params=ocp.args.StandardSave(_served(state)),
                config=ocp.args.JsonSave(_jsonable(config.to_dict())),
                norm_stats=ocp.args.JsonSave(_jsonable(norm_stats or {})),
                data=ocp.args.JsonSave(_jsonable(data_state or {})))
    self.manager.save(step, args=ocp.args.Composite(**args))

  def read_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def _check_compatible(self, step: int, config: ml_collections.ConfigDict | dict) -> None:
    diffs = config_differences(self.read_config(step), config, ignore=EXECUTION_FIELDS)
    if diffs:
      raise IncompatibleCheckpointError(
          f'{self.workdir} holds a checkpoint (step {step}) from an incompatible config: ' + '; '.join(diffs))

  def restore(self, step: int, abstract_state, config: ml_collections.ConfigDict):
    """Returns (state, data_state, norm_stats); refuses a checkpoint from an incompatible config."""
    self._check_compatible(step, config)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_restore_targets(_state_tree(abstract_state))),
        norm_stats=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
    fields = {k: out['state'].get(k) for k in abstract_state._fields}
    return type(abstract_state)(**fields), out['data'], out['norm_stats']

  def restore_params(self, step: int, abstract_params, config: ml_collections.ConfigDict | dict, abstract_frozen=None):
    """Returns (served parameters, frozen LoRA base or None, norm_stats), reading no optimiser state.

    `abstract_params`: the served tree's shapes, built from the model alone (the DiT's parameters;
    under LoRA its factors); `abstract_frozen`: under LoRA the frozen base's (the DiT's parameters),
    else None. The served parameters are the `params` item (EMA parameters when kept); under LoRA
    only the `frozen` subtree of the state item is read beside them. A checkpoint written before the
    `params` item existed reads the same from its state item (`ema` when its training kept one, else
    `params`). Refuses a checkpoint from an incompatible config, as `restore` does.
    """
    self._check_compatible(step, config)
    args = dict(norm_stats=ocp.args.JsonRestore())
    from_state = {}
    if self._has_item(step, 'params'):
      args['params'] = ocp.args.StandardRestore(_restore_targets(abstract_params))
    else:
      served = 'ema' if _get(self.read_config(step), 'train.ema_decay') else 'params'
      from_state[served] = _restore_targets(abstract_params)
    if abstract_frozen is not None:
      from_state['frozen'] = _restore_targets(abstract_frozen)
    if from_state:
      args['state'] = ocp.args.PyTreeRestore(
          from_state, restore_args=ocp.checkpoint_utils.construct_restore_args(from_state), partial_restore=True)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    params = out['params'] if 'params' in args else out['state'][served]
    frozen = out['state']['frozen'] if abstract_frozen is not None else None
    return params, frozen, out['norm_stats']

  def restore_model_params(self, step: int, abstract_params, config: ml_collections.ConfigDict):
    """The `params` item (EMA parameters when kept) of a checkpoint of the same model, to start
    another run from (init.pretrained): only the model section must match, not the training."""
    diffs = config_differences(self.read_config(step), config, fields=('model',), ignore=EXECUTION_FIELDS)
    if diffs:
      raise IncompatibleCheckpointError(f'init.pretrained: {self.workdir} (step {step}) holds another model: '
                                        + '; '.join(diffs))
    if not self._has_item(step, 'params'):
      raise IncompatibleCheckpointError(f'init.pretrained: {self.workdir} (step {step}) has no params item')
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_restore_targets(abstract_params))))
    return out['params']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---- .npz pytrees and weights directories ---------------------------------------------------------

WEIGHTS_FILE = 'params.npz'
META_FILE = 'meta.json'


def _key_name(entry) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """A pytree's leaves as host arrays keyed by their '/'-joined path ('encoder/conv_in/kernel')."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(e) for e in path): np.asarray(leaf) for path, leaf in leaves}


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the leaves holding NaN or inf."""
  return [k for k, v in flat_arrays(tree).items() if v.dtype.kind in 'fc' and not np.isfinite(v).all()]


def save_arrays(path: str, tree) -> None:
  """Writes a pytree of arrays to `path` (.npz) through a temporary file and a rename; refuses a
  tree holding NaN or inf (the file already there is kept)."""
  bad = nonfinite_leaves(tree)
  if bad:
    raise ValueError(f'{path}: not saved, non-finite values in {", ".join(bad[:5])}')
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.npz', dir=folder)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat_arrays(tree))
    os.chmod(tmp, 0o644)   # mkstemp's 0600 would hide the file from other readers
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load_arrays(path: str, target):
  """The pytree saved at `path`, in the structure of `target` (arrays or shape structs); refuses a
  file (never unpickled) that lacks a leaf, holds another shape or holds NaN or inf."""
  with np.load(path, allow_pickle=False) as z:
    stored = {k: z[k] for k in z.files}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  out, problems = [], []
  for entry_path, want in leaves:
    key = '/'.join(_key_name(e) for e in entry_path)
    have = stored.get(key)
    if have is None:
      problems.append(f'{key} missing')
    elif have.shape != tuple(np.shape(want)):
      problems.append(f'{key}: {have.shape} vs {tuple(np.shape(want))}')
    elif have.dtype.kind in 'fc' and not np.isfinite(have).all():
      problems.append(f'{key}: non-finite values')
    out.append(have)
  if problems:
    raise ValueError(f'{path}: ' + '; '.join(problems[:5]) + (' ...' if len(problems) > 5 else ''))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), out)


def save_weights(directory: str, params, meta: dict) -> None:
  """A weights directory: `params` (WEIGHTS_FILE) and `meta` (META_FILE), built beside `directory`
  and renamed into place, so a reader sees the old directory or the new one, never a mix."""
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + '.tmp', dir=parent)
  os.chmod(tmp, 0o755)
  try:
    save_arrays(os.path.join(tmp, WEIGHTS_FILE), params)
    with open(os.path.join(tmp, META_FILE), 'w') as f:
      json.dump(_jsonable(meta), f, indent=1)
    old = None
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=os.path.basename(directory) + '.old', dir=parent)
      os.replace(directory, os.path.join(old, 'd'))
    os.replace(tmp, directory)
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_weights_meta(directory: str) -> dict:
  path = os.path.join(directory, META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory} is not a weights directory (no {META_FILE})')
  with open(path) as f:
    return json.load(f)


def weights_digest(directory: str) -> str:
  """SHA-256 (hex) of a weights directory's parameter file: what a model trained on top of these
  weights records, so that it is never run with other ones."""
  digest = hashlib.sha256()
  with open(os.path.join(directory, WEIGHTS_FILE), 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def load_weights(directory: str, target):
  """The parameters of a weights directory in the structure of `target` (see load_arrays)."""
  return load_arrays(os.path.join(directory, WEIGHTS_FILE), target)


# ---- a model's parameters to start another run from (init.pretrained) -----------------------------

def _newest_model_params(workdir: str, abstract_params, config, what: str):
  """(step, params item, stored config) of `workdir`'s newest checkpoint (restore_model_params)."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise IncompatibleCheckpointError(f'{what}{workdir} holds no checkpoint')
    return int(step), ckpt.restore_model_params(step, abstract_params, config), ckpt.read_config(step)
  finally:
    ckpt.close()


def export_model_params(workdir: str, directory: str, abstract_params, config) -> int:
  """Writes the newest checkpoint's `params` item of `workdir` (restore_model_params) as a weights
  directory, its meta the checkpoint's config and step: what init.pretrained starts a run from,
  a fraction of the workdir's bytes (no optimiser state). Returns the step."""
  step, params, saved = _newest_model_params(workdir, abstract_params, config, 'nothing to export: ')
  save_weights(directory, jax.tree.map(np.asarray, params), dict(config=saved, step=step))
  return step


def load_model_params(path: str, abstract_params, config):
  """init.pretrained's parameters: a weights directory written by export_model_params, or a train
  workdir's newest checkpoint; refused (IncompatibleCheckpointError naming init.pretrained) when
  they belong to another model, are missing, or hold another shape or non-finite values."""
  if os.path.isfile(os.path.join(path, META_FILE)):
    diffs = config_differences(read_weights_meta(path).get('config', {}), config, fields=('model',),
                               ignore=EXECUTION_FIELDS)
    if diffs:
      raise IncompatibleCheckpointError(f'init.pretrained: {path} holds another model: ' + '; '.join(diffs))
    try:
      return load_weights(path, abstract_params)
    except ValueError as e:
      raise IncompatibleCheckpointError(f'init.pretrained: {e}') from None
  if not os.path.isdir(path):
    raise IncompatibleCheckpointError(f'init.pretrained: {path} is neither a weights directory nor a train workdir')
  return _newest_model_params(path, abstract_params, config, 'init.pretrained: ')[1]


def trim_metrics_log(path: str, step: int) -> None:
  """Rewrites a JSON-lines metrics log (atomically) without its records past `step` and without a
  line a crash left half-written: a run resuming from the checkpoint of `step` (0: starting
  afresh) logs the later steps again, and the log keeps one curve."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and isinstance(record.get('step'), int) and record['step'] <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)
