"""One registry for the Pallas GPU kernels, with a fallback chain like models/attention.py's.

Every kernel has three implementations: 'xla' (plain jnp, runs everywhere and ends every chain),
'pallas' (pallas_call lowered through Triton on a GPU) and 'interpret' (the same kernel in the
Pallas interpreter: tests and `kernels.check --interpret` on the CPU).

'auto' is 'pallas' on a GPU and 'xla' elsewhere. 'pallas' runs when the platform is a single GPU,
the shapes fit the kernel's tiling and the kernel at these shapes lowers and compiles on the device
(tried once per shape, outside the caller's trace): a kernel that cannot run falls back to 'xla'
with ONE warning per kernel. Under a multi-device mesh the kernels are not partitioned yet (a
pallas_call is opaque to GSPMD, which would gather its operands), so they fall back too.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from typing import Callable

import jax
from jax.experimental.pallas import triton as pltriton

from dreamzero_jax import sharding

FALLBACK = {
    'auto': ('pallas', 'xla'),
    'pallas': ('pallas', 'xla'),
    'interpret': ('interpret', 'xla'),
    'xla': ('xla',),
}

_USED: contextvars.ContextVar = contextvars.ContextVar('dreamzero_kernels_used', default=None)
_WARNED: set[str] = set()  # kernels that already warned about falling back
_COMPILES: dict[tuple, str | None] = {}  # (kernel, platform, avals) -> None if it compiles, else why not


@contextlib.contextmanager
def record():
  """Collects (kernel, implementation) pairs that kernel calls resolve to while tracing inside."""
  used: set[tuple[str, str]] = set()
  token = _USED.set(used)
  try:
    yield used
  finally:
    _USED.reset(token)


def _avals(args):
  """Shapes and dtypes of a pytree of arrays (what a kernel is compiled for)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A kernel's implementations.

  xla(*args, **kw) and kernel(*args, interpret=..., **kw) compute the same thing; unsupported(*args,
  **kw) returns why the kernel's tiling cannot take these inputs (None when it can); probe(*args,
  **kw), a function of arrays only, is what is compiled to find out whether the kernel lowers on
  the device (by default the kernel itself; a training kernel also compiles its backward).
  """
  name: str
  xla: Callable
  kernel: Callable
  unsupported: Callable[..., str | None]
  probe: Callable | None = None

  def _compile_error(self, args, kw) -> str | None:
    avals = _avals(args)
    leaves, tree = jax.tree.flatten(avals)
    key = (self.name, sharding.platform(), tree, tuple((a.shape, str(a.dtype)) for a in leaves), tuple(sorted(kw.items())))
    if key not in _COMPILES:
      probe = self.probe or functools.partial(self.kernel, interpret=False)
      try:
        jax.jit(lambda *a: probe(*a, **kw)).lower(*avals).compile()
        _COMPILES[key] = None
      except Exception as e:  # any lowering or compile failure means: use XLA  # noqa: BLE001
        _COMPILES[key] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    return _COMPILES[key]

  def why_not(self, impl: str, args, kw) -> str | None:
    """Why implementation impl cannot run these inputs here (None when it can)."""
    if impl == 'xla':
      return None
    if (reason := self.unsupported(*args, **kw)) is not None:
      return reason
    if impl == 'interpret':
      return None
    if sharding.platform() != 'gpu':
      return f'the Pallas kernels lower through Triton on GPUs, not on {sharding.platform()}'
    if sharding.device_count() > 1:
      return 'a multi-device mesh is active (the kernels are not partitioned yet)'
    return self._compile_error(args, kw)

  def resolve(self, impl: str, *args, **kw) -> str:
    """The first implementation of impl's chain that runs these inputs; warns once per kernel
    when a Pallas kernel that was asked for (explicitly, or by 'auto' on a GPU) cannot run."""
    if impl not in FALLBACK:
      raise ValueError(f'unknown kernel implementation {impl!r} (known: {", ".join(FALLBACK)})')
    for name in FALLBACK[impl]:
      reason = self.why_not(name, args, kw)
      if reason is None:
        return name
      if self.name not in _WARNED and (impl != 'auto' or sharding.platform() == 'gpu'):
        _WARNED.add(self.name)
        warnings.warn(f'kernel {self.name}: {name} cannot run ({reason}); using XLA', RuntimeWarning,
                      stacklevel=3)
    return 'xla'

  def __call__(self, *args, impl: str = 'auto', **kw):
    name = self.resolve(impl, *args, **kw)
    if (used := _USED.get()) is not None:
      used.add((self.name, name))
    if name == 'xla':
      return self.xla(*args, **kw)
    return self.kernel(*args, interpret=name == 'interpret', **kw)


def triton_params(num_warps: int, num_stages: int | None = None):
  """Compiler parameters that select the Triton lowering of pallas_call on GPUs (jax >= 0.10
  defaults to Mosaic GPU, whose pallas_call path these BlockSpec kernels are not written for)."""
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
