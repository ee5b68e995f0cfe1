"""LoRA on the DiT's block kernels: factors A [layers, in, r] and B [layers, r, out] beside a frozen
base, merged as base + (alpha / r) A B. Training learns the factors (training/trainer.py); serving merges
them into the base it restored (serving/loading.py)."""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


def _flat(tree: Params, prefix=()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def _unflat(flat: dict[tuple, Any]) -> Params:
  tree: Params = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def lora_target_paths(params: Params, targets: str) -> list[tuple]:
  """Kernels of the blocks matched by train.lora_targets (comma list of q,k,v,o,ffn)."""
  names = [t.strip() for t in targets.split(',') if t.strip()]
  pattern = re.compile(r'^blocks/(self_attn|cross_attn)/(' + '|'.join(n for n in names if n != 'ffn') +
                       r')/kernel$' + (r'|^blocks/ffn[12]/kernel$' if 'ffn' in names else ''))
  paths = [p for p in _flat(params) if pattern.match('/'.join(map(str, p)))]
  if not paths:
    raise ValueError(f'train.lora_targets={targets!r} matches no parameter')
  return paths


def init_lora(params: Params, targets: str, rank: int, rng: jax.Array) -> Params:
  """A [layers, in, r] ~ N(0, 1/in), B [layers, r, out] = 0: the adapted model starts as the base."""
  flat = _flat(params)
  lora = {}
  for i, path in enumerate(lora_target_paths(params, targets)):
    layers, din, dout = flat[path].shape
    a = jax.random.normal(jax.random.fold_in(rng, i), (layers, din, rank)) / np.sqrt(din)
    lora['/'.join(map(str, path))] = {'a': a, 'b': jnp.zeros((layers, rank, dout))}
  return lora


def merge_lora(frozen: Params, lora: Params, alpha: float, rank: int) -> Params:
  """The base with each factor pair merged into its kernel: W + (alpha / rank) A B."""
  flat = _flat(frozen)
  for key, ab in lora.items():
    path = tuple(key.split('/'))
    flat[path] = flat[path] + (alpha / rank) * jnp.einsum('lir,lro->lio', ab['a'], ab['b'])
  return _unflat(flat)
