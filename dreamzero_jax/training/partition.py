"""The train state's shardings and the sharded train step (docs/data_and_sharding.md).

What is general (meshes, rules, logical -> PartitionSpec, parameter and batch specs, global
batches) is `dreamzero_jax.sharding`; this module adds what a TrainState needs: LoRA factors and
optimiser moments shard like their parameter, and the step is jitted with those shardings. One
device is a one-device mesh (`compiled_train_step`), so a workstation and a pod run one program.
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dreamzero_jax import sharding
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.training import objective, trainer


def abstract_model(cfg: ml_collections.ConfigDict) -> nnx.Module:
  """The DiT with ShapeDtypeStruct leaves: shapes and logical axes, no memory (instant for 14B)."""
  return nnx.eval_shape(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0)))


def _lora_specs(specs: dict, lora_params: dict) -> dict:
  """LoRA factors shard like their base kernel: A [layers, in, r] by its input, B by its output."""
  out = {}
  for key in lora_params:
    node = specs
    for part in key.split('/'):
      node = node[part]
    layers, din, dout = node
    out[key] = {'a': PartitionSpec(layers, din, None), 'b': PartitionSpec(layers, None, dout)}
  return out


def state_specs(cfg: ml_collections.ConfigDict, abstract_state: trainer.TrainState, axis_sizes: sharding.AxisSizes,
                model: nnx.Module | None = None) -> trainer.TrainState:
  """PartitionSpecs for a TrainState (pass its abstract version, e.g. from jax.eval_shape)."""
  model = abstract_model(cfg) if model is None else model
  full = sharding.param_specs(model, sharding.config_rules(cfg), axis_sizes)
  params = full if abstract_state.frozen is None else _lora_specs(full, abstract_state.params)
  tx = trainer.make_optimizer(cfg.train)
  # Optimiser moments shard like their parameter; counters and other scalars are replicated.
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                              transform_non_params=lambda _: PartitionSpec(),
                              is_leaf=lambda x: isinstance(x, PartitionSpec))
  return trainer.TrainState(
      step=PartitionSpec(), params=params, frozen=None if abstract_state.frozen is None else full,
      opt_state=opt, rng=PartitionSpec(), ema=None if abstract_state.ema is None else params)


def train_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh, abstract_state: trainer.TrainState,
                    abstract_batch: objective.LatentBatch):
  """(state shardings, batch shardings) over `mesh` with cfg.mesh.rules."""
  sizes = dict(mesh.shape)
  return (sharding.named(mesh, state_specs(cfg, abstract_state, sizes)),
          sharding.named(mesh, sharding.batch_specs(abstract_batch, sharding.config_rules(cfg), sizes)))


def shard_train_step(step_fn: Callable, mesh: Mesh, state_shardings, batch_shardings, rules: sharding.Rules):
  """jax.jit of `step_fn` with explicit shardings, the state donated, traced under the mesh rules
  (so the model's sharding.constrain calls take effect); metrics come back replicated."""
  return jax.jit(sharding.under_mesh_rules(step_fn, mesh, rules), in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)


def compiled_train_step(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, abstract_state: trainer.TrainState,
                        abstract_batch: objective.LatentBatch):
  """(step, to_device, state shardings) of the train step over cfg's mesh (sharding.config_mesh:
  one device is a mesh of one). `step(state, batch)` is jitted with the state donated;
  `to_device(batch)` turns this host's batch into the step's global batch (multi-host: each host
  feeds its own rows); the state shardings say where a restored or new state goes."""
  mesh = sharding.config_mesh(cfg)
  state_sh, batch_sh = train_shardings(cfg, mesh, abstract_state, abstract_batch)
  step = shard_train_step(trainer.make_train_step(graphdef, cfg), mesh, state_sh, batch_sh,
                          sharding.config_rules(cfg))
  return step, lambda batch: sharding.global_batch(batch, batch_sh), state_sh
