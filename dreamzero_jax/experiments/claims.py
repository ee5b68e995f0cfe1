"""The paper's claims reproduced at small scale: `python -m dreamzero_jax.experiments claims --out DIR`.

What is compared (experiments/arms.py; docs/claims.md): every arm trains the same model for the same
steps on the same data unless its claim is about them (base config configs/metaworld_cpu.py; `--config`
/ `--config.a.b=v` change it for every arm). From scratch: wam (evaluated at 4 and, same checkpoint,
1 denoising step), action_only (no video loss: the VLA stand-in), flash, bidirectional, repetitive,
and wam_wide / action_only_wide (twice the width). From the video-pretrained DiT: wam_pretrained,
action_only_pretrained, wam_pretrained_videodemos (video-only episodes of the unseen tasks in its
data) and wam_pretrained_flash. The arms of the WAM-vs-action-only and video-only rows train with
`--seeds` seeds.

Stages, each skipped once done, so a rerun continues where the last one stopped: the Meta-World
data per setting (DIR/data/SETTING), the small VAE every arm uses, trained once on the diverse data
(DIR/vae/diverse; `--vae random` keeps the random frozen VAE), the baselines' evaluations (the
scripted expert and random actions, DIR/baselines/KIND/report.json, on the same tasks and seeds), the
video-only pretraining (DIR/pretrain/train: the action loss off, on video-only expert episodes of
the ML45 train tasks), then per arm and seed the training (DIR/arms/ARM[-seedK]/train; each run
trains at most `--budget_minutes`, a rerun resumes) and the closed-loop evaluations
(.../eval/EVAL/report.json: the seen tasks on variations the data never held, and unseen tasks, by
default the held-out ML45 test tasks). An arm whose reports all exist is finished and skipped. DIR is
made to be committed and continued on another machine (GITIGNORE; docs/claims.md, "Across machines"). Every
run rewrites DIR/claims.json, DIR/claims.md and DIR/figures/*.png from the reports there: per claim
our numbers with 95% intervals over seeds and episodes beside the paper's and a verdict (VERDICT_RULE).

Time (an idle 2-core CPU, measured in the runs of 2026-11-28/29): data ~3 s an expert episode; the
VAE ~12 min (2,000 updates at 0.37 s); training ~5 steps/s at width 128 (the base config's 8,000
steps: ~27 min an arm), about a third of that at width 256 (an estimate); the baselines ~5 min; an
evaluation ~4 min per 50 episodes. Each run prints its estimate of what is left; `--budget_minutes`
splits the work over several runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import jax
import numpy as np

from dreamzero_jax import checkpoint
from dreamzero_jax import evaluate as eval_cli
from dreamzero_jax.config import ConfigError, load_config, split_config_args
from dreamzero_jax.datasets import __main__ as datasets_cli
from dreamzero_jax.datasets import episodes as episodes_lib
from dreamzero_jax.evaluation import results, tasks as tasks_lib
from dreamzero_jax.experiments.arms import (ARMS, BASELINE_COLORS, BASELINES, BOOTSTRAP_SEED, CLAIMS, EVALS,
                                            FIGURES, LATENCY, METRICS, SPLITS, VERDICT_RULE, eval_metrics, judge,
                                            label)
from dreamzero_jax.models import encoders
from dreamzero_jax.settings import from_config
from dreamzero_jax.training import loop
from dreamzero_jax.training import vae_training

# The frozen VAE is one for every arm, trained on this setting's frames: the paper's arms share one
# pretrained Wan VAE, and a VAE per data setting would add a second difference to the data claim.
VAE_SETTING = 'diverse'
# The suite's own defaults, before the user's overrides: the VAE trained at the rate that carries the
# scene (bench/RESULTS.md, the claims follow-up: 25.8 dB held-out against 23.0 at the config's 2e-3).
SUITE_OVERRIDES = ('vae_train.lr=0.004',)
DEFAULT_TASKS = 'plate-slide-v3,plate-slide-side-v3,drawer-close-v3,window-open-v3,window-close-v3'
DATA_SEED = 0          # the expert episodes' build seed (variations 0.., reset seeds 0..)
EVAL_SEED = 1000       # eval.py's default: seen-task episodes in variations the data never held
# Seconds per unit on an idle 2-core CPU (the module docstring), for the estimate printed at start.
SECONDS = dict(episode=3.0, vae_update=0.37, step=0.2, wide_step=0.6, eval_episode=4.8)
# DIR/.gitignore: what a rerun rebuilds (the data, from its build seed) or no longer needs once a stage is
# done (checkpoints with their optimiser state, GIFs). The rest of DIR is what the suite keeps: its
# settings, each data setting's record and digest, the VAE's and the pretrained DiT's weights, every
# report, training log and figure, so DIR can be committed and the run continued on another machine.
GITIGNORE = '''# Written by `python -m dreamzero_jax.experiments claims` (docs/claims.md, "Outputs and resuming").
data/*/
vae/*/vae_state.npz
pretrain/train/checkpoints/
arms/*/train/checkpoints/
*/train/latent_cache/
arms/*/train/latent_cache/
*/train/tb/
arms/*/train/tb/
*.gif
'''


def parse(argv):
  overrides, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog='python -m dreamzero_jax.experiments claims', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', required=True, help='the suite\'s folder (rerun with the same flags to continue)')
  p.add_argument('--config', default='configs/metaworld_cpu.py', help='every arm\'s base config')
  p.add_argument('--arms', default=','.join(ARMS), help=f'arms to train and evaluate this run ({",".join(ARMS)})')
  p.add_argument('--tasks', default=DEFAULT_TASKS, help='seen (training) tasks, comma-separated')
  p.add_argument('--unseen_tasks', default='ml45', help='held-out tasks; "ml45" = the 5 ML45 test tasks')
  p.add_argument('--episodes', type=int, default=20, help='expert episodes per task in each data setting')
  p.add_argument('--repetitive_variations', type=int, default=2,
                 help='variations per task in the repetitive data (repeated over its episodes)')
  p.add_argument('--pretrain_tasks', default='ml45_train',
                 help='the video-only pretraining\'s tasks; "ml45_train" = the 45 ML45 train tasks')
  p.add_argument('--pretrain_episodes', type=int, default=10, help='video-only expert episodes per pretraining task')
  p.add_argument('--pretrain_steps', type=int, default=0, help='pretraining steps; 0 = the config\'s train.steps')
  p.add_argument('--videodemo_episodes', type=int, default=10,
                 help='video-only episodes per unseen task in the videodemos data (beside the seen tasks\' own)')
  p.add_argument('--seeds', type=int, default=2, help='training seeds of the arms that take several (arms.py)')
  p.add_argument('--eval_episodes', type=int, default=5, help='evaluation episodes per task')
  p.add_argument('--max_steps', type=int, default=150, help='environment steps per episode (data and evaluation)')
  p.add_argument('--budget_minutes', type=float, help='training minutes per arm and run (a rerun continues)')
  p.add_argument('--vae', choices=('trained', 'random'), default='trained',
                 help='train the small VAE once on the diverse data (training/vae_training.py), or keep the random frozen one')
  p.add_argument('--workers', type=int, default=0, help='data-build processes; 0 = one per core')
  args = p.parse_args(rest)
  if args.seeds < 1:
    p.error('--seeds: at least 1')
  return args, [*SUITE_OVERRIDES, *(o.removeprefix('--config.') for o in overrides)]


def run_name(arm: str, seed: int) -> str:
  """The folder of an arm's training seed `seed` (0: the arm's own name, as single-seed suites had)."""
  return arm if seed == 0 else f'{arm}-seed{seed}'


def _fmt(metric: str, v) -> str:
  if v is None:
    return '-'
  if metric in ('success', 'progress'):
    return f'{100 * v[0]:.1f}% [{100 * v[1]:.1f}, {100 * v[2]:.1f}]'
  if metric == 'chunk_ms':
    return f'{v[0]:.0f} ms [{v[1]:.0f}, {v[2]:.0f}]'
  return f'{v[0]:.3g} [{v[1]:.3g}, {v[2]:.3g}]'


def _fmt_difference(metric: str, v) -> str:
  if v is None:
    return '-'
  if metric in ('success', 'progress'):
    return f'{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}] points'
  return f'{v[0]:+.3g} [{v[1]:+.3g}, {v[2]:+.3g}]'


def _paper(claim_row: dict) -> str:
  paper = claim_row['paper']
  return paper if isinstance(paper, str) else f'{100 * paper[0]:.1f}% vs {100 * paper[1]:.1f}%'


class Suite:
  """The folder layout and the stages of one `claims --out DIR` run."""

  def __init__(self, args, overrides: list[str], argv: list[str]):
    self.args, self.overrides, self.argv, self.out = args, overrides, argv, os.path.abspath(args.out)
    self.arms = [a for a in args.arms.split(',') if a]
    unknown = [a for a in self.arms if a not in ARMS]
    if unknown:
      raise ConfigError(f'--arms: unknown arm {", ".join(unknown)} (known: {", ".join(ARMS)})')
    train_tasks, test_tasks = tasks_lib.ml45_split()
    self.seen = [t for t in args.tasks.split(',') if t]
    self.unseen = test_tasks if args.unseen_tasks == 'ml45' else [t for t in args.unseen_tasks.split(',') if t]
    self.pretrain_tasks = (train_tasks if args.pretrain_tasks == 'ml45_train' else
                           [t for t in args.pretrain_tasks.split(',') if t])
    known = tasks_lib.all_tasks()
    for flag, tasks in (('--tasks', self.seen), ('--unseen_tasks', self.unseen), ('--pretrain_tasks',
                                                                                   self.pretrain_tasks)):
      bad = [t for t in tasks if t not in known]
      if bad:
        raise ConfigError(f'{flag}: unknown Meta-World task {", ".join(bad)} (e.g. {", ".join(train_tasks[:3])})')
    leaked = sorted(set(self.unseen) & set(self.pretrain_tasks))
    if leaked:
      raise ConfigError(f'--pretrain_tasks: {", ".join(leaked)} are unseen tasks (their videos belong to the '
                        'videodemos arm only)')
    self.base = load_config(args.config, overrides)   # refuses a bad override before any work
    self.unseen_are_ml45 = sorted(self.unseen) == sorted(test_tasks)
    # Per data setting: (tasks, episodes per task, variations per task (0: all distinct), video-only tasks,
    # episodes per video-only task).
    self.data_settings = {
        'diverse': (self.seen, args.episodes, 0, (), 0),
        'repetitive': (self.seen, args.episodes, args.repetitive_variations, (), 0),
        'pretrain': (self.pretrain_tasks, args.pretrain_episodes, 0, tuple(self.pretrain_tasks), 0),
        'videodemos': (self.seen + self.unseen, args.episodes, 0, tuple(self.unseen), args.videodemo_episodes)}
    self.pretrain_steps = args.pretrain_steps or self.base.train.steps
    # What the results depend on: a rerun into the same DIR must repeat it (--seeds may grow).
    self.settings = dict(config=args.config, overrides=overrides, tasks=','.join(self.seen),
                         unseen_tasks=','.join(self.unseen), episodes=args.episodes,
                         repetitive_variations=args.repetitive_variations, eval_episodes=args.eval_episodes,
                         max_steps=args.max_steps, vae=args.vae, pretrain_tasks=','.join(self.pretrain_tasks),
                         pretrain_episodes=args.pretrain_episodes, pretrain_steps=self.pretrain_steps,
                         videodemo_episodes=args.videodemo_episodes)

  def path(self, *parts: str) -> str:
    return os.path.join(self.out, *parts)

  def split_label(self, split: str) -> str:
    held_out = split == 'unseen' and self.unseen_are_ml45
    return SPLITS[split] + (' (the held-out ML45 test tasks)' if held_out else '')

  def seeds_of(self, name: str) -> int:
    return self.args.seeds if ARMS[name].seeds else 1

  def runs(self, names=None) -> list[tuple[str, int]]:
    """(arm, seed) of the arms' runs, every arm's first seed before any second."""
    names = list(ARMS) if names is None else names
    return [(n, k) for k in range(self.args.seeds) for n in names if k < self.seeds_of(n)]

  def needed_data(self) -> list[str]:
    """The data settings the work left needs: the diverse data for the VAE and the baselines (their
    config), each unfinished run's, the pretraining data until the pretrained DiT is exported."""
    needed = []
    if ((self.args.vae == 'trained' and not os.path.exists(self.path('vae', f'{VAE_SETTING}.json')))
        or not all(os.path.exists(self.baseline_path(kind)) for kind in BASELINES)):
      needed.append(VAE_SETTING)
    unfinished = [name for name, seed in self.runs(self.arms) if not self.finished(name, seed)]
    needed += [ARMS[name].data for name in unfinished]
    if any(ARMS[name].pretrained for name in unfinished) and not self.pretrained():
      needed.append('pretrain')
    return list(dict.fromkeys(needed))

  def check_settings(self) -> None:
    """Records the flags the results depend on; refuses a rerun into DIR with others."""
    path = self.path('settings.json')
    if os.path.exists(path):
      with open(path) as fh:
        saved = json.load(fh)
      diffs = [f'{k}: {saved.get(k)!r} before, {v!r} now' for k, v in self.settings.items() if saved.get(k) != v]
      if diffs:
        raise ConfigError(f'{self.out} was run with other settings ({"; ".join(diffs)}): use them, or a new --out')
    else:
      os.makedirs(self.out, exist_ok=True)
      with open(path, 'w') as fh:
        json.dump(self.settings, fh, indent=1)
    if not os.path.exists(self.path('.gitignore')):
      with open(self.path('.gitignore'), 'w') as fh:
        fh.write(GITIGNORE)

  # ---- stages ------------------------------------------------------------------------------------

  def build_data(self, setting: str) -> int:
    """The expert episodes of a data setting, built once (an interrupted build starts over)."""
    data_dir, args = self.path('data', setting), self.args
    marker = os.path.join(data_dir, 'built.json')
    if os.path.exists(marker):
      self.write_data_record(setting)
      return 0
    if os.path.isdir(data_dir):
      shutil.rmtree(data_dir)
    tasks, episodes, variations, video_only, video_episodes = self.data_settings[setting]
    argv = ['build', 'metaworld', '--out', data_dir, '--tasks', ','.join(tasks), '--episodes', str(episodes),
            '--image_size', str(self.base.serve.camera_height), '--max_steps', str(args.max_steps),
            '--seed', str(DATA_SEED), '--variations', str(variations), '--workers', str(args.workers)]
    if video_only:
      argv += ['--video_only_tasks', ','.join(video_only), '--video_only_episodes', str(video_episodes)]
    print(f'[data] {setting}: {len(tasks)} tasks ({len(video_only)} video-only) in {data_dir}', flush=True)
    code = datasets_cli.main(argv)
    if code:
      return code
    stored = episodes_lib.open_dataset(data_dir, 'metaworld')
    digest, record = data_digest(stored.lowdim), self.data_record(setting)
    if os.path.exists(record):   # rebuilt on another machine: it must be the data the earlier runs had
      with open(record) as fh:
        want = json.load(fh)['digest']
      if digest != want:
        print(f'error: {data_dir} was rebuilt with other contents (digest {digest[:12]}... where the runs '
              f'recorded in {record} had {want[:12]}...): the results would mix two datasets', file=sys.stderr)
        return 1
    with open(marker, 'w') as fh:
      json.dump(dict(argv=argv), fh)
    self.write_data_record(setting, stored)
    return 0

  def write_data_record(self, setting: str, stored: episodes_lib.StoredDataset | None = None) -> None:
    """data_record's file, once, from the built data (`stored`: it opened)."""
    record, data_dir = self.data_record(setting), self.path('data', setting)
    if os.path.exists(record):
      return
    stored = stored or episodes_lib.open_dataset(data_dir, 'metaworld')
    with open(os.path.join(data_dir, 'built.json')) as fh:
      argv = json.load(fh)['argv']
    tmp = record + '.tmp'
    with open(tmp, 'w') as fh:
      json.dump(dict(argv=[os.path.relpath(a, self.out) if a == data_dir else a for a in argv],
                     digest=data_digest(stored.lowdim), **stored_summary(stored)), fh, indent=1)
    os.replace(tmp, record)

  def data_record(self, setting: str) -> str:
    """DIR/data/SETTING.json: the build's flags, the digest of its episodes and their counts, kept
    when the data itself is not (a rebuild is checked against the digest)."""
    return self.path('data', f'{setting}.json')

  def data_summary(self, setting: str) -> dict:
    """A data setting's folder and, once built, its episodes and minutes of video-only demonstrations."""
    tasks, episodes, variations, video_only, _ = self.data_settings[setting]
    out = dict(dir=os.path.relpath(self.path('data', setting), self.out), tasks=len(tasks),
               episodes_per_task=episodes, variations_per_task=variations or 'all distinct',
               video_only_tasks=list(video_only))
    if os.path.exists(self.data_record(setting)):
      with open(self.data_record(setting)) as fh:
        record = json.load(fh)
      out.update({k: record[k] for k in ('episodes', 'video_only_episodes', 'video_only_frames',
                                         'video_only_minutes')}, digest=record['digest'])
    return out

  def vae_override(self) -> list[str]:
    """`init.vae=PATH` of the trained VAE every arm uses (trained here once, on VAE_SETTING's frames), or
    nothing with --vae random."""
    if self.args.vae == 'random':
      return []
    setting = VAE_SETTING
    record = self.path('vae', f'{setting}.json')
    if not os.path.exists(record):
      cfg = load_config(self.args.config, [f'data.dir={self.path("data", setting)!r}', *self.overrides])
      print(f'[vae] {setting}: training the VAE in {self.path("vae", setting)}', flush=True)
      result = vae_training.train_vae(cfg, self.path('vae', setting))
      with open(record, 'w') as fh:
        json.dump(dict(psnr_db=float(result['psnr_db']), path=os.path.relpath(result['path'], self.out)), fh)
    # The weights' place in DIR, not the path the record was written with (DIR may have moved).
    return [f'init.vae={self.path("vae", setting, vae_training.VAE_DIR)!r}']

  def pretrain_dir(self) -> str:
    return self.path('pretrain', 'train')

  def pretrain_weights(self) -> str:
    """The pretrained DiT the pretrained arms start from: the pretraining's newest parameters exported
    as a weights directory (checkpoint.export_model_params) once it has trained to the end."""
    return self.path('pretrain', 'weights')

  def pretrain_step(self) -> int | None:
    """The pretraining's step: its exported weights' once finished, else its workdir's newest."""
    if self.pretrained():
      return int(checkpoint.read_weights_meta(self.pretrain_weights())['step'])
    return latest_step(self.pretrain_dir())

  def pretrained(self) -> bool:
    return os.path.isfile(os.path.join(self.pretrain_weights(), checkpoint.META_FILE))

  def pretrain_overrides(self) -> list[str]:
    """The video-only pretraining: the base model and recipe on the pretraining data, action loss off."""
    return [f'data.dir={self.path("data", "pretrain")!r}', *self.vae_override(), *self.overrides,
            'train.action_loss_weight=0.0', f'train.steps={self.pretrain_steps}']

  def arm_overrides(self, name: str, seed: int = 0) -> list[str]:
    """The run's training config as overrides of the base: its data and VAE, the pretrained DiT it
    starts from, the user's overrides, the arm's changes and its training seed."""
    arm = ARMS[name]
    out = [f'data.dir={self.path("data", arm.data)!r}', *self.vae_override(), *self.overrides,
           *[f'{k}={v!r}' for k, v in arm.changes.items()]]
    if arm.pretrained:
      out.append(f'init.pretrained={self.pretrain_weights()!r}')
    if seed:   # the initialisation and training noise, and the data order
      out += [f'seed={self.base.seed + seed}', f'data.seed={self.base.data.seed + seed}']
    return out

  def baseline_path(self, kind: str) -> str:
    return self.path('baselines', kind, 'report.json')

  def eval_argv(self, out: str) -> list[str]:
    """eval.py's flags every evaluation shares: the tasks, episodes, steps and seeds."""
    args = self.args
    return ['--config', args.config, '--out', out, '--tasks', ','.join(self.seen),
            '--unseen_tasks', ','.join(self.unseen), '--episodes', str(args.eval_episodes),
            '--max_steps', str(args.max_steps), '--seed', str(EVAL_SEED)]

  def run_baseline(self, kind: str) -> int:
    """The baseline's closed-loop evaluation, once (its config: the base with the diverse data)."""
    report = self.baseline_path(kind)
    if os.path.exists(report):
      return 0
    out = os.path.dirname(report)
    print(f'[baseline] {kind}: {BASELINES[kind]} in {out}', flush=True)
    overrides = [f'data.dir={self.path("data", "diverse")!r}', *self.overrides]
    return eval_cli.main(['--checkpoint', out, '--policy', kind, *self.eval_argv(out),
                          *[f'--config.{o}' for o in overrides]])

  def train(self, what: str, cfg, train_dir: str) -> tuple[int, bool]:
    """(exit code, trained to the end) of a training stage, resumed, at most --budget_minutes this run."""
    step = latest_step(train_dir)
    if step is not None and step >= cfg.train.steps:
      return 0, True
    print(f'[{what}] training in {train_dir} (from step {step or 0} of {cfg.train.steps})', flush=True)
    code = loop.train(cfg, train_dir, max_minutes=self.args.budget_minutes)
    step = latest_step(train_dir)
    done = step is not None and step >= cfg.train.steps
    if not code and not done:
      print(f'[{what}] step {step} of {cfg.train.steps} after --budget_minutes; rerun to continue', flush=True)
    return code, done

  def pretrain(self) -> tuple[int, bool]:
    """(exit code, finished) of the pretraining; once trained to the end its parameters are exported
    (pretrain_weights) and its workdir is no longer needed."""
    if self.pretrained():
      return 0, True
    cfg = load_config(self.args.config, self.pretrain_overrides())
    code, done = self.train('pretrain', cfg, self.pretrain_dir())
    if done:
      abstract = jax.eval_shape(lambda: encoders.initial_dit_shapes(from_config(cfg)))
      step = checkpoint.export_model_params(self.pretrain_dir(), self.pretrain_weights(), abstract, cfg)
      print(f'[pretrain] step {step} exported to {self.pretrain_weights()}', flush=True)
    return code, done

  def report_path(self, name: str, eval_name: str, seed: int = 0) -> str:
    return self.path('arms', run_name(name, seed), 'eval', eval_name, 'report.json')

  def trained_record(self, name: str, seed: int = 0) -> str:
    return self.path('arms', run_name(name, seed), 'trained.json')

  def run_step(self, name: str, seed: int = 0) -> int | None:
    """A run's training step: its newest checkpoint's, else the one recorded when it finished training."""
    step = latest_step(self.path('arms', run_name(name, seed), 'train'))
    if step is None and os.path.exists(self.trained_record(name, seed)):
      with open(self.trained_record(name, seed)) as fh:
        step = json.load(fh)['step']
    return step

  def finished(self, name: str, seed: int = 0) -> bool:
    return all(os.path.exists(self.report_path(name, e, seed)) for e in ARMS[name].evals)

  def run_arm(self, name: str, seed: int = 0) -> int:
    """Trains the run (resuming; at most --budget_minutes this run), then runs its missing evaluations."""
    run = run_name(name, seed)
    if self.finished(name, seed):
      print(f'[{run}] finished (its reports exist); skipped', flush=True)
      return 0
    overrides = self.arm_overrides(name, seed)
    train_dir = self.path('arms', run, 'train')
    code, done = self.train(f'{run}: {ARMS[name].what}', load_config(self.args.config, overrides), train_dir)
    if code or not done:
      return code
    with open(self.trained_record(name, seed), 'w') as fh:   # its step, kept when the checkpoints are not
      json.dump(dict(step=latest_step(train_dir)), fh)
    for eval_name in ARMS[name].evals:
      report = self.report_path(name, eval_name, seed)
      if os.path.exists(report):
        continue
      print(f'[{run}] evaluating at {EVALS[eval_name][0]} in {os.path.dirname(report)}', flush=True)
      sampler = [f'{k}={v!r}' for k, v in EVALS[eval_name][1].items()]
      code = eval_cli.main(['--checkpoint', train_dir, *self.eval_argv(os.path.dirname(report)),
                            *[f'--config.{o}' for o in overrides + sampler]])
      if code:
        return code
    return 0

  def estimate_minutes(self) -> dict[str, float]:
    """Minutes left per stage of this run's work on an idle 2-core CPU (SECONDS)."""
    s, args = SECONDS, self.args
    eval_s = (len(self.seen) + len(self.unseen)) * args.eval_episodes * s['eval_episode']
    out = dict(data=0.0, vae=0.0, baselines=0.0, pretraining=0.0, arms=0.0)
    for setting in self.needed_data():
      if not os.path.exists(self.path('data', setting, 'built.json')):
        tasks, episodes, _, video_only, video_episodes = self.data_settings[setting]
        count = sum(video_episodes or episodes if t in video_only else episodes for t in tasks)
        out['data'] += count * s['episode']
    if args.vae == 'trained' and not os.path.exists(self.path('vae', f'{VAE_SETTING}.json')):
      out['vae'] = self.base.vae_train.steps * s['vae_update']
    out['baselines'] = sum(eval_s for kind in BASELINES if not os.path.exists(self.baseline_path(kind)))
    if 'pretrain' in self.needed_data():
      out['pretraining'] = (self.pretrain_steps - (self.pretrain_step() or 0)) * s['step']
    for name, seed in self.runs(self.arms):
      if not self.finished(name, seed):
        rate = s['wide_step'] if 'model.dim' in ARMS[name].changes else s['step']
        done = self.run_step(name, seed) or 0
        out['arms'] += max(self.base.train.steps - done, 0) * rate + len(ARMS[name].evals) * eval_s
    return {k: round(v / 60, 1) for k, v in out.items()}

  # ---- outputs -----------------------------------------------------------------------------------

  def reports(self) -> dict:
    """{(arm, eval): [report of each training seed evaluated so far]} of every arm evaluation in DIR."""
    out = {}
    for name, arm in ARMS.items():
      for eval_name in arm.evals:
        for seed in range(self.seeds_of(name)):
          path = self.report_path(name, eval_name, seed)
          if os.path.exists(path):
            with open(path) as fh:
              out.setdefault((name, eval_name), []).append(json.load(fh))
    return out

  def run_status(self, name: str, seed: int) -> dict:
    """A run's arm, seed, settings, training step and evaluations."""
    arm = ARMS[name]
    evals = {}
    for eval_name in arm.evals:
      path = self.report_path(name, eval_name, seed)
      if os.path.exists(path):
        with open(path) as fh:
          report = json.load(fh)
        evals[eval_name] = dict(sampler=EVALS[eval_name][1], report=os.path.relpath(path, self.out),
                                seconds=report.get('seconds'), crashed=report.get('crashed'),
                                metrics=eval_metrics([report]))
    step = self.run_step(name, seed)
    if len(evals) == len(arm.evals):
      status = 'finished'
    else:
      status = ('not started' if step is None else 'training' if step < self.base.train.steps else
                'trained, evaluation unfinished')
    return dict(arm=name, seed=seed, what=arm.what, changes=arm.changes, data=arm.data, pretrained=arm.pretrained,
                status=status, step=step, steps=self.base.train.steps, evals=evals)

  def baseline_status(self) -> dict:
    """{kind: what, report, metrics} of the baselines evaluated so far."""
    out = {}
    for kind, what in BASELINES.items():
      path = self.baseline_path(kind)
      if os.path.exists(path):
        with open(path) as fh:
          out[kind] = dict(what=what, report=os.path.relpath(path, self.out), metrics=eval_metrics([json.load(fh)]))
    return out

  def write_outputs(self) -> dict:
    """claims.json, claims.md and the figures, from every report in DIR (arms of earlier runs too)."""
    reports = self.reports()
    runs = {run_name(n, k): self.run_status(n, k) for n, k in self.runs()}
    baselines = self.baseline_status()
    metrics = {side: eval_metrics(r) for side, r in reports.items()}
    rows = [judge(c, reports, metrics) for c in CLAIMS]
    os.makedirs(self.path('figures'), exist_ok=True)
    figures = self.figures(rows, metrics, runs, baselines)
    vae = {}
    if os.path.exists(self.path('vae', f'{VAE_SETTING}.json')):
      with open(self.path('vae', f'{VAE_SETTING}.json')) as fh:
        vae[VAE_SETTING] = json.load(fh)
    pretrain_step = self.pretrain_step()
    summary = dict(
        command=['python', '-m', 'dreamzero_jax.experiments', 'claims', *self.argv], settings=self.settings,
        seeds=dict(train=self.base.seed, data_pipeline=self.base.data.seed, data_build=DATA_SEED, eval=EVAL_SEED,
                   bootstrap=BOOTSTRAP_SEED, training_seeds=self.args.seeds),
        seen_tasks=self.seen, unseen_tasks=self.unseen, unseen_are_ml45_test_tasks=self.unseen_are_ml45,
        pretrain_tasks=self.pretrain_tasks,
        data={s: self.data_summary(s) for s in self.data_settings},
        vae=vae, pretrain=dict(dir=os.path.relpath(self.pretrain_dir(), self.out), step=pretrain_step,
                               weights=os.path.relpath(self.pretrain_weights(), self.out),
                               steps=self.pretrain_steps, status='not started' if pretrain_step is None else
                               'finished' if self.pretrained() else 'training'),
        verdict_rule=VERDICT_RULE, claims=rows, arms=runs, baselines=baselines,
        figures=[os.path.relpath(f, self.out) for f in figures])
    with open(self.path('claims.json'), 'w') as fh:
      json.dump(summary, fh, indent=1)
    with open(self.path('claims.md'), 'w') as fh:
      fh.write(self.markdown(summary))
    return summary

  def figures(self, rows: list[dict], metrics: dict, runs: dict, baselines: dict) -> list[str]:
    """Per claim figure: bars with 95% intervals and the paper's values, the baselines' beside them on
    progress and success (their jerk would dwarf the arms'); latency; training curves."""
    out, by_figure = [], {}
    for claim, row in zip(CLAIMS, rows):
      groups, reference = by_figure.setdefault(claim.figure, ({}, {}))
      group = f'{claim.split} {METRICS[claim.metric]}'
      for i, key in enumerate(('a', 'b')):
        if row[key]['value'] is not None:
          groups.setdefault(group, {})[row[key]['label']] = tuple(row[key]['value'])
          if not isinstance(claim.paper, str):
            reference.setdefault(group, {})[row[key]['label']] = claim.paper[i]
      if group in groups and claim.metric in ('progress', 'success'):
        for kind, b in baselines.items():
          if b['metrics'][claim.split][claim.metric] is not None:
            groups[group][kind] = tuple(b['metrics'][claim.split][claim.metric])
    latency = {label(side): tuple(metrics[side]['all']['chunk_ms']) for side in LATENCY
               if side in metrics and metrics[side]['all']['chunk_ms'] is not None}
    if latency:
      by_figure['latency'] = ({METRICS['chunk_ms']: latency}, {})
    for name, (groups, reference) in by_figure.items():
      if groups:
        out.append(results.interval_bars(groups, self.path('figures', f'{name}.png'), title=FIGURES[name],
                                         reference=reference, colors=BASELINE_COLORS))
    curves = {run: self.path('arms', run, 'train', 'metrics.jsonl') for run in runs}
    curves['pretrain'] = os.path.join(self.pretrain_dir(), 'metrics.jsonl')
    for run, metrics_path in curves.items():
      if os.path.exists(metrics_path) and os.path.getsize(metrics_path):
        out.append(results.training_curve(metrics_path, self.path('figures', f'train_{run}.png'),
                                          title=f'{run}: training losses'))
    return out

  # The Arms table's metric columns, (split, metric).
  ROW = (('seen', 'success'), ('seen', 'progress'), ('unseen', 'success'), ('unseen', 'progress'), ('all', 'jerk'),
         ('all', 'chunk_ms'))

  def markdown(self, summary: dict) -> str:
    s = self.settings
    demos = summary['data']['videodemos']
    minutes = (f'{demos["video_only_minutes"]} min ({demos["video_only_frames"]} frames at the control rate) of '
               f'video-only demonstrations of the unseen tasks' if 'video_only_minutes' in demos else
               f'{s["videodemo_episodes"]} video-only episodes per unseen task (not built yet)')
    pretrain = summary['data']['pretrain']
    lines = [
        "# DreamZero's claims at small scale", '',
        f'`{" ".join(summary["command"])}`', '',
        f'Config {" ".join([s["config"], *s["overrides"]])}; {s["episodes"]} expert episodes per seen task; '
        f'repetitive data: {s["repetitive_variations"]} variations per task; {s["eval_episodes"]} evaluation '
        f'episodes per task of at most {s["max_steps"]} steps; VAE: {s["vae"]}; seeds {summary["seeds"]}.', '',
        f'Seen tasks (evaluated on variations the data never held): {", ".join(self.seen)}. '
        f'Unseen tasks: {", ".join(self.unseen)}'
        + (' (the held-out ML45 test tasks).' if self.unseen_are_ml45 else '.'), '',
        f'Video pretraining: {len(self.pretrain_tasks)} tasks x {s["pretrain_episodes"]} video-only episodes'
        + (f' ({pretrain["video_only_minutes"]} min of video)' if 'video_only_minutes' in pretrain else '')
        + f', {s["pretrain_steps"]} steps with the action loss off ({summary["pretrain"]["status"]}, step '
        f'{summary["pretrain"]["step"] or 0}). The videodemos arm adds {minutes} to the seen tasks\' data.', '',
        f'Verdict: {VERDICT_RULE}', '',
        '| claim | metric | ours (95% interval; seeds) | difference a - b (95%, paired episodes) | paper | verdict |',
        '|---|---|---|---|---|---|']
    for row in summary['claims']:
      ours = ' vs '.join(f'{row[k]["label"]} {_fmt(row["metric"], row[k]["value"])}'
                         + (f' ({row[k]["seeds"]} seeds)' if row[k]['seeds'] > 1 else '') for k in ('a', 'b'))
      diff = _fmt_difference(row['metric'], row['difference']) + (f' ({row["paired_episodes"]})' if row['difference']
                                                                  else '')
      lines.append(f'| {row["claim"]} | {METRICS[row["metric"]]}, {self.split_label(row["split"])} | {ours} | {diff} | '
                   f'{_paper(row)} | {row["verdict"]} |')
    lines += ['', '## Arms (one row per training seed and evaluation)', '',
              '| run | changes | data | training | evaluation | seen success | seen progress | unseen success | '
              'unseen progress | jerk (all) | latency per chunk |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for kind, b in summary['baselines'].items():
      m = b['metrics']
      cells = [_fmt(metric, m[split][metric]) if metric != 'chunk_ms' else '-' for split, metric in self.ROW]
      lines.append(f'| {kind} (baseline) | {b["what"]} | - | - | closed loop | ' + ' | '.join(cells) + ' |')
    for run, arm in summary['arms'].items():
      changes = ', '.join(f'{k}={v!r}' for k, v in arm['changes'].items()) or '(the recipe)'
      changes += ' from the pretrained DiT' if arm['pretrained'] else ''
      training = f'{arm["status"]}, step {arm["step"] or 0} of {arm["steps"]}'
      if not arm['evals']:
        lines.append(f'| {run} | {changes} | {arm["data"]} | {training} | - | - | - | - | - | - | - |')
      for eval_name, e in arm['evals'].items():
        cells = [_fmt(metric, e['metrics'][split][metric]) for split, metric in self.ROW]
        lines.append(f'| {run} | {changes} | {arm["data"]} | {training} | {EVALS[eval_name][0]} | '
                     + ' | '.join(cells) + ' |')
    lines += ['', '## Figures', ''] + [f'- [{f}]({f})' for f in summary['figures']] + ['']
    return '\n'.join(lines)


def stored_summary(stored: episodes_lib.StoredDataset) -> dict:
  """A built dataset's episodes and minutes of video-only demonstrations."""
  lengths = np.diff(stored.lowdim.offsets)
  video = ~stored.lowdim.has_action
  return dict(episodes=int(len(lengths)), video_only_episodes=int(video.sum()),
              video_only_frames=int(lengths[video].sum()),
              video_only_minutes=round(float(lengths[video].sum()) / stored.spec.control_hz / 60, 3))


def data_digest(lowdim) -> str:
  """SHA-256 of a built dataset's episodes (every low-dimensional array of its lowdim.npz: the states,
  actions, lengths, instructions and flags the simulator produced; the frames render from the same
  states). The file's own bytes are not used: the .npz holds write times."""
  digest = hashlib.sha256()
  for field in sorted(vars(lowdim)):
    value = np.ascontiguousarray(getattr(lowdim, field))
    digest.update(f'{field}:{value.dtype.str}:{value.shape}'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def latest_step(train_dir: str) -> int | None:
  """The newest checkpoint's step of a training workdir, None before the first."""
  if not os.path.isdir(os.path.join(train_dir, 'checkpoints')):
    return None
  ckpt = checkpoint.Checkpointer(train_dir, async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, overrides = parse(argv)
  try:
    suite = Suite(args, overrides, argv)
    suite.check_settings()
  except (ConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  estimate = suite.estimate_minutes()
  print(f'[estimate] about {sum(estimate.values()):.0f} min of work left for this run on an idle 2-core CPU '
        f'({", ".join(f"{k} {v:g}" for k, v in estimate.items())}); --budget_minutes caps each training run',
        flush=True)
  failed = 0
  for setting in suite.needed_data():
    if suite.build_data(setting):
      print(f'error: building the {setting} data failed', file=sys.stderr)
      return 1
  for kind in BASELINES:
    code = suite.run_baseline(kind)
    if code:
      print(f'[baseline] {kind} failed (exit {code}); the arms go on', file=sys.stderr)
      failed = failed or code
  pretrained = True
  if any(ARMS[a].pretrained for a in suite.arms):
    try:
      code, pretrained = suite.pretrain()
    except (ConfigError, ValueError, OSError) as e:
      print(f'error: [pretrain] {e}', file=sys.stderr)
      code, pretrained = 2, False
    failed = failed or code
  for name, seed in suite.runs(suite.arms):
    if ARMS[name].pretrained and not pretrained:
      print(f'[{run_name(name, seed)}] waits for the pretraining to finish', flush=True)
      continue
    done_before = suite.finished(name, seed)
    try:
      code = suite.run_arm(name, seed)
    except (ConfigError, ValueError, OSError) as e:   # e.g. a checkpoint from another config in its workdir
      print(f'error: [{run_name(name, seed)}] {e}', file=sys.stderr)
      code = 2
    if code:
      print(f'[{run_name(name, seed)}] failed (exit {code}); the other arms go on', file=sys.stderr)
      failed = failed or code
    elif not done_before:   # the outputs follow the run: a run cut short still leaves its finished arms' rows
      suite.write_outputs()
  summary = suite.write_outputs()
  for row in summary['claims']:
    print(f'{row["verdict"]:>15}  {row["claim"]}')
  print(f'claims: {suite.path("claims.md")}, {suite.path("claims.json")}; figures in {suite.path("figures")}')
  return failed
