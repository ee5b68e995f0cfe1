"""The paper's claims reproduced at small scale: `python -m dreamzero_jax.experiments claims --out DIR`.

Arms (every arm trains the same model for the same steps on the same data unless the claim is
about them; the base config is configs/metaworld_cpu.py, and `--config` / `--config.a.b=v` change
it for every arm):
  wam            the recipe; evaluated at 4 denoising steps and, same checkpoint, at 1 step
  action_only    train.video_loss_weight=0.0: no video objective, the VLA stand-in
  flash          train.timestep_schedule='flash' (DreamZero-Flash), evaluated at 1 step
  bidirectional  model.attention_mask='bidirectional'
  repetitive     the recipe on repetitive data: as many episodes, `--repetitive_variations` variations
                 per task repeated (wam's data gives every episode its own variation)

Stages, each skipped once done, so a rerun continues where the last one stopped: the Meta-World
data per setting (DIR/data/{diverse,repetitive}), the small VAE every arm uses, trained once on the
diverse data (DIR/vae/diverse; `--vae random` keeps the random frozen VAE), the baselines' evaluations (the scripted expert and
random actions, DIR/baselines/KIND/report.json, on the same tasks and seeds), then per arm the training (DIR/arms/ARM/train; each run
trains at most `--budget_minutes`, a rerun resumes) and the closed-loop evaluations
(DIR/arms/ARM/eval/EVAL/report.json: the seen tasks on variations the data never held, and unseen
tasks, by default the held-out ML45 test tasks). An arm whose reports all exist is finished and
skipped. Every run rewrites DIR/claims.json, DIR/claims.md and DIR/figures/*.png from the reports
there: per claim our numbers with 95% bootstrap intervals beside the paper's and a verdict
(VERDICT_RULE; docs/claims.md).

Expected time with the defaults (5 seen tasks x 20 expert episodes per data setting; the base
config's 8,000 training steps per arm; 6 evaluations of 5 episodes on each of 5 seen and 5 unseen
tasks, 150 steps at most) on an idle 2-core CPU, measured in the first full run (2026-11-28):
data ~5 min per setting; the VAE ~12 min (2,000 updates at 0.37 s); training 4.5-5.3 steps/s
(~27 min an arm; `--config.train.steps=N` changes every arm); the baselines ~5 min; each
evaluation ~4 min (chunks of 15-25 ms). About 3 hours in all; `--budget_minutes` splits it over
several runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import NamedTuple

import numpy as np

from dreamzero_jax import checkpoint
from dreamzero_jax import evaluate as eval_cli
from dreamzero_jax.config import ConfigError, load_config, split_config_args
from dreamzero_jax.datasets import __main__ as datasets_cli
from dreamzero_jax.evaluation import metaworld_env, results
from dreamzero_jax.training import loop
from dreamzero_jax.training import vae as vae_training



class Arm(NamedTuple):
  changes: dict              # the config fields it changes, {dotted key: value}
  data: str                  # its data setting (a key of data_settings)
  evals: tuple[str, ...]     # how its checkpoint is evaluated (keys of EVALS)
  what: str


# The samplers a checkpoint is evaluated with (no retraining between them).
EVALS = {'steps4': ('4 steps', {'sampler.num_steps': 4, 'sampler.dit_step_mask': '1111'}),
         'steps1': ('1 step', {'sampler.num_steps': 1, 'sampler.dit_step_mask': '1'})}

ARMS = {
    'wam': Arm({}, 'diverse', ('steps4', 'steps1'), 'the recipe (video and action objectives)'),
    'action_only': Arm({'train.video_loss_weight': 0.0}, 'diverse', ('steps4',), 'no video loss: the VLA stand-in'),
    'flash': Arm({'train.timestep_schedule': 'flash'}, 'diverse', ('steps1',), 'DreamZero-Flash timesteps'),
    'bidirectional': Arm({'model.attention_mask': 'bidirectional'}, 'diverse', ('steps4',),
                         'bidirectional attention over the clip'),
    'repetitive': Arm({}, 'repetitive', ('steps4',), 'the recipe on repetitive data'),
}


class Claim(NamedTuple):
  name: str
  text: str
  a: tuple[str, str]         # (arm, eval): the side the paper names first
  b: tuple[str, str]
  metric: str                # an episode field of the reports: progress, success, jerk
  split: str                 # 'seen', 'unseen' or 'all' (both)
  expect: str                # a against b in the paper: 'greater', 'less' or 'equal'
  paper: tuple[float, float] | str
  figure: str


CLAIMS = (
    Claim('wam_vs_vla_seen', 'A world action model beats an action-only policy (VLA) of the same size',
          ('wam', 'steps4'), ('action_only', 'steps4'), 'progress', 'seen', 'greater', (0.622, 0.274), 'wam_vs_vla'),
    Claim('wam_vs_vla_unseen', 'A world action model generalises better to unseen tasks than an action-only policy',
          ('wam', 'steps4'), ('action_only', 'steps4'), 'progress', 'unseen', 'greater', (0.395, 0.163), 'wam_vs_vla'),
    Claim('steps_4_vs_1', 'One denoising step instead of four (same checkpoint) loses performance',
          ('wam', 'steps4'), ('wam', 'steps1'), 'progress', 'seen', 'greater', (0.83, 0.52), 'denoising_steps'),
    Claim('flash_vs_1_step', 'Flash training recovers one-step performance',
          ('flash', 'steps1'), ('wam', 'steps1'), 'progress', 'seen', 'greater', (0.74, 0.52), 'denoising_steps'),
    Claim('ar_vs_bidirectional', 'Autoregressive and bidirectional attention perform alike',
          ('wam', 'steps4'), ('bidirectional', 'steps4'), 'progress', 'seen', 'equal', (0.50, 0.50), 'attention'),
    Claim('ar_smoother', 'Autoregressive actions are smoother (lower mean squared jerk)',
          ('wam', 'steps4'), ('bidirectional', 'steps4'), 'jerk', 'all', 'less', 'AR smoother (no number given)',
          'attention_jerk'),
    Claim('diverse_vs_repetitive', 'Diverse data beats repetitive data at equal episode count',
          ('wam', 'steps4'), ('repetitive', 'steps4'), 'progress', 'seen', 'greater', (0.50, 0.33), 'data'),
)
# Reference policies through the same closed loop, tasks and seeds as the arms (no training):
# where a number sits between them says what it means.
BASELINES = {'expert': 'the scripted expert (the data\'s policy)', 'random': 'uniform random actions'}
BASELINE_COLORS = {'expert': '0.75', 'random': '0.45'}   # greys: the arms keep the colours

# The evaluations whose latency per chunk is reported beside the step-count claims.
LATENCY = (('wam', 'steps4'), ('wam', 'steps1'), ('flash', 'steps1'))
FIGURES = {'wam_vs_vla': 'World action model vs action-only (VLA)', 'denoising_steps': 'Denoising steps and Flash',
           'attention': 'Autoregressive vs bidirectional', 'attention_jerk': 'Action smoothness (lower is smoother)',
           'data': 'Diverse vs repetitive data', 'latency': 'Latency per chunk (closed loop)'}

VERDICT_RULE = (
    'A claim that one side is higher (or lower) is reproduced when the 95% interval of our difference (a - b) '
    'excludes 0 on the paper\'s side, not reproduced when it excludes 0 on the other side, and inconclusive at this '
    'scale when it holds 0. A claim of no difference is reproduced when the interval lies within +-10 points '
    '(equivalence), not reproduced when it excludes 0, and inconclusive otherwise. Intervals: 95% bootstrap over '
    'episodes, resampled within each task and averaged over tasks (evaluation/results.bootstrap_ci); the difference '
    'pairs the two sides\' episodes by task and seed (every evaluation runs the same seeded episodes) and resamples '
    'the pairs. With fewer than 10 paired episodes the verdict is inconclusive (an interval over a handful of '
    'episodes is too narrow to trust).')
EQUIVALENCE_MARGIN = 0.10
MIN_EPISODES = 10

METRICS = {'success': 'success rate', 'progress': 'task progress', 'jerk': 'mean squared jerk',
           'chunk_ms': 'ms per chunk'}
SPLITS = {'seen': 'seen tasks, new variations', 'unseen': 'unseen tasks', 'all': 'seen and unseen tasks'}

# The frozen VAE is one for every arm, trained on this setting's frames: the paper's arms share one
# pretrained Wan VAE, and a VAE per data setting would add a second difference to the data claim.
VAE_SETTING = 'diverse'
DEFAULT_TASKS = 'plate-slide-v3,plate-slide-side-v3,drawer-close-v3,window-open-v3,window-close-v3'
DATA_SEED = 0          # the expert episodes' build seed (variations 0.., reset seeds 0..)
EVAL_SEED = 1000       # eval.py's default: seen-task episodes in variations the data never held
BOOTSTRAP_SEED = 0


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
  p.add_argument('--eval_episodes', type=int, default=5, help='evaluation episodes per task')
  p.add_argument('--max_steps', type=int, default=150, help='environment steps per episode (data and evaluation)')
  p.add_argument('--budget_minutes', type=float, help='training minutes per arm and run (a rerun continues)')
  p.add_argument('--vae', choices=('trained', 'random'), default='trained',
                 help='train the small VAE per data setting (training/vae.py), or keep the random frozen one')
  p.add_argument('--workers', type=int, default=0, help='data-build processes; 0 = one per core')
  args = p.parse_args(rest)
  return args, [o.removeprefix('--config.') for o in overrides]


def verdict(difference: tuple[float, float, float], expect: str) -> str:
  """VERDICT_RULE for the interval (point, low, high) of the difference a - b."""
  _, low, high = difference
  if expect == 'equal':
    if low > 0 or high < 0:
      return 'not reproduced'
    return 'reproduced' if -EQUIVALENCE_MARGIN <= low and high <= EQUIVALENCE_MARGIN else 'inconclusive'
  if expect == 'less':
    low, high = -high, -low
  return 'reproduced' if low > 0 else 'not reproduced' if high < 0 else 'inconclusive'


def parts(split: str) -> tuple[str, ...]:
  """The report splits a claim's split covers ('all': seen and unseen)."""
  return ('seen', 'unseen') if split == 'all' else (split,)


