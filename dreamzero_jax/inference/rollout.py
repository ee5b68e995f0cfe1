"""The chunk functions of a control step, as pure jitted functions (docs/inference.md).

  start    first frame + prompt embeddings -> an episode's device state (KV cache with frame 0,
           text/image cross-attention K/V, the VAE's streaming cache, the I2V condition)
  observe  the REAL frames seen while a chunk ran -> VAE-encoded and written into the KV cache
           (serve.observation_encode: a fresh encode of [first + frames] per call, or streamed)
  denoise  the sampler over one chunk's video latents and actions, against the cache

Each takes a `RolloutSpec` (static: every shape and sampler setting, hashable) and pytrees only:
the networks as (graphdef, state) pairs, the cache, arrays. Nothing is closed over, so the
policy (inference/policy.py), the latency benchmark and the ahead-of-time compile
(inference/serve_aot.py) call the very same functions; each compiles once per spec.

With CFG the episode has batch 2 (prompt, negative prompt) so both branches run in one forward.

Devices: serve.mesh ('' = one device; 'tensor=N', 'data=2' or 'data=2,tensor=N') is a mesh over
sharding.MESH_AXES with the config's rules (mesh.rules, those training uses). Over `tensor` the DiT
is split Megatron-style by the rules' 'heads' and 'mlp' (attention by heads, the FFN by its hidden
width), and so are the episode's self-attention cache and cross-attention K/V (their heads axis);
over `data` the CFG branches run one per device group (the paper's CFG parallelism;
sampler.cfg_parallel is data=2). The VAE is replicated (0.5 GiB at 14B); umT5 and CLIP stay in host
memory (policy.py). Every chunk function is one program over the mesh (GSPMD), not a per-device loop.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dreamzero_jax import checks
from dreamzero_jax import sharding
from dreamzero_jax.inference import samplers
from dreamzero_jax.models import clip
from dreamzero_jax.models import encoders as encoders_lib
from dreamzero_jax.models import kv_cache
from dreamzero_jax.settings import SamplerSettings, Settings

OBSERVATION_ENCODES = ('per_call', 'streaming')

# A network split for jit: (nnx.GraphDef, nnx.State). The graphdef is a leafless pytree node, so
# it is part of the compiled signature and the state is the arrays.
Network = tuple[nnx.GraphDef, Any]


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """The static settings of an episode, from the config (B = 1 per episode, 2 with CFG)."""
  lf: int                     # latent frames per chunk
  num_frames: int             # canvas frames of a full context window
  latent_hw: tuple[int, int]
  tokens_per_frame: int
  capacity: int               # KV cache slots (tokens)
  with_uncond: bool
  batch: int
  i2v: bool
  latent_channels: int
  action_horizon: int
  action_dim: int             # the model's (padded) action and state widths
  state_dim: int
  num_layers: int
  num_heads: int
  head_dim: int
  cache_dtype: str
  sampler: SamplerSettings
  num_train_timesteps: int
  cfg_parallel: bool
  observation_encode: str     # serve.observation_encode
  mesh_shape: tuple[int, ...]  # over sharding.MESH_AXES (serve.mesh; data=2 under sampler.cfg_parallel)
  rules: sharding.Rules        # mesh.rules
  topology: str = ''           # '' = this host's devices; a TPU topology for ahead-of-time compiles

  @classmethod
  def from_config(cls, settings: Settings) -> 'RolloutSpec':
    v, m, serve = settings.video, settings.model, settings.serve
    lf = v.frames_per_chunk // v.vae_temporal
    latent_hw = (v.height // v.vae_spatial, v.width // v.vae_spatial)
    tokens_per_frame = (latent_hw[0] // m.patch_size[1]) * (latent_hw[1] // m.patch_size[2])
    with_uncond = samplers.uses_uncond(settings.sampler)
    if serve.observation_encode not in OBSERVATION_ENCODES:
      raise ValueError(f'serve.observation_encode={serve.observation_encode!r}: expected one of '
                       f'{OBSERVATION_ENCODES}')
    return cls(lf=lf, num_frames=1 + v.max_chunks * v.frames_per_chunk, latent_hw=latent_hw,
               tokens_per_frame=tokens_per_frame, capacity=(1 + v.max_chunks * lf) * tokens_per_frame,
               with_uncond=with_uncond, batch=2 if with_uncond else 1, i2v=encoders_lib.uses_i2v_condition(settings),
               latent_channels=v.latent_channels, action_horizon=v.action_horizon, action_dim=m.action_dim,
               state_dim=m.state_dim, num_layers=m.num_layers, num_heads=m.num_heads,
               head_dim=m.dim // m.num_heads, cache_dtype=jnp.dtype(kv_cache.cache_dtype(m)).name,
               sampler=settings.sampler, num_train_timesteps=settings.train.num_train_timesteps,
               cfg_parallel=settings.sampler.cfg_parallel, observation_encode=serve.observation_encode,
               mesh_shape=serve_mesh_shape(settings, with_uncond), rules=settings.mesh.rules)


SERVE_MESH_AXES = ('data', 'tensor')


def parse_serve_mesh(text: str, field: str = 'serve.mesh') -> dict[str, int]:
  """serve.mesh (or `serve --mesh`) text -> axis sizes; a bad value is a ValueError naming `field`."""
  return sharding.parse_axis_sizes(text, field, SERVE_MESH_AXES)


def with_serve_mesh(settings: Settings, mesh: str | None) -> Settings:
  """The settings with serve.mesh = `mesh` (`serve --mesh`, checked here so a bad value names the
  flag), or as they were for None."""
  if mesh is None:
    return settings
  parse_serve_mesh(mesh, '--mesh')
  return dataclasses.replace(settings, serve=dataclasses.replace(settings.serve, mesh=mesh))


def serve_mesh_shape(settings: Settings, with_uncond: bool) -> tuple[int, ...]:
  """serve.mesh as a shape over sharding.MESH_AXES, checked against the model and the sampler."""
  text, cfg_parallel = settings.serve.mesh, settings.sampler.cfg_parallel
  sizes = parse_serve_mesh(text)
  if cfg_parallel:
    if sizes.get('data', 2) != 2:
      raise ValueError(f'serve.mesh={text!r}: sampler.cfg_parallel puts the CFG branches on data=2')
    sizes['data'] = 2
  if sizes.get('data', 1) > 2:
    raise ValueError(f'serve.mesh={text!r}: data splits the 2 CFG branches, so data is 1 or 2')
  if sizes.get('data', 1) == 2 and not with_uncond:
    what = 'sampler.cfg_parallel' if cfg_parallel else f'serve.mesh={text!r}'
    raise ValueError(f'{what} runs the CFG branches on two devices, but this sampler has no unconditional '
                     'branch (sampler.cfg_scale is 1 or sampler.num_steps is 1)')
  tensor, m = sizes.get('tensor', 1), settings.model
  for name, width in (('model.num_heads', m.num_heads), ('model.ffn_dim', m.ffn_dim)):
    if width % tensor:
      # fit_spec would quietly replicate what does not divide: every device would hold it whole.
      raise ValueError(f'serve.mesh={text!r}: tensor={tensor} does not divide {name}={width}')
  return tuple(sizes.get(axis, 1) for axis in sharding.MESH_AXES)


def device_mesh(spec: RolloutSpec) -> Mesh:
  """The devices an episode runs on: the first prod(spec.mesh_shape) of this host's (or of
  spec.topology's compile-only TPU devices) as a mesh of spec.mesh_shape; one device is a mesh of
  one. The rules map activation_batch to data (the conditional branch on the first half of the
  devices, the unconditional one on the second) and heads/mlp to tensor."""
  devices = sharding.topology_devices(spec.topology) if spec.topology else jax.devices()
  need = math.prod(spec.mesh_shape)
  if len(devices) < need:
    what = 'sampler.cfg_parallel' if spec.cfg_parallel and need == 2 else 'serve.mesh'
    raise ValueError(f'{what} needs {need} devices, found {len(devices)} ({devices[0].platform})')
  return sharding.make_mesh(spec.mesh_shape, devices=devices[:need])


def _under_mesh(fn):
  """fn(spec, ...) traced under the spec's mesh and rules."""

  @functools.wraps(fn)
  def traced(spec, *args):
    with sharding.use_mesh_rules(device_mesh(spec), spec.rules):
      return fn(spec, *args)
  return traced


