"""Train-step time with the frozen encoders on the hot path vs the latent cache (data.latent_cache).

  python bench/latent_cache.py --data DIR [--config configs/metaworld_cpu.py] [--steps 20]

DIR holds a built Meta-World dataset (python -m dreamzero_jax.datasets build metaworld ...). Both
paths run in this process on the same batches, interleaved step by step (so a shared machine slows
both alike), after one compile each; the table gives the median per-step time of each (data loading,
encoding or cache gather, and the jitted update) and their ratio, plus the one-off cost of building
the cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from dreamzero_jax import settings as settings_lib  # noqa: E402
from dreamzero_jax.config import load_config, split_config_args  # noqa: E402
from dreamzero_jax.datasets import pipeline  # noqa: E402
from dreamzero_jax.models import encoders  # noqa: E402
from dreamzero_jax.training import latent_cache, train_aot, trainer  # noqa: E402


def main(argv=None) -> int:
  overrides, rest = split_config_args(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', required=True)
  p.add_argument('--config', default='configs/metaworld_cpu.py')
  p.add_argument('--steps', type=int, default=20)
  args = p.parse_args(rest)
  cfg = load_config(args.config, [f'data.dir={args.data}', *overrides])
  settings = settings_lib.from_config(cfg)
  frozen = encoders.build_frozen_encoders(settings)
  encode = encoders.BatchEncoder(frozen, settings)
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    encode.cache = latent_cache.build_or_load(cfg, tmp, encode, frozen)
    build_s = time.perf_counter() - t0
    iters = {'on the fly': iter(pipeline.make_dataset(settings, train=True, process_index=0, process_count=1)),
             'latent cache': iter(pipeline.make_dataset(settings, train=True, process_index=0, process_count=1,
                                                        latent_rows=encode.cache.member_rows))}
    graphdef, abstract = trainer.abstract_train_state(cfg)
    step, to_device, shardings = trainer.compiled_train_step(
        cfg, graphdef, abstract, train_aot.abstract_batch(cfg, trainer.update_batch_size(cfg.train)))
    params = encoders.initial_dit_params(settings)
    state = jax.jit(lambda p, k: trainer.state_from_params(p, cfg, k), out_shardings=shardings)(
        jax.device_put(params, shardings.params), jax.random.key(0))
    times = {name: [] for name in iters}
    for i in range(args.steps + 1):
      for name, it in iters.items():
        t = time.perf_counter()
        state, metrics = step(state, to_device(encode(next(it))))
        jax.block_until_ready(metrics)
        if i:   # the first step of each compiles
          times[name].append(time.perf_counter() - t)
  med = {name: statistics.median(v) for name, v in times.items()}
  print(f'{args.config}, batch {cfg.train.batch_size}, {cfg.video.height}x{cfg.video.width} canvas, '
        f'{jax.devices()[0].device_kind}; cache: {len(encode.cache.valid)} clips built in {build_s:.1f} s')
  print('| path | median step (s) | steps/s |\n|---|---|---|')
  for name, m in med.items():
    print(f'| {name} | {m:.3f} | {1 / m:.2f} |')
  print(f'speed-up: {med["on the fly"] / med["latent cache"]:.1f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())
