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
import zlib
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


def action_jerk(actions: list[np.ndarray]) -> float | None:
  """Mean squared jerk of an episode's executed actions (clipped to [-1, 1] as the simulator takes
  them): the third difference over control steps, squared, averaged over steps and action dims.
  None under 4 actions."""
  if len(actions) < 4:
    return None
  executed = np.clip(np.stack(actions).astype(np.float64), -1.0, 1.0)
  return float(np.mean(np.diff(executed, n=3, axis=0) ** 2))


def run_episode(infer: Callable, cfg, task: str, prompt: str, seed: int, max_steps: int,
                variation: Variation | None = None) -> dict:
  """infer(observation with prompt) -> (actions [Ha, A], predicted latents or None).

  The task instance is MT1(task, seed)'s variation `seed` reset with `seed`, or `variation`. The
  record holds the action smoothness (`jerk`, action_jerk) and the latency per chunk (`chunk_ms`:
  the median wall time of the policy calls after the first, which starts the session and compiles;
  None with fewer than 2 calls)."""
  cameras = cfg.data.cameras
  v = variation or Variation(task, seed, seed, seed)
  env = MetaWorldEnv(v.task, v.seed, cameras, cfg.serve.camera_height, cfg.serve.camera_width,
                     task_index=v.task_index, reset_seed=v.reset_seed)
  record = dict(task=task, seed=seed, success=False, progress=0.0, length=0, failure=None, actions=[])
  real, predicted, calls = [], [], []

  def ask(observation: dict):
    start = time.perf_counter()
    out = infer({**observation, 'prompt': prompt})
    calls.append(time.perf_counter() - start)
    return out

  if hasattr(infer, 'bind'):   # a baseline that reads the simulator (the scripted expert)
    infer.bind(env)
  try:
    images, state = env.reset()
    real.append(images)
    actions, video = ask(_observation(images, state, cameras))
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
      actions, video = ask(_observation(images, state, cameras, frames[-cfg.video.frames_per_chunk:]))
  except Exception as e:  # pylint: disable=broad-except  (a crashed episode is a failure, not a crash)
    record['failure'] = f'{type(e).__name__}: {e}'
    record['success'] = False
    traceback.print_exc()
  finally:
    env.close()
  record['real'], record['predicted'] = real, predicted
  record['jerk'] = action_jerk(record['actions'])
  record['chunk_ms'] = 1e3 * float(np.median(calls[1:])) if len(calls) > 1 else None
  return record


def in_process(backend):
  """An infer factory calling `backend` (serving.adapters.PolicyServerBackend) in this process: each
  session starts at its first observation; the predicted latents come back for the GIFs."""

  def factory(session_id):
    del session_id
    state = {}

    def infer(obs):
      obs = dict(obs)
      prompt = obs.pop('prompt')
      if 'episode' not in state:
        state['episode'] = backend.new_session(prompt, obs)
      actions, state['episode'], _, video = backend.infer_with_video(state['episode'], obs)
      return actions, video
    return infer
  return factory


def baseline(kind: str, horizon: int):
  """An infer factory for a baseline policy; the session id names the split, task and episode."""

  def factory(session_id):
    _, rest = session_id.split('-', 1)
    task = rest.rsplit('-', 1)[0]
    return Baseline(kind, task, horizon, seed=zlib.crc32(session_id.encode()))
  return factory


class Baseline:
  """A reference policy driven through the same loop, chunk by chunk: 'expert' (Meta-World's
  scripted policy for the task, from the full simulator state, the policy the data came from,
  replanning every step inside the chunk as it was recorded) or 'random' (actions uniform in
  [-1, 1], seeded per episode)."""

  def __init__(self, kind: str, task: str, horizon: int, seed: int):
    if kind not in ('expert', 'random'):
      raise ValueError(f'--policy: unknown baseline {kind!r} (expert or random)')
    self.kind, self.horizon, self.env = kind, horizon, None
    self.rng = np.random.default_rng(seed)
    if kind == 'expert':
      from metaworld.policies import ENV_POLICY_MAP  # pylint: disable=g-import-not-at-top
      self.expert = ENV_POLICY_MAP[task]()

  def bind(self, env) -> None:
    self.env = env

  def __call__(self, observation: dict):
    del observation
    if self.kind == 'random':
      return self.rng.uniform(-1.0, 1.0, (self.horizon, 4)).astype(np.float32), None
    return _ExpertChunk(self), None


class _ExpertChunk:
  """The expert's chunk: each action computed when it is taken (from the state it is taken in)."""

  def __init__(self, baseline: Baseline):
    self.baseline = baseline

  def __iter__(self):
    for _ in range(self.baseline.horizon):
      obs = self.baseline.env.last_obs
      yield np.clip(self.baseline.expert.get_action(obs), -1.0, 1.0).astype(np.float32)