EPISODE_AXES = (None, 'activation_batch', None, 'activation_heads', None)


def _by_branch(tree):
  """Episode K/V [layers, B, L, H, Dh] split by CFG branch over data and by head over tensor (no-op
  on one device)."""
  return jax.tree.map(lambda x: sharding.constrain(x, EPISODE_AXES), tree)


def abstract_cache(spec: RolloutSpec) -> kv_cache.KVCache:
  """The shapes and dtypes of an episode's self-attention KV cache (kv_cache.empty_cache at the spec)."""
  return jax.eval_shape(lambda: kv_cache.empty_cache(spec.num_layers, spec.batch, spec.capacity, spec.num_heads,
                                                     spec.head_dim, jnp.dtype(spec.cache_dtype)))


def _check_episode(spec: RolloutSpec, cache, cross_kv, i2v_cond) -> None:
  """An episode's device pytrees against the spec (chex, on shapes: these run while a chunk function
  is traced, never per call): the KV cache exactly as `start` builds it, the cross-attention K/V
  [layers, B, L, H, Dh], the I2V condition [1, F, h, w, C] of the whole window or None."""
  checks.check('cache', chex.assert_trees_all_equal_shapes_and_dtypes, cache, abstract_cache(spec))
  checks.check('cross_kv', chex.assert_tree_shape_prefix, cross_kv, (spec.num_layers, spec.batch))
  checks.check('cross_kv', chex.assert_tree_shape_suffix, cross_kv, (spec.num_heads, spec.head_dim))
  if not spec.i2v:
    if i2v_cond is not None:
      raise ValueError('i2v_cond: given, but this model takes no I2V condition (expected None)')
    return
  checks.check('i2v_cond', chex.assert_shape, i2v_cond, (1, spec.capacity // spec.tokens_per_frame, *spec.latent_hw,
                                                        None))


