"""Control-step latency of the policy, broken into VAE encode, cache write, denoise, action decode.

  python bench/policy_latency.py [--config configs/dreamzero_14b_droid.py] [--config.x=v ...]

Random weights (built on the device under jit, params in model.param_dtype). On a GPU run it with
the 14B DROID config twice: Flash (--config.sampler.num_steps=1 --config.sampler.dit_step_mask=1
--config.sampler.kind=euler) and the official setting (the config's default: 16-step UniPC, DiT on
8, CFG 5 batched), and run bench/_peers/torch_dit_forward.py (a copy of shared/peers) in the same
command for the PyTorch peer. Without a GPU it times the tiny config on the CPU. Prints a table.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dreamzero_jax import encoders  # noqa: E402
from dreamzero_jax.config import load_config, split_config_args  # noqa: E402
from dreamzero_jax.inference.policy import Policy  # noqa: E402
from dreamzero_jax.models.dit import build_dit  # noqa: E402


def timed(fn, *args, repeats=5):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times)), out


def main(argv):
  overrides, rest = split_config_args(argv)
  gpu = jax.default_backend() == 'gpu'
  spec = rest[rest.index('--config') + 1] if '--config' in rest else (
      'configs/dreamzero_14b_droid.py' if gpu else 'configs/tiny.py')
  cfg = load_config(spec, (['model.param_dtype="bfloat16"'] if gpu else []) + overrides)
  model = nnx.jit(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0)))()
  frozen = nnx.jit(lambda: encoders.FrozenEncoders(cfg, rngs=nnx.Rngs(1)))()
  e = __import__('dreamzero_jax.datasets.embodiments', fromlist=['get']).get(cfg.data.embodiment)
  stats = {'state': dict(q01=[-1.0] * e.state_dim, q99=[1.0] * e.state_dim),
           'action': dict(q01=[-1.0] * e.action_dim, q99=[1.0] * e.action_dim)}
  policy = Policy(cfg, model, frozen, stats)
  v = cfg.video
  rng = np.random.default_rng(0)
  first = rng.uniform(-1, 1, (v.height, v.width, 3)).astype(np.float32)
  frames = jnp.asarray(rng.uniform(-1, 1, (1, v.frames_per_chunk, v.height, v.width, 3)), jnp.float32)
  state = np.zeros(e.state_dim, np.float32)
  ep = policy.reset('pick up the cup', first, state)

  vae = frozen.vae
  vae_ms, (latents, _) = timed(jax.jit(vae.encode_stream), ep.vae_cache, frames)
  dup = lambda x: jnp.broadcast_to(x, (policy.batch, *x.shape[1:]))
  cond = None if ep.cond is None else dup(ep.cond[:, 1:1 + policy.lf])
  write = jax.jit(lambda cache, lat, c: model.write_clean_frames(lat, cache, ep.cross_kv, chunk=jnp.int32(0),
                                                                 cond=c))
  write_ms, _ = timed(write, ep.cache, dup(latents), cond)
  denoise = lambda: policy._denoise(policy._model_state, ep.cache, ep.cross_kv, ep.cond,
                                    policy._normalised_state(state), jnp.int32(e.id), jnp.int32(0),
                                    jax.random.key(0))
  denoise_ms, (_, actions, evaluations) = timed(denoise)
  actions = np.asarray(actions[0])
  t = time.perf_counter()
  for _ in range(20):
    policy.postprocess(actions, state)
  decode_ms = 1e3 * (time.perf_counter() - t) / 20
  device = jax.devices()[0].device_kind
  s = cfg.sampler
  print('| device | config | sampler | VAE encode ms | cache write ms | denoise ms | action decode ms | total ms |')
  print('|---|---|---|---|---|---|---|---|')
  total = vae_ms + write_ms + denoise_ms + decode_ms
  print(f'| {device} | {spec} | {s.kind} {s.num_steps} steps, DiT x{int(evaluations)}, cfg {s.cfg_scale}'
        f'{" batched" if policy.batch == 2 else ""} | {vae_ms:.1f} | {write_ms:.1f} | {denoise_ms:.1f} | '
        f'{decode_ms:.2f} | {total:.1f} |')


if __name__ == '__main__':
  main(sys.argv[1:])
