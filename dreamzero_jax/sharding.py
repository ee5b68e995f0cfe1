"""Sharding, in one place: meshes, logical-axis rules, PartitionSpecs, global batches
(docs/data_and_sharding.md), the train state's specs and the sharded train step.

Parameters and activations carry logical axis names; one ordered rule list in the config maps
them to mesh axes. From those, `param_specs` and `batch_specs` give the PartitionSpec of every
parameter and batch field for a mesh (`train_state_specs`: a TrainState's, LoRA factors and
optimiser moments like their parameter), `named` turns specs into shardings, and `global_batch`
assembles each host's slice into global arrays. `constrain` is a no-op unless `use_mesh_rules` has
installed a mesh and rules, so models run unchanged without one. One device is a mesh of one
device, not a separate code path: `config_mesh` gives it whatever cfg.mesh says.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'context', 'tensor')

# 14B on a TPU pod (docs/data_and_sharding.md). Each logical name maps to a mesh axis, a tuple of axes,
# or None (replicated). Weights are also split over 'context': its devices hold different tokens of
# the same examples, so without that they would each keep a full fsdp shard of the weights.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('layers', None),
    ('embed', ('fsdp', 'context')),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('head_dim', None),
    ('norm', None),
    ('input', None),
    ('conv_in', None),
    ('embodiment', None),
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', 'context'),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
)

Rules = tuple[tuple[str, Any], ...]
AxisSizes = Mapping[str, int]

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar('dreamzero_mesh_rules', default=None)


# ---- meshes -------------------------------------------------------------------------------------

def parse_axis_sizes(text: str, field: str, allowed: Sequence[str] = MESH_AXES) -> dict[str, int]:
  """'tensor=4' or 'data=2,tensor=4' -> {'data': 2, 'tensor': 4}; '' -> {}. A bad entry is a
  ValueError naming `field` (the config field or flag the text came from)."""
  sizes = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, eq, size = item.partition('=')
    if not eq or name not in allowed or not size.isdigit() or int(size) < 1 or name in sizes:
      raise ValueError(f'{field}={text!r}: expected comma-separated AXIS=SIZE with AXIS one of '
                       f'{", ".join(allowed)} (each once) and SIZE >= 1, e.g. tensor=4')
    sizes[name] = int(size)
  return sizes


@functools.cache
def topology_devices(topology: str) -> tuple:
  """Compile-only TPU devices of `topology` (e.g. 'v5e:2x4'), for ahead-of-time compiles on a host
  without the chips; needs libtpu (the `[tpu]` extra), which provides the TPU compiler."""
  from jax.experimental import topologies  # libtpu: optional, AOT only
  # libtpu takes a host-wide lock meant for processes that drive real chips; compile-only devices
  # drive none, so concurrent compiles (pytest -n, several configs at once) are safe.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  return tuple(topologies.get_topology_desc(topology_name=topology, platform='tpu').devices)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
  """A mesh of `shape` over `axes`; one -1 entry takes the remaining devices.

  Axes are AxisType.Auto (jax >= 0.10 makes meshes Explicit by default otherwise), so shardings
  propagate through jit as GSPMD decides and `constrain` annotates activations.
  """
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape}: at most one -1')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh shape {shape} does not divide {len(devices)} devices')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}')
  auto = (jax.sharding.AxisType.Auto,) * len(axes)
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=auto, devices=devices)


def config_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The mesh of cfg.mesh over `devices` (default: all). On one device every axis has size 1, so
  a config written for a pod runs on a workstation through the same sharded program."""
  devices = jax.devices() if devices is None else devices
  if len(devices) == 1:
    return make_mesh((1,) * len(cfg.mesh.axes), cfg.mesh.axes, devices=devices)
  return make_mesh(cfg.mesh.shape, cfg.mesh.axes, devices=devices)


# ---- logical axes -> PartitionSpecs ---------------------------------------------------------------

def config_rules(cfg: ml_collections.ConfigDict) -> Rules:
  """cfg.mesh.rules as hashable (name, axis) pairs (overrides arrive as lists)."""
  norm = lambda a: tuple(a) if isinstance(a, (list, tuple)) else a
  return tuple((name, norm(axis)) for name, axis in cfg.mesh.rules)


def _axes(entry) -> tuple[str, ...]:
  """The mesh axes of a PartitionSpec entry (None, an axis name, or a tuple of names)."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _entry(axes: Sequence[str]):
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def axes_size(axis_sizes: AxisSizes, entry) -> int:
  """Devices along a PartitionSpec entry: the product of its mesh axes' sizes (mesh.shape works)."""
  return int(np.prod([axis_sizes[a] for a in _axes(entry)]))


