"""`python -m dreamzero_jax.summary --config C`: the parameter table of a config's DiT.

Uses abstract shapes (nnx.eval_shape), so it is instant even for 14B. The Wan backbone and
DreamZero's additions are counted separately; the last line is `total_params=<int>`.
"""
from __future__ import annotations

import argparse
import collections
import sys

import numpy as np
from flax import nnx

from dreamzero_jax import settings
from dreamzero_jax.config import ConfigError, load_config, split_config_args
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.models.weights import dit_keys
from dreamzero_jax.settings import ModelSettings


def parameter_table(model_cfg: ModelSettings) -> list[tuple[str, tuple, int]]:
  """(path, shape, count) of every parameter, from abstract shapes."""
  abstract = nnx.eval_shape(lambda: build_dit(model_cfg, rngs=nnx.Rngs(0)))
  rows = []
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    shape = tuple(var.get_value().shape if hasattr(var, 'get_value') else var.value.shape)
    rows.append(('/'.join(map(str, path)), shape, int(np.prod(shape))))
  return rows


def summarize(model_cfg: ModelSettings) -> dict[str, int]:
  rows = parameter_table(model_cfg)
  modules = collections.OrderedDict()
  for path, _, n in rows:
    top = path.split('/')[0]
    if top == 'blocks':
      top = 'blocks/' + path.split('/')[1]
    modules[top] = modules.get(top, 0) + n
  dreamzero = sum(n for p, _, n in rows if dit_keys.is_dreamzero_key(tuple(p.split('/'))))
  total = sum(n for _, _, n in rows)
  return dict(modules=modules, wan_backbone=total - dreamzero, dreamzero=dreamzero, total=total)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog='python -m dreamzero_jax.summary', description=__doc__)
  parser.add_argument('--config', required=True, help='configs/NAME.py[:ARG]')
  args = parser.parse_args(rest)
  try:
    m = settings.from_config(load_config(args.config, overrides)).model
    s = summarize(m)
  except (ConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'config {args.config}: dim={m.dim} layers={m.num_layers} heads={m.num_heads} ffn={m.ffn_dim} '
        f'in={m.in_channels} out={m.out_channels} image_dim={m.image_dim} embodiments={m.num_embodiments}')
  print(f'{"module":<40}{"params":>18}')
  for name, n in s['modules'].items():
    print(f'{name:<40}{n:>18,}')
  print(f'{"wan backbone":<40}{s["wan_backbone"]:>18,}')
  print(f'{"dreamzero additions":<40}{s["dreamzero"]:>18,}')
  print(f'wan_backbone_params={s["wan_backbone"]}')
  print(f'dreamzero_params={s["dreamzero"]}')
  print(f'total_params={s["total"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
