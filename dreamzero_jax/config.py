"""Loading `configs/NAME.py[:ARG]` files and applying `--config.a.b=value` overrides.

Unknown keys are errors that name the key; override values are parsed as Python literals
and must keep the type of the field they replace. The loaded config is validated: counts that
must be positive (steps, sizes, intervals) are refused naming the field.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file or override that cannot be applied."""


# A source checkout's root (configs/ beside the package): relative config paths also resolve there,
# so `--config configs/tiny.py` works from any directory.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_config_module(path: str):
  if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(os.path.join(_CHECKOUT, path)):
    path = os.path.join(_CHECKOUT, path)
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  # Config files import their siblings as `configs.<name>`: the directory holding the `configs`
  # package (the repository root, also for configs/ablations/*.py) must be importable.
  folder = here = os.path.dirname(os.path.abspath(path))
  while os.path.basename(folder) != 'configs' and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  root = os.path.dirname(folder if os.path.basename(folder) == 'configs' else here)
  if root not in sys.path:
    sys.path.insert(0, root)
  name = '_dreamzero_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config()')
  return module


def _parse_value(key: str, text: str, old):
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # a bare string such as `--config.data.dir=/tmp/d`
  if old is None:
    return value
  if isinstance(old, bool):
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ('true', 'false'):
      return value.lower() == 'true'
  elif isinstance(old, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  elif isinstance(old, tuple) and isinstance(value, (list, tuple)):
    return tuple(value)
  elif isinstance(old, str):
    return str(value) if not isinstance(value, str) else value
  elif isinstance(value, type(old)) and not isinstance(value, bool):
    return value
  raise ConfigError(f'--config.{key}={text}: expected {type(old).__name__}, got {type(value).__name__}')


# Counts that a run divides by, loops over or builds arrays from: zero or less is never meant.
POSITIVE_FIELDS = (
    'train.steps', 'train.batch_size', 'train.checkpoint_every', 'train.keep_checkpoints',
    'train.log_every', 'train.grad_accum_steps', 'train.num_train_timesteps',
    'model.dim', 'model.num_layers', 'model.num_heads', 'model.ffn_dim', 'model.freq_dim',
    'model.text_dim', 'model.text_len', 'model.action_dim', 'model.state_dim',
    'model.embodiment_hidden', 'model.num_embodiments', 'model.in_channels', 'model.out_channels',
    'model.seq_pad_multiple',
    'video.height', 'video.width', 'video.vae_spatial', 'video.vae_temporal',
    'video.latent_channels', 'video.frames_per_chunk', 'video.max_chunks', 'video.action_horizon',
    'data.control_hz', 'data.frame_stride', 'data.action_dim', 'data.state_dim',
    'data.max_corrupt', 'data.anchor_stride', 'sampler.num_steps', 'serve.camera_height', 'serve.camera_width',
    'vae_train.steps', 'vae_train.batch_size', 'vae_train.checkpoint_every', 'vae_train.log_every')
# Counts for which 0 means "none" or "off".
NON_NEGATIVE_FIELDS = ('train.lora_rank', 'data.num_workers', 'data.relative_action_dims',
                       'model.image_dim', 'model.attention_block_q', 'model.inference_attention_block_q',
                       'vae_train.eval_every', 'vae_train.image_batch', 'vae_train.clip_frames')


def _lookup(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first count that is out of range (fields a config lacks pass)."""
  for fields, low, what in ((POSITIVE_FIELDS, 1, 'positive'), (NON_NEGATIVE_FIELDS, 0, '>= 0')):
    for key in fields:
      value = _lookup(config, key)
      if isinstance(value, int) and not isinstance(value, bool) and value < low:
        raise ConfigError(f'{key}: {value} (must be {what})')
  clip = _lookup(config, 'vae_train.clip_frames')
  if isinstance(clip, int) and clip and clip % 4 != 1:
    raise ConfigError(f'vae_train.clip_frames: {clip} (must be 1 + a multiple of 4, or 0 for the DiT\'s clip)')
  lr = _lookup(config, 'train.lr')
  if isinstance(lr, float) and not (lr == lr and abs(lr) != float('inf')):
    raise ConfigError(f'train.lr: {lr} (must be finite)')


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets config.<key> (dotted) from the string `text`; the key must exist."""
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f'unknown config key: {".".join(parents[:i + 1])}')
    node = node[part]
  if leaf not in node:
    raise ConfigError(f'unknown config key: {key}')
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f'config key {key} is a section, not a value')
  node[leaf] = _parse_value(key, text, node[leaf])


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and applies overrides given as `a.b=value` (or `--config.a.b=value`)."""
  path, _, arg = spec.partition(':')
  module = _import_config_module(path)
  try:
    config = module.get_config(arg or None)
  except (ValueError, KeyError) as e:  # an unknown variant (`tiny.py:bogus`) is the user's input
    raise ConfigError(f'--config {spec}: {e}') from None
  for item in overrides:
    item = item.removeprefix('--').removeprefix('config.')
    key, sep, text = item.partition('=')
    if not sep:
      raise ConfigError(f'override needs key=value: {item}')
    apply_override(config, key, text)
  validate(config)
  return config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` overrides from the other command-line arguments."""
  overrides, rest = [], []
  for a in argv:
    (overrides if a.startswith('--config.') else rest).append(a)
  return overrides, rest
