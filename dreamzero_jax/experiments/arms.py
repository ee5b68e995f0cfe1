"""What the claims suite compares (claims.py runs it): the data settings, the arms, the claims with
the paper's numbers, and the verdict rule applied to evaluation reports. docs/claims.md explains each.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dreamzero_jax.evaluation import results


class Arm(NamedTuple):
  changes: dict              # the config fields it changes, {dotted key: value}
  data: str                  # its data setting (a key of claims.Suite.data_settings)
  evals: tuple[str, ...]     # how its checkpoint is evaluated (keys of EVALS)
  what: str
  pretrained: bool = False   # starts the DiT from the video-only pretraining stage (init.pretrained)
  seeds: bool = False        # trained with --seeds training seeds (the rows that need seed-to-seed noise)


# The samplers a checkpoint is evaluated with (no retraining between them).
EVALS = {'steps4': ('4 steps', {'sampler.num_steps': 4, 'sampler.dit_step_mask': '1111'}),
         'steps1': ('1 step', {'sampler.num_steps': 1, 'sampler.dit_step_mask': '1'})}

ACTION_ONLY = {'train.video_loss_weight': 0.0}
FLASH = {'train.timestep_schedule': 'flash'}
WIDE = {'model.dim': 256, 'model.num_heads': 8, 'model.ffn_dim': 1024, 'model.embodiment_hidden': 256}

# In the order a default run trains them: the rows of the paper's thesis first.
ARMS = {
    'wam': Arm({}, 'diverse', ('steps4', 'steps1'), 'the recipe (video and action objectives)', seeds=True),
    'action_only': Arm(ACTION_ONLY, 'diverse', ('steps4',), 'no video loss: the VLA stand-in', seeds=True),
    'wam_pretrained': Arm({}, 'diverse', ('steps4',), 'the recipe from the video-pretrained DiT', True, True),
    'action_only_pretrained': Arm(ACTION_ONLY, 'diverse', ('steps4',),
                                  'actions only from the video-pretrained DiT: a VLA from a pretrained backbone',
                                  True, True),
    'wam_pretrained_videodemos': Arm({}, 'videodemos', ('steps4',),
                                     'the pretrained recipe with video-only episodes of the unseen tasks', True, True),
    'wam_pretrained_flash': Arm(FLASH, 'diverse', ('steps4', 'steps1'), 'the pretrained recipe, Flash timesteps',
                                True),
    'flash': Arm(FLASH, 'diverse', ('steps1',), 'DreamZero-Flash timesteps'),
    'bidirectional': Arm({'model.attention_mask': 'bidirectional'}, 'diverse', ('steps4',),
                         'bidirectional attention over the clip'),
    'repetitive': Arm({}, 'repetitive', ('steps4',), 'the recipe on repetitive data'),
    'wam_wide': Arm(WIDE, 'diverse', ('steps4',), 'the recipe at twice the width (256)'),
    'action_only_wide': Arm({**ACTION_ONLY, **WIDE}, 'diverse', ('steps4',), 'actions only at twice the width'),
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
    Claim('pretrained_wam_vs_vla_seen', 'From a video-pretrained backbone, the WAM beats the action-only policy',
          ('wam_pretrained', 'steps4'), ('action_only_pretrained', 'steps4'), 'progress', 'seen', 'greater',
          (0.622, 0.274), 'pretrained'),
    Claim('pretrained_wam_vs_vla_unseen', 'From a video-pretrained backbone, the WAM generalises better to unseen tasks',
          ('wam_pretrained', 'steps4'), ('action_only_pretrained', 'steps4'), 'progress', 'unseen', 'greater',
          (0.395, 0.163), 'pretrained'),
    Claim('pretraining_lifts_wam_unseen', 'Video pretraining lifts the WAM on unseen tasks',
          ('wam_pretrained', 'steps4'), ('wam', 'steps4'), 'progress', 'unseen', 'greater',
          "the paper's WAM starts from Wan2.1 (no from-scratch number)", 'pretrained'),
    Claim('videodemos_lift_unseen', 'Video-only demonstrations of the unseen tasks lift progress on them',
          ('wam_pretrained_videodemos', 'steps4'), ('wam_pretrained', 'steps4'), 'progress', 'unseen', 'greater',
          (0.543, 0.383), 'videodemos'),
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
    Claim('wam_gains_from_size', 'A larger WAM does better (the paper: 14B vs 5B)',
          ('wam_wide', 'steps4'), ('wam', 'steps4'), 'progress', 'seen', 'greater', (0.50, 0.21), 'size'),
    Claim('vla_gains_nothing_from_size', 'A larger action-only policy does no better (the paper: ~0% at 5B and 14B)',
          ('action_only_wide', 'steps4'), ('action_only', 'steps4'), 'progress', 'seen', 'equal', (0.0, 0.0), 'size'),
)
# Reference policies through the same closed loop, tasks and seeds as the arms (no training):
# where a number sits between them says what it means.
BASELINES = {'expert': 'the scripted expert (the data\'s policy)', 'random': 'uniform random actions'}
BASELINE_COLORS = {'expert': '0.75', 'random': '0.45'}   # greys: the arms keep the colours

# The evaluations whose latency per chunk is reported beside the step-count claims.
LATENCY = (('wam', 'steps4'), ('wam', 'steps1'), ('flash', 'steps1'))
FIGURES = {'wam_vs_vla': 'World action model vs action-only (VLA), from scratch',
           'pretrained': 'From a video-pretrained DiT', 'videodemos': 'Video-only demonstrations of unseen tasks',
           'denoising_steps': 'Denoising steps and Flash', 'attention': 'Autoregressive vs bidirectional',
           'attention_jerk': 'Action smoothness (lower is smoother)', 'data': 'Diverse vs repetitive data',
           'size': 'Model width (128 vs 256)', 'latency': 'Latency per chunk (closed loop)'}

VERDICT_RULE = (
    'A claim that one side is higher (or lower) is reproduced when the 95% interval of our difference (a - b) '
    'excludes 0 on the paper\'s side, not reproduced when it excludes 0 on the other side, and inconclusive at this '
    'scale when it holds 0. A claim of no difference is reproduced when the interval lies within +-10 points '
    '(equivalence), not reproduced when it excludes 0, and inconclusive otherwise. Intervals: a two-level bootstrap '
    '(evaluation/results.hierarchical_ci): each side\'s training seeds resampled, then the episodes within each task '
    '(paired between the sides by task and episode seed: every evaluation runs the same seeded episodes), averaged '
    'over tasks; with one seed a side this is the paired episode bootstrap. With fewer than 10 paired episodes the '
    'verdict is inconclusive (an interval over a handful of episodes is too narrow to trust).')
EQUIVALENCE_MARGIN = 0.10
MIN_EPISODES = 10
BOOTSTRAP_SEED = 0

METRICS = {'success': 'success rate', 'progress': 'task progress', 'jerk': 'mean squared jerk',
           'chunk_ms': 'ms per chunk'}
SPLITS = {'seen': 'seen tasks, new variations', 'unseen': 'unseen tasks', 'all': 'seen and unseen tasks'}


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


def runs_of(reports: list[dict], split: str, metric: str) -> list[dict[str, dict[int, float]]]:
  """Per training seed's report, {task: {episode seed: value}} over the split's parts."""
  out = []
  for report in reports:
    run = {}
    for part in parts(split):
      run.update(results.by_episode(report, part, metric))
    out.append(run)
  return out


def interval(a: list[dict], b: list[dict] | None, split: str, metric: str) -> tuple[list[float] | None, int]:
  """([point, 95% low, high] or None, episodes) of side a's reports (one per training seed), or of the
  paired difference a - b."""
  ci, episodes = results.hierarchical_ci(runs_of(a, split, metric), runs_of(b, split, metric) if b else (),
                                         seed=BOOTSTRAP_SEED)
  return (None if np.isnan(ci[0]) else list(ci)), episodes


def eval_metrics(reports: list[dict]) -> dict:
  """{split: {metric: [mean over tasks, 95% low, high] or None, 'episodes': n, 'seeds': n}} of an
  evaluation's reports, one per training seed."""
  out = {}
  for split in SPLITS:
    out[split] = {'seeds': len(reports)}
    for metric in METRICS:
      out[split][metric], episodes = interval(reports, None, split, metric)
      if metric == 'success':
        out[split]['episodes'] = episodes
  return out


