"""Imports modules of the official Wan code (PyPI `wan22`) as an independent reference: what the
parity tests compare the models with, and the official state-dict names and shapes
(bench/convert_memory.py builds its synthetic checkpoint from them).

`wan/__init__.py` pulls in GPU-only dependencies (flash_attn, torchvision, opencv, dashscope),
so empty `wan` / `wan.modules` packages are registered first and its flash_attention is replaced
by an fp32 scaled-dot-product equivalent that honours the key lengths.
"""
import importlib
import importlib.util
import os
import sys
import types


class WanNotInstalledError(ModuleNotFoundError):
  """The official Wan code (wan22) is not installed."""


def _flash_attention_fp32(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None,
                          q_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                          dtype=None, version=None):
  import torch
  del q_lens, dropout_p, q_scale, window_size, deterministic, dtype, version
  b, lq, _, _ = q.shape
  lk = k.shape[1]
  mask = None
  if k_lens is not None:
    mask = torch.arange(lk)[None, :] < k_lens[:, None].to(torch.long)
    mask = mask[:, None, None, :].expand(b, 1, lq, lk)
  out = torch.nn.functional.scaled_dot_product_attention(
      q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
      attn_mask=mask, is_causal=causal, scale=softmax_scale)
  return out.transpose(1, 2).contiguous()


def _wan_root() -> str:
  if getattr(sys.modules.get('wan'), '_dreamzero_stub', False):
    return sys.modules['wan'].__path__[0]
  spec = importlib.util.find_spec('wan')
  if spec is None:
    raise WanNotInstalledError('official Wan code not installed: pip install --no-deps wan22==2.2.11')
  return os.path.dirname(spec.origin)


def import_wan(name: str):
  """Returns `wan.<name>` (e.g. 'modules.model') from the installed wan22 distribution
  (WanNotInstalledError without it)."""
  root = _wan_root()
  for pkg, path in (('wan', root), ('wan.modules', os.path.join(root, 'modules'))):
    if pkg not in sys.modules or not getattr(sys.modules[pkg], '_dreamzero_stub', False):
      module = types.ModuleType(pkg)
      module.__path__ = [path]
      module._dreamzero_stub = True
      sys.modules[pkg] = module
  attention = importlib.import_module('wan.modules.attention')
  attention.flash_attention = _flash_attention_fp32
  import torch
  # wan/modules/t5.py evaluates torch.cuda.current_device() as a default argument at import.
  current_device = torch.cuda.current_device
  torch.cuda.current_device = lambda: 'cpu'
  try:
    module = importlib.import_module(f'wan.{name}')
  finally:
    torch.cuda.current_device = current_device
  if hasattr(module, 'flash_attention'):
    module.flash_attention = _flash_attention_fp32
  return module
