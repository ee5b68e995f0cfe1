"""Every kernel against its pure-jnp reference: one JSON line per kernel and dtype, exit 1 on a mismatch.

  python -m dreamzero_jax.kernels.check [--interpret]

On a GPU the kernels run as compiled Pallas (Triton) kernels at the 14B DiT's shapes (DROID
inference: 1,785 tokens, width 5120, 40 heads) and each line also has `ms` for the kernel and the
reference (median after a warmup, block_until_ready). --interpret runs them in the Pallas
interpreter at small shapes (the CPU); without it, on a backend where a kernel cannot run, the line
says impl 'xla' (the registry's fallback, still checked against the reference).

max_rel_err = max |kernel - reference| / max |reference| over the output. Tolerances: fp32 1e-5,
bf16 1e-2; the fp8 GEMM against its dequantised reference at fp32 output 1e-5, and against the
unquantised product within fp8.error_bound elementwise (`within_bound`). The training kernel's
gradients (x, shift and scale tables) are checked the same way (`grad_max_rel_err`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dreamzero_jax.kernels import fp8, modulation, qk_norm_rope, registry

TOLERANCE = {'float32': 1e-5, 'bfloat16': 1e-2}


def rel_err(got, want) -> float:
  got, want = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (got, want))
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def timed_ms(fn, *args, repeats: int = 20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def shapes(small: bool) -> dict:
  """Small shapes for the interpreter (odd lengths, several row chunks), else the 14B DiT's."""
  if small:
    return dict(b=2, length=13, groups=3, dim=96, heads=4, head_dim=16, m=37, k=64, n=48)
  return dict(b=1, length=1785, groups=3, dim=5120, heads=40, head_dim=128, m=1785, k=5120, n=13824)


def _impl_of(kernel: registry.Kernel, impl: str, *args, **kw) -> str:
  with registry.record() as used:
    jax.eval_shape(lambda *a: kernel(*a, impl=impl, **kw), *args)
  return next(name for k, name in used if k == kernel.name)


def check_layer_norm_modulate(s, impl, rng, dtype, timing):
  x = jnp.asarray(rng.standard_normal((s['b'], s['length'], s['dim'])) * 3 + 1, jnp.float32)
  shift, scale = (jnp.asarray(rng.standard_normal((s['b'], s['groups'], s['dim'])), jnp.float32) for _ in '01')
  # fp32 with one group layout for the batch, bf16 with one per example: both index shapes checked.
  group_shape = (s['length'],) if dtype == jnp.float32 else (s['b'], s['length'])
  group = jnp.asarray(rng.integers(0, s['groups'], group_shape), jnp.int32)
  cot = jnp.asarray(rng.standard_normal(x.shape), dtype)

  def run(impl_):
    fn = lambda x, shift, scale: modulation.layer_norm_modulate(x, shift, scale, group, out_dtype=dtype, impl=impl_)
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot.astype(jnp.float32))
    return jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  (kernel, kernel_grad), (ref, ref_grad) = run(impl), run('xla')
  args = (x, shift, scale)
  out = dict(max_rel_err=rel_err(kernel(*args), modulation.layer_norm_modulate_reference(
      x, shift, scale, group, out_dtype=dtype)),
             grad_max_rel_err=max(rel_err(g, w) for g, w in zip(kernel_grad(*args), ref_grad(*args))),
             impl=_impl_of(modulation.LAYER_NORM_MODULATE, impl, x, shift, scale, group, out_dtype=dtype))
  out['ok'] = max(out['max_rel_err'], out['grad_max_rel_err']) < TOLERANCE[jnp.dtype(dtype).name]
  if timing:
    out['ms'] = dict(kernel=timed_ms(kernel, *args), reference=timed_ms(ref, *args),
                     grad_kernel=timed_ms(kernel_grad, *args), grad_reference=timed_ms(ref_grad, *args))
  return out


