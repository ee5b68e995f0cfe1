"""The small VAE's held-out PSNR against updates, per variant of its width, loss and batch: which
VAE reaches a given PSNR in the fewest CPU-seconds (the default job's VAE stage, bench/RESULTS.md).

Runs training/vae_training.py's own train_vae on frames exported once, so the variants can train where the
dataset readers are not installed (a GPU machine: all variants at once, one process each):

  python bench/vae_sweep.py export --config configs/metaworld_cpu.py:quick --config.data.dir=D --out F.npz
  python bench/vae_sweep.py train --frames F.npz --variant wide16 --steps 4000 --out DIR [--max_minutes M]
  python bench/vae_sweep.py cost --frames F.npz [--variant NAME ...]    # seconds per update here
  python bench/vae_sweep.py table DIR                                    # every variant trained in DIR

Each variant is config overrides on --config (default: the default job's, configs/metaworld_cpu.py:quick).
`train` logs the held-out PSNR every --eval_every updates (DIR/NAME@STEPS/vae_metrics.jsonl) and
writes DIR/NAME@STEPS/result.json; `table` prints PSNR at each logged update count, the final PSNR and the
updates per second.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from dreamzero_jax import settings as settings_lib  # noqa: E402
from dreamzero_jax.config import load_config, split_config_args  # noqa: E402
from dreamzero_jax.models import vae as vae_lib  # noqa: E402
from dreamzero_jax.training import vae_training  # noqa: E402

SPATIAL4 = ['vae.dim_mult=(1, 2, 2)', 'vae.temporal_downsample=(True, True)']   # 4x, not 8x, in space
VARIANTS = {
    'base': [],
    'wide16': ['vae.base_dim=16'],
    'wide32': ['vae.base_dim=32'],
    'dec16': ['vae.decoder_base_dim=16'],
    'dec32': ['vae.decoder_base_dim=32'],
    'mse': ['vae_train.l1_weight=0.0'],
    'lr4e-3': ['vae_train.lr=0.004'],
    'lr1e-3': ['vae_train.lr=0.001'],
    'batch4': ['vae_train.batch_size=4'],
    'img16': ['vae_train.image_batch=16'],
    'res2': ['vae.num_res_blocks=2'],
    'spatial4': SPATIAL4,
    'spatial4_lr4e-3': [*SPATIAL4, 'vae_train.lr=0.004'],
    'spatial4_lr3e-3': [*SPATIAL4, 'vae_train.lr=0.003'],
    'spatial4_lr4e-3_clip17': [*SPATIAL4, 'vae_train.lr=0.004', 'vae_train.clip_frames=17'],
    'spatial4_lr4e-3_clip9': [*SPATIAL4, 'vae_train.lr=0.004', 'vae_train.clip_frames=9'],
}


def variant_config(spec: str, overrides: list[str], name: str):
  if name not in VARIANTS:
    raise SystemExit(f'--variant: unknown {name!r} (known: {", ".join(VARIANTS)})')
  return load_config(spec, [*overrides, *VARIANTS[name]])


def save_frames(path: str, frames: vae_training.EpisodeFrames) -> None:
  arrays = {f'train_{i:04d}': e for i, e in enumerate(frames.train)}
  arrays.update({f'heldout_{i:04d}': e for i, e in enumerate(frames.heldout)})
  np.savez_compressed(path, stride=np.int64(frames.stride), ids=np.array(frames.heldout_ids), **arrays)


def load_frames(path: str) -> vae_training.EpisodeFrames:
  with np.load(path, allow_pickle=False) as z:
    pick = lambda prefix: [z[k] for k in sorted(z.files) if k.startswith(prefix)]
    return vae_training.EpisodeFrames(pick('train_'), pick('heldout_'), [str(i) for i in z['ids']],
                                      int(z['stride']))


def seconds_per_update(cfg, frames: vae_training.EpisodeFrames, repeats: int = 5) -> float:
  """Median wall-clock seconds of one update (after two warm-ups), this machine's backend."""
  t = cfg.vae_train
  graphdef, params = nnx.split(vae_lib.WanVAE(settings_lib.from_config(cfg).vae, rngs=nnx.Rngs(0)))
  params = params.to_pure_dict()
  opt_state = vae_training.make_optimizer(t).init(params)
  update = vae_training.jitted_update(graphdef, t)
  rng = np.random.default_rng(0)
  times = []
  for i in range(repeats + 2):
    video = vae_training.sample_clips(frames.train, t.batch_size, vae_training.train_clip_frames(cfg), frames.stride,
                                        rng)
    images = vae_training.sample_clips(frames.train, t.image_batch, 1, 1, rng) if t.image_batch else None
    tick = time.perf_counter()
    params, opt_state, metrics = update(params, opt_state, video, images, jax.random.key(i), np.float32(1e-3))
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - tick)
  return statistics.median(times[2:])