def _check_frames(field: str, frames, num_frames: int | None = None) -> None:
  """Canvas frames [1, T, H, W, 3] (T = num_frames, or any), floating."""
  checks.check(field, chex.assert_shape, frames, (1, num_frames, None, None, 3))
  checks.check(field, chex.assert_type, frames, float)


def _dup(spec: RolloutSpec, x):
  """A batch-1 input repeated for the CFG batch."""
  return None if x is None else jnp.broadcast_to(x, (spec.batch, *x.shape[1:]))


def _chunk_i2v_cond(spec: RolloutSpec, i2v_cond, chunk):
  """The I2V condition y of chunk `chunk`'s latent frames."""
  return None if i2v_cond is None else jax.lax.dynamic_slice_in_dim(i2v_cond, 1 + chunk * spec.lf, spec.lf, axis=1)


def _start(spec: RolloutSpec, dit: Network, vae: Network, image: Network | None, frame, text, image_frame):
  """First frame [1, 1, H, W, 3] -> (cache with frame 0, cross K/V, VAE cache (None under
  'per_call'), y)."""
  _check_frames('frame', frame, 1)
  _check_frames('image_frame', image_frame)
  checks.check('text', chex.assert_shape, text, (spec.batch, None, None))
  model, vae = nnx.merge(*dit), nnx.merge(*vae)
  latent, vae_cache = vae.encode_stream(vae.init_encode_cache(1, *frame.shape[2:4]), frame)
  if spec.observation_encode == 'per_call':
    vae_cache = None   # every call encodes with a fresh cache: the stream's is never read
  i2v_cond = vae.i2v_condition(frame[:, 0], spec.num_frames) if spec.i2v else None
  image_tokens = None
  if image is not None:
    image_tokens = clip.encode_first_frame(nnx.merge(*image), image_frame)
    image_tokens = jnp.broadcast_to(image_tokens, (spec.batch, *image_tokens.shape[1:]))
  cross_kv = _by_branch(model.cross_kv(*model.embed_context(text, image_tokens)))
  cache = kv_cache.empty_cache(spec.num_layers, spec.batch, spec.capacity, spec.num_heads, spec.head_dim,
                               jnp.dtype(spec.cache_dtype))
  cache = model.write_clean_frames(_dup(spec, latent), cache, cross_kv,
                                   i2v_cond=_dup(spec, None if i2v_cond is None else i2v_cond[:, :1]))
  return cache._replace(k=_by_branch(cache.k), v=_by_branch(cache.v)), cross_kv, vae_cache, i2v_cond


