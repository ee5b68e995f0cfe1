"""Train-step time and MFU for a 14B-width slice: 4 layers, 5120 wide, the DROID sequence, batch 1.

The full 14B step does not fit one GPU; a few layers at full width and full sequence length have
the same per-layer cost, so step time and MFU measured here carry over per layer (docs/gpu_reference.md
has the reference figure: 436 ms, 42% MFU on an H100). Model FLOPs count the forward
matmuls and unmasked attention three times (forward + backward), not the remat recompute, as MFU
conventionally does. Without a GPU the script shrinks the width and canvas so it runs on the
CPU in seconds and says so: those numbers only check that the script works.

  python bench/train_step.py [--config configs/dreamzero_14b_droid.py] [--layers 4] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dreamzero_jax import settings as settings_lib  # noqa: E402
from dreamzero_jax.config import load_config, split_config_args  # noqa: E402
from dreamzero_jax.models.dit import build_dit  # noqa: E402
from dreamzero_jax.training import train_aot, trainer  # noqa: E402

# Dense bf16 datasheet peaks (TFLOP/s) for MFU; --peak_tflops overrides for other devices.
PEAK_TFLOPS = {'NVIDIA H100 80GB HBM3': 989.0, 'NVIDIA H200': 989.0, 'NVIDIA H100 PCIe': 756.0}

# Without a GPU: the same code path at toy width, so the script still runs end to end.
CPU_OVERRIDES = ['model.dim=256', 'model.num_heads=2', 'model.ffn_dim=512', 'model.text_len=64',
                 'model.dtype=float32', 'video.height=64', 'video.width=128']


def model_tflop(cfg, tokens: int, batch: int) -> float:
  """Forward matmul + attention FLOPs of the DiT blocks, times 3 for forward + backward."""
  m = cfg.model
  d, f, layers = m.dim, m.ffn_dim, m.num_layers
  context = m.text_len + (m.image_tokens if m.image_dim else 0)
  per_layer = (8 * tokens * d * d           # self-attention q, k, v, o
               + 4 * tokens * tokens * d    # scores and weighted values
               + 4 * tokens * d * d         # cross-attention q, o
               + 4 * context * d * d        # cross-attention k, v (text and image)
               + 4 * tokens * context * d   # cross-attention scores and values
               + 4 * tokens * d * f)        # FFN
  return 3 * batch * layers * per_layer / 1e12


def main(argv: list[str]) -> None:
  overrides, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/dreamzero_14b_droid.py')
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--runs', type=int, default=5, help='timed steps after one warm-up')
  parser.add_argument('--peak_tflops', type=float, default=None, help='device peak for MFU')
  args = parser.parse_args(rest)

  device = jax.devices()[0]
  on_gpu = device.platform == 'gpu'
  slice_overrides = [f'model.num_layers={args.layers}', f'train.batch_size={args.batch}',
                     'model.attention=' + ('cudnn' if on_gpu else 'xla')]
  cfg = load_config(args.config, slice_overrides + ([] if on_gpu else CPU_OVERRIDES) + overrides)

  model = build_dit(settings_lib.from_config(cfg).model, rngs=nnx.Rngs(0))
  graphdef, state = trainer.init_train_state(model, cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  fill = {jnp.dtype(jnp.float32): rng.standard_normal, jnp.dtype(jnp.bool_): np.ones, jnp.dtype(jnp.int32): np.zeros}
  batch = jax.tree.map(lambda s: jnp.asarray(fill[jnp.dtype(s.dtype)](s.shape), s.dtype),
                       train_aot.abstract_batch(cfg, args.batch))  # every chunk real, embodiment 0
  step = jax.jit(trainer.make_train_step(graphdef, cfg), donate_argnums=0)

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.runs):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)

  median = statistics.median(times)
  tokens, padded = train_aot.sequence_length(cfg)
  tflop = model_tflop(cfg, padded, args.batch)
  peak = args.peak_tflops or PEAK_TFLOPS.get(device.device_kind)
  mfu = f'{100 * tflop / median / peak:.0f}%' if peak else 'n/a (peak unknown)'
  if not on_gpu:
    print(f'no GPU in this run ({device.platform}): a tiny-width slice ({" ".join(CPU_OVERRIDES)}); '
          'the numbers only show the benchmark runs')
  print('| device | layers x dim | tokens (padded) | batch | dtype | attention | compile s | median ms | min ms '
        '| model TFLOP | TFLOP/s | MFU |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  print(f'| {device.device_kind} ({device.platform}) | {cfg.model.num_layers} x {cfg.model.dim} | {tokens} ({padded}) '
        f'| {args.batch} | {cfg.model.dtype} | {cfg.model.attention} | {compile_s:.1f} | {median * 1e3:.0f} '
        f'| {min(times) * 1e3:.0f} | {tflop:.3g} | {tflop / median:.3g} | {mfu} |')
  print(f'runs_ms={[round(t * 1e3) for t in times]} loss={float(metrics["loss"]):.4f}')


if __name__ == '__main__':
  main(sys.argv[1:])
