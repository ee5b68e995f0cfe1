"""Times each Pallas kernel against its XLA path and today's unfused baseline at the 14B DiT's shapes.

  python bench/kernels_gpu.py [--repeats 20]      # on a GPU: prints a markdown table
  python bench/kernels_gpu.py --interpret         # anywhere: the interpreter at tiny shapes (smoke run)

Shapes: DROID inference, 1,785 new tokens per example, B=1 and B=2 (CFG batched), width 5120, 40
heads of 128, FFN 13824, 3 timestep groups. Columns (median ms after a warmup, block_until_ready):
kernel = the registry's Pallas kernel ('impl' says if it fell back), xla = the same computation
through XLA, baseline = what the model does today (modulation from a per-token e0 [B, L, 6, D];
a bf16 GEMM for the fp8 rows). Run `python -m dreamzero_jax.kernels.check` first: it checks the
kernels' numbers at the same shapes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dreamzero_jax.kernels import fp8, modulation, qk_norm_rope, registry  # noqa: E402
from dreamzero_jax.kernels.check import timed_ms  # noqa: E402

FULL = dict(tokens=1785, batches=(1, 2), dim=5120, heads=40, head_dim=128, ffn=13824, groups=3)
TINY = dict(tokens=13, batches=(2,), dim=96, heads=4, head_dim=16, ffn=64, groups=3)


def _impl(kernel: registry.Kernel, impl: str, *args, **kw) -> str:
  with registry.record() as used:
    jax.eval_shape(lambda *a: kernel(*a, impl=impl, **kw), *args)
  return next(name for k, name in used if k == kernel.name)


def modulation_rows(s, b, impl, repeats, rng):
  x = jnp.asarray(rng.standard_normal((b, s['tokens'], s['dim'])), jnp.float32)
  table = jnp.asarray(rng.standard_normal((b, s['groups'], 2, s['dim'])), jnp.float32)
  group = jnp.asarray(np.sort(rng.integers(0, s['groups'], s['tokens'])), jnp.int32)
  e0 = modulation.gather_groups(table, group)  # today's per-token rows, as the model holds them
  run = lambda impl_: lambda x, t: modulation.layer_norm_modulate(x, t[:, :, 0], t[:, :, 1], group,
                                                                 out_dtype=jnp.bfloat16, impl=impl_)

  def per_token(x, e0):
    x32 = x - x.mean(-1, keepdims=True)
    h = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + 1e-6)
    return (h * (1 + e0[:, :, 1]) + e0[:, :, 0]).astype(jnp.bfloat16)

  grad = lambda f: jax.grad(lambda x, t: jnp.sum(f(x, t).astype(jnp.float32)), argnums=(0, 1))
  shape = f'x [{b}, {s["tokens"]}, {s["dim"]}], G={s["groups"]}'
  used = _impl(modulation.LAYER_NORM_MODULATE, impl, x, table[:, :, 0], table[:, :, 1], group,
               out_dtype=jnp.bfloat16)
  fwd = dict(kernel=timed_ms(jax.jit(run(impl)), x, table, repeats=repeats),
             xla=timed_ms(jax.jit(run('xla')), x, table, repeats=repeats),
             baseline=timed_ms(jax.jit(per_token), x, e0, repeats=repeats))
  bwd = dict(kernel=timed_ms(jax.jit(grad(run(impl))), x, table, repeats=repeats),
             xla=timed_ms(jax.jit(grad(run('xla'))), x, table, repeats=repeats),
             baseline=timed_ms(jax.jit(grad(per_token)), x, e0, repeats=repeats))
  return [('layer_norm_modulate', shape, used, fwd), ('layer_norm_modulate fwd+bwd', shape, used, bwd)]


def qk_rows(s, b, impl, repeats, rng):
  x = jnp.asarray(rng.standard_normal((b, s['tokens'], s['heads'], s['head_dim'])), jnp.bfloat16)
  w = jnp.asarray(1 + 0.1 * rng.standard_normal(s['heads'] * s['head_dim']), jnp.float32)
  angles = jnp.asarray(rng.uniform(0, 100, (s['tokens'], s['head_dim'] // 2)), jnp.float32)
  ms = dict(kernel=timed_ms(jax.jit(lambda *a: qk_norm_rope.qk_norm_rope(*a, impl=impl)), x, w, angles,
                            repeats=repeats),
            xla=timed_ms(jax.jit(qk_norm_rope.qk_norm_rope_reference), x, w, angles, repeats=repeats))
  return [('qk_norm_rope', f'x [{b}, {s["tokens"]}, {s["heads"]}, {s["head_dim"]}] bf16',
           _impl(qk_norm_rope.QK_NORM_ROPE, impl, x, w, angles), ms)]


def fp8_rows(s, b, impl, repeats, rng):
  rows = []
  m, d, f = b * s['tokens'], s['dim'], s['ffn']
  for k, n, what in ((d, d, 'q/k/v/o'), (d, f, 'ffn1'), (f, d, 'ffn2')):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
    qw = fp8.quantize_weight(w)
    ms = dict(kernel=timed_ms(jax.jit(lambda x, qw: fp8.fp8_matmul(x, qw, impl=impl)), x, qw, repeats=repeats),
              xla=timed_ms(jax.jit(lambda x, qw: fp8.fp8_matmul(x, qw, impl='xla')), x, qw, repeats=repeats),
              baseline=timed_ms(jax.jit(lambda x, w: jnp.matmul(x, w)), x, w, repeats=repeats))
    ms['kernel TFLOP/s'] = 2 * m * k * n / ms['kernel'] / 1e9
    rows.append((f'fp8_matmul {what}', f'[{m}, {k}] x [{k}, {n}]',
                 _impl(fp8.FP8_MATMUL, impl, x, qw, None, out_dtype=jnp.dtype(jnp.bfloat16)), ms))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--interpret', action='store_true',
                      help='run the kernels in the Pallas interpreter at tiny shapes (a smoke run off a GPU)')
  parser.add_argument('--repeats', type=int, default=20, help='timed runs per cell (median)')
  args = parser.parse_args(argv)
  if not args.interpret and jax.default_backend() != 'gpu':
    print(f'no GPU (backend {jax.default_backend()}): run on a GPU, or with --interpret for a smoke run')
    return 2
  s, impl = (TINY, 'interpret') if args.interpret else (FULL, 'pallas')
  rng = np.random.default_rng(0)
  rows = []
  for b in s['batches']:
    for make in (modulation_rows, qk_rows, fp8_rows):
      rows += make(s, b, impl, args.repeats, rng)
  device = jax.devices()[0]
  print(f'{datetime.date.today()} | {device.platform} {getattr(device, "device_kind", "")} | jax {jax.__version__}')
  print('| kernel | shape | impl | kernel ms | xla ms | baseline ms | kernel TFLOP/s |')
  print('|---|---|---|---|---|---|---|')
  cell = lambda ms, key, fmt: format(ms[key], fmt) if key in ms else ''
  for name, shape, used, ms in rows:
    print(f'| {name} | {shape} | {used} | {cell(ms, "kernel", ".3f")} | {cell(ms, "xla", ".3f")} | '
          f'{cell(ms, "baseline", ".3f")} | {cell(ms, "kernel TFLOP/s", ".0f")} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