def label(side: tuple[str, str]) -> str:
  return f'{side[0]} ({EVALS[side[1]][0]})'


def judge(claim: Claim, reports: dict, metrics: dict | None = None) -> dict:
  """A claim's row from the eval reports ({(arm, eval): [report per training seed]}): both sides'
  intervals (None while an arm is not evaluated), the paired difference's and the verdict. `metrics`
  ({(arm, eval): eval_metrics of its reports}) saves recomputing them."""
  sides = {}
  for key, side in (('a', claim.a), ('b', claim.b)):
    have = reports.get(side)
    m = ((metrics or {}).get(side) or eval_metrics(have)) if have else None
    sides[key] = dict(arm=side[0], eval=side[1], label=label(side), seeds=len(have or ()),
                      value=m[claim.split][claim.metric] if m else None)
  both = bool(reports.get(claim.a)) and bool(reports.get(claim.b))
  diff, pairs = interval(reports[claim.a], reports[claim.b], claim.split, claim.metric) if both else (None, 0)
  if not both:
    outcome = 'pending'
  elif diff is None or pairs < MIN_EPISODES:
    outcome = 'inconclusive'   # no or few paired values (e.g. the jerk of episodes under 4 steps)
  else:
    outcome = verdict(diff, claim.expect)
  return dict(name=claim.name, claim=claim.text, metric=claim.metric, split=claim.split, expect=claim.expect,
              paper=claim.paper, verdict=outcome, difference=diff, paired_episodes=pairs, **sides)
