"""Evaluate a trained DreamZero: `python eval.py --checkpoint WORKDIR --out DIR --mode closed_loop|offline|latency`
(the same as `python -m dreamzero_jax.evaluate ...`).

closed_loop: Meta-World tasks driven through the policy exactly as a robot would drive it (chunks,
smoothing, real frames back into the cache), in-process or (--via_server) through the websocket
server on loopback; per-task success, progress and episode length over seeded episodes, split into
seen (ML45 train) and unseen (ML45 test) tasks on variations the data never held, plus a GIF per
task (real | predicted frames); --replay N also reruns N of the training episodes themselves.
offline: action MSE and predicted-video PSNR of the first chunk on held-out clips of data.dir.
latency: the per-stage timing of a control step (canvas, observe = VAE + cache write, denoise).
All write DIR/report.json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import sys
import threading
import time
import zlib

import dreamzero_client as client_lib
import jax
import numpy as np

from dreamzero_jax import checkpoint
from dreamzero_jax.config import ConfigError, load_config, split_config_args
from dreamzero_jax.datasets import pipeline
from dreamzero_jax.evaluation import closed_loop, metaworld_env, offline
from dreamzero_jax.serving import loading
from dreamzero_jax.serving import server as server_lib


def parse(argv):
  overrides, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog='python eval.py', description=__doc__)
  p.add_argument('--checkpoint', required=True, help='a train.py workdir')
  p.add_argument('--config', help='configs/NAME.py[:ARG]; default: the checkpoint\'s own')
  p.add_argument('--out', required=True)
  p.add_argument('--mode', default='closed_loop', choices=('closed_loop', 'offline', 'latency'))
  p.add_argument('--clips', type=int, default=32, help='offline: held-out clips to score')
  p.add_argument('--tasks', default=None, help="seen tasks (comma list; '' for none); default: the ML45 train tasks")
  p.add_argument('--unseen_tasks', default=None, help='unseen tasks (comma list); default: the ML45 test tasks')
  p.add_argument('--episodes', type=int, default=3, help='seeded episodes per task')
  p.add_argument('--max_steps', type=int, default=200, help='environment steps per episode')
  p.add_argument('--via_server', action='store_true', help='run the rollouts through the websocket server')
  p.add_argument('--seed', type=int, default=1000,
                 help='seen/unseen episode e runs MT1(task, seed + e): away from the build seeds, new variations')
  p.add_argument('--policy', default='model', choices=('model', 'expert', 'random'),
                 help="closed_loop: the checkpoint's policy, or a baseline through the same loop (the scripted "
                      'expert, or uniform random actions); baselines need only --config or a checkpoint for its config')
  p.add_argument('--replay', type=int, default=0,
                 help='also replay N training episodes (their own variations and reset seeds; split "replay")')
  return p.parse_args(rest), overrides


def in_process(backend):
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


@contextlib.contextmanager
def through_server(backend):
  """Serves `backend` on a loopback port from a thread; yields an infer factory using the client."""
  server, ports, handles = server_lib.PolicyServer(backend, max_sessions=4), queue.Queue(), {}

  async def main():
    handles['loop'], handles['stop'] = asyncio.get_running_loop(), asyncio.Event()
    await server.serve('127.0.0.1', 0, handles['stop'], on_ready=ports.put)

  thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
  thread.start()
  port = ports.get(timeout=120)
  clients = []

  def factory(session_id):
    c = client_lib.PolicyClient('127.0.0.1', port, session_id=session_id, timeout_s=600)
    clients.append(c)

    def infer(obs):
      return c.infer(obs)['actions'], None
    return infer

  try:
    yield factory
  finally:
    for c in clients:
      c.close()
    handles['loop'].call_soon_threadsafe(handles['stop'].set)
    thread.join(60)


def checkpoint_config(workdir: str):
  """The config a train.py workdir's newest checkpoint was trained with."""
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise ValueError(f'--checkpoint {workdir}: holds no checkpoint (or pass --config)')
  return loading.config_from_dict(ckpt.read_config(step))


def baseline(kind: str, horizon: int):
  """An infer factory for a baseline policy; the session id names the split, task and episode."""

  def factory(session_id):
    _, rest = session_id.split('-', 1)
    task = rest.rsplit('-', 1)[0]
    return closed_loop.Baseline(kind, task, horizon, seed=zlib.crc32(session_id.encode()))
  return factory


