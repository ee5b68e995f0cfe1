"""A rollout through the KV cache equals one masked full-sequence (teacher-forcing) forward."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamzero_jax.config import load_config
from dreamzero_jax.inference import kv_cache
from dreamzero_jax.models.dit import build_dit
from tests.helpers import random_model

# The training-consistent rule for state queries: under it the cache rollout IS the masked forward.
CFG = load_config('configs/tiny.py', ['model.inference_state_attention=self'])


def _random_model():
  return random_model(lambda: build_dit(CFG.model, rngs=nnx.Rngs(0)), seed=1)


def _rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_four_chunk_rollout_through_cache_equals_full_masked_forward():
  model = _random_model()
  m, v = CFG.model, CFG.video
  k, lf, ha = 4, v.frames_per_chunk // v.vae_temporal, v.action_horizon
  f, h = 1 + k * lf, v.height // v.vae_spatial
  rng = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  clean, noisy, cond = arr(1, f, h, h, 16), arr(1, f, h, h, 16), arr(1, f, h, h, 20)
  actions, state = arr(1, k * ha, m.action_dim), arr(1, k, m.state_dim)
  chunk_t = jnp.asarray([900.0, 600.0, 350.0, 75.0])
  video_t = jnp.concatenate([jnp.zeros(1), jnp.repeat(chunk_t, lf)])[None]
  action_t = jnp.repeat(chunk_t, ha)[None]
  emb = jnp.array([1], jnp.int32)
  text, image = arr(1, m.text_len, m.text_dim), arr(1, m.image_tokens, m.image_dim)

  full_video, full_actions = jax.jit(model.teacher_forcing)(clean, noisy, video_t, actions, action_t, state, emb,
                                                            text, image, cond)

  cross_kv = model.cross_kv(*model.embed_context(text, image))
  cache = kv_cache.empty_cache(m.num_layers, 1, f * (h // 2) ** 2, m.num_heads, m.dim // m.num_heads)
  cache = model.write_clean_frames(clean[:, :1], cache, cross_kv, cond=cond[:, :1])
  denoise = jax.jit(model.denoise)
  write = jax.jit(lambda lat, cache, c, cnd: model.write_clean_frames(lat, cache, cross_kv, chunk=c, cond=cnd))
  for c in range(k):
    frames = slice(1 + c * lf, 1 + (c + 1) * lf)
    acts = slice(c * ha, (c + 1) * ha)
    vid, act = denoise(noisy[:, frames], chunk_t[c:c + 1], actions[:, acts], chunk_t[c:c + 1], state[:, c:c + 1],
                       emb, jnp.int32(c), cache, cross_kv, cond[:, frames])
    assert _rel(vid, full_video[:, frames]) < 1e-5, c
    assert _rel(act, full_actions[:, acts]) < 1e-5, c
    cache = write(clean[:, frames], cache, jnp.int32(c), cond[:, frames])  # the REAL frames enter the cache
  assert int(cache.length) == cache.capacity


def test_reset_empties_the_cache():
  cache = kv_cache.empty_cache(2, 1, 8, 2, 4)
  cache = kv_cache.append(cache, jnp.ones((2, 1, 3, 2, 4)), jnp.ones((2, 1, 3, 2, 4)),
                          kv_cache.masks.segment(kv_cache.masks.Group.CLEAN, 0, 3))
  assert int(cache.length) == 3 and (np.asarray(cache.group[:3]) == kv_cache.masks.Group.CLEAN).all()
  cache = kv_cache.reset(cache)
  assert int(cache.length) == 0 and (np.asarray(cache.group) == kv_cache.masks.Group.PAD).all()
