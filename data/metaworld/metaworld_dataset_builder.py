"""Meta-World episodes generated on the spot by the scripted expert policies (no downloads).

Tasks named in `video_only_tasks` ('all': every task) are recorded as video-only demonstrations:
the expert acts as usual, but its actions are not stored (zeros, has_action False), so nothing
trained on the dataset sees an action of those tasks (the states stay: a robot's own readings);
`video_only_episodes` (default: episodes_per_task) of each.

Episode e of a task uses the task variation e mod 50 (e mod `variations` when given: fewer
variations, repeated) and reset seed `seed + e`: a rebuild with the same arguments gives the same
states, actions and (on the same renderer) the same images.
State = hand xyz + gripper opening (observation[:4]); actions (dx, dy, dz, grip) in [-1, 1]. The
simulator, the variations and the task instructions: dreamzero_jax/envs/metaworld.py (shared with the
closed-loop evaluation).
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Iterator, Sequence

import numpy as np

from dreamzero_jax import embodiments
from dreamzero_jax.datasets import episodes
from dreamzero_jax.envs.metaworld import MetaWorldEnv, instruction, training_variation


def _run_episode(args: tuple[str, int, int, int, int, int, str, int, bool]) -> dict[str, Any]:
  """One expert rollout with every camera rendered at each step (runs in a worker process)."""
  task, index, seed, size, max_steps, tail, image_format, variations, video_only = args
  # The [sim] extra, imported in the worker processes.
  from metaworld.policies import ENV_POLICY_MAP  # pylint: disable=g-import-not-at-top
  cameras = embodiments.get('metaworld').cameras
  v = training_variation(task, index, seed, variations)
  sim = MetaWorldEnv(v.task, v.seed, cameras, size, size, task_index=v.task_index, reset_seed=v.reset_seed)
  env = sim.env
  policy = ENV_POLICY_MAP[task]()
  obs, _ = env.reset(seed=sim.reset_seed)
  states, actions, images = [], [], {c: [] for c in cameras}
  success, steps_after_success = False, 0
  def observe(o):
    states.append(np.asarray(o[:4], np.float32))
    for cam, image in sim.render().items():
      images[cam].append(episodes.encode_image(image, image_format))
  observe(obs)
  for _ in range(max_steps):
    action = np.clip(policy.get_action(obs), -1.0, 1.0).astype(np.float32)
    obs, _, terminated, truncated, info = env.step(action)
    actions.append(action)
    observe(obs)
    success = success or bool(info['success'])
    steps_after_success += success
    if terminated or truncated or steps_after_success > tail:
      break
  sim.close()
  actions.append(np.zeros(4, np.float32))  # no action follows the last observation
  t = len(states)
  action = np.zeros((t, 4), np.float32) if video_only else np.stack(actions)
  return dict(episode_id=f'{task}/{index}'.encode(), images=images, state=np.stack(states),
              action=action, language=np.zeros((t, 1), np.int32),
              instructions=[instruction(task)], has_action=not video_only, success=success)


class Metaworld(episodes.EpisodeBuilder):
  """Scripted-expert Meta-World episodes; see the module docstring for seeding."""

  def __init__(self, *, tasks: Sequence[str] = ('reach-v3',), episodes_per_task: int = 4,
               image_size: int = 128, seed: int = 0, max_steps: int = 500, tail: int = 16,
               image_format: str = 'jpeg', workers: int = 0, variations: int = 0,
               video_only_tasks: Sequence[str] | str = (), video_only_episodes: int = 0, **kwargs):
    self._tasks, self._episodes_per_task = tuple(tasks), episodes_per_task
    self._video_only = set(self._tasks if video_only_tasks == 'all' else video_only_tasks)
    self._video_only_episodes = video_only_episodes or episodes_per_task
    unknown = sorted(self._video_only - set(self._tasks))
    if unknown:
      raise episodes.DataError(f'--video_only_tasks: {", ".join(unknown)} not among --tasks')
    self._variations = variations   # 0: every episode its own variation
    self._image_size, self._seed, self._max_steps, self._tail = image_size, seed, max_steps, tail
    self._image_format, self._workers = image_format, workers or os.cpu_count() or 1
    super().__init__(**kwargs)

  def dataset_spec(self) -> episodes.DatasetSpec:
    e = embodiments.get('metaworld')
    return episodes.DatasetSpec(
        embodiment=e.name, cameras=e.cameras,
        image_shapes={c: (self._image_size, self._image_size) for c in e.cameras},
        control_hz=e.control_hz, state_dim=e.state_dim, action_dim=e.action_dim,
        num_alternatives=1, source=f'metaworld tasks={",".join(self._tasks)} seed={self._seed}'
                                   + (f' variations={self._variations}' if self._variations else '')
                                   + (f' video_only={",".join(t for t in self._tasks if t in self._video_only)}'
                                      if self._video_only else ''))

  def episodes(self) -> Iterator[dict[str, Any]]:
    from metaworld.policies import ENV_POLICY_MAP  # pylint: disable=g-import-not-at-top
    for task in self._tasks:
      if task not in ENV_POLICY_MAP:
        raise episodes.DataError(f'--tasks: no scripted policy for {task!r}')
    jobs = [(task, i, self._seed, self._image_size, self._max_steps, self._tail, self._image_format,
             self._variations, task in self._video_only) for task in self._tasks
            for i in range(self._video_only_episodes if task in self._video_only else self._episodes_per_task)]
    # Fresh processes: each owns its EGL context, and rollouts are independent.
    with multiprocessing.get_context('spawn').Pool(min(self._workers, len(jobs))) as pool:
      yield from pool.imap(_run_episode, jobs)
