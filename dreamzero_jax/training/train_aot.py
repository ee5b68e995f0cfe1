"""Ahead-of-time compilation of the sharded train step for a TPU pod slice, without a TPU.

With libtpu installed (the `[tpu]` extra), jax.experimental.topologies describes a slice such as
'v5p:4x4x8' as compile-only devices; the step is lowered on abstract inputs over a mesh of them
and compiled, and XLA's memory analysis says what one device would hold. This is how a config's
mesh and rules are checked against a chip's HBM before paying for the pod (docs/data_and_sharding.md).

The step trains the DiT on precomputed latents: the frozen encoders (VAE, umT5, CLIP) are not
part of it, so their memory is not counted.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections

from dreamzero_jax import sharding
from dreamzero_jax.models import attention
from dreamzero_jax.training import objective, trainer

GIB = 1024 ** 3


def abstract_batch(cfg: ml_collections.ConfigDict, batch_size: int) -> objective.LatentBatch:
  """ShapeDtypeStructs of one LatentBatch at the config's full clip (K = video.max_chunks chunks)."""
  m, v = cfg.model, cfg.video
  k, lf = v.max_chunks, v.frames_per_chunk // v.vae_temporal
  f, h, w = 1 + k * lf, v.height // v.vae_spatial, v.width // v.vae_spatial
  arr = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
  i2v_cond_channels = m.in_channels - v.latent_channels
  return objective.LatentBatch(
      latents=arr(f, h, w, v.latent_channels),
      i2v_cond=arr(f, h, w, i2v_cond_channels) if i2v_cond_channels else None,
      text=arr(m.text_len, m.text_dim),
      image=arr(m.image_tokens, m.image_dim) if m.image_dim else None,
      actions=arr(k * v.action_horizon, m.action_dim),
      action_mask=arr(k * v.action_horizon, m.action_dim, dtype=jnp.bool_),
      state=arr(k, m.state_dim),
      chunk_mask=arr(k, dtype=jnp.bool_),
      embodiment_id=arr(dtype=jnp.int32))


def sequence_length(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """(tokens, tokens padded to model.seq_pad_multiple) of one teacher-forcing sequence."""
  m, v = cfg.model, cfg.video
  k, lf = v.max_chunks, v.frames_per_chunk // v.vae_temporal
  pt, ph, pw = m.patch_size
  video = ((1 + k * lf) // pt) * (v.height // v.vae_spatial // ph) * (v.width // v.vae_spatial // pw)
  tokens = 2 * video + k * v.action_horizon + k
  return tokens, -(-tokens // m.seq_pad_multiple) * m.seq_pad_multiple


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` carrying `shardings` (a matching pytree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def compile_only(cfg: ml_collections.ConfigDict, topology: str) -> dict:
  """Compiles the train step for `topology` (e.g. 'v5p:4x4x8') and reports per-device memory.

  The step is one optimiser update over train.batch_size x train.grad_accum_steps examples, run as
  grad_accum_steps micro-batches of train.batch_size.
  """
  devices = sharding.topology_devices(topology)
  mesh = sharding.config_mesh(cfg, devices)
  graphdef, state = trainer.abstract_train_state(cfg)
  batch = abstract_batch(cfg, trainer.update_batch_size(cfg.train))
  state_sh, batch_sh = trainer.train_shardings(cfg, mesh, state, batch)
  step = sharding.shard_train_step(trainer.make_train_step(graphdef, cfg), mesh, state_sh, batch_sh,
                                   sharding.config_rules(cfg))
  start = time.perf_counter()
  with attention.record() as attention_used:
    lowered = step.lower(with_shardings(state, state_sh), with_shardings(batch, batch_sh))
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  mem = compiled.memory_analysis()
  gib = lambda n: round(n / GIB, 3)
  tokens, padded = sequence_length(cfg)
  return dict(
      topology=topology, device_kind=devices[0].device_kind, devices=len(devices),
      mesh=dict(mesh.shape), per_step_batch=cfg.train.batch_size,
      global_batch=trainer.update_batch_size(cfg.train), tokens=tokens, padded_tokens=padded,
      num_layers=cfg.model.num_layers, dim=cfg.model.dim, lora_rank=cfg.train.lora_rank,
      params=sum(x.size for x in jax.tree.leaves(state.params)),
      argument_gib=gib(mem.argument_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
      output_gib=gib(mem.output_size_in_bytes), alias_gib=gib(mem.alias_size_in_bytes),
      # Donated state aliases its output: count those bytes once.
      total_gib=gib(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes),
      attention=sorted(attention_used), compile_s=round(compile_s, 1),
      scope='DiT train step on precomputed latents; frozen VAE/umT5/CLIP encoders not included')
