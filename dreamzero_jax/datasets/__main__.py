"""`python -m dreamzero_jax.datasets build|stats|inspect ...` (README, "Commands").

  build metaworld --out DIR [--tasks a,b] [--episodes N] [--image_size S] [--seed S] [--variations V]
                  [--video_only_tasks a,b|all] [--video_only_episodes N]   those tasks' episodes
                  stored without actions (video-only demonstrations), N of each
  build droid --src RLDS_DIR --out DIR
  build agibot --src LEROBOT_DIR --out DIR
  build lerobot --src LEROBOT_DIR --out DIR (--embodiment NAME | --embodiment_file E.json)
  embodiment --from_lerobot LEROBOT_DIR [--name N] [--out E.json]   a draft embodiment file to check
  build rlds --src RLDS_DIR --spec SPEC.json --out DIR
  stats --config C [--config.x=...]          recomputes norm_stats.json next to the dataset
  stats --config C --from_official FILE [--out PATH]   the release's statistics in our format
  inspect --config C [--batches N] [--eval]  one JSON line per batch
Any bad input ends in one line `error: ...` naming the field, and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Sequence

import numpy as np
from absl import flags

from dreamzero_jax import config as config_lib
from dreamzero_jax import embodiments
from dreamzero_jax import settings as settings_lib
from dreamzero_jax.datasets import episodes, lerobot_embodiment, normalization, pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _builder_module(name: str):
  # The TFDS builders live in the repository's data/ folder, beside the package.
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
  return importlib.import_module(f'data.{name}.{name}_dataset_builder')


def _build(args) -> None:
  if args.dataset != 'metaworld' and not args.src:
    raise episodes.DataError(f'--src: required for build {args.dataset}')
  if args.src and not os.path.isdir(args.src):
    raise episodes.DataError(f'--src: not a directory: {args.src}')
  module = _builder_module(args.dataset)
  common = dict(data_dir=args.out)
  if args.dataset == 'metaworld':
    builder = module.Metaworld(tasks=args.tasks.split(','), episodes_per_task=args.episodes,
                               image_size=args.image_size, seed=args.seed, max_steps=args.max_steps,
                               workers=args.workers, variations=args.variations,
                               video_only_tasks=('all' if args.video_only_tasks == 'all' else
                                                 [t for t in args.video_only_tasks.split(',') if t]),
                               video_only_episodes=args.video_only_episodes, **common)
  elif args.dataset == 'droid':
    builder = module.Droid(src=args.src, on_corrupt=args.on_corrupt, **common)
  elif args.dataset == 'agibot':
    builder = module.Agibot(src=args.src, **common)
  elif args.dataset == 'lerobot':
    if bool(args.embodiment) == bool(args.embodiment_file):
      raise episodes.DataError('--embodiment / --embodiment_file: give exactly one (a built-in name or a file)')
    builder = module.Lerobot(src=args.src, embodiment=args.embodiment or args.embodiment_file, **common)
  else:
    if not args.spec:
      raise episodes.DataError('--spec: required for build rlds')
    builder = module.Rlds(src=args.src, spec_path=args.spec, on_corrupt=args.on_corrupt, **common)
  version = episodes.build(builder)
  # The embodiment travels with its dataset: a mixture member made for a robot this package does not
  # ship is read by the file it was built with.
  embodiments.save_file(embodiments.get(builder.dataset_spec().embodiment if args.dataset != 'lerobot'
                                        else args.embodiment or args.embodiment_file),
                        os.path.join(version, embodiments.DATASET_FILE))
  print(json.dumps({'built': version}))


def _embodiment(args) -> None:
  draft = lerobot_embodiment.draft(args.from_lerobot, args.name)
  text = json.dumps(draft, indent=2) + '\n'
  if args.out:
    if os.path.exists(args.out):
      raise episodes.DataError(f'--out: {args.out} already exists (a draft never overwrites)')
    with open(args.out, 'w') as f:
      f.write(text)
  else:
    sys.stdout.write(text)


def _stats(settings: settings_lib.Settings, from_official: str = '', out: str = '') -> None:
  """Recomputes every dataset's statistics under the config's settings (saved ones are replaced, even
  when they were made for other settings), or imports the release's file for the config's embodiment."""
  if from_official:
    e = embodiments.get(settings.data.embodiment)
    stats = normalization.from_official(from_official, e, settings.video.action_horizon,
                                        embodiments.relative_dims(settings.data.relative_action_dims,
                                                                  e.action_dim, e.state_dim))
    normalization.check_stats(stats, e.state_dim, e.action_dim, settings.video.action_horizon,
                              stats['settings']['relative_action_dims'], from_official)
    if not out:
      if not settings.data.dir:
        raise episodes.DataError('--out: required when data.dir is not set')
      out = pipeline.stats_path(settings.data, settings.data.name)
    normalization.save_stats(stats, out)
    print(json.dumps({'stats': out, 'from_official': os.path.abspath(from_official)}))
    return
  if out:
    raise episodes.DataError('--out: only with --from_official (recomputed statistics go beside each dataset)')
  for name, _ in pipeline.mixture(settings.data):
    member = pipeline.open_member(settings, name, 1.0, train=False, with_stats=False)
    stats = normalization.compute_stats(member.loader.dataset.lowdim, settings.video.action_horizon,
                                        member.loader.spec.relative_action_dims)
    path = pipeline.stats_path(settings.data, name)
    normalization.save_stats(stats, path)
    print(json.dumps({'stats': path, 'episodes': len(member.loader.dataset.lowdim)}))


def describe(batch: dict[str, np.ndarray]) -> dict[str, dict]:
  out = {}
  for key, value in batch.items():
    entry = dict(shape=list(value.shape), dtype=str(value.dtype))
    if value.dtype != object:
      entry.update(min=float(value.min()), max=float(value.max()))
    else:
      entry.update(first=value.flat[0].decode())
    out[key] = entry
  return out


def _inspect(settings: settings_lib.Settings, batches: int, train: bool) -> None:
  # A one-host view of the data: no accelerator runtime is started for it.
  it = iter(pipeline.make_dataset(settings, train=train, process_index=0, process_count=1))
  for _ in range(batches):
    print(json.dumps(describe(next(it))), flush=True)


def main(argv: Sequence[str]) -> int:
  overrides, rest = config_lib.split_config_args(argv)
  parser = argparse.ArgumentParser(prog='python -m dreamzero_jax.datasets')
  sub = parser.add_subparsers(dest='command', required=True)
  b = sub.add_parser('build')
  b.add_argument('dataset', choices=('metaworld', 'droid', 'agibot', 'lerobot', 'rlds'))
  b.add_argument('--out', required=True)
  b.add_argument('--src', default='')
  b.add_argument('--spec', default='')
  b.add_argument('--embodiment', default='', help='lerobot: a built-in embodiment name')
  b.add_argument('--embodiment_file', default='', help='lerobot: an embodiment file (docs/embodiments.md)')
  em = sub.add_parser('embodiment')
  em.add_argument('--from_lerobot', required=True, help='a LeRobot directory (meta/info.json, modality.json)')
  em.add_argument('--name', default='', help='the embodiment name (default: embodiment.json\'s tag, or the folder)')
  em.add_argument('--out', default='', help='where to write the draft (default: stdout)')
  b.add_argument('--tasks', default='reach-v3,push-v3')
  b.add_argument('--episodes', type=int, default=4, help='episodes per task')
  b.add_argument('--image_size', type=int, default=128)
  b.add_argument('--max_steps', type=int, default=500)
  b.add_argument('--seed', type=int, default=0)
  b.add_argument('--variations', type=int, default=0,
                 help='metaworld: variations per task, episode i running variation i mod V (repeated data); '
                      '0 = every episode its own')
  b.add_argument('--video_only_tasks', default='',
                 help='metaworld: tasks recorded without their actions (video-only demonstrations); "all"')
  b.add_argument('--video_only_episodes', type=int, default=0,
                 help='metaworld: episodes per video-only task (default: --episodes)')
  b.add_argument('--workers', type=int, default=0, help='rollout processes; 0 = one per core')
  b.add_argument('--on_corrupt', choices=('fail', 'skip'), default='fail')
  for name in ('stats', 'inspect'):
    p = sub.add_parser(name)
    p.add_argument('--config', required=True)
    if name == 'stats':
      p.add_argument('--from_official', default='', help="the release's statistics file (meta/"
                     'relative_stats_dreamzero.json beside stats.json and modality.json, or metadata.json)')
      p.add_argument('--out', default='', help='with --from_official: where to write (default: beside the dataset)')
    if name == 'inspect':
      p.add_argument('--batches', type=int, default=1)
      p.add_argument('--eval', action='store_true', help='evaluation order, no augmentation')
  args = parser.parse_args(rest)
  try:
    if args.command in ('build', 'embodiment'):
      if overrides:
        raise config_lib.ConfigError(f'{args.command} takes no --config overrides')
      (_build if args.command == 'build' else _embodiment)(args)
      return 0
    settings = settings_lib.from_config(config_lib.load_config(args.config, overrides))
    if args.command == 'stats':
      _stats(settings, args.from_official, args.out)
    else:
      flags.FLAGS.mark_as_parsed()   # grain's worker processes read absl flags; this program parses its own
      _inspect(settings, args.batches, train=not args.eval)
  except (episodes.DataError, config_lib.ConfigError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
