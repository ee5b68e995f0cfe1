"""Evaluate a trained DreamZero: `python eval.py --checkpoint WORKDIR --out DIR --mode closed_loop|offline|latency`
(the same as `python -m dreamzero_jax.evaluate ...`).

closed_loop: Meta-World tasks driven through the policy exactly as a robot would drive it (chunks,
smoothing, real frames back into the cache), in-process or (--via_server) through the websocket
server on loopback; per-task success, progress and episode length over seeded episodes, split into
seen (ML45 train) and unseen (ML45 test) tasks on variations the data never held, plus a GIF per
task (real | predicted frames); --replay N also reruns N of the training episodes themselves.
offline: action MSE and predicted-video PSNR of the first chunk on held-out clips of data.dir.
latency: the per-stage timing of a control step (canvas, observe = VAE + cache write, denoise).
All write DIR/report.json. The harness is evaluation/ (closed_loop, offline, latency, tasks); this
module is its command line and the loopback server --via_server drives (serving sits above evaluation).
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

import dreamzero_client as client_lib

from dreamzero_jax import checkpoint
from dreamzero_jax import settings as settings_lib
from dreamzero_jax.config import ConfigError, config_from_dict, load_config, split_config_args
from dreamzero_jax.datasets import pipeline
from dreamzero_jax.evaluation import closed_loop, latency, offline, tasks as tasks_lib
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
  return config_from_dict(ckpt.read_config(step))


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args, overrides = parse(argv)
  try:
    settings = settings_lib.from_config(load_config(args.config, overrides)) if args.config else None
    tasks = tasks_lib.seen_and_unseen(args.tasks, args.unseen_tasks) if args.mode == 'closed_loop' else None
    if args.policy != 'model' and args.mode != 'closed_loop':
      raise ValueError(f'--policy {args.policy}: baselines run in --mode closed_loop only')
    if args.policy == 'model':
      pol = loading.load_policy(args.checkpoint, settings)
      settings = pol.settings
    elif settings is None:
      settings = settings_lib.from_config(checkpoint_config(args.checkpoint))
    if args.mode == 'offline':
      batches = iter(pipeline.make_dataset(settings, train=False, process_index=0, process_count=1))
  except (ConfigError, ValueError, OSError) as e:  # DataError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  if args.mode in ('latency', 'offline'):
    if args.mode == 'latency':
      report = dict(mode='latency', **latency.measure(pol, settings))
    else:
      report = dict(mode='offline', **offline.evaluate(pol, batches, args.clips))
    with open(os.path.join(args.out, 'report.json'), 'w') as fh:
      json.dump(report, fh, indent=1)
    print(json.dumps(report))
    return 0
  if settings.data.embodiment != 'metaworld':
    print(f'error: closed_loop evaluates Meta-World; this checkpoint is for {settings.data.embodiment!r}',
          file=sys.stderr)
    return 2
  seen, unseen = tasks
  replay = []
  if args.replay > 0:
    try:
      replay = tasks_lib.spread(tasks_lib.dataset_variations(settings.data.dir, settings.data.name), args.replay)
    except (ValueError, OSError) as e:
      print(f'error: --replay reads the training data (data.dir={settings.data.dir!r}): {e}', file=sys.stderr)
      return 2
  if args.policy != 'model':
    report = closed_loop.evaluate(settings, closed_loop.baseline(args.policy, settings.video.action_horizon), seen,
                                  unseen, args.episodes, args.max_steps, args.out, seed=args.seed, replay=replay)
    print(f'report: {os.path.join(args.out, "report.json")} ({args.policy} policy)')
    return 0
  backend = loading.PolicyServerBackend(pol)
  with (through_server(backend) if args.via_server else contextlib.nullcontext(closed_loop.in_process(backend))) as factory:
    report = closed_loop.evaluate(settings, factory, seen, unseen, args.episodes, args.max_steps, args.out,
                                  decode=pol.decode_video, encode=pol.encode_video, seed=args.seed,
                                  replay=replay)
  print(f'report: {os.path.join(args.out, "report.json")} ({report["crashed"]} crashed episodes); '
        f'gifs: {", ".join(report["gifs"])}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