def logical_to_spec(names: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for logical axis names; a mesh axis is used at most once (first come)."""
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used, spec = set(), []
  for name in names:
    axes = tuple(a for a in _axes(table.get(name) if name is not None else None) if a not in used)
    used.update(axes)
    spec.append(_entry(axes))
  return PartitionSpec(*spec)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], axis_sizes: AxisSizes) -> PartitionSpec:
  """Drops the mesh axes that do not divide their dimension (longest dividing prefix kept).

  Tiny configs then run on any mesh; for real configs the golden files (tests/golden/) show every
  dimension this leaves less split than its rule says.
  """
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = _axes(entry)
    while axes and dim % axes_size(axis_sizes, axes):
      axes = axes[:-1]
    out.append(_entry(axes))
  return PartitionSpec(*out)


def param_specs(model: nnx.Module, rules: Rules, axis_sizes: AxisSizes) -> dict:
  """PartitionSpec of every variable of `model` (by its 'logical_axes' metadata), as a pure dict.
  `model` may be abstract (nnx.eval_shape): only shapes and metadata are read."""
  return state_specs(nnx.split(model)[1], rules, axis_sizes)


def state_specs(state: nnx.State, rules: Rules, axis_sizes: AxisSizes) -> dict:
  """param_specs of a split module's state (its Variables carry the logical axes)."""

  def spec(var: nnx.Variable) -> PartitionSpec:
    names = var.get_metadata().get('logical_axes')
    return fit_spec(logical_to_spec(names, rules), var.value.shape, axis_sizes)

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()


def batch_specs(batch, rules: Rules, axis_sizes: AxisSizes):
  """A batch pytree's specs: the leading (batch) dimension by the 'activation_batch' rule,
  everything else replicated."""

  def spec(x):
    names = ('activation_batch',) + (None,) * (len(x.shape) - 1)
    return fit_spec(logical_to_spec(names, rules), x.shape, axis_sizes)

  return jax.tree.map(spec, batch)


# ---- the train state's specs and the sharded step -------------------------------------------------

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


def train_state_specs(abstract_state, model: nnx.Module, tx: optax.GradientTransformation, rules: Rules,
                      axis_sizes: AxisSizes):
  """PartitionSpecs for a training.trainer.TrainState (pass its abstract version, e.g. from
  jax.eval_shape), built by `tx` around `model`'s parameters (`model` may be abstract): parameters by
  their logical axes, LoRA factors like their base kernel, optimiser moments like their parameter;
  the step, the rng and the optimiser's counters replicated."""
  full = param_specs(model, rules, axis_sizes)
  params = full if abstract_state.frozen is None else _lora_specs(full, abstract_state.params)
  # Optimiser moments shard like their parameter; counters and other scalars are replicated.
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                              transform_non_params=lambda _: PartitionSpec(),
                              is_leaf=lambda x: isinstance(x, PartitionSpec))
  return abstract_state._replace(
      step=PartitionSpec(), params=params, frozen=None if abstract_state.frozen is None else full,
      opt_state=opt, rng=PartitionSpec(), ema=None if abstract_state.ema is None else params)


def shard_train_step(step_fn: Callable, mesh: Mesh, state_shardings, batch_shardings, rules: Rules):
  """jax.jit of `step_fn` with explicit shardings, the state donated, traced under the mesh rules
  (so the model's sharding.constrain calls take effect); metrics come back replicated."""
  return jax.jit(under_mesh_rules(step_fn, mesh, rules), in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)


# ---- shardings and arrays ------------------------------------------------------------------------

def named(mesh: Mesh, specs):
  """PartitionSpec pytree -> NamedSharding pytree over `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def place_state(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """A split module's state over `mesh` as its logical axes and `rules` say: arrays are moved there,
  ShapeDtypeStructs (an abstract state) come back carrying their sharding. `state` is left as it was."""
  pure = state.to_pure_dict()
  shardings = named(mesh, state_specs(state, rules, dict(mesh.shape)))
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(pure)):
    placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, shardings)
  else:
    placed = jax.device_put(pure, shardings)
  out = jax.tree.map(lambda x: x, state)   # new Variables: replace_by_pure_dict works in place
  out.replace_by_pure_dict(placed)
  return out


def replicate(tree, mesh: Mesh):
  """Every array of `tree` whole on each device of `mesh` (no copy where it already is)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def global_batch(local_batch, batch_shardings):
  """This host's slice of the global batch (numpy or on-device arrays) -> global jax.Arrays.

  One process holds the whole batch and places it directly (arrays already on the device stay
  there); with several, each host contributes its rows (make_array_from_process_local_data)."""
  if jax.process_count() == 1:
    return jax.device_put(local_batch, batch_shardings)
  return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
                      batch_shardings, local_batch)


# ---- the active mesh and rules (what models trace under) -----------------------------------------

@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules=DEFAULT_RULES):
  token = _CONTEXT.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def under_mesh_rules(fn: Callable, mesh: Mesh, rules=DEFAULT_RULES) -> Callable:
  """fn traced under `mesh` and `rules` (jit the result: its `constrain` calls then take effect)."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with use_mesh_rules(mesh, rules):
      return fn(*args, **kwargs)
  return traced


def current():
  """(mesh, rules) installed by use_mesh_rules, or None."""
  return _CONTEXT.get()


def platform() -> str:
  """The platform being traced for: the active mesh's devices (compile-only TPU devices when a pod
  step is compiled ahead of time on a CPU host), else the default backend."""
  ctx = _CONTEXT.get()
  return ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()


def device_count() -> int:
  """Devices of the active mesh (1 without one)."""
  ctx = _CONTEXT.get()
  return 1 if ctx is None else ctx[0].devices.size


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op without mesh rules)."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