def latency(policy, cfg, steps: int = 5) -> dict:
  rng = np.random.default_rng(0)
  frame = lambda n: rng.uniform(-1, 1, (n, cfg.video.height, cfg.video.width, 3)).astype(np.float32)
  state = np.zeros(policy.embodiment.state_dim, np.float32)
  t = time.perf_counter()
  ep = policy.reset('reach the goal position', frame(1)[0], state)
  _, _, ep, _ = policy.step(ep)           # compiles
  ep = policy.observe(ep, frame(cfg.video.frames_per_chunk), state)
  first = time.perf_counter() - t
  rows = []
  for _ in range(steps):
    t0 = time.perf_counter()
    _, _, ep, info = policy.step(ep)
    t1 = time.perf_counter()
    ep = policy.observe(ep, frame(cfg.video.frames_per_chunk), state)  # restarts a full window
    jax.block_until_ready(ep.cache)
    t2 = time.perf_counter()
    rows.append(dict(denoise_ms=1e3 * (t1 - t0), observe_ms=1e3 * (t2 - t1)))
  med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
  return dict(first_step_with_compile_s=round(first, 2), **med, dit_evaluations=info['dit_evaluations'])


def _spread(variations: list, n: int) -> list:
  """n of the dataset's episodes, round-robin over its tasks (each task's first episodes first)."""
  by_task = {}
  for v in variations:
    by_task.setdefault(v.task, []).append(v)
  order = [eps[i] for i in range(max(map(len, by_task.values()), default=0)) for eps in by_task.values() if i < len(eps)]
  return order[:n]


def _tasks(args) -> tuple[list[str], list[str]]:
  """(seen, unseen) Meta-World tasks; an unknown name is refused before any model is loaded."""
  seen, unseen = metaworld_env.ml45_split()
  seen = seen if args.tasks is None else [t for t in args.tasks.split(',') if t]
  unseen = unseen if args.unseen_tasks is None else [t for t in args.unseen_tasks.split(',') if t]
  known = metaworld_env.all_tasks()
  for flag, tasks in (('--tasks', seen), ('--unseen_tasks', unseen)):
    unknown = [t for t in tasks if t not in known]
    if unknown:
      raise ValueError(f'{flag}: unknown Meta-World task {", ".join(unknown)} (e.g. {", ".join(sorted(known)[:3])})')
  return seen, unseen


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args, overrides = parse(argv)
  try:
    cfg = load_config(args.config, overrides) if args.config else None
    tasks = _tasks(args) if args.mode == 'closed_loop' else None
    if args.policy != 'model' and args.mode != 'closed_loop':
      raise ValueError(f'--policy {args.policy}: baselines run in --mode closed_loop only')
    if args.policy == 'model':
      pol = loading.load_policy(args.checkpoint, cfg)
      cfg = pol.cfg
    elif cfg is None:
      cfg = checkpoint_config(args.checkpoint)
    if args.mode == 'offline':
      batches = iter(pipeline.make_dataset(cfg, train=False, process_index=0, process_count=1))
  except (ConfigError, ValueError, OSError) as e:  # DataError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  if args.mode in ('latency', 'offline'):
    if args.mode == 'latency':
      report = dict(mode='latency', **latency(pol, cfg))
    else:
      report = dict(mode='offline', **offline.evaluate(pol, batches, args.clips))
    with open(os.path.join(args.out, 'report.json'), 'w') as fh:
      json.dump(report, fh, indent=1)
    print(json.dumps(report))
    return 0
  if cfg.data.embodiment != 'metaworld':
    print(f'error: closed_loop evaluates Meta-World; this checkpoint is for {cfg.data.embodiment!r}', file=sys.stderr)
    return 2
  seen, unseen = tasks
  replay = []
  if args.replay > 0:
    try:
      replay = _spread(metaworld_env.dataset_variations(cfg.data.dir, cfg.data.name), args.replay)
    except (ValueError, OSError) as e:
      print(f'error: --replay reads the training data (data.dir={cfg.data.dir!r}): {e}', file=sys.stderr)
      return 2
  if args.policy != 'model':
    report = closed_loop.evaluate(cfg, baseline(args.policy, cfg.video.action_horizon), seen, unseen, args.episodes,
                                  args.max_steps, args.out, seed=args.seed, replay=replay)
    print(f'report: {os.path.join(args.out, "report.json")} ({args.policy} policy)')
    return 0
  backend = loading.PolicyServerBackend(pol)
  with (through_server(backend) if args.via_server else contextlib.nullcontext(in_process(backend))) as factory:
    report = closed_loop.evaluate(cfg, factory, seen, unseen, args.episodes, args.max_steps, args.out,
                                  decode=pol.decode_video, encode=pol.encode_video, seed=args.seed,
                                  replay=replay)
  print(f'report: {os.path.join(args.out, "report.json")} ({report["crashed"]} crashed episodes); '
        f'gifs: {", ".join(report["gifs"])}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
