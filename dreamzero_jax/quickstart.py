"""The default job: `python -m dreamzero_jax.quickstart --out DIR`.

Runs the tiny DreamZero model on a teacher-forcing sequence of random latents on the CPU and
prints the parameter summary and the output shapes. (The Meta-World build -> train -> closed-loop
evaluation run replaces this once eval.py lands; see README.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dreamzero_jax import summary
from dreamzero_jax.config import load_config, split_config_args
from dreamzero_jax.models.dit import build_dit


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog='python -m dreamzero_jax.quickstart', description=__doc__)
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--out', default='runs/quickstart')
  args = parser.parse_args(rest)
  cfg = load_config(args.config, overrides)
  summary.main(['--config', args.config, *overrides])

  m, v = cfg.model, cfg.video
  k = v.max_chunks
  f = 1 + k * v.frames_per_chunk // v.vae_temporal
  h, w = v.height // v.vae_spatial, v.width // v.vae_spatial
  rng = jax.random.split(jax.random.key(cfg.seed), 8)
  model = build_dit(m, rngs=nnx.Rngs(cfg.seed))
  inputs = dict(
      clean=jax.random.normal(rng[0], (1, f, h, w, v.latent_channels)),
      noisy=jax.random.normal(rng[1], (1, f, h, w, v.latent_channels)),
      video_t=jnp.full((1, f), 500.0),
      actions=jax.random.normal(rng[2], (1, k * v.action_horizon, m.action_dim)),
      action_t=jnp.full((1, k * v.action_horizon), 500.0),
      state=jax.random.normal(rng[3], (1, k, m.state_dim)),
      embodiment_id=jnp.zeros((1,), jnp.int32),
      text=jax.random.normal(rng[4], (1, m.text_len, m.text_dim)),
      image=jax.random.normal(rng[5], (1, m.image_tokens, m.image_dim)) if m.image_dim else None,
      cond=jax.random.normal(rng[6], (1, f, h, w, m.in_channels - v.latent_channels))
      if m.in_channels > v.latent_channels else None)
  start = time.perf_counter()
  video_v, action_v = jax.jit(model.teacher_forcing)(**inputs)
  jax.block_until_ready(action_v)
  seconds = time.perf_counter() - start
  report = dict(config=args.config, video_velocity=list(video_v.shape), action_velocity=list(action_v.shape),
                finite=bool(jnp.isfinite(video_v).all() and jnp.isfinite(action_v).all()),
                seconds_with_compile=round(seconds, 2), backend=jax.default_backend())
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'report.json')
  with open(path, 'w') as fh:
    json.dump(report, fh, indent=1)
  print(json.dumps(report))
  print(f'report written to {path}')
  return 0 if report['finite'] else 1


if __name__ == '__main__':
  sys.exit(main())
