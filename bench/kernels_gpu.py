"""Times each Pallas kernel against its XLA path and the unfused baseline at the 14B DiT's shapes;
with --dit, one 14B DiT forward in bf16 and fp8 beside the PyTorch peer instead.

  python bench/kernels_gpu.py [--repeats 20]      # on a GPU: prints a markdown table
  python bench/kernels_gpu.py --interpret         # anywhere: the interpreter at tiny shapes (smoke run)
  python bench/kernels_gpu.py --dit               # on a GPU: the 14B DiT forward table with the peer
  python bench/kernels_gpu.py --dit --interpret   # the DiT table's smoke run: configs/tiny.py on the CPU

--dit: the model's own cached forward (DreamZeroDiT.denoise, jitted, random weights, params in
bf16) at the DROID inference shape: 1,785 new tokens (2 latent frames + 24 actions + 1 state)
against a full KV cache of 7,920 tokens, text/image K/V precomputed, B=1 and B=2 (CFG batched);
model.quantization 'none' (bf16 weights and cache) and 'fp8' (e4m3 blocks and cache), kernels
'pallas' (falling back to XLA where one cannot run: the table's impl column); then
bench/torch_dit_peer.py at the same shape in a child process on the same device: eager and
torch.compile (eager only on the CPU). The `vs torch` column is each JAX row's time over the
fastest peer row of the same batch.

Shapes: DROID inference, 1,785 new tokens per example, B=1 and B=2 (CFG batched), width 5120, 40
heads of 128, FFN 13824, 3 timestep groups. Columns (median ms after a warmup, block_until_ready):
kernel = the registry's Pallas kernel ('impl' says if it fell back), xla = the same computation
through XLA, baseline = the model before the kernels (modulation from a per-token e0 [B, L, 6, D];
a bf16 GEMM for the fp8 rows). Run `python -m dreamzero_jax.kernels.check` first: it checks the
kernels' numbers at the same shapes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flax import nnx  # noqa: E402

from dreamzero_jax import settings as settings_lib  # noqa: E402
from dreamzero_jax.config import load_config  # noqa: E402
from dreamzero_jax.inference.rollout import RolloutSpec  # noqa: E402
from dreamzero_jax.kernels import fp8, modulation, qk_norm_rope, registry  # noqa: E402
from dreamzero_jax.kernels.check import timed_ms  # noqa: E402
from dreamzero_jax.models import dit, kv_cache, masks  # noqa: E402

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torch_dit_peer.py')

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
  e0 = modulation.gather_groups(table, group)  # per-token rows, as the model held them before the group tables
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


def dit_rows(config: str, impl: str, batches, repeats: int, rng):
  """(name, shape, kernels used, {'ms': ...}) of one DiT forward per quantization and batch."""
  rows = []
  for quantization in ('none', 'fp8'):
    cfg = settings_lib.from_config(load_config(config, ['model.param_dtype="bfloat16"', f'model.kernels={impl}',
                                                        f'model.quantization={quantization}']))
    m, v = cfg.model, cfg.video
    geo = RolloutSpec.from_config(cfg)
    model = dit.for_inference(nnx.jit(lambda: dit.build_dit(m, rngs=nnx.Rngs(0)))(), quantization)
    graphdef, state = nnx.split(model)
    h, w = geo.latent_hw
    arr = lambda *shape, dtype=jnp.float32: jnp.asarray(rng.standard_normal(shape), dtype)
    layout = masks.video_layout(range(1 + v.max_chunks * geo.lf), geo.tokens_per_frame, geo.lf, clean=True)
    for b in batches:
      kv = (m.num_layers, b, geo.capacity, m.num_heads, m.dim // m.num_heads)
      dtype = kv_cache.cache_dtype(m)
      # A full cache: every slot a real frame's (the last chunk's step attends to all 7,920 keys).
      cache = kv_cache.KVCache(jax.random.normal(jax.random.key(1), kv, jnp.bfloat16).astype(dtype),
                               jax.random.normal(jax.random.key(2), kv, jnp.bfloat16).astype(dtype),
                               jnp.asarray(layout.group, jnp.int8), jnp.asarray(layout.chunk, jnp.int32),
                               jnp.int32(geo.capacity))
      image = arr(b, m.image_tokens, m.image_dim) if m.image_dim else None
      cross_kv = jax.jit(lambda s, t, i: nnx.merge(graphdef, s).cross_kv(*nnx.merge(graphdef, s).embed_context(t, i)))(
          state, arr(b, m.text_len, m.text_dim), image)
      i2v_cond = arr(b, geo.lf, h, w, m.in_channels - v.latent_channels) if geo.i2v else None
      args = (arr(b, geo.lf, h, w, v.latent_channels), jnp.full((b,), 500.0), arr(b, v.action_horizon, m.action_dim),
              jnp.full((b,), 500.0), arr(b, 1, m.state_dim), jnp.zeros((b,), jnp.int32), jnp.int32(v.max_chunks - 1),
              cache, cross_kv, i2v_cond)
      forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s).denoise(*a))
      with registry.record() as used:
        jax.eval_shape(forward, state, *args)
      impls = ', '.join(sorted(f'{k}:{i}' for k, i in used))
      shape = f'B={b}, {geo.lf * geo.tokens_per_frame + v.action_horizon + 1} new tokens, {geo.capacity} cached'
      weights = next(x.dtype for x in jax.tree.leaves(nnx.state(model.blocks.ffn1)) if x.ndim == 3)
      rows.append((f'jax DiT forward, {weights.name} weights + {dtype.name} cache',
                   shape, impls, dict(ms=timed_ms(forward, state, *args, repeats=repeats), batch=b)))
    del model, state
  return rows


def peer_rows(config: str, repeats: int) -> list:
  """The PyTorch peer's rows (eager, torch.compile) at config's shape, run now on this device."""
  cfg = settings_lib.from_config(load_config(config))
  m, v = cfg.model, cfg.video
  geo = RolloutSpec.from_config(cfg)
  new_tokens = geo.lf * geo.tokens_per_frame + v.action_horizon + 1
  on_gpu = jax.default_backend() == 'gpu'
  cmd = [sys.executable, PEER, '--layers', str(m.num_layers), '--dim', str(m.dim), '--heads', str(m.num_heads),
         '--ffn', str(m.ffn_dim), '--new_tokens', str(new_tokens), '--cached', str(geo.capacity),
         '--text', str(m.text_len), '--image', str(m.image_tokens if m.image_dim else 0),
         '--repeats', str(max(3, repeats // 2))] + ([] if on_gpu else ['--device', 'cpu', '--no_compile'])
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
  rows = []
  for line in out.stdout.splitlines():
    if (match := re.match(r'(torch[\w. ]*) B=(\d+) q=(\d+) kv=(\d+): ([\d.]+) ms', line)):
      name, b, q, kv, ms = match.groups()
      rows.append((name, f'B={b}, {q} new tokens, {kv} cached', 'torch', dict(ms=float(ms), batch=int(b))))
    elif ' failed: ' in line:
      rows.append((line.split(' B=')[0], '', 'failed', dict(note=line.split(' failed: ', 1)[1][:160])))
  return rows or [('torch peer', '', 'failed', dict(note=(out.stdout + out.stderr)[-200:].replace('\n', ' ')))]


def print_dit_table(rows) -> None:
  """The table, with each JAX row's time over the fastest peer row of its batch (3 significant digits:
  a tiny smoke-run forward beside a loaded peer stays above 0.00x)."""
  fastest = {}
  for name, _, used, ms in rows:
    if used == 'torch' and 'ms' in ms:
      fastest[ms['batch']] = min(ms['ms'], fastest.get(ms['batch'], float('inf')))
  print('| forward | shape | kernels | ms | vs torch |')
  print('|---|---|---|---|---|')
  for name, shape, used, ms in rows:
    ratio = (f'{ms["ms"] / fastest[ms["batch"]]:.3g}x' if used != 'torch' and 'ms' in ms
             and ms.get('batch') in fastest else '')
    print(f'| {name} | {shape} | {used} | {format(ms["ms"], ".1f") if "ms" in ms else ms["note"]} | {ratio} |')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--interpret', action='store_true',
                      help='run the kernels in the Pallas interpreter at tiny shapes (a smoke run off a GPU)')
  parser.add_argument('--dit', action='store_true',
                      help='time the DiT forward (bf16, fp8) and the PyTorch peer instead of the kernels')
  parser.add_argument('--repeats', type=int, default=20, help='timed runs per cell (median)')
  args = parser.parse_args(argv)
  if not args.interpret and jax.default_backend() != 'gpu':
    print(f'no GPU (backend {jax.default_backend()}): run on a GPU, or with --interpret for a smoke run')
    return 2
  s, impl = (TINY, 'interpret') if args.interpret else (FULL, 'pallas')
  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  if args.dit:
    config = 'configs/tiny.py' if args.interpret else 'configs/dreamzero_14b_droid.py'
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), config)
    rows = dit_rows(path, impl, (1, 2), args.repeats, rng) + peer_rows(path, args.repeats)
    print(f'{datetime.date.today()} | {device.platform} {getattr(device, "device_kind", "")} | jax {jax.__version__}'
          f' | {config}')
    print_dit_table(rows)
    return 0
  rows = []
  for b in s['batches']:
    for make in (modulation_rows, qk_rows, fp8_rows):
      rows += make(s, b, impl, args.repeats, rng)
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
