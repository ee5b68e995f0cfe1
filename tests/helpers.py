"""Shared test helpers."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_model(factory, seed: int = 0, scale: float = 0.3):
  """factory() built abstractly, every parameter filled with scale * N(0, 1) numpy draws.

  Skips jax.random's per-shape compiles, and gives zero-initialised layers (output heads) real
  values so that outputs react to their inputs.
  """
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype),
                                          state))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_devices_env(count: int) -> dict:
  """Environment of a fresh Python process with `count` fake CPU devices that imports this checkout
  (XLA_FLAGS is read when JAX starts, so multi-device checks run as scripts in a new process)."""
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={count}', JAX_PLATFORMS='cpu',
              PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))


def run_with_fake_devices(script: str, args: list, count: int, expect: str, timeout: int = 900) -> str:
  """Runs `python script *args` with `count` fake devices; asserts success and `expect` in its output."""
  out = subprocess.run([sys.executable, script, *map(str, args)], env=fake_devices_env(count), cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert expect in out.stdout, out.stdout[-3000:]
  return out.stdout
