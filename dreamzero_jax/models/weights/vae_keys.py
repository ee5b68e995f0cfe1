"""Checkpoint key maps for the Wan VAE: official Wan (Wan2.1_VAE.pth / Wan2.2_VAE.pth) and diffusers
AutoencoderKLWan names.

Stage i of the encoder holds num_res_blocks resnets then its downsampler; stage i of the decoder
num_res_blocks + 1 resnets then its upsampler. Wan2.1 checkpoints list the encoder (both) and the
decoder (official) as one flat sequence.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from dreamzero_jax.models.weights.common import Target, torch_conv
from dreamzero_jax.settings import VAESettings

KINDS = ('wan2.1', 'wan2.2')   # the vae.kind values whose checkpoint layouts these maps place

_OFFICIAL_RESIDUAL = {'residual.0': 'norm1', 'residual.2': 'conv1', 'residual.3': 'norm2',
                      'residual.6': 'conv2', 'shortcut': 'shortcut'}
_DIFFUSERS_RESIDUAL = {'norm1': 'norm1', 'conv1': 'conv1', 'norm2': 'norm2', 'conv2': 'conv2',
                       'conv_shortcut': 'shortcut'}
_RESAMPLE = {'resample.1': 'conv', 'time_conv': 'time_conv'}
_ATTENTION = {'norm': 'norm', 'to_qkv': 'qkv', 'proj': 'proj'}


def _attention_weight(w: np.ndarray) -> np.ndarray:
  """torch 1x1 Conv2d weight [out, in, 1, 1] -> Dense kernel [in, out]."""
  return np.ascontiguousarray(w[:, :, 0, 0].T)


def _leaf(path: tuple, param: str) -> Target | None:
  if param == 'gamma':
    return Target(path + ('gamma',), lambda g: g.reshape(-1))
  if param == 'bias':
    return Target(path + ('bias',))
  if param == 'weight':
    attention = path[-1] in ('qkv', 'proj')
    return Target(path + ('kernel',), _attention_weight if attention else torch_conv)
  return None


def _module(path: tuple, rest: str, table: dict[str, str]) -> Target | None:
  """(path, 'residual.2.weight') -> Target(path + ('conv1', 'kernel')) through `table`."""
  prefix, _, param = rest.rpartition('.')
  return _leaf(path + (table[prefix],), param) if prefix in table else None


def _stage_entry(part: str, stage: int, index: int, rest: str, stage_len: int,
                 residual: dict[str, str]) -> Target | None:
  """Entry `index` of a stage: a resnet, or the resampler when it is the stage's last entry."""
  path = (part, 'stages', stage)
  if index == stage_len - 1:
    return _module(path + ('resample',), rest, _RESAMPLE)
  return _module(path + ('resnets', index), rest, residual)


def _stage_lengths(cfg_vae: VAESettings) -> dict[str, int]:
  return {'encoder': cfg_vae.num_res_blocks + 1, 'decoder': cfg_vae.num_res_blocks + 2}


def _shared_key(part: str, rest: str, residual: dict[str, str], names: dict[str, str]
                ) -> Target | None:
  """Keys outside the stages: conv in/out, norm out and the middle blocks."""
  for theirs, ours in names.items():
    if m := re.fullmatch(re.escape(theirs) + r'\.(.+)', rest):
      if ours in ('conv_in', 'conv_out', 'norm_out'):
        return _leaf((part, ours), m[1])
      return _module((part, ours), m[1], _ATTENTION if ours == 'mid_attn' else residual)
  return None


def official_key_map(cfg_vae: VAESettings) -> Callable[[str], Target | None]:
  """Key map for the official Wan checkpoints (modules.vae2_1 / vae2_2 WanVAE_ names)."""
  if cfg_vae.kind not in KINDS:
    raise ValueError(f'no official key map for vae.kind={cfg_vae.kind!r}')
  lengths = _stage_lengths(cfg_vae)
  names = {'conv1': 'conv_in', 'middle.0': 'mid_block1', 'middle.1': 'mid_attn',
           'middle.2': 'mid_block2', 'head.0': 'norm_out', 'head.2': 'conv_out'}

  def key_map(key: str) -> Target | None:
    head, _, param = key.partition('.')
    if head in ('conv1', 'conv2'):
      return _leaf(('quant_conv' if head == 'conv1' else 'post_quant_conv',), param)
    m = re.fullmatch(r'(encoder|decoder)\.(.+)', key)
    if m is None:
      return None
    part, rest = m.groups()
    n = lengths[part]
    if m := re.fullmatch(r'(?:down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.+)',
                         rest):  # Wan2.2: nested stages
      return _stage_entry(part, int(m[1]), int(m[2]), m[3], n, _OFFICIAL_RESIDUAL)
    if m := re.fullmatch(r'(?:down|up)samples\.(\d+)\.(.+)', rest):  # Wan2.1: flat
      stage, index = divmod(int(m[1]), n)
      return _stage_entry(part, stage, index, m[2], n, _OFFICIAL_RESIDUAL)
    return _shared_key(part, rest, _OFFICIAL_RESIDUAL, names)

  return key_map


def diffusers_key_map(cfg_vae: VAESettings) -> Callable[[str], Target | None]:
  """Key map for diffusers AutoencoderKLWan state_dict names."""
  if cfg_vae.kind not in KINDS:
    raise ValueError(f'no diffusers key map for vae.kind={cfg_vae.kind!r}')
  lengths = _stage_lengths(cfg_vae)
  names = {'conv_in': 'conv_in', 'mid_block.resnets.0': 'mid_block1',
           'mid_block.attentions.0': 'mid_attn', 'mid_block.resnets.1': 'mid_block2',
           'norm_out': 'norm_out', 'conv_out': 'conv_out'}

  def key_map(key: str) -> Target | None:
    head, _, param = key.partition('.')
    if head in ('quant_conv', 'post_quant_conv'):
      return _leaf((head,), param)
    m = re.fullmatch(r'(encoder|decoder)\.(.+)', key)
    if m is None:
      return None
    part, rest = m.groups()
    n = lengths[part]
    if m := re.fullmatch(r'(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)', rest):
      return _stage_entry(part, int(m[1]), int(m[2]), m[3], n, _DIFFUSERS_RESIDUAL)
    if m := re.fullmatch(
        r'(?:down|up)_blocks\.(\d+)\.(?:downsampler|upsampler|upsamplers\.0)\.(.+)', rest):
      return _stage_entry(part, int(m[1]), n - 1, m[2], n, _DIFFUSERS_RESIDUAL)
    if m := re.fullmatch(r'down_blocks\.(\d+)\.(.+)', rest):  # Wan2.1 encoder: flat
      stage, index = divmod(int(m[1]), n)
      return _stage_entry(part, stage, index, m[2], n, _DIFFUSERS_RESIDUAL)
    return _shared_key(part, rest, _DIFFUSERS_RESIDUAL, names)

  return key_map