def _encode_observed(spec: RolloutSpec, vae: Network, vae_cache, frames):
  """Observed frames [1, frames_per_chunk, H, W, 3] -> (latents [1, lf, h, w, C], VAE cache).

  'per_call' (the release): [the call's first frame + its frames] encoded with a fresh cache, the
  first frame's latent dropped (vae_cache is None); 'streaming': the
  frames continue the episode's causal VAE stream.
  """
  _check_frames('frames', frames)
  vae = nnx.merge(*vae)
  if spec.observation_encode == 'per_call':
    return vae.encode(jnp.concatenate([frames[:, :1], frames], axis=1))[:, 1:], vae_cache
  return vae.encode_stream(vae_cache, frames)


def _write_observed(spec: RolloutSpec, dit: Network, cache, cross_kv, i2v_cond, latents, chunk):
  """Chunk `chunk`'s clean latents -> the cache with their K/V written."""
  _check_episode(spec, cache, cross_kv, i2v_cond)
  checks.check('latents', chex.assert_shape, latents, (1, spec.lf, *spec.latent_hw, spec.latent_channels))
  checks.check('chunk', chex.assert_shape, chunk, ())
  cache = nnx.merge(*dit).write_clean_frames(_dup(spec, latents), cache, cross_kv, chunk=chunk,
                                             i2v_cond=_dup(spec, _chunk_i2v_cond(spec, i2v_cond, chunk)))
  return cache._replace(k=_by_branch(cache.k), v=_by_branch(cache.v))


def _observe(spec: RolloutSpec, dit: Network, vae: Network, cache, cross_kv, vae_cache, i2v_cond, frames, chunk):
  """Observed frames [1, frames_per_chunk, H, W, 3] of chunk `chunk` -> (cache, VAE cache)."""
  latents, vae_cache = _encode_observed(spec, vae, vae_cache, frames)
  return _write_observed(spec, dit, cache, cross_kv, i2v_cond, latents, chunk), vae_cache


def chunk_noise(spec: RolloutSpec, rng) -> dict:
  """A chunk's starting {'video', 'action'} noise: from sampler.noise_seed, the same every chunk
  (the release; JAX's draws, not torch's), or with noise_seed = -1 from `rng`."""
  if spec.sampler.noise_seed >= 0:
    rng = jax.random.key(spec.sampler.noise_seed)
  h, w = spec.latent_hw
  x_rng, a_rng = jax.random.split(rng)
  return {'video': jax.random.normal(x_rng, (1, spec.lf, h, w, spec.latent_channels)),
          'action': jax.random.normal(a_rng, (1, spec.action_horizon, spec.action_dim))}


