"""Streaming Wan VAE encode: 4 new frames with the feature cache, the per-chunk cost at inference.

Every inference chunk encodes the newly observed frames into the cache (docs/model.md); this
times that step at the config's canvas size with random weights, jitted, and prints a table.

  python bench/vae_encode.py [--config configs/dreamzero_14b_droid.py] [--runs 5] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dreamzero_jax import settings as settings_lib  # noqa: E402
from dreamzero_jax.config import load_config, split_config_args  # noqa: E402
from dreamzero_jax.models.vae import FRAMES_PER_LATENT, WanVAE  # noqa: E402


def main(argv: list[str]) -> None:
  overrides, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/dreamzero_14b_droid.py')
  parser.add_argument('--runs', type=int, default=5, help='timed runs after one warm-up')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  args = parser.parse_args(rest)
  cfg = settings_lib.from_config(load_config(args.config, overrides))
  h, w = cfg.video.height, cfg.video.width
  dtype = jnp.dtype(args.dtype)

  vae = WanVAE(cfg.vae, dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(vae)
  step = jax.jit(lambda s, c, f: nnx.merge(graphdef, s).encode_stream(c, f))
  key0, key1 = jax.random.split(jax.random.key(0))
  first = jax.random.uniform(key0, (args.batch, 1, h, w, 3), minval=-1, maxval=1)
  frames = jax.random.uniform(key1, (args.batch, FRAMES_PER_LATENT, h, w, 3), minval=-1, maxval=1)

  # The cache a real stream carries: after the clip's first frame.
  _, cache = step(state, vae.init_encode_cache(args.batch, h, w), first)
  lowered = step.lower(state, cache, frames)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  flops = (cost[0] if isinstance(cost, list) else cost).get('flops', float('nan'))

  print(f'compiled in {compile_s:.1f} s', file=sys.stderr, flush=True)
  jax.block_until_ready(compiled(state, cache, frames))  # warm-up
  times = []
  for i in range(args.runs):
    t0 = time.perf_counter()
    latents, _ = compiled(state, cache, frames)
    jax.block_until_ready(latents)
    times.append(time.perf_counter() - t0)
    print(f'run {i}: {times[-1] * 1e3:.0f} ms', file=sys.stderr, flush=True)
  median = statistics.median(times)

  device = jax.devices()[0]
  print('| device | dtype | batch x frames x HxW | latents | compile s | median ms | min ms '
        '| GFLOP | GFLOP/s |')
  print('|---|---|---|---|---|---|---|---|---|')
  print(f'| {device.device_kind} ({device.platform}) | {args.dtype} | {args.batch} x '
        f'{FRAMES_PER_LATENT} x {h}x{w} | {tuple(latents.shape)} | {compile_s:.1f} | '
        f'{median * 1e3:.0f} | {min(times) * 1e3:.0f} | {flops / 1e9:.0f} | '
        f'{flops / median / 1e9:.0f} |')
  print(f'runs_ms={[round(t * 1e3) for t in times]}')


if __name__ == '__main__':
  main(sys.argv[1:])
