"""The default job: `python -m dreamzero_jax.quickstart --out DIR` (CPU, minutes, no downloads).

1. builds a small Meta-World dataset with the scripted experts (DIR/data),
2. trains the tiny config on it (DIR/train; rerunning resumes),
3. evaluates closed loop through the same policy a robot uses: replays of training episodes (their
   own variations and reset seeds), new variations of the seen tasks, and unseen tasks
   (DIR/eval/report.json and a GIF per task: real frames | predicted frames).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dreamzero_jax import evaluate as eval_cli
from dreamzero_jax.config import load_config, split_config_args
from dreamzero_jax.datasets import __main__ as datasets_cli
from dreamzero_jax.evaluation import metaworld_env
from dreamzero_jax.training import loop


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog='python -m dreamzero_jax.quickstart', description=__doc__)
  p.add_argument('--config', default='configs/tiny.py')
  p.add_argument('--out', default='runs/quickstart')
  p.add_argument('--tasks', default='reach-v3,push-v3',
                 help='seen (training) tasks, comma-separated; "ml45" = the 45 ML45 train tasks')
  p.add_argument('--unseen_tasks', default='hand-insert-v3',
                 help='held-out tasks, comma-separated; "ml45" = the 5 ML45 test tasks')
  p.add_argument('--episodes', type=int, default=6, help='expert episodes per task to train on')
  p.add_argument('--eval_episodes', type=int, default=1)
  p.add_argument('--eval_steps', type=int, default=96, help='environment steps per evaluation episode')
  p.add_argument('--replay', type=int, default=5, help='training episodes replayed in their own variations')
  p.add_argument('--max_minutes', type=float, help='wall-clock budget of the training stage (resumable)')
  args = p.parse_args(rest)
  if 'ml45' in (args.tasks, args.unseen_tasks):
    train_tasks, test_tasks = metaworld_env.ml45_split()
    args.tasks = ','.join(train_tasks) if args.tasks == 'ml45' else args.tasks
    args.unseen_tasks = ','.join(test_tasks) if args.unseen_tasks == 'ml45' else args.unseen_tasks
  start = time.time()
  data_dir, workdir, eval_dir = (os.path.join(args.out, d) for d in ('data', 'train', 'eval'))
  cfg = load_config(args.config, [f'data.dir={data_dir}', *overrides])
  size = cfg.serve.camera_height

  if not os.path.isdir(os.path.join(data_dir, 'metaworld')):
    print(f'[1/3] building Meta-World data ({args.tasks}, {args.episodes} episodes each) in {data_dir}', flush=True)
    code = datasets_cli.main(['build', 'metaworld', '--out', data_dir, '--tasks', args.tasks,
                              '--episodes', str(args.episodes), '--image_size', str(size), '--max_steps', '200'])
    if code:
      return code
  print(f'[2/3] training {args.config} for {cfg.train.steps} steps in {workdir}', flush=True)
  code = loop.train(cfg, workdir, max_minutes=args.max_minutes)
  if code:
    return code
  print(f'[3/3] closed-loop evaluation in {eval_dir}', flush=True)
  code = eval_cli.main(['--checkpoint', workdir, '--out', eval_dir, '--tasks', args.tasks,
                        '--unseen_tasks', args.unseen_tasks, '--episodes', str(args.eval_episodes),
                        '--max_steps', str(args.eval_steps), '--replay', str(args.replay)])
  if code:
    return code
  with open(os.path.join(eval_dir, 'report.json')) as fh:
    report = json.load(fh)
  replay = {k: v for k, v in report['replay'].items() if k not in ('tasks', 'episodes')}
  print(json.dumps(dict(seen=report['seen'], unseen=report['unseen'], replay=replay, crashed=report['crashed'],
                        minutes=round((time.time() - start) / 60, 1))))
  print(f'results: {os.path.join(eval_dir, "report.json")}, GIFs: {", ".join(report["gifs"])}, '
        f'training curve: {os.path.join(workdir, "metrics.jsonl")} (TensorBoard: {os.path.join(workdir, "tb")})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
