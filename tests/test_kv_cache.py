"""A rollout through the KV cache equals one masked full-sequence (teacher-forcing) forward."""
import jax.numpy as jnp
import numpy as np

from dreamzero_jax.config import load_config
from dreamzero_jax.models import kv_cache
from tests.helpers import cache_rollout_errors, random_dit

# The training-consistent rule for state queries: under it the cache rollout IS the masked forward.
CFG = load_config('configs/tiny.py', ['model.inference_state_attention=self'])


def test_four_chunk_rollout_through_cache_equals_full_masked_forward():
  errors, cache = cache_rollout_errors(CFG, random_dit(CFG), [900.0, 600.0, 350.0, 75.0])
  for c, (video, actions) in enumerate(errors):
    assert video < 1e-5 and actions < 1e-5, (c, video, actions)
  assert int(cache.length) == cache.capacity


def test_reset_empties_the_cache():
  cache = kv_cache.empty_cache(2, 1, 8, 2, 4)
  cache = kv_cache.append(cache, jnp.ones((2, 1, 3, 2, 4)), jnp.ones((2, 1, 3, 2, 4)),
                          kv_cache.masks.segment(kv_cache.masks.Group.CLEAN, 0, 3))
  assert int(cache.length) == 3 and (np.asarray(cache.group[:3]) == kv_cache.masks.Group.CLEAN).all()
  cache = kv_cache.reset(cache)
  assert int(cache.length) == 0 and (np.asarray(cache.group) == kv_cache.masks.Group.PAD).all()
