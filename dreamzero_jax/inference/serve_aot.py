"""The serving control step compiled from abstract shapes: its per-device memory, without weights.

`python -m dreamzero_jax.serve --config C --compile_only` lowers one control tick (rollout.control_step:
VAE-encode the chunk's observed frames, write them into the KV cache, run the config's sampler with
CFG batched, decode the actions) on this host's backend and reads XLA's memory analysis. Its
arguments are what the device holds during control: the DiT as served (dit.for_inference:
model.quantization), the VAE, and one episode's KV cache (both CFG branches), text/image K/V, VAE
cache and I2V condition. umT5 and CLIP are not: they run once per prompt / episode from host memory.

Over serve.mesh (`--mesh tensor=8`) the arguments carry the shardings the policy gives them
(inference/rollout.py) and the figures are per device; `--topology v5e:2x4` compiles for that TPU
slice's compile-only devices (libtpu), fake CPU devices stand in for a GPU mesh. The report adds the
program's per-device cost (inference/hlo_cost.py), the sampler's DiT share of its steps applied.

On a CPU host the figure is for a device with native bf16/fp8 dots: the CPU emulates those dots in
fp32, and its loop-invariant code motion then hoists the fp32 conversions of the layer-stacked
weights and KV cache out of the layer loop (the 14B bf16 step showed 78 GiB of temporaries, 4x the
weights' bytes), so the CPU compile runs with that pass off (CPU_COMPILER_OPTIONS) and converts
one layer at a time, as a GPU's own dtypes never need to.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dreamzero_jax import sharding
from dreamzero_jax.inference import hlo_cost, rollout, samplers
from dreamzero_jax.kernels import registry
from dreamzero_jax.models import attention
from dreamzero_jax.models import dit as dit_lib
from dreamzero_jax.models import encoders as encoders_lib
from dreamzero_jax.settings import Settings

GIB = 1024 ** 3
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}


def _gib(n: int) -> float:
  return round(n / GIB, 3)


def _bytes_by_dtype(tree) -> dict[str, float]:
  out = collections.Counter()
  for x in jax.tree.leaves(tree):
    out[str(x.dtype)] += x.size * jnp.dtype(x.dtype).itemsize
  return {k: _gib(v) for k, v in sorted(out.items())}


def _with_sharding(tree, sharding_of):
  """ShapeDtypeStructs of `tree` with the sharding sharding_of(leaf) gives."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of the sharded ShapeDtypeStructs of `tree`."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_only(settings: Settings, topology: str = '') -> dict:
  """Compiles the control step for the settings over its serving mesh (serve.mesh; one device by default) on
  this host's backend, or with `topology` (e.g. 'v5e:2x4', needs libtpu) for that TPU slice's
  compile-only devices; returns the per-device report."""
  spec = dataclasses.replace(rollout.RolloutSpec.from_config(settings), topology=topology)
  mesh = rollout.device_mesh(spec)
  m, v = settings.model, settings.video
  model = nnx.eval_shape(lambda: dit_lib.for_inference(dit_lib.build_dit(m, rngs=nnx.Rngs(0)), m.quantization))
  frozen = nnx.eval_shape(lambda: encoders_lib.FrozenEncoders(settings, rngs=nnx.Rngs(1)))
  graphdef, mstate = nnx.split(model)
  vae_def, vae_state = nnx.split(frozen.vae)
  image = nnx.split(frozen.image) if frozen.image is not None else None
  # The arguments as the policy places them: the DiT by its logical axes, the episode's K/V by
  # rollout.EPISODE_AXES, everything else whole on each device.
  whole = NamedSharding(mesh, PartitionSpec())
  dit = (graphdef, sharding.place_state(mstate, mesh, spec.rules))
  vae = (vae_def, _with_sharding(vae_state, lambda x: whole))

  sds = jax.ShapeDtypeStruct
  frame = sds((1, 1, v.height, v.width, 3), jnp.float32)
  text = sds((spec.batch, m.text_len, m.text_dim), jnp.float32)
  cache, cross_kv, vae_cache, i2v_cond = jax.eval_shape(functools.partial(rollout.start, spec), dit, vae, image,
                                                        frame, text, frame)
  sizes = dict(mesh.shape)
  episode_spec = sharding.logical_to_spec(rollout.EPISODE_AXES, spec.rules)
  episode = lambda x: NamedSharding(mesh, sharding.fit_spec(episode_spec, x.shape, sizes))
  # The K/V (the cache's and the cross-attention's) are the 5-dim arrays; the cache's layout is whole.
  cache, cross_kv = _with_sharding((cache, cross_kv), lambda x: episode(x) if x.ndim == 5 else whole)
  vae_cache, i2v_cond = _with_sharding((vae_cache, i2v_cond), lambda x: whole)
  rest = _with_sharding((sds((1, v.frames_per_chunk, v.height, v.width, 3), jnp.float32), sds((), jnp.int32),
                         sds((1, 1, m.state_dim), jnp.float32), sds((), jnp.int32),
                         jax.eval_shape(lambda: jax.random.key(0))), lambda x: whole)
  args = (dit, vae, cache, cross_kv, vae_cache, i2v_cond, *rest)
  start = time.perf_counter()
  with attention.record() as attention_used, registry.record() as kernels_used:
    lowered = rollout.control_step.lower(spec, *args)
  device = mesh.devices.flat[0]
  options = CPU_COMPILER_OPTIONS if device.platform == 'cpu' else {}
  compiled = lowered.compile(compiler_options=options)
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  # The sampler's lax.cond runs the DiT on the steps of sampler.dit_step_mask (all of them, an upper
  # bound, under dynamic skipping, which decides at run time).
  dit_share = 1.0 if settings.sampler.dynamic_skip else float(samplers.dit_step_mask(settings.sampler).mean())
  cost = hlo_cost.program_cost(compiled.as_text(), taken=dit_share)
  xla_cost = compiled.cost_analysis()
  xla_cost = xla_cost[0] if isinstance(xla_cost, (list, tuple)) else xla_cost
  ffn1 = [x for x in jax.tree.leaves(nnx.state(model.blocks.ffn1)) if x.ndim == 3]  # [layers, D, ffn]
  return dict(
      config_model=dict(dim=m.dim, num_layers=m.num_layers), device=f'{device.platform} {device.device_kind}',
      topology=topology or None, mesh={k: n for k, n in mesh.shape.items() if n > 1} or 'one device',
      devices=mesh.devices.size,
      quantization=m.quantization,
      # The blocks' linear weights (98% of the DiT) and what the whole argument holds, by dtype.
      weights_dtype=str(ffn1[0].dtype),
      dit_gib_by_dtype=_bytes_by_dtype(mstate), dit_gib_per_device=_gib(_bytes_per_device(dit[1])),
      vae_gib=_gib(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vae_state))),
      kv_cache_dtype=str(cache.k.dtype), kv_cache_gib=_gib(2 * cache.k.size * cache.k.dtype.itemsize),
      kv_cache_gib_per_device=_gib(_bytes_per_device((cache.k, cache.v))),
      cross_kv_gib=_gib(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cross_kv))),
      cfg_batch=spec.batch, sampler=f'{settings.sampler.kind} {settings.sampler.num_steps} steps, dit_step_mask '
                                   f'{settings.sampler.dit_step_mask or "all"}, cfg {settings.sampler.cfg_scale}',
      new_tokens=spec.lf * spec.tokens_per_frame + v.action_horizon + 1, cache_tokens=spec.capacity,
      argument_gib=_gib(mem.argument_size_in_bytes), temp_gib=_gib(mem.temp_size_in_bytes),
      output_gib=_gib(mem.output_size_in_bytes), alias_gib=_gib(mem.alias_size_in_bytes),
      # The donated cache and VAE cache alias their outputs: count those bytes once.
      total_gib=_gib(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes),
      # Per device, loops counted by their trip counts (inference/hlo_cost.py); XLA's own
      # cost_analysis counts each loop body once (kept for comparison).
      cost_per_device=dict(flops=cost.flops, hbm_gib=_gib(cost.hbm_bytes), collective_gib=_gib(cost.collective_bytes),
                           unknown_trip_counts=cost.unknown_trip_counts, dit_step_share=dit_share),
      xla_cost_analysis=dict(flops=float(xla_cost.get('flops', 0.0)),
                             bytes_accessed_gib=_gib(xla_cost.get('bytes accessed', 0.0))),
      attention=sorted(attention_used), kernels=sorted(f'{k}:{i}' for k, i in kernels_used),
      compiler_options=options, compile_s=round(compile_s, 1),
      scope='one control tick (VAE encode + cache write + sampler + action head), CFG batched; '
            'umT5/CLIP excluded (host-resident, run once per prompt/episode)')
