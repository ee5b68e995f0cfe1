"""Checkpoint key maps for the CLIP image encoder: transformers CLIPVisionModel names, and renamers
from the official Wan2.1 and open_clip names into them (streaming, splitting fused qkv).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

import numpy as np

from dreamzero_jax.models.weights.common import Target, torch_conv, torch_linear

_HF_LAYER = re.compile(r'(?:vision_model\.)?encoder\.layers\.(\d+)\.(.+)\.(weight|bias)')
_HF_LAYER_NAMES = {
    'layer_norm1': 'norm1', 'self_attn.q_proj': 'q', 'self_attn.k_proj': 'k', 'self_attn.v_proj': 'v',
    'self_attn.out_proj': 'o', 'layer_norm2': 'norm2', 'mlp.fc1': 'fc1', 'mlp.fc2': 'fc2',
}
_HF_GLOBAL = {
    'embeddings.class_embedding': Target(('class_embedding',)),
    'embeddings.patch_embedding.weight': Target(('patch_kernel',), torch_conv),
    'embeddings.position_embedding.weight': Target(('pos_embedding',)),
    'pre_layrnorm.weight': Target(('pre_norm_scale',)),
    'pre_layrnorm.bias': Target(('pre_norm_bias',)),
}


def transformers_key_map(key: str) -> Target | None:
  """transformers CLIPVisionModel names (with or without the `vision_model.` prefix)."""
  bare = key.removeprefix('vision_model.')
  if bare in _HF_GLOBAL:
    return _HF_GLOBAL[bare]
  match = _HF_LAYER.fullmatch(key)
  if match is None or match[2] not in _HF_LAYER_NAMES:
    return None
  base, kind = _HF_LAYER_NAMES[match[2]], match[3]
  if base.startswith('norm'):
    return Target((f'{base}_{"scale" if kind == "weight" else "bias"}',), layer=int(match[1]))
  if kind == 'bias':
    return Target((f'{base}_bias',), layer=int(match[1]))
  return Target((f'{base}_kernel',), torch_linear, layer=int(match[1]))


def unused_keys(num_layers: int) -> Callable[[str], bool]:
  """Transformers-named tensors the penultimate-layer encoder never reads: the last block and the
  final LayerNorm (and anything outside the vision tower of a full CLIPModel checkpoint)."""
  last = re.compile(rf'(?:vision_model\.)?encoder\.layers\.{num_layers - 1}\..+')

  def unused(key: str) -> bool:
    bare = key.removeprefix('vision_model.')
    return (bare.startswith('post_layernorm.') or bool(last.fullmatch(key))
            or key.startswith(('text_model.', 'visual_projection.', 'text_projection.', 'logit_scale')))

  return unused


def _split_qkv(prefix: str, kind: str, fused: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
  for name, part in zip(('q_proj', 'k_proj', 'v_proj'), np.split(np.asarray(fused), 3, axis=0)):
    yield f'{prefix}.self_attn.{name}.{kind}', part


_WAN_LAYER = re.compile(r'visual\.transformer\.(\d+)\.(.+)\.(weight|bias)')
_WAN_LAYER_NAMES = {'norm1': 'layer_norm1', 'attn.proj': 'self_attn.out_proj', 'norm2': 'layer_norm2',
                    'mlp.0': 'mlp.fc1', 'mlp.2': 'mlp.fc2'}
_WAN_GLOBAL = {'visual.patch_embedding.weight': 'embeddings.patch_embedding.weight',
               'visual.pre_norm.weight': 'pre_layrnorm.weight',
               'visual.pre_norm.bias': 'pre_layrnorm.bias',
               'visual.post_norm.weight': 'post_layernorm.weight',
               'visual.post_norm.bias': 'post_layernorm.bias'}


def wan_to_transformers(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
  """Renames the official Wan2.1 CLIP checkpoint (models_clip_open-clip-xlm-roberta-large-vit-huge-14
  .pth, Wan's own module names: visual.transformer.N.attn.to_qkv, ...) into transformers names,
  splitting fused qkv, streaming. The text tower and the contrastive head are dropped."""
  for key, value in tensors:
    if key == 'visual.cls_embedding':    # [1, 1, D]
      yield 'embeddings.class_embedding', np.asarray(value).reshape(-1)
    elif key == 'visual.pos_embedding':  # [1, tokens, D]
      yield 'embeddings.position_embedding.weight', np.asarray(value)[0]
    elif key in _WAN_GLOBAL:
      yield _WAN_GLOBAL[key], value
    elif match := _WAN_LAYER.fullmatch(key):
      prefix = f'encoder.layers.{match[1]}'
      if match[2] == 'attn.to_qkv':
        yield from _split_qkv(prefix, match[3], value)
      elif match[2] in _WAN_LAYER_NAMES:
        yield f'{prefix}.{_WAN_LAYER_NAMES[match[2]]}.{match[3]}', value
      else:
        yield key, value   # unknown: let the key map report it
    elif key.startswith('visual.') and key != 'visual.head':
      yield key, value
    # textual.*, log_scale, visual.head: not part of the image encoder


_OPEN_CLIP_LAYER = re.compile(r'visual\.transformer\.resblocks\.(\d+)\.(.+)')
_OPEN_CLIP_LAYER_NAMES = {
    'ln_1.weight': 'layer_norm1.weight', 'ln_1.bias': 'layer_norm1.bias',
    'attn.out_proj.weight': 'self_attn.out_proj.weight',
    'attn.out_proj.bias': 'self_attn.out_proj.bias',
    'ln_2.weight': 'layer_norm2.weight', 'ln_2.bias': 'layer_norm2.bias',
    'mlp.c_fc.weight': 'mlp.fc1.weight', 'mlp.c_fc.bias': 'mlp.fc1.bias',
    'mlp.c_proj.weight': 'mlp.fc2.weight', 'mlp.c_proj.bias': 'mlp.fc2.bias'}
_OPEN_CLIP_GLOBAL = {'visual.class_embedding': 'embeddings.class_embedding',
                     'visual.positional_embedding': 'embeddings.position_embedding.weight',
                     'visual.conv1.weight': 'embeddings.patch_embedding.weight',
                     'visual.ln_pre.weight': 'pre_layrnorm.weight',
                     'visual.ln_pre.bias': 'pre_layrnorm.bias',
                     'visual.ln_post.weight': 'post_layernorm.weight',
                     'visual.ln_post.bias': 'post_layernorm.bias'}


def open_clip_to_transformers(tensors: Iterable[tuple[str, np.ndarray]]
                              ) -> Iterator[tuple[str, np.ndarray]]:
  """Renames open_clip state-dict names (visual.transformer.resblocks.N.attn.in_proj_weight, ...)
  into transformers names, streaming; the text tower and `visual.proj` are dropped."""
  for key, value in tensors:
    if key in _OPEN_CLIP_GLOBAL:
      yield _OPEN_CLIP_GLOBAL[key], value
    elif match := _OPEN_CLIP_LAYER.fullmatch(key):
      prefix = f'encoder.layers.{match[1]}'
      if match[2] in ('attn.in_proj_weight', 'attn.in_proj_bias'):
        yield from _split_qkv(prefix, match[2].rsplit('_', 1)[1], value)
      elif match[2] in _OPEN_CLIP_LAYER_NAMES:
        yield f'{prefix}.{_OPEN_CLIP_LAYER_NAMES[match[2]]}', value
      else:
        yield key, value
    elif key.startswith('visual.') and key != 'visual.proj':
      yield key, value