def _denoise(spec: RolloutSpec, dit: Network, cache, cross_kv, i2v_cond, state_vec, embodiment_id, chunk, rng):
  """Samples chunk `chunk`: (video latents [1, lf, h, w, C], normalised actions [1, Ha, A], DiT calls)."""
  _check_episode(spec, cache, cross_kv, i2v_cond)
  checks.check('state_vec', chex.assert_shape, state_vec, (1, 1, spec.state_dim))
  for field, x in (('embodiment_id', embodiment_id), ('chunk', chunk)):
    checks.check(field, chex.assert_shape, x, ())
    checks.check(field, chex.assert_type, x, int)
  model = nnx.merge(*dit)
  x0 = chunk_noise(spec, rng)
  chunk_i2v_cond = _chunk_i2v_cond(spec, i2v_cond, chunk)
  emb = jnp.full((spec.batch,), embodiment_id, jnp.int32)
  state_b = jnp.broadcast_to(state_vec, (spec.batch, 1, spec.state_dim))

  def velocity(x, t, with_uncond):
    tt = jnp.full((spec.batch,), t, jnp.float32)
    vid, act = model.denoise(_dup(spec, x['video']), tt, _dup(spec, x['action']), tt, state_b, emb, chunk, cache,
                             cross_kv, _dup(spec, chunk_i2v_cond))
    cond_v = {'video': vid[:1], 'action': act[:1]}
    return cond_v, (vid[1:] if with_uncond else None)

  out, info = samplers.sample(velocity, x0, spec.sampler, spec.num_train_timesteps)
  return out['video'], out['action'], info.num_evaluations


def _control_step(spec: RolloutSpec, dit: Network, vae: Network, cache, cross_kv, vae_cache, i2v_cond, frames,
                  chunk, state_vec, embodiment_id, rng):
  """One control tick as the server runs it: the frames observed while chunk `chunk` ran are
  written into the cache, then chunk + 1 is denoised."""
  cache, vae_cache = _observe(spec, dit, vae, cache, cross_kv, vae_cache, i2v_cond, frames, chunk)
  video, actions, evaluations = _denoise(spec, dit, cache, cross_kv, i2v_cond, state_vec, embodiment_id, chunk + 1,
                                         rng)
  return cache, vae_cache, video, actions, evaluations


_jit = functools.partial(jax.jit, static_argnums=0)

# start(spec, dit, vae, image, frame, text, image_frame) -> (cache, cross_kv, vae_cache, i2v_cond)
start = _jit(_under_mesh(_start))
# observe(spec, dit, vae, cache, cross_kv, vae_cache, i2v_cond, frames, chunk) -> (cache, vae_cache);
# the cache and the VAE cache are donated (updated in place).
observe = _jit(_under_mesh(_observe), donate_argnums=(3, 5))
# denoise(spec, dit, cache, cross_kv, i2v_cond, state_vec, embodiment_id, chunk, rng) -> (video, actions, evaluations)
denoise = _jit(_under_mesh(_denoise))
# control_step(spec, dit, vae, cache, cross_kv, vae_cache, i2v_cond, frames, chunk, state_vec, embodiment_id, rng)
#   -> (cache, vae_cache, video, actions, evaluations): observe then denoise, as one program.
control_step = _jit(_under_mesh(_control_step), donate_argnums=(3, 5))
# The two halves of observe, for timing them apart (bench/policy_latency.py).
encode_observed = _jit(_under_mesh(_encode_observed))
write_observed = _jit(_under_mesh(_write_observed))


@jax.jit
def encode_video(vae: Network, video):
  """Canvas frames [B, 1 + 4k, H, W, 3] in [-1, 1] -> normalised latents [B, 1 + k, h, w, C]."""
  return nnx.merge(*vae).encode(video)


@jax.jit
def decode_video(vae: Network, latents):
  """Latents [B, F, h, w, C] -> frames [B, T, H, W, 3] in [-1, 1]."""
  return nnx.merge(*vae).decode(latents)
