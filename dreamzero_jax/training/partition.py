"""Shardings of the train state and batches, and the sharded train step (docs/data_and_sharding.md).

Every parameter carries logical axis names (models/layers.py); `cfg.mesh.rules` maps them to mesh
axes (sharding.logical_to_spec). A dimension that a mesh axis does not divide keeps only the
longest prefix of its mesh axes whose product divides it, down to none (replicated): tiny configs
then run on any mesh, and for real configs the golden files (tests/golden/) show every such case.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dreamzero_jax import sharding
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.training import objective, trainer

Rules = tuple[tuple[str, Any], ...]
AxisSizes = Mapping[str, int]


def config_rules(cfg: ml_collections.ConfigDict) -> Rules:
  """cfg.mesh.rules as hashable (name, axis) pairs (overrides arrive as lists)."""
  norm = lambda a: tuple(a) if isinstance(a, (list, tuple)) else a
  return tuple((name, norm(axis)) for name, axis in cfg.mesh.rules)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], axis_sizes: AxisSizes) -> PartitionSpec:
  """Drops the mesh axes that do not divide their dimension (longest dividing prefix kept)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    while axes and dim % int(np.prod([axis_sizes[a] for a in axes])):
      axes = axes[:-1]
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def abstract_model(cfg: ml_collections.ConfigDict) -> nnx.Module:
  """The DiT with ShapeDtypeStruct leaves: shapes and logical axes, no memory (instant for 14B)."""
  return nnx.eval_shape(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0)))


def param_specs(model: nnx.Module, rules: Rules, axis_sizes: AxisSizes) -> dict:
  """PartitionSpec of every model variable, as the pure dict trainer.model_params returns."""
  _, state = nnx.split(model)

  def spec(var: nnx.Variable) -> PartitionSpec:
    names = var.get_metadata().get('logical_axes')
    return fit_spec(sharding.logical_to_spec(names, rules), var.value.shape, axis_sizes)

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()


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


def state_specs(cfg: ml_collections.ConfigDict, abstract_state: trainer.TrainState, axis_sizes: AxisSizes,
                model: nnx.Module | None = None) -> trainer.TrainState:
  """PartitionSpecs for a TrainState (pass its abstract version, e.g. from jax.eval_shape)."""
  model = abstract_model(cfg) if model is None else model
  full = param_specs(model, config_rules(cfg), axis_sizes)
  params = full if abstract_state.frozen is None else _lora_specs(full, abstract_state.params)
  tx = trainer.make_optimizer(cfg.train)
  # Optimiser moments shard like their parameter; counters and other scalars are replicated.
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                              transform_non_params=lambda _: PartitionSpec(),
                              is_leaf=lambda x: isinstance(x, PartitionSpec))
  return trainer.TrainState(
      step=PartitionSpec(), params=params, frozen=None if abstract_state.frozen is None else full,
      opt_state=opt, rng=PartitionSpec(), ema=None if abstract_state.ema is None else params)


def batch_specs(batch: objective.LatentBatch, rules: Rules, axis_sizes: AxisSizes) -> objective.LatentBatch:
  """Leading (batch) dimension by the 'activation_batch' rule, everything else replicated."""

  def spec(x):
    names = ('activation_batch',) + (None,) * (len(x.shape) - 1)
    return fit_spec(sharding.logical_to_spec(names, rules), x.shape, axis_sizes)

  return jax.tree.map(spec, batch)


def named(mesh: Mesh, specs):
  """PartitionSpec pytree -> NamedSharding pytree over `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def train_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh, abstract_state: trainer.TrainState,
                    abstract_batch: objective.LatentBatch):
  """(state shardings, batch shardings) over `mesh` with cfg.mesh.rules."""
  sizes = dict(mesh.shape)
  return (named(mesh, state_specs(cfg, abstract_state, sizes)),
          named(mesh, batch_specs(abstract_batch, config_rules(cfg), sizes)))


def shard_train_step(step_fn: Callable, mesh: Mesh, state_shardings, batch_shardings, rules: Rules):
  """jax.jit of `step_fn` with explicit shardings, the state donated, traced under the mesh rules
  (so the model's sharding.constrain calls take effect); metrics come back replicated."""

  def step(state, batch):
    with sharding.use_mesh_rules(mesh, rules):
      return step_fn(state, batch)

  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)


def global_batch(local_batch, batch_shardings):
  """Per-host numpy batches (each host's slice of the global batch) -> global jax.Arrays."""
  return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
                      batch_shardings, local_batch)
