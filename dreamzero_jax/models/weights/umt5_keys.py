"""Checkpoint key maps for the umT5 text encoder: transformers UMT5EncoderModel and official Wan names."""
from __future__ import annotations

import re

from dreamzero_jax.models import umt5
from dreamzero_jax.models.weights.common import Target, torch_linear

_HF_LAYER = re.compile(r'encoder\.block\.(\d+)\.layer\.(\d)\.(.+)\.weight')
_HF_NAMES = {
    (0, 'layer_norm'): 'attn_norm', (0, 'SelfAttention.q'): 'q', (0, 'SelfAttention.k'): 'k',
    (0, 'SelfAttention.v'): 'v', (0, 'SelfAttention.o'): 'o',
    (0, 'SelfAttention.relative_attention_bias'): 'rel_bias',
    (1, 'layer_norm'): 'ffn_norm', (1, 'DenseReluDense.wi_0'): 'gate',
    (1, 'DenseReluDense.wi_1'): 'up', (1, 'DenseReluDense.wo'): 'down',
}
_WAN_LAYER = re.compile(r'blocks\.(\d+)\.(.+)\.weight')
_WAN_NAMES = {
    'norm1': 'attn_norm', 'attn.q': 'q', 'attn.k': 'k', 'attn.v': 'v', 'attn.o': 'o',
    'pos_embedding.embedding': 'rel_bias', 'norm2': 'ffn_norm', 'ffn.gate.0': 'gate',
    'ffn.fc1': 'up', 'ffn.fc2': 'down',
}


def _layer_target(name: str | None, layer: int) -> Target | None:
  if name is None:
    return None
  return Target((name,), torch_linear if name in umt5.LINEAR else (lambda x: x), layer=layer)


def transformers_key_map(key: str) -> Target | None:
  """transformers UMT5EncoderModel / UMT5Model names (shared.weight, encoder.block.N.layer.M...)."""
  if key in ('shared.weight', 'encoder.embed_tokens.weight'):
    return Target(('embedding',))
  if key == 'encoder.final_layer_norm.weight':
    return Target(('final_norm',))
  match = _HF_LAYER.fullmatch(key)
  if match is None:
    return None
  return _layer_target(_HF_NAMES.get((int(match[2]), match[3])), int(match[1]))


def transformers_unused(key: str) -> bool:
  """Keys of a full UMT5 (encoder-decoder) checkpoint that the encoder does not use."""
  return key.startswith(('decoder.', 'lm_head.'))


def wan_key_map(key: str) -> Target | None:
  """Official Wan names (models_t5_umt5-xxl-enc-bf16.pth: token_embedding, blocks.N.attn.q, ...)."""
  if key == 'token_embedding.weight':
    return Target(('embedding',))
  if key == 'norm.weight':
    return Target(('final_norm',))
  match = _WAN_LAYER.fullmatch(key)
  if match is None:
    return None
  return _layer_target(_WAN_NAMES.get(match[2]), int(match[1]))
