"""Control-step latency of the policy, broken into VAE encode, cache write, denoise, action decode.

Times the policy's own chunk functions (inference/rollout.py: observe's two halves, encode_observed
and write_observed, then denoise) on the episode a Policy starts, and the policy's action decode.

  python bench/policy_latency.py [--config configs/dreamzero_14b_droid.py] [--ticks N] [--config.x=v ...]

Random weights (built on the device under jit, params in model.param_dtype). On a GPU run it with
the 14B DROID config twice: Flash (--config.sampler.num_steps=1 --config.sampler.dit_step_mask=1
--config.sampler.kind=euler) and the official setting (the config's default: 16-step UniPC, DiT on
8, CFG 5 batched); `bash bench/gpu.sh` does, with --ticks. Without a GPU it times the tiny config
on the CPU. Prints a table.

--ticks N: instead of the breakdown, the whole control step as the server runs it (rollout.control_step:
observe + denoise as one program, the caches donated tick to tick) for N ticks after 2 warm-up ticks:
p50 / p99 latency, the device's memory in use with the episode started, and its peak over the
process (memory_stats; none on the CPU), which includes building the random weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dreamzero_jax import embodiments  # noqa: E402
from dreamzero_jax import settings as settings_lib  # noqa: E402
from dreamzero_jax.config import load_config, split_config_args  # noqa: E402
from dreamzero_jax.inference import rollout  # noqa: E402
from dreamzero_jax.inference.policy import Policy  # noqa: E402
from dreamzero_jax.models import encoders  # noqa: E402
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


def _gib(stats: dict | None, key: str) -> str:
  return f'{stats[key] / 2 ** 30:.2f}' if stats and key in stats else 'n/a'


def control_step_ticks(policy: Policy, first, frames, state, embodiment_id: int, ticks: int) -> dict:
  """Times rollout.control_step over 2 warm-up + `ticks` ticks, chunk after chunk of an episode; a
  full context window restarts the episode (policy.reset, untimed, as the server's reset)."""
  spec, (dit, vae, _) = policy.spec, policy.networks
  times, ep, in_use = [], None, None
  windows = policy.settings.video.max_chunks - 1  # observed chunks 0 .. max_chunks - 2, each denoising the next
  for tick in range(2 + ticks):
    chunk = tick % windows
    if chunk == 0:
      ep = policy.reset('pick up the cup', first, state, seed=tick)
      cache, vae_cache = ep.cache, ep.vae_cache
      in_use = in_use or jax.devices()[0].memory_stats()
    start = time.perf_counter()
    cache, vae_cache, _, actions, evaluations = rollout.control_step(
        spec, dit, vae, cache, ep.cross_kv, vae_cache, ep.i2v_cond, frames, jnp.int32(chunk),
        policy.normalised_state(state), jnp.int32(embodiment_id), jax.random.key(tick))
    jax.block_until_ready(actions)
    if tick >= 2:
      times.append(1e3 * (time.perf_counter() - start))
  peak = jax.devices()[0].memory_stats()
  return dict(p50=float(np.percentile(times, 50)), p99=float(np.percentile(times, 99)),
              evaluations=int(evaluations), in_use_gib=_gib(in_use, 'bytes_in_use'),
              peak_gib=_gib(peak, 'peak_bytes_in_use'))


def main(argv):
  overrides, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog='python bench/policy_latency.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', help='configs/NAME.py[:ARG] (default: the 14B DROID config on a GPU, else '
                      'configs/tiny.py); --config.a.b=v overrides follow it')
  parser.add_argument('--ticks', type=int, default=0, help='time the whole control step for this many ticks '
                      '(p50/p99, device memory) instead of the breakdown')
  gpu = jax.default_backend() == 'gpu'
  args = parser.parse_args(rest)
  config_path = args.config or ('configs/dreamzero_14b_droid.py' if gpu else 'configs/tiny.py')
  overrides = (['model.param_dtype="bfloat16"'] if gpu else []) + overrides
  cfg = settings_lib.from_config(load_config(config_path, overrides))
  model = nnx.jit(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0)))()
  frozen = nnx.jit(lambda: encoders.FrozenEncoders(cfg, rngs=nnx.Rngs(1)))()
  e = embodiments.get(cfg.data.embodiment)
  stats = {'state': dict(q01=[-1.0] * e.state_dim, q99=[1.0] * e.state_dim),
           'action': dict(q01=[-1.0] * e.action_dim, q99=[1.0] * e.action_dim)}
  policy = Policy(cfg, model, frozen, stats)
  del model  # the policy holds the weights as served (fp8: the bf16 originals would double them)
  v = cfg.video
  rng = np.random.default_rng(0)
  first = rng.uniform(-1, 1, (v.height, v.width, 3)).astype(np.float32)
  frames = jnp.asarray(rng.uniform(-1, 1, (1, v.frames_per_chunk, v.height, v.width, 3)), jnp.float32)
  state = np.zeros(e.state_dim, np.float32)
  device = jax.devices()[0].device_kind
  s = cfg.sampler
  sampler = f'{s.kind} {s.num_steps} steps, DiT on {s.dit_step_mask or "all"}, cfg {s.cfg_scale}'
  if args.ticks:
    r = control_step_ticks(policy, first, frames, state, e.id, args.ticks)
    print('| device | config | quantization | sampler | DiT calls | ticks | p50 ms | p99 ms | in use GiB | peak GiB |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    print(f'| {device} | {config_path} | {cfg.model.quantization} | {sampler}{" batched" if policy.batch == 2 else ""} '
          f'| {r["evaluations"]} | {args.ticks} | {r["p50"]:.1f} | {r["p99"]:.1f} | {r["in_use_gib"]} | {r["peak_gib"]} |')
    return
  ep = policy.reset('pick up the cup', first, state)

  spec, (dit, vae, _) = policy.spec, policy.networks
  vae_ms, (latents, _) = timed(rollout.encode_observed, spec, vae, ep.vae_cache, frames)
  write_ms, _ = timed(rollout.write_observed, spec, dit, ep.cache, ep.cross_kv, ep.i2v_cond, latents, jnp.int32(0))
  denoise_ms, (_, actions, evaluations) = timed(
      rollout.denoise, spec, dit, ep.cache, ep.cross_kv, ep.i2v_cond, policy.normalised_state(state), jnp.int32(e.id),
      jnp.int32(0), jax.random.key(0))
  actions = np.asarray(actions[0])
  t = time.perf_counter()
  for _ in range(20):
    policy.postprocess(actions, state)
  decode_ms = 1e3 * (time.perf_counter() - t) / 20
  print('| device | config | sampler | VAE encode ms | cache write ms | denoise ms | action decode ms | total ms |')
  print('|---|---|---|---|---|---|---|---|')
  total = vae_ms + write_ms + denoise_ms + decode_ms
  print(f'| {device} | {config_path} | {s.kind} {s.num_steps} steps, DiT x{int(evaluations)}, cfg {s.cfg_scale}'
        f'{" batched" if policy.batch == 2 else ""} | {vae_ms:.1f} | {write_ms:.1f} | {denoise_ms:.1f} | '
        f'{decode_ms:.2f} | {total:.1f} |')


if __name__ == '__main__':
  main(sys.argv[1:])