def table(out: str) -> None:
  rows = []
  for name in sorted(os.listdir(out)):
    result_path = os.path.join(out, name, 'result.json')
    if not os.path.isfile(result_path):
      continue
    with open(result_path) as fh:
      result = json.load(fh)
    curve = {}
    with open(os.path.join(out, name, vae_training.METRICS_FILE)) as fh:
      for line in fh:
        record = json.loads(line)
        if 'heldout_psnr_db' in record:
          curve[record['step']] = record['heldout_psnr_db']
    rows.append((name, result, curve))
  steps = sorted({s for _, _, c in rows for s in c})
  marks = [s for s in steps if s % 500 == 0] or steps
  print('| variant | ' + ' | '.join(f'@{s}' for s in marks) + ' | final dB (steps) | mean frame dB | updates/s |')
  print('|---' * (len(marks) + 4) + '|')
  for name, result, curve in rows:
    cells = ' | '.join(f'{curve[s]:.2f}' if s in curve else '' for s in marks)
    print(f'| {name} | {cells} | {result["psnr_db"]:.2f} ({result["steps"]}) | '
          f'{result["mean_frame_psnr_db"]:.2f} | {result["updates_per_second"]:.1f} |')


def main(argv=None) -> int:
  overrides, argv = split_config_args(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('command', choices=('export', 'train', 'cost', 'table'))
  p.add_argument('--config', default='configs/metaworld_cpu.py:quick')
  p.add_argument('--frames', help='frames exported by `export` (.npz)')
  p.add_argument('--out')
  p.add_argument('--variant', action='append')
  p.add_argument('--steps', type=int, default=4000)
  p.add_argument('--eval_every', type=int, default=250)
  p.add_argument('--max_minutes', type=float)
  args = p.parse_args(argv)
  if args.command == 'table':
    table(args.out)
    return 0
  if args.command == 'export':
    save_frames(args.out, vae_training.episode_frames(load_config(args.config, overrides)))
    print(f'wrote {args.out}')
    return 0
  frames = load_frames(args.frames)
  if args.command == 'cost':
    print(f'| variant | s/update ({jax.default_backend()}) |\n|---|---|')
    for name in args.variant or list(VARIANTS):
      print(f'| {name} | {seconds_per_update(variant_config(args.config, overrides, name), frames):.3f} |', flush=True)
    return 0
  for name in args.variant or ['base']:
    cfg = variant_config(args.config, [*overrides, f'vae_train.eval_every={args.eval_every}'], name)
    workdir = os.path.join(args.out, f'{name}@{args.steps}')   # a variant's run at its schedule's length
    started = time.time()
    result = vae_training.train_vae(cfg, workdir, steps=args.steps, max_minutes=args.max_minutes, frames=frames)
    result['updates_per_second'] = result['steps'] / (time.time() - started)
    with open(os.path.join(workdir, 'result.json'), 'w') as fh:
      json.dump(dict(result, variant=name, overrides=VARIANTS[name], backend=jax.default_backend()), fh)
    print(json.dumps(dict(variant=name, psnr_db=round(result['psnr_db'], 2), steps=result['steps'])), flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
