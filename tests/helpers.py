"""Shared test helpers."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_model(factory, seed: int = 0, scale: float = 0.3):
  """factory() built abstractly, every parameter filled with scale * N(0, 1) numpy draws.

  Skips jax.random's per-shape compiles, and gives zero-initialised layers (output heads) real
  values so that outputs react to their inputs.
  """
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype),
                                          state))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_devices_env(count: int) -> dict:
  """Environment of a fresh Python process with `count` fake CPU devices that imports this checkout
  (XLA_FLAGS is read when JAX starts, so multi-device checks run as scripts in a new process)."""
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={count}', JAX_PLATFORMS='cpu',
              PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))


def run_with_fake_devices(script: str, args: list, count: int, expect: str, timeout: int = 900) -> str:
  """Runs `python script *args` with `count` fake devices; asserts success and `expect` in its output."""
  out = subprocess.run([sys.executable, script, *map(str, args)], env=fake_devices_env(count), cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert expect in out.stdout, out.stdout[-3000:]
  return out.stdout


def run_datasets_cli(*args):
  """`python -m dreamzero_jax.datasets *args` from the repository root; the CompletedProcess."""
  return subprocess.run([sys.executable, '-m', 'dreamzero_jax.datasets', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def build_metaworld(out: str, image_size: int) -> str:
  """A Meta-World dataset at `out`: one scripted episode each of reach-v3 and push-v3, 40 steps."""
  r = run_datasets_cli('build', 'metaworld', '--out', out, '--tasks', 'reach-v3,push-v3', '--episodes', '1',
                       '--image_size', str(image_size), '--max_steps', '40')
  assert r.returncode == 0, r.stderr
  return out


def random_dit(cfg, seed: int = 1):
  """cfg.model's DiT with random_model's parameters."""
  from dreamzero_jax.models.dit import build_dit
  return random_model(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0)), seed=seed)


# Normalisation statistics of a 4-dim state and action, for the tiny policies and trained runs.
STATS = {'state': dict(q01=[-1.0] * 4, q99=[1.0] * 4), 'action': dict(q01=[-2.0] * 4, q99=[2.0] * 4)}


def synthetic_batches(cfg, n=8, seed=0):
  """Pipeline-contract batches, deterministic in their index."""
  v, m, b = cfg.video, cfg.model, cfg.train.batch_size
  k = v.max_chunks
  out = []
  for i in range(n):
    rng = np.random.default_rng(seed + i)
    action_mask = np.zeros((b, k * v.action_horizon, m.action_dim), bool)
    action_mask[..., :4] = True
    out.append(dict(
        video=rng.uniform(-1, 1, (b, 1 + k * v.frames_per_chunk, v.height, v.width, 3)).astype(np.float32),
        actions=(rng.uniform(-1, 1, action_mask.shape) * action_mask).astype(np.float32), action_mask=action_mask,
        state=rng.uniform(-1, 1, (b, k, m.state_dim)).astype(np.float32), state_mask=np.ones((b, k, m.state_dim), bool),
        chunk_mask=np.ones((b, k), bool), has_real_action=np.ones((b,), bool),
        embodiment_id=np.zeros((b,), np.int32),
        instruction=np.array([b'reach the goal', b'push the puck'][:b], dtype=object)))
  return out


class ListIterator:
  """An iterator over a list with grain-style get_state/set_state."""

  def __init__(self, items):
    self.items, self.index = items, 0

  def __next__(self):
    item = self.items[self.index]
    self.index += 1
    return item

  def get_state(self):
    return {'next_index': self.index}

  def set_state(self, state):
    self.index = state['next_index']


def train_on_synthetic(cfg, workdir: str, n: int = 1, norm_stats=STATS) -> None:
  """loop.train on n synthetic_batches into workdir; asserts it finished (exit code 0)."""
  from dreamzero_jax.training import loop
  assert loop.train(cfg, workdir, data=ListIterator(synthetic_batches(cfg, n=n)), norm_stats=norm_stats) == 0


def cache_rollout_errors(cfg, model, chunk_t) -> tuple[list[tuple[float, float]], object]:
  """Relative errors (video, actions) per chunk of a rollout through the KV cache (real clean frames
  written after each chunk) against one masked teacher-forcing forward of the same inputs; and the
  final cache. One chunk per entry of chunk_t (its noise level), random latents/actions/prompt."""
  from dreamzero_jax.models import kv_cache
  m, v = cfg.model, cfg.video
  k, lf, ha = len(chunk_t), v.frames_per_chunk // v.vae_temporal, v.action_horizon
  f, h = 1 + k * lf, v.height // v.vae_spatial
  rng = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  clean, noisy, i2v_cond = arr(1, f, h, h, 16), arr(1, f, h, h, 16), arr(1, f, h, h, 20)
  actions, state = arr(1, k * ha, m.action_dim), arr(1, k, m.state_dim)
  chunk_t = jnp.asarray(chunk_t, jnp.float32)
  video_t = jnp.concatenate([jnp.zeros(1), jnp.repeat(chunk_t, lf)])[None]
  emb, text, image = jnp.array([1], jnp.int32), arr(1, m.text_len, m.text_dim), arr(1, m.image_tokens, m.image_dim)
  full_video, full_actions = jax.jit(model.teacher_forcing)(clean, noisy, video_t, actions,
                                                            jnp.repeat(chunk_t, ha)[None], state, emb, text, image,
                                                            i2v_cond)
  cross_kv = model.cross_kv(*model.embed_context(text, image))
  cache = kv_cache.empty_cache(m.num_layers, 1, f * (h // 2) ** 2, m.num_heads, m.dim // m.num_heads)
  cache = model.write_clean_frames(clean[:, :1], cache, cross_kv, i2v_cond=i2v_cond[:, :1])
  denoise = jax.jit(model.denoise)
  write = jax.jit(lambda lat, cache, c, i2v_c: model.write_clean_frames(lat, cache, cross_kv, chunk=c, i2v_cond=i2v_c))
  rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
  errors = []
  for c in range(k):
    frames, acts = slice(1 + c * lf, 1 + (c + 1) * lf), slice(c * ha, (c + 1) * ha)
    vid, act = denoise(noisy[:, frames], chunk_t[c:c + 1], actions[:, acts], chunk_t[c:c + 1], state[:, c:c + 1],
                       emb, jnp.int32(c), cache, cross_kv, i2v_cond[:, frames])
    errors.append((rel(vid, full_video[:, frames]), rel(act, full_actions[:, acts])))
    cache = write(clean[:, frames], cache, jnp.int32(c), i2v_cond[:, frames])  # the REAL frames enter the cache
  return errors, cache
