"""Results as a reader sees them: confidence intervals, a per-task table beside the baselines, plots.

Success rates come with a 95% bootstrap interval over episodes (resampling each task's episodes,
then averaging over tasks as the headline number does). Plots are PNGs written with matplotlib's
Agg backend (no display).
"""
from __future__ import annotations

import json
import os
import textwrap
from typing import Sequence

import numpy as np


def bootstrap_ci(per_task: Sequence[Sequence[float]], samples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
  """(mean over tasks of each task's mean, low, high): episodes resampled within each task."""
  tasks = [np.asarray(v, np.float64) for v in per_task if len(v)]
  if not tasks:
    return float('nan'), float('nan'), float('nan')
  rng = np.random.default_rng(seed)
  point = float(np.mean([t.mean() for t in tasks]))
  draws = np.mean([t[rng.integers(0, len(t), (samples, len(t)))].mean(axis=1) for t in tasks], axis=0)
  low, high = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
  return point, float(low), float(high)


def episodes_of(report: dict, split: str = 'seen', metric: str = 'success') -> dict[str, list[float]]:
  """{task: [`metric` of each episode]} of one split of an eval.py report (success, progress, jerk,
  ...; episodes without a value, such as the jerk of a 3-step episode, left out)."""
  tasks = report['replay'].get('tasks', {}) if split == 'replay' else {
      task: t for task, t in report['tasks'].items() if t['split'] == split}
  return {task: [float(e[metric]) for e in t['episodes'] if e.get(metric) is not None] for task, t in tasks.items()}


def by_episode(report: dict, split: str, metric: str) -> dict[str, dict[int, float]]:
  """{task: {episode seed: `metric`}} of one split of an eval.py report (episodes without a value
  left out)."""
  return {task: {e['seed']: float(e[metric]) for e in t['episodes'] if e.get(metric) is not None}
          for task, t in report['tasks'].items() if t['split'] == split}


def _runs_by_task(runs: Sequence[dict[str, dict[int, float]]], seeds: dict[str, list]) -> dict[str, np.ndarray]:
  return {task: np.array([[run[task][s] for s in ep_seeds] for run in runs], np.float64)
          for task, ep_seeds in seeds.items()}


def hierarchical_ci(a: Sequence[dict[str, dict[int, float]]], b: Sequence[dict[str, dict[int, float]]] = (),
                    samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[tuple[float, float, float], int]:
  """((point, low, high), episodes per run) of the mean over tasks of side `a`, or of a - b with `b`.

  Each side is one or more training runs (seeds), each run {task: {episode seed: value}} of the same
  evaluation. The point is the mean over tasks of the mean over runs and episodes. The interval is a
  two-level bootstrap: each draw resamples each side's runs (with replacement, one draw for every task:
  a run is one model) and, within each task, the episodes (the same episode seeds for both sides, so
  the difference stays paired), then averages as the point does. With one run per side this is the
  episode bootstrap of bootstrap_ci (of the paired differences, with b). Only episodes every run of both sides
  has count; a task without any is left out.
  """
  runs = [*a, *b]
  tasks = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
  seeds = {t: sorted(set.intersection(*(set(r[t]) for r in runs))) for t in tasks}
  seeds = {t: s for t, s in seeds.items() if s}
  if not seeds:
    return (float('nan'), float('nan'), float('nan')), 0
  ma, mb = _runs_by_task(a, seeds), _runs_by_task(b, seeds) if b else None
  rng = np.random.default_rng(seed)
  ra = rng.integers(0, len(a), (samples, len(a)))
  rb = rng.integers(0, len(b), (samples, len(b))) if b else None
  point, draws = [], []
  for task, values in ma.items():
    n = values.shape[1]
    e = rng.integers(0, n, (samples, n))
    side = values[ra[:, :, None], e[:, None, :]].mean(axis=(1, 2))
    p = values.mean()
    if b:
      side = side - mb[task][rb[:, :, None], e[:, None, :]].mean(axis=(1, 2))
      p = p - mb[task].mean()
    point.append(p)
    draws.append(side)
  low, high = np.quantile(np.mean(draws, axis=0), [(1 - level) / 2, 1 - (1 - level) / 2])
  return (float(np.mean(point)), float(low), float(high)), sum(len(s) for s in seeds.values())


def table(reports: dict[str, dict], split: str = 'seen') -> tuple[str, dict]:
  """A markdown table, one row per task and one column per policy (success rate, episodes), with a
  mean row carrying 95% bootstrap intervals; and the same numbers as a dict."""
  names = list(reports)
  per_policy = {name: episodes_of(r, split) for name, r in reports.items()}
  tasks = sorted({t for eps in per_policy.values() for t in eps})
  lines = ['| task | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  data = {'tasks': {}, 'mean': {}}
  for task in tasks:
    cells = []
    for name in names:
      eps = per_policy[name].get(task, [])
      cells.append(f'{np.mean(eps):.2f} ({len(eps)})' if eps else '-')
      data['tasks'].setdefault(task, {})[name] = dict(success_rate=float(np.mean(eps)) if eps else None,
                                                      episodes=len(eps))
    lines.append(f'| {task} | ' + ' | '.join(cells) + ' |')
  cells = []
  for name in names:
    mean, low, high = bootstrap_ci(list(per_policy[name].values()))
    data['mean'][name] = dict(success_rate=mean, ci95=[low, high])
    cells.append(f'**{mean:.2f}** [{low:.2f}, {high:.2f}]')
  lines.append('| mean (95% CI) | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines), data


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top  (the [sim] extra; only for plots)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _title(ax, text: str) -> None:
  """A title wrapped to the figure's width (a quickstart's task list runs long)."""
  ax.set_title(textwrap.fill(text.replace(',', ', '), 80, break_on_hyphens=False), fontsize=9)


def loss_rows(metrics_path: str) -> list[dict]:
  """A metrics.jsonl's records by step, the last record of each step (training trims the log to the
  step it resumes from; a log written before it did may hold a step twice)."""
  last = {}
  with open(metrics_path) as fh:
    for line in fh:
      if line.strip():
        row = json.loads(line)
        last[row['step']] = row
  return [last[step] for step in sorted(last)]


def training_curve(metrics_path: str, out_png: str, title: str = '') -> str:
  """The losses of a train.py metrics.jsonl against the step (log scale)."""
  rows = loss_rows(metrics_path)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for key in ('loss', 'video_loss', 'action_loss'):
    points = [(r['step'], r[key]) for r in rows if key in r]
    if points:
      ax.plot(*zip(*points), label=key)
  ax.set_yscale('log')
  ax.set_xlabel('step')
  _title(ax, title or os.path.dirname(metrics_path))
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png


def success_bars(data: dict, out_png: str, title: str = '') -> str:
  """Per-task success of each policy (a `table` dict), with the mean's 95% interval as error bars."""
  plt = _pyplot()
  tasks = list(data['tasks']) + ['mean']
  names = list(data['mean'])
  width = 0.8 / max(len(names), 1)
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 3.5))
  for i, name in enumerate(names):
    values = [data['tasks'][t][name]['success_rate'] or 0.0 for t in tasks[:-1]] + [data['mean'][name]['success_rate']]
    low, high = data['mean'][name]['ci95']
    errors = np.zeros((2, len(tasks)))
    errors[:, -1] = [values[-1] - low, high - values[-1]]
    ax.bar(np.arange(len(tasks)) + i * width, values, width, yerr=errors, capsize=3, label=name)
  ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha='right')
  ax.set_ylim(0, 1.05)
  ax.set_ylabel('success rate')
  _title(ax, title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png


def interval_bars(groups: dict[str, dict[str, tuple[float, float, float]]], out_png: str, title: str = '',
                  ylabel: str = '', reference: dict[str, dict[str, float]] | None = None,
                  colors: dict[str, str] | None = None) -> str:
  """Bars of (point, low, high) per group (x) and series (colour; `colors` fixes some series'), the
  interval as error bars; a `reference` value ({group: {series: value}}, e.g. the paper's) is drawn
  as a black tick on its bar."""
  plt = _pyplot()
  names = list(dict.fromkeys(n for series in groups.values() for n in series))
  width = 0.8 / max(len(names), 1)
  fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(groups) * len(names)), 3.5))
  labelled = False
  for i, name in enumerate(names):
    x = np.array([g for g, series in enumerate(groups.values()) if name in series]) + i * width
    points = np.array([series[name] for series in groups.values() if name in series], np.float64)
    errors = np.maximum(np.stack([points[:, 0] - points[:, 1], points[:, 2] - points[:, 0]]), 0.0)
    ax.bar(x, points[:, 0], width, yerr=errors, capsize=3, label=name, color=(colors or {}).get(name))
    marks = [(xi, (reference or {}).get(group, {}).get(name))
             for xi, group in zip(x, [g for g, series in groups.items() if name in series])]
    for xi, value in marks:
      if value is not None:
        ax.plot([xi - width / 2, xi + width / 2], [value, value], 'k-', lw=2, label=None if labelled else 'paper')
        labelled = True
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, list(groups))
  ax.set_ylabel(ylabel)
  _title(ax, title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png