def difference(a: dict, b: dict, split: str, metric: str) -> tuple[list[float] | None, int]:
  """([a - b over tasks, 95% low, high] or None, paired episodes) of two eval reports."""
  per_task = {}
  for part in parts(split):
    per_task.update(results.paired_differences(a, b, part, metric))
  ci = results.bootstrap_ci(list(per_task.values()), seed=BOOTSTRAP_SEED)
  return (None if np.isnan(ci[0]) else list(ci)), sum(map(len, per_task.values()))


def eval_metrics(report: dict) -> dict:
  """{split: {metric: [mean over tasks, 95% low, high] or None, 'episodes': n}} of an eval report."""
  out = {}
  for split in SPLITS:
    out[split] = {}
    for metric in METRICS:
      per_task = {}
      for part in parts(split):
        per_task.update(results.episodes_of(report, part, metric))
      ci = results.bootstrap_ci(list(per_task.values()), seed=BOOTSTRAP_SEED)
      out[split][metric] = None if np.isnan(ci[0]) else list(ci)
      if metric == 'success':
        out[split]['episodes'] = sum(map(len, per_task.values()))
  return out


def label(side: tuple[str, str]) -> str:
  return f'{side[0]} ({EVALS[side[1]][0]})'


def judge(claim: Claim, reports: dict, metrics: dict | None = None) -> dict:
  """A claim's row from the eval reports ({(arm, eval): report}): both sides' intervals (None while an arm
  is not evaluated), the paired difference's and the verdict. `metrics` ({(arm, eval): eval_metrics of its
  report}) saves recomputing them."""
  sides = {}
  for key, side in (('a', claim.a), ('b', claim.b)):
    m = ((metrics or {}).get(side) or eval_metrics(reports[side])) if side in reports else None
    sides[key] = dict(arm=side[0], eval=side[1], label=label(side),
                      value=m[claim.split][claim.metric] if m else None)
  both = claim.a in reports and claim.b in reports
  diff, pairs = difference(reports[claim.a], reports[claim.b], claim.split, claim.metric) if both else (None, 0)
  if not both:
    outcome = 'pending'
  elif diff is None or pairs < MIN_EPISODES:
    outcome = 'inconclusive'   # no or few paired values (e.g. the jerk of episodes under 4 steps)
  else:
    outcome = verdict(diff, claim.expect)
  return dict(name=claim.name, claim=claim.text, metric=claim.metric, split=claim.split, expect=claim.expect,
              paper=claim.paper, verdict=outcome, difference=diff, paired_episodes=pairs, **sides)


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
    train_tasks, test_tasks = metaworld_env.ml45_split()
    self.seen = [t for t in args.tasks.split(',') if t]
    self.unseen = test_tasks if args.unseen_tasks == 'ml45' else [t for t in args.unseen_tasks.split(',') if t]
    known = metaworld_env.all_tasks()
    for flag, tasks in (('--tasks', self.seen), ('--unseen_tasks', self.unseen)):
      bad = [t for t in tasks if t not in known]
      if bad:
        raise ConfigError(f'{flag}: unknown Meta-World task {", ".join(bad)} (e.g. {", ".join(train_tasks[:3])})')
    self.base = load_config(args.config, overrides)   # refuses a bad override before any work
    self.unseen_are_ml45 = sorted(self.unseen) == sorted(test_tasks)
    self.data_variations = {'diverse': 0, 'repetitive': args.repetitive_variations}
    # What the results depend on: a rerun into the same DIR must repeat it.
    self.settings = dict(config=args.config, overrides=overrides, tasks=','.join(self.seen),
                         unseen_tasks=','.join(self.unseen), episodes=args.episodes,
                         repetitive_variations=args.repetitive_variations, eval_episodes=args.eval_episodes,
                         max_steps=args.max_steps, vae=args.vae)

  def path(self, *parts: str) -> str:
    return os.path.join(self.out, *parts)

  def split_label(self, split: str) -> str:
    held_out = split == 'unseen' and self.unseen_are_ml45
    return SPLITS[split] + (' (the held-out ML45 test tasks)' if held_out else '')

  def check_settings(self) -> None:
    """Records the flags the results depend on; refuses a rerun into DIR with others."""
    path = self.path('settings.json')
    if os.path.exists(path):
      with open(path) as fh:
        saved = json.load(fh)
      diffs = [f'{k}: {saved.get(k)!r} before, {v!r} now' for k, v in self.settings.items() if saved.get(k) != v]
      if diffs:
        raise ConfigError(f'{self.out} was run with other settings ({"; ".join(diffs)}): use them, or a new --out')
      return
    os.makedirs(self.out, exist_ok=True)
    with open(path, 'w') as fh:
      json.dump(self.settings, fh, indent=1)

  # ---- stages ------------------------------------------------------------------------------------

  def build_data(self, setting: str) -> int:
    """The expert episodes of a data setting, built once (an interrupted build starts over)."""
    data_dir, args = self.path('data', setting), self.args
    marker = os.path.join(data_dir, 'built.json')
    if os.path.exists(marker):
      return 0
    if os.path.isdir(data_dir):
      shutil.rmtree(data_dir)
    argv = ['build', 'metaworld', '--out', data_dir, '--tasks', ','.join(self.seen), '--episodes', str(args.episodes),
            '--image_size', str(self.base.serve.camera_height), '--max_steps', str(args.max_steps),
            '--seed', str(DATA_SEED), '--variations', str(self.data_variations[setting]),
            '--workers', str(args.workers)]
    print(f'[data] {setting}: {len(self.seen)} tasks x {args.episodes} episodes in {data_dir}', flush=True)
    code = datasets_cli.main(argv)
    if code == 0:
      with open(marker, 'w') as fh:
        json.dump(dict(argv=argv), fh)
    return code

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
        json.dump(dict(psnr_db=float(result['psnr_db']), path=result['path']), fh)
    with open(record) as fh:
      return [f'init.vae={json.load(fh)["path"]!r}']

  def arm_overrides(self, name: str) -> list[str]:
    """The arm's training config as overrides of the base: its data and VAE, the user's, its changes."""
    arm = ARMS[name]
    return [f'data.dir={self.path("data", arm.data)!r}', *self.vae_override(), *self.overrides,
            *[f'{k}={v!r}' for k, v in arm.changes.items()]]

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

  def report_path(self, name: str, eval_name: str) -> str:
    return self.path('arms', name, 'eval', eval_name, 'report.json')

  def finished(self, name: str) -> bool:
    return all(os.path.exists(self.report_path(name, e)) for e in ARMS[name].evals)

  def run_arm(self, name: str) -> int:
    """Trains the arm (resuming; at most --budget_minutes this run), then runs its missing evaluations."""
    if self.finished(name):
      print(f'[{name}] finished (its reports exist); skipped', flush=True)
      return 0
    overrides = self.arm_overrides(name)
    cfg = load_config(self.args.config, overrides)
    train_dir = self.path('arms', name, 'train')
    step = latest_step(train_dir)
    if step is None or step < cfg.train.steps:
      print(f'[{name}] training {ARMS[name].what} in {train_dir} (from step {step or 0} of {cfg.train.steps})',
            flush=True)
      code = loop.train(cfg, train_dir, max_minutes=self.args.budget_minutes)
      if code:
        return code
      step = latest_step(train_dir)
      if step is None or step < cfg.train.steps:
        print(f'[{name}] step {step} of {cfg.train.steps} after --budget_minutes; rerun to continue', flush=True)
        return 0
    for eval_name in ARMS[name].evals:
      report = self.report_path(name, eval_name)
      if os.path.exists(report):
        continue
      print(f'[{name}] evaluating at {EVALS[eval_name][0]} in {os.path.dirname(report)}', flush=True)
      sampler = [f'{k}={v!r}' for k, v in EVALS[eval_name][1].items()]
      code = eval_cli.main(['--checkpoint', train_dir, *self.eval_argv(os.path.dirname(report)),
                            *[f'--config.{o}' for o in overrides + sampler]])
      if code:
        return code
    return 0

  # ---- outputs -----------------------------------------------------------------------------------

  def reports(self) -> dict:
    """{(arm, eval): report} of every arm evaluation in DIR."""
    out = {}
    for name, arm in ARMS.items():
      for eval_name in arm.evals:
        path = self.report_path(name, eval_name)
        if os.path.exists(path):
          with open(path) as fh:
            out[name, eval_name] = json.load(fh)
    return out

  def arm_status(self, name: str, reports: dict) -> dict:
    """An arm's settings, training step and evaluations (`reports`: Suite.reports())."""
    arm = ARMS[name]
    evals = {}
    for eval_name in arm.evals:
      if (name, eval_name) in reports:
        report = reports[name, eval_name]
        evals[eval_name] = dict(sampler=EVALS[eval_name][1],
                                report=os.path.relpath(self.report_path(name, eval_name), self.out),
                                seconds=report.get('seconds'), crashed=report.get('crashed'),
                                metrics=eval_metrics(report))
    step = latest_step(self.path('arms', name, 'train'))
    if len(evals) == len(arm.evals):
      status = 'finished'
    else:
      status = ('not started' if step is None else 'training' if step < self.base.train.steps else
                'trained, evaluation unfinished')
    return dict(what=arm.what, changes=arm.changes, data=arm.data, status=status, step=step,
                steps=self.base.train.steps, evals=evals)

  def baseline_status(self) -> dict:
    """{kind: what, report, metrics} of the baselines evaluated so far."""
    out = {}
    for kind, what in BASELINES.items():
      path = self.baseline_path(kind)
      if os.path.exists(path):
        with open(path) as fh:
          out[kind] = dict(what=what, report=os.path.relpath(path, self.out), metrics=eval_metrics(json.load(fh)))
    return out

  def write_outputs(self) -> dict:
    """claims.json, claims.md and the figures, from every report in DIR (arms of earlier runs too)."""
    reports = self.reports()
    arms = {name: self.arm_status(name, reports) for name in ARMS}
    baselines = self.baseline_status()
    metrics = {(name, e): v['metrics'] for name, a in arms.items() for e, v in a['evals'].items()}
    rows = [judge(c, reports, metrics) for c in CLAIMS]
    os.makedirs(self.path('figures'), exist_ok=True)
    figures = self.figures(rows, metrics, arms, baselines)
    vae = {}
    for setting in self.data_variations:
      if os.path.exists(self.path('vae', f'{setting}.json')):
        with open(self.path('vae', f'{setting}.json')) as fh:
          vae[setting] = json.load(fh)
    summary = dict(
        command=['python', '-m', 'dreamzero_jax.experiments', 'claims', *self.argv], settings=self.settings,
        seeds=dict(train=self.base.seed, data_pipeline=self.base.data.seed, data_build=DATA_SEED, eval=EVAL_SEED,
                   bootstrap=BOOTSTRAP_SEED),
        seen_tasks=self.seen, unseen_tasks=self.unseen, unseen_are_ml45_test_tasks=self.unseen_are_ml45,
        data={s: dict(dir=os.path.relpath(self.path('data', s), self.out), variations_per_task=v or 'all distinct')
              for s, v in self.data_variations.items()},
        vae=vae, verdict_rule=VERDICT_RULE, claims=rows, arms=arms, baselines=baselines,
        figures=[os.path.relpath(f, self.out) for f in figures])
    with open(self.path('claims.json'), 'w') as fh:
      json.dump(summary, fh, indent=1)
    with open(self.path('claims.md'), 'w') as fh:
      fh.write(self.markdown(summary))
    return summary

  def figures(self, rows: list[dict], metrics: dict, arms: dict, baselines: dict) -> list[str]:
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
    for name in arms:
      metrics_path = self.path('arms', name, 'train', 'metrics.jsonl')
      if os.path.exists(metrics_path) and os.path.getsize(metrics_path):
        out.append(results.training_curve(metrics_path, self.path('figures', f'train_{name}.png'),
                                          title=f'{name}: training losses'))
    return out

  # The Arms table's metric columns, (split, metric).
  ROW = (('seen', 'success'), ('seen', 'progress'), ('unseen', 'success'), ('unseen', 'progress'), ('all', 'jerk'),
         ('all', 'chunk_ms'))

  def markdown(self, summary: dict) -> str:
    s = self.settings
    lines = [
        "# DreamZero's claims at small scale", '',
        f'`{" ".join(summary["command"])}`', '',
        f'Config {" ".join([s["config"], *s["overrides"]])}; {s["episodes"]} expert episodes per seen task; '
        f'repetitive data: {s["repetitive_variations"]} variations per task; {s["eval_episodes"]} evaluation '
        f'episodes per task of at most {s["max_steps"]} steps; VAE: {s["vae"]}; seeds {summary["seeds"]}.', '',
        f'Seen tasks (evaluated on variations the data never held): {", ".join(self.seen)}. '
        f'Unseen tasks: {", ".join(self.unseen)}'
        + (' (the held-out ML45 test tasks).' if self.unseen_are_ml45 else '.'),
        '', f'Verdict: {VERDICT_RULE}', '',
        '| claim | metric | ours (95% interval) | difference a - b (95%, paired episodes) | paper | verdict |',
        '|---|---|---|---|---|---|']
    for row in summary['claims']:
      ours = ' vs '.join(f'{row[k]["label"]} {_fmt(row["metric"], row[k]["value"])}' for k in ('a', 'b'))
      diff = _fmt_difference(row['metric'], row['difference']) + (f' ({row["paired_episodes"]})' if row['difference']
                                                                  else '')
      lines.append(f'| {row["claim"]} | {METRICS[row["metric"]]}, {self.split_label(row["split"])} | {ours} | {diff} | '
                   f'{_paper(row)} | {row["verdict"]} |')
    lines += ['', '## Arms', '',
              '| arm | changes | data | training | evaluation | seen success | seen progress | unseen success | '
              'unseen progress | jerk (all) | latency per chunk |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for kind, b in summary['baselines'].items():
      m = b['metrics']
      cells = [_fmt(metric, m[split][metric]) if metric != 'chunk_ms' else '-' for split, metric in self.ROW]
      lines.append(f'| {kind} (baseline) | {b["what"]} | - | - | closed loop | ' + ' | '.join(cells) + ' |')
    for name, arm in summary['arms'].items():
      changes = ', '.join(f'{k}={v!r}' for k, v in arm['changes'].items()) or '(the recipe)'
      training = f'{arm["status"]}, step {arm["step"] or 0} of {arm["steps"]}'
      if not arm['evals']:
        lines.append(f'| {name} | {changes} | {arm["data"]} | {training} | - | - | - | - | - | - | - |')
      for eval_name, e in arm['evals'].items():
        cells = [_fmt(metric, e['metrics'][split][metric]) for split, metric in self.ROW]
        lines.append(f'| {name} | {changes} | {arm["data"]} | {training} | {EVALS[eval_name][0]} | '
                     + ' | '.join(cells) + ' |')
    lines += ['', '## Figures', ''] + [f'- [{f}]({f})' for f in summary['figures']] + ['']
    return '\n'.join(lines)


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
  failed = 0
  for setting in dict.fromkeys(['diverse', *(ARMS[a].data for a in suite.arms)]):   # the baselines' config: diverse
    if suite.build_data(setting):
      print(f'error: building the {setting} data failed', file=sys.stderr)
      return 1
  for kind in BASELINES:
    code = suite.run_baseline(kind)
    if code:
      print(f'[baseline] {kind} failed (exit {code}); the arms go on', file=sys.stderr)
      failed = failed or code
  for name in suite.arms:
    try:
      code = suite.run_arm(name)
    except (ConfigError, ValueError, OSError) as e:   # e.g. a checkpoint from another config in its workdir
      print(f'error: [{name}] {e}', file=sys.stderr)
      code = 2
    if code:
      print(f'[{name}] failed (exit {code}); the other arms go on', file=sys.stderr)
      failed = failed or code
  summary = suite.write_outputs()
  for row in summary['claims']:
    print(f'{row["verdict"]:>15}  {row["claim"]}')
  print(f'claims: {suite.path("claims.md")}, {suite.path("claims.json")}; figures in {suite.path("figures")}')
  return failed
