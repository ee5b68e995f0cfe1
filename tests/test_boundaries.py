"""chex at the array boundaries: a wrong shape or dtype where arrays enter a layer (the latent batch
into the objective, the policy's inputs, the rollout functions' pytrees, the pipeline's batches) is a
one-line ValueError naming the field. Every check here fails before any compile or forward pass."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamzero_jax import checks, settings
from dreamzero_jax.config import load_config
from dreamzero_jax.inference import rollout
from dreamzero_jax.inference.policy import Episode, Policy
from dreamzero_jax.models import encoders, kv_cache
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.training import loop, objective
from tests import helpers
from tests.test_train_step import fixed_batch

SMALL = ['video.height=32', 'video.width=32', 'video.max_chunks=2']


def _refused(field: str, call, *args, what: str) -> str:
  """call(*args) raises a one-line ValueError that starts with `field: ` and says `what`."""
  with pytest.raises(ValueError) as info:
    call(*args)
  message = str(info.value)
  assert '\n' not in message and message.startswith(f'{field}: ') and re.search(what, message), message
  assert 'Chex' not in message   # chex's boilerplate is dropped
  return message


def test_check_names_the_field_on_one_line_for_each_kind_of_chex_failure():
  _refused('x', checks.check, 'x', chex.assert_shape, np.zeros((2, 1)), (2, 3),
           what=r'^x: has shape \(2, 1\) but expected \(2, 3\)$')
  _refused('x', checks.check, 'x', chex.assert_type, np.zeros(2, np.float32), int,
           what='has type float32 but expected int$')
  _refused('tree', checks.check, 'tree', chex.assert_tree_all_finite, {'a': np.array([np.nan])}, what='non-finite')
  # A tree-structure mismatch spans lines in chex: one line here, both structures kept.
  _refused('tree', checks.check, 'tree', chex.assert_trees_all_equal_shapes_and_dtypes, {'a': np.zeros(2)},
           {'b': np.zeros(2)}, what=r"do not match, tree 0: PyTreeDef\(\{'a': \*\}\) tree 1: PyTreeDef\(\{'b'")
  checks.check('x', chex.assert_shape, np.zeros((2, 3)), (2, None))   # passes: returns None


def test_objective_refuses_a_latent_batch_off_its_contract_even_under_jit():
  cfg = load_config('configs/tiny.py', [])
  batch, key = fixed_batch(cfg), jax.random.key(0)
  loss = lambda b: objective.flow_matching_loss(None, b, key, cfg.train)   # the check runs before the model
  _refused('batch.state', loss, batch._replace(state=batch.state[:, :1]),
           what=r'has shape \(2, 1, 64\) but expected \(2, 4, None\)')
  _refused('batch.chunk_mask', loss, batch._replace(chunk_mask=batch.chunk_mask.astype(jnp.float32)),
           what='has type float32 but expected bool')
  _refused('batch.embodiment_id', jax.jit(loss),   # at trace time, under jit
           batch._replace(embodiment_id=batch.embodiment_id.astype(jnp.float32)), what='expected int')
  _refused('batch.latents', loss, batch._replace(latents=batch.latents[0]), what='has rank 4')
  _refused('batch.latents/actions', loss,
           batch._replace(actions=batch.actions[:, 1:], action_mask=batch.action_mask[:, 1:]),
           what='are not 1 \\+ 4 and 4 chunks')
  _refused('batch.action_mask', loss, batch._replace(action_mask=batch.action_mask[..., :4]), what='has shape')
  _refused('batch.i2v_cond', loss, batch._replace(i2v_cond=batch.i2v_cond[:, :-1]), what='has shape')


@pytest.fixture(scope='module')
def policy():
  cfg = settings.from_config(load_config('configs/tiny.py', SMALL))
  return Policy(cfg, build_dit(cfg.model, rngs=nnx.Rngs(0)), encoders.FrozenEncoders(cfg, rngs=nnx.Rngs(1)),
                helpers.STATS)


def test_policy_refuses_observations_off_the_config(policy):
  v = policy.settings.video
  frame, state = np.zeros((v.height, v.width, 3), np.float32), np.zeros(policy.embodiment.state_dim)
  _refused('first_frame', policy.reset, 'reach', frame[:, :-1], state,
           what=r'has shape \(32, 31, 3\) but expected \(32, 32, 3\)')
  _refused('robot_state', policy.reset, 'reach', frame, np.zeros(5), what=r'has shape \(5,\) but expected \(4,?\)')
  # An episode waiting for chunk 0's observations (the inputs are checked before the episode is read).
  ep = Episode(cache=None, cross_kv=None, vae_cache=None, i2v_cond=None, chunk=1, written=0, anchor_state=state,
               rng=jax.random.key(0), instruction='reach')
  frames = np.zeros((v.frames_per_chunk, v.height, v.width, 3), np.float32)
  _refused('observed frames', policy.observe, ep, frames[1:], state,
           what=rf'has shape \({v.frames_per_chunk - 1}, 32, 32, 3\) but expected \({v.frames_per_chunk}, 32, 32, 3\)')
  _refused('robot_state', policy.observe, ep, frames, [0.0, 0.0], what=r'has shape \(2,\) but expected \(4,?\)')


def test_rollout_functions_refuse_pytrees_off_the_spec():
  """Each chunk function checks its pytrees while it is traced (the networks are not even read)."""
  spec = rollout.RolloutSpec.from_config(settings.from_config(load_config('configs/tiny.py', SMALL)))
  none = (None, None)
  cache = kv_cache.empty_cache(spec.num_layers, spec.batch, spec.capacity, spec.num_heads, spec.head_dim)
  cross_kv = (jnp.zeros((spec.num_layers, spec.batch, 8, spec.num_heads, spec.head_dim)),) * 2
  i2v_cond = jnp.zeros((1, spec.capacity // spec.tokens_per_frame, *spec.latent_hw, 20))
  state_vec, emb, chunk = jnp.zeros((1, 1, spec.state_dim)), jnp.int32(0), jnp.int32(0)
  rng = jax.random.key(0)

  def denoise(**kw):
    args = dict(cache=cache, cross_kv=cross_kv, i2v_cond=i2v_cond, state_vec=state_vec, emb=emb, chunk=chunk) | kw
    return rollout.denoise(spec, none, *args.values(), rng)

  short = kv_cache.empty_cache(spec.num_layers, spec.batch, spec.capacity - 1, spec.num_heads, spec.head_dim)
  _refused('cache', lambda: denoise(cache=short), what=r'19, 2, 16\) != \(2, 2, 20, 2, 16\)')
  _refused('cache', lambda: denoise(cache=cache._replace(k=cache.k.astype(jnp.bfloat16))), what='bfloat16')
  _refused('cross_kv', lambda: denoise(cross_kv=(cross_kv[0][:, :1],) * 2), what='shape prefix')
  _refused('i2v_cond', lambda: denoise(i2v_cond=i2v_cond[:, :-1]), what='has shape')
  _refused('state_vec', lambda: denoise(state_vec=jnp.zeros((1, 1, 4))), what=r'has shape \(1, 1, 4\)')
  _refused('chunk', lambda: denoise(chunk=jnp.float32(0)), what='expected int')
  frames = jnp.zeros((1, 4, 32, 32, 3))
  _refused('frames', rollout.observe, spec, none, none, cache, cross_kv, None, i2v_cond, frames[0], chunk,
           what='has shape')
  _refused('frame', rollout.start, spec, none, none, None, frames, jnp.zeros((spec.batch, 8, 16)), frames[:, :1],
           what=r'has shape \(1, 4, 32, 32, 3\) but expected \(1, 1, None, None, 3\)')
  _refused('text', rollout.start, spec, none, none, None, frames[:, :1], jnp.zeros((1, 8, 16)), frames[:, :1],
           what=r'expected \(2, None, None\)')


def test_training_loop_refuses_a_pipeline_batch_off_the_contract():
  cfg = load_config('configs/tiny.py', ['train.batch_size=2'])
  batch = helpers.synthetic_batches(cfg, n=1)[0]
  loop.check_data_batch(batch, cfg)   # the contract's batch passes
  _refused("batch['embodiment_id']", loop.check_data_batch, dict(batch, embodiment_id=batch['embodiment_id'] * 1.0),
           cfg, what='has type float64 but expected int')
  _refused("batch['action_mask']", loop.check_data_batch, dict(batch, action_mask=batch['actions']), cfg,
           what='has type float32 but expected bool')
  _refused("batch['video']", loop.check_data_batch, dict(batch, video=batch['video'][:, 1:]), cfg,
           what=r'has shape \(2, 32, 64, 64, 3\) but expected \(2, 33, ')
  with pytest.raises(ValueError, match="^batch is missing 'chunk_mask'$"):
    loop.check_data_batch({k: v for k, v in batch.items() if k != 'chunk_mask'}, cfg)