def canvas_frames(cfg, real: list[dict]) -> np.ndarray:
  """The recorded camera frames of an episode as canvas frames [T, H, W, 3] in [-1, 1]."""
  return np.stack([canvas.compose_arrays([f[c][None] for c in cfg.data.cameras], cfg.data.canvas_layout,
                                         cfg.video.height, cfg.video.width)[0] for f in real])


def predicted_video(cfg, real: list[dict], predicted: list[np.ndarray], encode: Callable,
                    decode: Callable) -> np.ndarray:
  """The episode's predicted frames [1 + 4 n, H, W, 3], aligned with the real ones, decoded per
  context window as the policy made them (inference/policy.py: after video.max_chunks chunks it
  restarts from the newest real frame as frame 0): each window's frame-0 latent (encoded from that
  real frame, as the policy did) followed by its chunks' predicted latents, decoded as one clip by the
  causal decoder (a chunk's latents continue the clip; decoded alone, its first latent would be read
  as a clip's lone first frame). A later window's frame 0 is the previous window's last frame: kept
  from the previous window, which predicted it."""
  k, f = cfg.video.max_chunks, cfg.video.frames_per_chunk
  clips = []
  for w in range(0, len(predicted), k):   # w: the window's first chunk; its frame 0 is real frame w x f
    first = encode(canvas_frames(cfg, real[w * f:w * f + 1])[None])
    clips.append(decode(np.concatenate([first, *predicted[w:w + k]], axis=1)))
  return _join_windows(clips)


def _join_windows(clips: list[np.ndarray]) -> np.ndarray:
  """Consecutive context windows' frames as one video: each window after the first starts at the
  previous one's last frame, which is kept from the previous window."""
  return np.concatenate([clips[0], *(c[1:] for c in clips[1:])])


def context_windows(cfg, n: int) -> list[tuple[int, int]]:
  """(start, stop) of the policy's context windows over n frames: 1 + video.max_chunks x
  frames_per_chunk frames each, the next starting at the last frame of one, each cut to the causal
  VAE's 1 + 4k frames (so the last may end early)."""
  span, t = cfg.video.max_chunks * cfg.video.frames_per_chunk, cfg.video.vae_temporal
  windows = []
  for start in range(0, max(n - 1, 1), span):
    stop = start + (min(start + span, n - 1) - start) // t * t
    windows.append((start, stop + 1))
  return windows


