"""Result tables and plots: bootstrap intervals, the per-task table beside the baselines, PNGs."""
import json

import numpy as np
import pytest

from dreamzero_jax.evaluation import results


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_episodes():
  point, low, high = results.bootstrap_ci([[1, 0, 1, 1], [0, 0, 1, 0]])
  assert point == pytest.approx(0.5) and low < point < high
  _, low_many, high_many = results.bootstrap_ci([[1, 0, 1, 1] * 25, [0, 0, 1, 0] * 25])
  assert high_many - low_many < high - low
  assert results.bootstrap_ci([[1, 1, 1]]) == (1.0, 1.0, 1.0)


def _report(rates):
  return {'tasks': {t: {'split': 'seen', 'episodes': [{'success': s} for s in eps]} for t, eps in rates.items()},
          'replay': {}}


def test_table_lists_every_task_and_policy_with_the_mean_interval(tmp_path):
  reports = {'model': _report({'a': [1, 0], 'b': [1, 1]}), 'random': _report({'a': [0, 0], 'b': [0, 0]})}
  text, data = results.table(reports)
  assert text.splitlines()[0] == '| task | model | random |'
  assert '| a | 0.50 (2) | 0.00 (2) |' in text
  assert data['mean']['model']['success_rate'] == pytest.approx(0.75)
  assert data['mean']['random']['ci95'] == [0.0, 0.0]
  json.dumps(data)
  png = results.success_bars(data, str(tmp_path / 'bars.png'))
  metrics = tmp_path / 'metrics.jsonl'
  metrics.write_text('\n'.join(json.dumps(dict(step=s, loss=1 / s, video_loss=0.5 / s, action_loss=0.5 / s))
                               for s in range(1, 20)))
  curve = results.training_curve(str(metrics), str(tmp_path / 'curve.png'))
  # A run resumed from step 10 logs steps 11.. again: the later records stand, in step order.
  with open(metrics, 'a') as fh:
    fh.write('\n' + '\n'.join(json.dumps(dict(step=s, loss=2.0)) for s in range(11, 14)))
  rows = results.loss_rows(str(metrics))
  assert [r['step'] for r in rows] == list(range(1, 20)) and [r['loss'] for r in rows[10:14]] == [2.0, 2.0, 2.0, 1 / 14]
  for path in (png, curve):
    from PIL import Image
    assert Image.open(path).size[0] > 100 and np.asarray(Image.open(path)).std() > 0


def test_episodes_of_reads_any_metric_and_interval_bars_draw(tmp_path):
  report = {'tasks': {'a': {'split': 'seen', 'episodes': [{'success': True, 'progress': 1.0, 'jerk': None},
                                                          {'success': False, 'progress': 0.5, 'jerk': 0.2}]}},
            'replay': {}}
  assert results.episodes_of(report, 'seen', 'progress') == {'a': [1.0, 0.5]}
  assert results.episodes_of(report, 'seen', 'jerk') == {'a': [0.2]}   # episodes without a value left out
  assert results.episodes_of(report, 'unseen') == {}
  png = results.interval_bars({'seen': {'x': (0.5, 0.4, 0.6), 'y': (0.2, 0.1, 0.3)}, 'unseen': {'x': (0.3, 0.2, 0.4)}},
                              str(tmp_path / 'bars.png'), title='t', reference={'seen': {'x': 0.62}})
  from PIL import Image
  assert Image.open(png).size[0] > 100 and np.asarray(Image.open(png)).std() > 0
