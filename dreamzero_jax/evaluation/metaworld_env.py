"""A Meta-World task as the policy sees a robot: camera images + state in, actions out.

The dataset builder (data/metaworld) renders its expert episodes through the same class: shadows
and multisampling off, images flipped upright. Progress is 1 - (object-to-target distance / its initial value), clipped to
[0, 1], and 1 on success.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple

import numpy as np

from dreamzero_jax.datasets import episodes

os.environ.setdefault('MUJOCO_GL', 'egl')


class Variation(NamedTuple):
  """Which task instance an episode runs: MT1(task, seed).train_tasks[task_index], reset with reset_seed."""
  task: str
  seed: int
  task_index: int
  reset_seed: int


def training_variation(task: str, index: int, seed: int) -> Variation:
  """Episode `index` of a task in a dataset built with `seed` (data/metaworld: variation index, reset
  seed seed + index)."""
  return Variation(task, seed, index, seed + index)


def dataset_variations(data_dir: str, name: str = 'metaworld') -> list[Variation]:
  """The variations of a built Meta-World dataset's episodes, in dataset order (episode ids
  'task/index', the build seed in the dataset's source line)."""
  stored = episodes.open_dataset(data_dir, name)
  seed = re.search(r'\bseed=(\d+)', stored.spec.source)
  if not stored.spec.source.startswith('metaworld') or seed is None:
    raise ValueError(f'--replay: {stored.path} is not a Meta-World dataset built here (source {stored.spec.source!r})')
  out = []
  for eid in stored.lowdim.episode_id:
    task, _, index = (eid.decode() if isinstance(eid, bytes) else str(eid)).rpartition('/')
    out.append(training_variation(task, int(index), int(seed.group(1))))
  return out


def ml45_split() -> tuple[list[str], list[str]]:
  """Meta-World's ML45 (train tasks = seen, test tasks = unseen)."""
  import metaworld.env_dict as env_dict  # pylint: disable=g-import-not-at-top
  return list(env_dict.ML45_V3['train']), list(env_dict.ML45_V3['test'])


def all_tasks() -> set[str]:
  """Every Meta-World v3 task name."""
  import metaworld.env_dict as env_dict  # pylint: disable=g-import-not-at-top
  return set(env_dict.ALL_V3_ENVIRONMENTS)


class MetaWorldEnv:
  """One task instance, seeded; `cameras` rendered at (height, width). The task variant is
  train_tasks[task_index] (default: the seed), of MT1(task, seed=seed); reset() resets with
  `reset_seed` (default: the seed)."""

  def __init__(self, task: str, seed: int, cameras, height: int, width: int, task_index: int | None = None,
               reset_seed: int | None = None):
    import metaworld  # pylint: disable=g-import-not-at-top
    import mujoco  # pylint: disable=g-import-not-at-top
    self.task, self.cameras = task, tuple(cameras)
    benchmark = metaworld.MT1(task, seed=seed)
    self.env = benchmark.train_classes[task]()
    index = seed if task_index is None else task_index
    self.env.set_task(benchmark.train_tasks[index % len(benchmark.train_tasks)])
    # Shadows and multisampling cost 5-40x render time in software GL and teach nothing at this size.
    self.env.model.light_castshadow[:] = 0
    self.env.model.vis.quality.offsamples = 0
    self.renderer = mujoco.Renderer(self.env.model, height, width)
    self.seed = seed
    self.reset_seed = seed if reset_seed is None else reset_seed
    self._start_distance = None

  def render(self) -> dict[str, np.ndarray]:
    """Every camera's current image, uint8 [height, width, 3]."""
    images = {}
    for cam in self.cameras:
      self.renderer.update_scene(self.env.data, camera=cam)
      images[cam] = np.ascontiguousarray(self.renderer.render()[::-1])  # offscreen is upside down
    return images

  def _observe(self, obs) -> tuple[dict[str, np.ndarray], np.ndarray]:
    self.last_obs = obs   # the full observation, for the scripted-expert baseline only
    return self.render(), np.asarray(obs[:4], np.float32)

  def reset(self):
    obs, _ = self.env.reset(seed=self.reset_seed)
    self._start_distance = None
    return self._observe(obs)

  def step(self, action: np.ndarray):
    """Returns (images, state, success, progress, done)."""
    action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
    if not np.isfinite(action).all():
      raise FloatingPointError(f'non-finite action {action.tolist()}')
    obs, _, terminated, truncated, info = self.env.step(action)
    success = bool(info.get('success', 0.0))
    distance = float(info.get('obj_to_target', np.nan))
    if self._start_distance is None:
      self._start_distance = max(distance, 1e-6)
    progress = 1.0 if success else float(np.clip(1.0 - distance / self._start_distance, 0.0, 1.0))
    images, state = self._observe(obs)
    return images, state, success, progress if np.isfinite(progress) else 0.0, bool(terminated or truncated)

  def close(self):
    self.renderer.close()
    self.env.close()
