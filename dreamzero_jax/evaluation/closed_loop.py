"""Closed-loop Meta-World evaluation through the robot path: chunks, smoothing, real frames.

Each episode runs the policy exactly as a robot would: the first observation starts a session,
every chunk of actions is executed at the embodiment's frame stride while frames are recorded,
and those REAL frames come back with the next request. The same rollout can go through the
in-process backend or the websocket server (identical actions for the same seed).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from typing import Callable

import numpy as np
from PIL import Image

from dreamzero_jax.datasets import canvas
from dreamzero_jax.envs.metaworld import MetaWorldEnv, Variation, instruction


def _observation(images: dict, state: np.ndarray, cameras, frames=None) -> dict:
  if frames is None:
    obs = {f'observation/{c}': images[c][None] for c in cameras}
  else:
    obs = {f'observation/{c}': np.stack([f[c] for f in frames]) for c in cameras}
  obs['observation/state'] = np.asarray(state, np.float32)
  return obs


def run_episode(infer: Callable, cfg, task: str, prompt: str, seed: int, max_steps: int,
                variation: Variation | None = None) -> dict:
  """infer(observation with prompt) -> (actions [Ha, A], predicted latents or None).

  The task instance is MT1(task, seed)'s variation `seed` reset with `seed`, or `variation`."""
  cameras = cfg.data.cameras
  v = variation or Variation(task, seed, seed, seed)
  env = MetaWorldEnv(v.task, v.seed, cameras, cfg.serve.camera_height, cfg.serve.camera_width,
                     task_index=v.task_index, reset_seed=v.reset_seed)
  record = dict(task=task, seed=seed, success=False, progress=0.0, length=0, failure=None, actions=[])
  real, predicted = [], []
  try:
    images, state = env.reset()
    real.append(images)
    actions, video = infer({**_observation(images, state, cameras), 'prompt': prompt})
    while record['length'] < max_steps and not record['success']:
      if video is not None:
        predicted.append(video)
      frames = []
      for i, action in enumerate(actions):
        images, state, success, progress, done = env.step(action)
        record['actions'].append(np.asarray(action))
        record['length'] += 1
        record['success'] |= success
        record['progress'] = max(record['progress'], progress)
        if (i + 1) % cfg.data.frame_stride == 0:
          frames.append(images)
        if done or record['success'] or record['length'] >= max_steps:
          break
      real.extend(frames)
      if record['success'] or record['length'] >= max_steps or len(frames) < cfg.video.frames_per_chunk:
        break
      actions, video = infer({**_observation(images, state, cameras, frames[-cfg.video.frames_per_chunk:]),
                              'prompt': prompt})
  except Exception as e:  # pylint: disable=broad-except  (a crashed episode is a failure, not a crash)
    record['failure'] = f'{type(e).__name__}: {e}'
    record['success'] = False
    traceback.print_exc()
  finally:
    env.close()
  record['real'], record['predicted'] = real, predicted
  return record


def write_gif(path: str, cfg, real: list[dict], predicted_frames: np.ndarray | None) -> None:
  """Real canvas frames (left) next to the model's predicted frames (right)."""
  frames = [canvas.compose_arrays([f[c][None] for c in cfg.data.cameras], cfg.data.canvas_layout,
                                  cfg.video.height, cfg.video.width)[0] for f in real]
  out = []
  for i, frame in enumerate(frames):
    right = np.zeros_like(frame) - 1.0
    if predicted_frames is not None and len(predicted_frames):
      right = predicted_frames[min(i, len(predicted_frames) - 1)]
    pair = np.concatenate([frame, right], axis=1)
    out.append(Image.fromarray(np.uint8(np.clip((pair + 1.0) * 127.5, 0, 255))))
  out[0].save(path, save_all=True, append_images=out[1:], duration=100, loop=0)


def _summary(runs: list[dict]) -> dict:
  return dict(success_rate=float(np.mean([r['success'] for r in runs])),
              progress=float(np.mean([r['progress'] for r in runs])),
              length=float(np.mean([r['length'] for r in runs])), episodes=runs)


def evaluate(cfg, infer_factory: Callable[[str], Callable], tasks_seen, tasks_unseen, episodes: int,
             max_steps: int, out_dir: str, decode: Callable | None = None, seed: int = 0,
             replay: list[Variation] = ()) -> dict:
  """Runs every task `episodes` times, and each of `replay` (training episodes' own variations) once;
  writes report.json and one GIF per task and split into out_dir.

  Seen and unseen episode e runs MT1(task, seed + e)'s variation seed + e (evaluate with a seed
  away from the dataset's build seed for variations it never saw). Report: per split a success
  rate, progress and length averaged over its tasks (replay: over its episodes); per task those of
  its episodes (seen/unseen under `tasks`, replay under replay.tasks).
  """
  os.makedirs(out_dir, exist_ok=True)
  report = dict(tasks={}, seen={}, unseen={}, replay={}, crashed=0, gifs=[])
  start = time.time()
  jobs = {('replay', v.task): [] for v in replay}
  for v in replay:
    jobs['replay', v.task].append((v.seed, v))
  for split, tasks in (('seen', tasks_seen), ('unseen', tasks_unseen)):
    for task in tasks:
      jobs[split, task] = [(seed + e, None) for e in range(episodes)]
  replay_tasks = {}
  for (split, task), episodes_of_task in jobs.items():
    runs = []
    for e, (ep_seed, variation) in enumerate(episodes_of_task):
      rec = run_episode(infer_factory(f'{split}-{task}-{e}'), cfg, task, instruction(task), ep_seed, max_steps,
                        variation)
      if e == 0:
        predicted = None
        if decode is not None and rec['predicted']:
          predicted = np.concatenate([decode(v) for v in rec['predicted']])
        path = os.path.join(out_dir, f'{task}.gif' if split != 'replay' else f'replay-{task}.gif')
        write_gif(path, cfg, rec['real'], predicted)
        report['gifs'].append(path)
      report['crashed'] += rec['failure'] is not None
      run = {k: rec[k] for k in ('seed', 'success', 'progress', 'length', 'failure')}
      if variation is not None:
        run.update(task_index=variation.task_index, reset_seed=variation.reset_seed)
      runs.append(run)
    summary = dict(split=split, **_summary(runs))
    (replay_tasks if split == 'replay' else report['tasks'])[task] = summary
    print(f'{split:>6} {task:<24} success {summary["success_rate"]:.2f}  progress {summary["progress"]:.2f}  '
          f'length {summary["length"]:.0f}', flush=True)
  for split in ('seen', 'unseen'):
    rows = [t for t in report['tasks'].values() if t['split'] == split]
    if rows:
      report[split] = dict(success_rate=float(np.mean([t['success_rate'] for t in rows])),
                           progress=float(np.mean([t['progress'] for t in rows])),
                           length=float(np.mean([t['length'] for t in rows])), tasks=len(rows))
  if replay_tasks:  # replay: over its episodes (a handful, unevenly spread over tasks)
    runs = [r for t in replay_tasks.values() for r in t['episodes']]
    report['replay'] = dict(_summary(runs), tasks=replay_tasks)
  report['seconds'] = round(time.time() - start, 1)
  with open(os.path.join(out_dir, 'report.json'), 'w') as fh:
    json.dump(report, fh, indent=1)
  return report
