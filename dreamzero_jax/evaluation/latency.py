"""The per-stage timing of a policy's control step (`eval.py --mode latency`): random frames at the
config's canvas size, a session reset, then denoise and observe timed apart."""
from __future__ import annotations

import time

import jax
import numpy as np


def measure(policy, cfg, steps: int = 5) -> dict:
  """The median wall time of a control step's stages over `steps` steps (denoise = the DiT's sampling
  of a chunk; observe = the VAE encode and cache write of a chunk's frames), and the first step with
  its compile."""
  rng = np.random.default_rng(0)
  frame = lambda n: rng.uniform(-1, 1, (n, cfg.video.height, cfg.video.width, 3)).astype(np.float32)
  state = np.zeros(policy.embodiment.state_dim, np.float32)
  t = time.perf_counter()
  ep = policy.reset('reach the goal position', frame(1)[0], state)
  _, _, ep, _ = policy.step(ep)           # compiles
  ep = policy.observe(ep, frame(cfg.video.frames_per_chunk), state)
  first = time.perf_counter() - t
  rows = []
  for _ in range(steps):
    t0 = time.perf_counter()
    _, _, ep, info = policy.step(ep)
    t1 = time.perf_counter()
    ep = policy.observe(ep, frame(cfg.video.frames_per_chunk), state)  # restarts a full window
    jax.block_until_ready(ep.cache)
    t2 = time.perf_counter()
    rows.append(dict(denoise_ms=1e3 * (t1 - t0), observe_ms=1e3 * (t2 - t1)))
  med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
  return dict(first_step_with_compile_s=round(first, 2), **med, dit_evaluations=info['dit_evaluations'])
