"""Checkpoint key maps for the DiT: official Wan names and diffusers names (WanTransformer3DModel).

Diffusers keys are first renamed to the official ones, so one table places both. The converter and
the parity tests use these maps with common.load_tensors.
"""
from __future__ import annotations

import re

import numpy as np

from dreamzero_jax.models.weights.common import Target, torch_linear


def _patch_kernel(w: np.ndarray) -> np.ndarray:
  """Conv3d weight [D, C, pt, ph, pw] -> Dense kernel [(pt, ph, pw, C), D]."""
  return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]))


def _squeeze0(w: np.ndarray) -> np.ndarray:
  return w.reshape(w.shape[1:]) if w.ndim == 3 else w


_LINEAR = {'weight': ('kernel', torch_linear), 'bias': ('bias', lambda x: x)}
_NORM = {'weight': ('scale', lambda x: x), 'bias': ('bias', lambda x: x)}

# Official Wan module path -> (our path, parameter kind).
_TOP = {
    'patch_embedding': (('patch_embedding',), 'patch'),
    'text_embedding.0': (('text_embedding1',), 'linear'),
    'text_embedding.2': (('text_embedding2',), 'linear'),
    'time_embedding.0': (('time_embedding1',), 'linear'),
    'time_embedding.2': (('time_embedding2',), 'linear'),
    'time_projection.1': (('time_projection',), 'linear'),
    'img_emb.proj.0': (('img_norm1',), 'norm'),
    'img_emb.proj.1': (('img_proj1',), 'linear'),
    'img_emb.proj.3': (('img_proj2',), 'linear'),
    'img_emb.proj.4': (('img_norm2',), 'norm'),
    'head.head': (('head',), 'linear'),
}
_BLOCK = {
    **{f'self_attn.{n}': (('self_attn', n), 'linear') for n in 'qkvo'},
    **{f'cross_attn.{n}': (('cross_attn', n), 'linear') for n in ('q', 'k', 'v', 'o', 'k_img', 'v_img')},
    'self_attn.norm_q': (('self_attn', 'norm_q'), 'norm'),
    'self_attn.norm_k': (('self_attn', 'norm_k'), 'norm'),
    'cross_attn.norm_q': (('cross_attn', 'norm_q'), 'norm'),
    'cross_attn.norm_k': (('cross_attn', 'norm_k'), 'norm'),
    'cross_attn.norm_k_img': (('cross_attn', 'norm_k_img'), 'norm'),
    'norm3': (('norm3',), 'norm'),
    'ffn.0': (('ffn1',), 'linear'),
    'ffn.2': (('ffn2',), 'linear'),
}

# diffusers -> official renames (applied to the module path, before the parameter name).
_DIFFUSERS_TOP = {
    'condition_embedder.text_embedder.linear_1': 'text_embedding.0',
    'condition_embedder.text_embedder.linear_2': 'text_embedding.2',
    'condition_embedder.time_embedder.linear_1': 'time_embedding.0',
    'condition_embedder.time_embedder.linear_2': 'time_embedding.2',
    'condition_embedder.time_proj': 'time_projection.1',
    'condition_embedder.image_embedder.norm1': 'img_emb.proj.0',
    'condition_embedder.image_embedder.ff.net.0.proj': 'img_emb.proj.1',
    'condition_embedder.image_embedder.ff.net.2': 'img_emb.proj.3',
    'condition_embedder.image_embedder.norm2': 'img_emb.proj.4',
    'proj_out': 'head.head',
    'scale_shift_table': 'head.modulation',
}
_DIFFUSERS_BLOCK = {
    'attn1.to_q': 'self_attn.q', 'attn1.to_k': 'self_attn.k', 'attn1.to_v': 'self_attn.v',
    'attn1.to_out.0': 'self_attn.o', 'attn1.norm_q': 'self_attn.norm_q', 'attn1.norm_k': 'self_attn.norm_k',
    'attn2.to_q': 'cross_attn.q', 'attn2.to_k': 'cross_attn.k', 'attn2.to_v': 'cross_attn.v',
    'attn2.to_out.0': 'cross_attn.o', 'attn2.norm_q': 'cross_attn.norm_q', 'attn2.norm_k': 'cross_attn.norm_k',
    'attn2.add_k_proj': 'cross_attn.k_img', 'attn2.add_v_proj': 'cross_attn.v_img',
    'attn2.norm_added_k': 'cross_attn.norm_k_img',
    'norm2': 'norm3', 'ffn.net.0.proj': 'ffn.0', 'ffn.net.2': 'ffn.2', 'scale_shift_table': 'modulation',
}
_BLOCK_KEY = re.compile(r'^blocks\.(\d+)\.(.+)$')


def diffusers_to_wan_key(key: str) -> str:
  """A diffusers WanTransformer3DModel key in official Wan naming (unknown keys pass through)."""
  m = _BLOCK_KEY.match(key)
  if m:
    layer, rest = m.groups()
    module, _, name = rest.rpartition('.')
    if rest in _DIFFUSERS_BLOCK:  # a bare parameter (scale_shift_table)
      return f'blocks.{layer}.{_DIFFUSERS_BLOCK[rest]}'
    return f'blocks.{layer}.{_DIFFUSERS_BLOCK.get(module, module)}.{name}'
  if key in _DIFFUSERS_TOP:
    return _DIFFUSERS_TOP[key]
  module, _, name = key.rpartition('.')
  return f'{_DIFFUSERS_TOP.get(module, module)}.{name}'


def _target(path, kind, name, layer=None):
  if kind == 'patch':
    return Target(path + ('kernel',), _patch_kernel, layer) if name == 'weight' else (
        Target(path + ('bias',), layer=layer) if name == 'bias' else None)
  table = _LINEAR if kind == 'linear' else _NORM
  if name not in table:
    return None
  leaf, fn = table[name]
  return Target(path + (leaf,), fn, layer)


def wan_key_map(key: str) -> Target | None:
  """Official Wan DiT key -> Target in DreamZeroDiT (None for keys the model does not have)."""
  m = _BLOCK_KEY.match(key)
  if m:
    layer, rest = int(m.group(1)), m.group(2)
    if rest == 'modulation':
      return Target(('blocks', 'modulation'), _squeeze0, layer)
    module, _, name = rest.rpartition('.')
    if module not in _BLOCK:
      return None
    path, kind = _BLOCK[module]
    return _target(('blocks',) + path, kind, name, layer)
  if key == 'head.modulation':
    return Target(('head_modulation',), _squeeze0)
  module, _, name = key.rpartition('.')
  if module not in _TOP:
    return None
  path, kind = _TOP[module]
  return _target(path, kind, name)


def diffusers_key_map(key: str) -> Target | None:
  return wan_key_map(diffusers_to_wan_key(key))


def is_dreamzero_key(path: tuple) -> bool:
  """Parameters DreamZero adds to the Wan backbone (not in Wan checkpoints)."""
  return path[0] in ('action_encoder', 'state_encoder', 'action_decoder')