def prediction_psnr(real: np.ndarray, predicted: np.ndarray) -> float:
  """PSNR (dB, pixels in [0, 1]) of the predicted frames 1.. against the real frames they predicted."""
  n = min(len(real), len(predicted))
  if n < 2:
    return float('nan')
  mse = np.mean(((real[1:n] - predicted[1:n]) / 2.0) ** 2)
  return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def persistence_frames(real: np.ndarray, frames_per_chunk: int) -> np.ndarray:
  """The "nothing moves" prediction: each chunk's frames (1 + c F .. F + c F) as the last real frame
  the policy had seen when it predicted them (frame c F)."""
  index = np.arange(len(real))
  return real[np.maximum(index - 1, 0) // frames_per_chunk * frames_per_chunk]


def reference_psnrs(cfg, real: np.ndarray, predicted: np.ndarray, encode: Callable, decode: Callable) -> dict:
  """What a prediction's PSNR is read against, on the same frames (1 .. len(predicted) - 1):
  `persistence_psnr_db`, the last observed frame held through each chunk (a model that predicts
  no motion), and `reconstruction_psnr_db`, the real frames through the VAE one context window at a
  time (the best a predicted latent can score)."""
  n = min(len(real), len(predicted))
  reconstructed = _join_windows([   # encoded as the policy encodes: one window at a time
      decode(encode(real[None, start:stop])) if stop - start > 1 else real[start:stop]
      for start, stop in context_windows(cfg, n)])
  return dict(persistence_psnr_db=prediction_psnr(real[:n], persistence_frames(real[:n], cfg.video.frames_per_chunk)),
              reconstruction_psnr_db=prediction_psnr(real[:len(reconstructed)], reconstructed))


def write_gif(path: str, cfg, real: list[dict], predicted_frames: np.ndarray | None) -> None:
  """Real canvas frames (left) next to the model's predicted frames (right)."""
  frames = canvas_frames(cfg, real)
  out = []
  for i, frame in enumerate(frames):
    right = np.zeros_like(frame) - 1.0
    if predicted_frames is not None and len(predicted_frames):
      right = predicted_frames[min(i, len(predicted_frames) - 1)]
    pair = np.concatenate([frame, right], axis=1)
    out.append(Image.fromarray(np.uint8(np.clip((pair + 1.0) * 127.5, 0, 255))))
  out[0].save(path, save_all=True, append_images=out[1:], duration=100, loop=0)


def _mean_of(rows: list[dict], key: str, reduce=np.mean) -> float | None:
  """`reduce` over the rows' values of `key` that exist (jerk and latency are None for short episodes)."""
  values = [r[key] for r in rows if r.get(key) is not None]
  return float(reduce(values)) if values else None


def _summary(runs: list[dict]) -> dict:
  return dict(success_rate=float(np.mean([r['success'] for r in runs])),
              progress=float(np.mean([r['progress'] for r in runs])),
              length=float(np.mean([r['length'] for r in runs])), jerk=_mean_of(runs, 'jerk'),
              chunk_ms=_mean_of(runs, 'chunk_ms', np.median), episodes=runs)


PSNR_KEYS = ('prediction_psnr_db', 'persistence_psnr_db', 'reconstruction_psnr_db')


def _mean_psnr(summary: dict, rows: list[dict]) -> None:
  for key in PSNR_KEYS:
    values = [t[key] for t in rows if np.isfinite(t.get(key, np.nan))]
    if values:
      summary[key] = float(np.mean(values))


def evaluate(cfg, infer_factory: Callable[[str], Callable], tasks_seen, tasks_unseen, episodes: int,
             max_steps: int, out_dir: str, decode: Callable | None = None, seed: int = 0,
             replay: list[Variation] = (), encode: Callable | None = None) -> dict:
  """Runs every task `episodes` times, and each of `replay` (training episodes' own variations) once;
  writes report.json and one GIF per task and split into out_dir.

  Seen and unseen episode e runs MT1(task, seed + e)'s variation seed + e (evaluate with a seed
  away from the dataset's build seed for variations it never saw). Report: per split a success
  rate, progress, length and jerk averaged over its tasks (replay: over its episodes) and the median
  latency per chunk (chunk_ms); per task those of its episodes (seen/unseen under `tasks`, replay
  under replay.tasks).

  With `encode` and `decode` (the policy's VAE), each task's first episode's predicted video is
  decoded for its GIF and scored against the real frames: `prediction_psnr_db` per task and split,
  beside `persistence_psnr_db` and `reconstruction_psnr_db` on the same frames (reference_psnrs).
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
    runs, first_psnr, references = [], None, {}
    for e, (ep_seed, variation) in enumerate(episodes_of_task):
      rec = run_episode(infer_factory(f'{split}-{task}-{e}'), cfg, task, instruction(task), ep_seed, max_steps,
                        variation)
      psnr = None
      if e == 0:
        predicted = None
        if decode is not None and encode is not None and rec['predicted']:
          predicted = predicted_video(cfg, rec['real'], rec['predicted'], encode, decode)
          real = canvas_frames(cfg, rec['real'])
          psnr = prediction_psnr(real, predicted)
          references = reference_psnrs(cfg, real, predicted, encode, decode)
        path = os.path.join(out_dir, f'{task}.gif' if split != 'replay' else f'replay-{task}.gif')
        write_gif(path, cfg, rec['real'], predicted)
        report['gifs'].append(path)
      report['crashed'] += rec['failure'] is not None
      run = {k: rec[k] for k in ('seed', 'success', 'progress', 'length', 'failure', 'jerk', 'chunk_ms')}
      if variation is not None:
        run.update(task_index=variation.task_index, reset_seed=variation.reset_seed)
      runs.append(run)
      if psnr is not None:
        first_psnr = psnr
    summary = dict(split=split, **_summary(runs))
    if first_psnr is not None:
      summary.update(prediction_psnr_db=first_psnr, **references)
    (replay_tasks if split == 'replay' else report['tasks'])[task] = summary
    psnr_text = (f'  prediction {first_psnr:.1f} dB (persistence {references["persistence_psnr_db"]:.1f}, '
                 f'VAE {references["reconstruction_psnr_db"]:.1f})' if first_psnr is not None else '')
    print(f'{split:>6} {task:<24} success {summary["success_rate"]:.2f}  progress {summary["progress"]:.2f}  '
          f'length {summary["length"]:.0f}{psnr_text}', flush=True)
  for split in ('seen', 'unseen'):
    rows = [t for t in report['tasks'].values() if t['split'] == split]
    if rows:
      report[split] = dict(success_rate=float(np.mean([t['success_rate'] for t in rows])),
                           progress=float(np.mean([t['progress'] for t in rows])),
                           length=float(np.mean([t['length'] for t in rows])), jerk=_mean_of(rows, 'jerk'),
                           chunk_ms=_mean_of(rows, 'chunk_ms', np.median), tasks=len(rows))
      _mean_psnr(report[split], rows)
  if replay_tasks:  # replay: over its episodes (a handful, unevenly spread over tasks)
    runs = [r for t in replay_tasks.values() for r in t['episodes']]
    report['replay'] = dict(_summary(runs), tasks=replay_tasks)
    _mean_psnr(report['replay'], list(replay_tasks.values()))
  report['seconds'] = round(time.time() - start, 1)
  with open(os.path.join(out_dir, 'report.json'), 'w') as fh:
    json.dump(report, fh, indent=1)
  return report
