"""Mesh construction and logical-axis sharding rules (docs/data_and_sharding.md).

Parameters and activations carry logical axis names; one ordered rule list in the config maps
them to mesh axes. `constrain` is a no-op unless `use_mesh_rules` has installed a mesh and rules,
so models run unchanged on one device.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import numpy as np
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

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar('dreamzero_mesh_rules', default=None)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
  """A mesh of `shape` over `axes`; one -1 entry takes the remaining devices."""
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


def logical_to_spec(names: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for logical axis names; a mesh axis is used at most once (first come)."""
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used, spec = set(), []
  for name in names:
    axis = table.get(name) if name is not None else None
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules=DEFAULT_RULES):
  token = _CONTEXT.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def current():
  """(mesh, rules) installed by use_mesh_rules, or None."""
  return _CONTEXT.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op without mesh rules)."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def replicate(tree, mesh: Mesh):
  """Every array of `tree` whole on each device of `mesh` (no copy where it already is)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