def check_qk_norm_rope(s, impl, rng, dtype, timing):
  x = jnp.asarray(rng.standard_normal((s['b'], s['length'], s['heads'], s['head_dim'])), dtype)
  weight = jnp.asarray(1 + 0.1 * rng.standard_normal(s['heads'] * s['head_dim']), jnp.float32)
  angles = jnp.asarray(rng.uniform(0, 100, (s['length'], s['head_dim'] // 2)), jnp.float32)
  kernel = jax.jit(lambda *a: qk_norm_rope.qk_norm_rope(*a, impl=impl))
  ref = jax.jit(qk_norm_rope.qk_norm_rope_reference)
  err = rel_err(kernel(x, weight, angles), ref(x, weight, angles))
  out = dict(max_rel_err=err, impl=_impl_of(qk_norm_rope.QK_NORM_ROPE, impl, x, weight, angles),
             ok=err < TOLERANCE[jnp.dtype(dtype).name])
  if timing:
    out['ms'] = dict(kernel=timed_ms(kernel, x, weight, angles), reference=timed_ms(ref, x, weight, angles))
  return out


def check_fp8_matmul(s, impl, rng, dtype, timing):
  """dtype: the activations' and output's (the weight is quantised from the same dtype)."""
  x = jnp.asarray(rng.standard_normal((s['m'], s['k'])), dtype)
  w = jnp.asarray(rng.standard_normal((s['k'], s['n'])) / np.sqrt(s['k']), dtype)
  bias = jnp.asarray(rng.standard_normal(s['n']), jnp.float32)
  qw = fp8.quantize_weight(w)
  kernel = jax.jit(lambda x, qw, bias: fp8.fp8_matmul(x, qw, bias, out_dtype=dtype, impl=impl))
  ref = jax.jit(lambda x, qw, bias: fp8.fp8_matmul_reference(x, qw, bias, out_dtype=dtype))
  err = rel_err(kernel(x, qw, bias), ref(x, qw, bias))
  out = dict(max_rel_err=err, impl=_impl_of(fp8.FP8_MATMUL, impl, x, qw, bias, out_dtype=dtype))
  ok = err < TOLERANCE[jnp.dtype(dtype).name]
  if dtype == jnp.float32:  # the quantisation error itself, at an output that does not round it away
    exact = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
    got = jax.jit(lambda x, qw: fp8.fp8_matmul(x, qw, out_dtype=jnp.float32, impl=impl))(x, qw)
    out['max_rel_err_unquantized'] = rel_err(got, exact)
    out['within_bound'] = bool(jnp.all(jnp.abs(got - exact) <= fp8.error_bound(x, w)))
    ok = ok and out['within_bound']
  out['ok'] = ok
  if timing:
    unquantized = jax.jit(lambda x, w, bias: (jnp.matmul(x, w, preferred_element_type=jnp.float32)
                                              + bias).astype(dtype))
    out['ms'] = dict(kernel=timed_ms(kernel, x, qw, bias), reference=timed_ms(ref, x, qw, bias),
                     unquantized=timed_ms(unquantized, x, w, bias))
  return out


CHECKS = {
    'layer_norm_modulate': check_layer_norm_modulate,
    'qk_norm_rope': check_qk_norm_rope,
    'fp8_matmul': check_fp8_matmul,
}


def run(interpret: bool, seed: int = 0) -> list[dict]:
  """Runs every check; returns one record per (kernel, dtype)."""
  on_gpu = jax.default_backend() == 'gpu'
  s = shapes(small=interpret or not on_gpu)
  impl = 'interpret' if interpret else 'auto'
  records = []
  for name, check in CHECKS.items():
    for dtype in (jnp.float32, jnp.bfloat16):
      rec = dict(kernel=name, dtype=jnp.dtype(dtype).name)
      rec.update(check(s, impl, np.random.default_rng(seed), dtype, timing=on_gpu and not interpret))
      records.append(rec)
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--interpret', action='store_true', help='run the kernels in the Pallas interpreter')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  records = run(args.interpret, args.seed)
  for rec in records:
    print(json.dumps(rec), flush=True)
  return 0 if all(r['ok'] for r in records) else 1


if __name__ == '__main__':
  sys.exit(main())
