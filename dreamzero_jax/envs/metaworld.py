"""A Meta-World task as the policy sees a robot: camera images + state in, actions out.

The dataset builder (data/metaworld) records its expert episodes through this class and the
closed-loop evaluation (evaluation/) runs the policy in it: shadows and multisampling off, images
flipped upright. Progress is 1 - (object-to-target distance / its initial value), clipped to [0, 1],
and 1 on success. metaworld and mujoco (the [sim] extra) are imported only when an environment is made.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

# Offscreen rendering without a display; must be set before MuJoCo is first imported.
os.environ.setdefault('MUJOCO_GL', 'egl')

# Instructions are written for tasks whose name does not read as one; others use the name.
_INSTRUCTIONS = {
    'reach-v3': 'reach the goal position',
    'reach-wall-v3': 'reach the goal position behind the wall',
    'push-v3': 'push the puck to the goal',
    'push-wall-v3': 'push the puck around the wall to the goal',
    'push-back-v3': 'push the puck back to the goal',
    'pick-place-v3': 'pick up the puck and place it at the goal',
    'pick-place-wall-v3': 'pick up the puck and place it at the goal behind the wall',
    'assembly-v3': 'pick up the nut and place it onto the peg',
    'disassemble-v3': 'pick the nut off the peg',
    'basketball-v3': 'dunk the basketball into the hoop',
    'bin-picking-v3': 'move the puck from one bin to the other',
    'hammer-v3': 'hammer the nail into the wall',
    'soccer-v3': 'kick the ball into the goal',
    'sweep-v3': 'sweep the puck off the table',
    'sweep-into-v3': 'sweep the puck into the hole',
    'shelf-place-v3': 'place the puck on the shelf',
    'dial-turn-v3': 'turn the dial',
    'hand-insert-v3': 'insert the gripper into the hole',
    'peg-insert-side-v3': 'insert the peg sideways into the hole',
    'peg-unplug-side-v3': 'unplug the peg sideways',
    'pick-out-of-hole-v3': 'pick the puck out of the hole',
    'stick-pull-v3': 'grab the stick and pull the container',
    'stick-push-v3': 'grab the stick and push the container',
    'coffee-button-v3': 'press the coffee machine button',
    'coffee-pull-v3': 'pull the mug from the coffee machine',
    'coffee-push-v3': 'push the mug under the coffee machine',
}


def instruction(task: str) -> str:
  """A task's instruction: the dataset's episodes carry it and the evaluation prompts with it."""
  return _INSTRUCTIONS.get(task) or task.removesuffix('-v3').replace('-', ' ')


class Variation(NamedTuple):
  """Which task instance an episode runs: MT1(task, seed).train_tasks[task_index], reset with reset_seed."""
  task: str
  seed: int
  task_index: int
  reset_seed: int


def training_variation(task: str, index: int, seed: int, variations: int = 0) -> Variation:
  """Episode `index` of a task in a dataset built with `seed` (data/metaworld: variation index, or
  index mod `variations` when the build repeats that many; reset seed seed + index)."""
  return Variation(task, seed, index % variations if variations else index, seed + index)


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
      self._start_distance = distance
    if success or not self._start_distance > 1e-6:
      # Tasks whose obj_to_target is always 0 (assembly, box-close, disassemble, door-open, hammer
      # in metaworld 3.1.1), or NaN, measure no distance: their progress is their success.
      progress = float(success)
    else:
      progress = float(np.clip(1.0 - distance / self._start_distance, 0.0, 1.0))
    images, state = self._observe(obs)
    return images, state, success, progress if np.isfinite(progress) else 0.0, bool(terminated or truncated)

  def close(self):
    self.renderer.close()
    self.env.close()
