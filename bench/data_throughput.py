"""Clip samples per second on ONE CPU core (one thread, training augmentation on).

  python bench/data_throughput.py [--samples N] [--results bench/RESULTS.md]

Meta-World: a freshly built 128x128 dataset read into the configs/metaworld.py canvas.
DROID resolution: synthetic 180x320 JPEG episodes (textured, so JPEG sizes are realistic)
read into the 14B canvas (352x640, 33 frames = 4 chunks of 24 actions at stride 3).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamzero_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from dreamzero_jax import embodiments
from dreamzero_jax import settings as settings_lib
from dreamzero_jax.datasets import episodes, pipeline  # pylint: disable=g-import-not-at-top


SECTION = '## Data throughput'


class SyntheticDroid(episodes.EpisodeBuilder):
  """DROID-shaped episodes with textured frames, built without any RLDS input."""
  name = 'droid'

  def __init__(self, *, num_episodes: int, steps: int, **kwargs):
    self._num_episodes, self._steps = num_episodes, steps
    super().__init__(**kwargs)

  def dataset_spec(self):
    e = embodiments.get('droid')
    return episodes.DatasetSpec(embodiment='droid', cameras=e.cameras,
                                image_shapes={c: (180, 320) for c in e.cameras}, control_hz=15,
                                state_dim=8, action_dim=8, num_alternatives=1, source='synthetic')

  def episodes(self):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:180, 0:320]
    for i in range(self._num_episodes):
      frames = {}
      for c, cam in enumerate(embodiments.get('droid').cameras):
        frames[cam] = []
        for t in range(self._steps):
          base = (np.sin((xx + 3 * t) / (9 + c)) * 60 + np.cos(yy / 13.0) * 60 + 128)
          img = np.clip(base[..., None] + rng.normal(0, 12, (180, 320, 3)), 0, 255).astype(np.uint8)
          frames[cam].append(episodes.encode_image(img, 'jpeg', 90))
      walk = np.cumsum(rng.normal(0, 0.01, (self._steps, 8)), 0).astype(np.float32)
      yield dict(episode_id=f'synthetic/{i}'.encode(), images=frames, state=walk,
                 action=np.roll(walk, -1, 0), language=np.zeros((self._steps, 1), np.int32),
                 instructions=['do the thing'], has_action=True, success=True)


def rate(cfg, samples: int) -> float:
  """Clips per second of the per-sample work (read, decode, canvas, normalise) on one thread."""
  member = pipeline.open_member(settings_lib.from_config(cfg), cfg.data.name, 1.0, train=True)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(member.index))
  member.loader.random_map(member.index[order[0]], rng)  # warm up: opens files
  # CPU time of this (single-threaded) process: a per-core figure even on a shared machine.
  start = time.process_time()
  for i in range(samples):
    member.loader.random_map(member.index[order[(i + 1) % len(order)]], rng)
  return samples / (time.process_time() - start)


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.machine()


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--samples', type=int, default=100)
  p.add_argument('--results', default='')
  args = p.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as tmp:
    import importlib  # pylint: disable=g-import-not-at-top
    mw = importlib.import_module('data.metaworld.metaworld_dataset_builder')
    episodes.build(mw.Metaworld(data_dir=tmp, tasks=('reach-v3', 'push-v3'), episodes_per_task=2,
                                image_size=128, max_steps=80))
    cfg = config_lib.load_config(os.path.join(root, 'configs/metaworld.py'),
                                 [f'data.dir={tmp}', 'train.batch_size=1'])
    mw_rate = rate(cfg, args.samples)
    episodes.build(SyntheticDroid(data_dir=tmp, num_episodes=2, steps=120))
    cfg = config_lib.load_config(os.path.join(root, 'configs/dreamzero_14b_droid.py'),
                                 [f'data.dir={tmp}', 'train.batch_size=1'])
    droid_rate = rate(cfg, max(args.samples // 5, 10))
  line = (f'| {datetime.date.today()} | {cpu_name()} ({os.cpu_count()} cores) | {mw_rate:.1f} '
          f'| {droid_rate:.1f} |')
  print(line)
  if args.results:
    add_row(args.results, line)


def add_row(path: str, row: str) -> None:
  """Appends `row` to the table of the file's 'Data throughput' section (other sections untouched)."""
  with open(path) as f:
    lines = f.read().split('\n')
  start = lines.index(SECTION)
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('## ')), len(lines))
  last_row = max(i for i in range(start, end) if lines[i].startswith('|'))
  lines.insert(last_row + 1, row)
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


if __name__ == '__main__':
  main()
