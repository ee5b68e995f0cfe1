"""The default job: `python -m dreamzero_jax.quickstart --out DIR` (CPU, no downloads; every stage resumes).

1. builds a small Meta-World dataset with the scripted experts (DIR/data),
2. trains the small Wan2.1 VAE on the data's canvases (DIR/vae; training/vae_training.py) and makes it the
   frozen VAE (init.vae; its held-out reconstruction PSNR is the JSON line's vae_psnr_db),
3. encodes every training clip once with it and trains the policy on the stored latents (DIR/train),
4. evaluates closed loop through the same policy a robot uses: replays of training episodes (their
   own variations and reset seeds), new variations of the seen tasks, and unseen tasks
   (DIR/eval/report.json, a GIF per task: real frames | predicted frames, and the predicted frames'
   PSNR against the real ones).
--baselines also runs the scripted expert and a random policy through the same loop and writes
DIR/results.md (per-task table with 95% intervals), DIR/results.json, DIR/training_curve.png and
DIR/success.png. The last stdout line is one JSON object (seen, unseen, replay, vae_psnr_db, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dreamzero_jax import evaluate as eval_cli
from dreamzero_jax.config import ConfigError, load_config, split_config_args
from dreamzero_jax.datasets import __main__ as datasets_cli
from dreamzero_jax.evaluation import results, tasks as tasks_lib
from dreamzero_jax.training import loop
from dreamzero_jax.training import vae_training


def parse(argv):
  overrides, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog='python -m dreamzero_jax.quickstart', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/metaworld_cpu.py:quick')
  p.add_argument('--out', default='runs/quickstart')
  p.add_argument('--tasks', default='plate-slide-v3,drawer-close-v3',
                 help='seen (training) tasks, comma-separated; "ml45" = the 45 ML45 train tasks')
  p.add_argument('--unseen_tasks', default='hand-insert-v3',
                 help='held-out tasks, comma-separated; "ml45" = the 5 ML45 test tasks; "" = none')
  p.add_argument('--episodes', type=int, default=6, help='expert episodes per task to train on')
  p.add_argument('--eval_episodes', type=int, default=1, help='new-variation episodes per seen/unseen task')
  p.add_argument('--eval_steps', type=int, default=150, help='environment steps per evaluation episode')
  p.add_argument('--replay', type=int, default=6, help='training episodes replayed in their own variations')
  p.add_argument('--max_minutes', type=float, help='wall-clock budget of the policy training stage (resumable)')
  p.add_argument('--vae', choices=('trained', 'random'), default='trained',
                 help='train the small VAE here (vae_train.steps updates), or keep the random frozen one')
  p.add_argument('--vae_minutes', type=float, help='wall-clock cap of the VAE stage (resumable)')
  p.add_argument('--baselines', action='store_true',
                 help='also evaluate the scripted expert and a random policy; write results.md/json and PNGs')
  return p.parse_args(rest), overrides


def main(argv=None) -> int:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  train_tasks, test_tasks = tasks_lib.ml45_split()
  tasks = ','.join(train_tasks) if args.tasks == 'ml45' else args.tasks
  unseen = ','.join(test_tasks) if args.unseen_tasks == 'ml45' else args.unseen_tasks
  start = time.time()
  data_dir, vae_dir, workdir, eval_dir = (os.path.join(args.out, d) for d in ('data', 'vae', 'train', 'eval'))
  try:
    cfg = load_config(args.config, [f'data.dir={data_dir}', *overrides])
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  size = cfg.serve.camera_height

  if not os.path.isdir(os.path.join(data_dir, 'metaworld')):
    print(f'[1/4] building Meta-World data ({tasks}, {args.episodes} episodes each) in {data_dir}', flush=True)
    code = datasets_cli.main(['build', 'metaworld', '--out', data_dir, '--tasks', tasks,
                              '--episodes', str(args.episodes), '--image_size', str(size), '--max_steps', '200'])
    if code:
      return code
  vae_psnr = None
  if cfg.init.vae or cfg.init.converted or args.vae == 'random':
    print('[2/4] the frozen VAE: ' + (f'init.vae={cfg.init.vae}' if cfg.init.vae else 'init.converted'
                                      if cfg.init.converted else f'random (seed {cfg.seed + 1}; --vae random)'),
          flush=True)
  else:
    print(f'[2/4] training the small VAE for {cfg.vae_train.steps} updates in {vae_dir}', flush=True)
    try:
      result = vae_training.train_vae(cfg, vae_dir, max_minutes=args.vae_minutes)
    except (ValueError, OSError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    cfg.init.vae, vae_psnr = result['path'], round(result['psnr_db'], 2)
  print(f'[3/4] training {args.config} for {cfg.train.steps} steps in {workdir}', flush=True)
  code = loop.train(cfg, workdir, max_minutes=args.max_minutes)
  if code:
    return code
  print(f'[4/4] closed-loop evaluation in {eval_dir}', flush=True)
  common = ['--tasks', tasks, '--unseen_tasks', unseen, '--episodes', str(args.eval_episodes),
            '--max_steps', str(args.eval_steps)]
  code = eval_cli.main(['--checkpoint', workdir, '--out', eval_dir, *common, '--replay', str(args.replay)])
  if code:
    return code
  with open(os.path.join(eval_dir, 'report.json')) as fh:
    report = json.load(fh)
  if args.baselines:
    write_results(args, cfg, workdir, report, common)
  summary = lambda split: {k: v for k, v in report[split].items() if k not in ('tasks', 'episodes')}
  print(json.dumps(dict(seen=summary('seen'), unseen=summary('unseen'), replay=summary('replay'),
                        vae_psnr_db=vae_psnr, crashed=report['crashed'],
                        minutes=round((time.time() - start) / 60, 1))))
  print(f'results: {os.path.join(eval_dir, "report.json")}, GIFs: {", ".join(report["gifs"])}, '
        f'training curve: {os.path.join(workdir, "metrics.jsonl")} (TensorBoard: {os.path.join(workdir, "tb")})')
  return 0


def write_results(args, cfg, workdir: str, report: dict, common: list[str]) -> None:
  """The expert and random baselines through the same loop (`common`: the evaluation's arguments
  but its checkpoint and output directory), then the table and the plots."""
  reports = {'policy': report}
  for kind in ('expert', 'random'):
    out = os.path.join(args.out, f'eval_{kind}')
    if not os.path.isfile(os.path.join(out, 'report.json')):
      eval_cli.main(['--checkpoint', workdir, '--policy', kind, '--out', out, *common])
    with open(os.path.join(out, 'report.json')) as fh:
      reports[kind] = json.load(fh)
  lines = []
  data = {}
  for split in ('seen', 'unseen'):
    text, data[split] = results.table(reports, split)
    if data[split]['tasks']:
      lines += [f'### {split} ({"new variations of the training tasks" if split == "seen" else "held-out tasks"})',
                '', text, '']
  with open(os.path.join(args.out, 'results.md'), 'w') as fh:
    fh.write('\n'.join(lines))
  with open(os.path.join(args.out, 'results.json'), 'w') as fh:
    json.dump(data, fh, indent=1)
  results.training_curve(os.path.join(workdir, 'metrics.jsonl'), os.path.join(args.out, 'training_curve.png'),
                         title=f'{args.config}: {args.tasks}')
  results.success_bars(data['seen'], os.path.join(args.out, 'success.png'), title='seen tasks, new variations')
  print('\n'.join(lines))


if __name__ == '__main__':
  sys.exit(main())
