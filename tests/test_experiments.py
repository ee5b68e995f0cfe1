"""python -m dreamzero_jax.experiments claims: the verdict rule, claim rows from reports, and the suite
end to end on a tiny setting (two arms, two training steps, one episode per task), rerun."""
import json
import os

import pytest

pytest.importorskip('metaworld')

from dreamzero_jax.experiments import __main__ as experiments_cli  # noqa: E402
from dreamzero_jax.experiments import arms, claims  # noqa: E402

TINY = ['--config.model.dim=32', '--config.model.num_layers=1', '--config.model.num_heads=2',
        '--config.model.ffn_dim=64', '--config.model.freq_dim=16', '--config.model.embodiment_hidden=16',
        '--config.train.steps=2', '--config.train.batch_size=1', '--config.train.log_every=1',
        '--config.vae.base_dim=4', '--config.video.max_chunks=2', '--config.video.height=32',
        '--config.video.width=32', '--config.serve.camera_height=16', '--config.serve.camera_width=16']


def test_verdict_rule():
  """On the interval of the difference a - b: its sign where a side is claimed higher or lower;
  within +-10 points where the claim is no difference."""
  above, below, around = (0.2, 0.05, 0.35), (-0.2, -0.35, -0.05), (0.05, -0.1, 0.2)
  assert arms.verdict(above, 'greater') == 'reproduced'
  assert arms.verdict(below, 'greater') == 'not reproduced'
  assert arms.verdict(around, 'greater') == 'inconclusive'
  assert arms.verdict(below, 'less') == 'reproduced'
  assert arms.verdict(above, 'less') == 'not reproduced'
  assert arms.verdict((0.01, -0.05, 0.08), 'equal') == 'reproduced'
  assert arms.verdict(around, 'equal') == 'inconclusive'     # holds 0, but also differences of 20 points
  assert arms.verdict(above, 'equal') == 'not reproduced'


def _report(progress: dict[str, list[float]], split='seen') -> dict:
  return {'tasks': {task: {'split': split, 'episodes': [
      {'seed': 1000 + i, 'success': p == 1.0, 'progress': p, 'jerk': 0.1, 'chunk_ms': 50.0}
      for i, p in enumerate(values)]} for task, values in progress.items()}, 'replay': {}}


def test_claim_rows_come_from_the_reports_with_intervals():
  good, bad = _report({'a': [1.0, 0.9] * 3, 'b': [0.8, 1.0] * 3}), _report({'a': [0.1, 0.0] * 3, 'b': [0.2, 0.1] * 3})
  metrics = arms.eval_metrics([good])
  assert metrics['seen']['episodes'] == 12 and metrics['unseen']['progress'] is None
  point, low, high = metrics['seen']['progress']
  assert point == pytest.approx(0.925) and low <= point <= high
  claim = arms.CLAIMS[0]   # WAM beats the action-only policy, seen progress
  row = arms.judge(claim, {claim.a: [good], claim.b: [bad]})
  assert row['verdict'] == 'reproduced' and row['a']['label'] == 'wam (4 steps)'
  assert row['difference'][0] == pytest.approx(0.925 - 0.1) and row['paired_episodes'] == 12
  assert arms.judge(claim, {claim.a: [bad], claim.b: [good]})['verdict'] == 'not reproduced'
  assert arms.judge(claim, {claim.a: [good]})['verdict'] == 'pending'
  few = _report({'a': [1.0, 1.0]})
  assert arms.judge(claim, {claim.a: [few], claim.b: [bad]})['verdict'] == 'inconclusive'   # under 10 pairs
  # Pairing by seed is what makes a small steady difference visible: the same episodes, a little better
  # each, are inconclusive by the sides' own intervals (they overlap) and reproduced by the difference's.
  base = [0.2, 0.9, 0.5, 0.7, 0.3, 0.8, 0.4, 0.6, 0.1, 1.0] * 2
  better = _report({'a': [min(p + 0.05, 1.0) for p in base]})
  row = arms.judge(claim, {claim.a: [better], claim.b: [_report({'a': base})]})
  assert row['a']['value'][1] < row['b']['value'][2] and row['verdict'] == 'reproduced'
  shuffled = _report({'a': [min(p + 0.05, 1.0) for p in base[::-1]]})   # other episodes than paired
  assert arms.judge(claim, {claim.a: [shuffled], claim.b: [_report({'a': base})]})['verdict'] == 'inconclusive'


@pytest.mark.slow   # ~100 s on 2 cores; run with -m slow
def test_claims_end_to_end_and_a_rerun_skips_finished_arms(tmp_path, monkeypatch):
  out = str(tmp_path / 'claims')
  argv = ['claims', '--out', out, '--arms', 'action_only,repetitive', '--tasks', 'plate-slide-v3',
          '--unseen_tasks', 'hand-insert-v3', '--episodes', '2', '--repetitive_variations', '1',
          '--eval_episodes', '1', '--max_steps', '24', '--vae', 'random', '--workers', '1', '--seeds', '1', *TINY]
  assert experiments_cli.main(argv) == 0

  summary = json.load(open(os.path.join(out, 'claims.json')))
  assert {'command', 'settings', 'seeds', 'seen_tasks', 'unseen_tasks', 'data', 'verdict_rule', 'claims', 'arms',
          'baselines', 'figures'} <= set(summary)
  assert summary['seeds'] == dict(train=0, data_pipeline=0, data_build=0, eval=1000, bootstrap=0,
                                  training_seeds=1)
  assert [c['name'] for c in summary['claims']] == [c.name for c in arms.CLAIMS]
  assert {c['verdict'] for c in summary['claims']} == {'pending'}   # every claim needs an arm not run
  runs = summary['arms']
  assert runs['action_only']['status'] == 'finished' and runs['action_only']['step'] == 2
  assert runs['wam']['status'] == 'not started' and not runs['wam']['evals']
  metrics = runs['repetitive']['evals']['steps4']['metrics']
  assert metrics['seen']['episodes'] == 1 and metrics['unseen']['episodes'] == 1
  assert metrics['all']['jerk'][0] >= 0 and metrics['all']['chunk_ms'][0] > 0
  report = json.load(open(os.path.join(out, runs['repetitive']['evals']['steps4']['report'])))
  assert report['tasks']['plate-slide-v3']['episodes'][0]['jerk'] is not None

  # The baselines run through the same loop, tasks and seeds (24 steps: too few for the expert to finish,
  # but its actions are smooth where uniform random ones have a mean squared jerk near 20/3).
  expert, random = (summary['baselines'][k]['metrics'] for k in ('expert', 'random'))
  assert expert['seen']['episodes'] == random['unseen']['episodes'] == 1
  assert random['all']['jerk'][0] > 2.0 > 10 * expert['all']['jerk'][0]

  markdown = open(os.path.join(out, 'claims.md')).read()
  for claim in arms.CLAIMS:
    assert f'| {claim.text} |' in markdown
  assert '| repetitive | (the recipe) | repetitive | finished, step 2 of 2 | 4 steps |' in markdown
  assert '| expert (baseline) | the scripted expert' in markdown and '| random (baseline) |' in markdown
  assert {'figures/train_action_only.png', 'figures/train_repetitive.png'} <= set(summary['figures'])
  for figure in summary['figures']:
    assert figure.endswith('.png') and os.path.getsize(os.path.join(out, figure)) > 1000

  # The repetitive data repeats one variation per task; --replay still finds each episode's.
  from dreamzero_jax.evaluation import tasks as tasks_lib
  assert [(v.task_index, v.reset_seed) for v in tasks_lib.dataset_variations(
      os.path.join(out, 'data', 'repetitive'))] == [(0, 0), (0, 1)]
  assert [(v.task_index, v.reset_seed) for v in tasks_lib.dataset_variations(
      os.path.join(out, 'data', 'diverse'))] == [(0, 0), (1, 1)]

  def must_not_run(*args, **kwargs):
    raise AssertionError('a finished arm was trained or evaluated again')

  monkeypatch.setattr(claims.loop, 'train', must_not_run)
  monkeypatch.setattr(claims.eval_cli, 'main', must_not_run)
  assert experiments_cli.main(argv) == 0
  assert json.load(open(os.path.join(out, 'claims.json')))['arms'] == runs
  changed = [a if a != '2' else '3' for a in argv]   # --episodes 3: not the data this folder holds
  assert experiments_cli.main(changed) == 2


def test_every_arm_uses_the_one_trained_vae(tmp_path):
  """The repetitive arm trains on its own data with the VAE trained once on the diverse data."""
  out = tmp_path / 'claims'
  (out / 'vae').mkdir(parents=True)
  (out / 'vae' / 'diverse.json').write_text(json.dumps(dict(psnr_db=23.0, path=str(out / 'vae' / 'diverse' / 'vae'))))
  argv = ['--out', str(out), '--tasks', 'plate-slide-v3', '--unseen_tasks', 'hand-insert-v3']
  suite = claims.Suite(*claims.parse(argv), argv)
  for arm in ('wam', 'repetitive'):
    overrides = suite.arm_overrides(arm)
    assert f"init.vae={str(out / 'vae' / 'diverse' / 'vae')!r}" in overrides
    assert f"data.dir={str(out / 'data' / arms.ARMS[arm].data)!r}" in overrides


def test_the_interval_over_seeds_and_episodes():
  """hierarchical_ci: one run a side is the paired episode bootstrap; seeds that disagree widen it; a
  side's runs are resampled as wholes and the episodes stay paired between the sides."""
  from dreamzero_jax.evaluation import results
  run = lambda values: {'t': dict(enumerate(values))}   # noqa: E731
  base = [0.2, 0.9, 0.5, 0.7, 0.3, 0.8, 0.4, 0.6, 0.1, 1.0] * 2
  (point, low, high), n = results.hierarchical_ci([run([p + 0.05 for p in base])], [run(base)])
  assert n == 20 and point == pytest.approx(0.05) and low == pytest.approx(0.05) == high   # paired: no noise
  one, _ = results.hierarchical_ci([run(base)])
  assert one == pytest.approx(results.bootstrap_ci([base]), abs=0.03)
  (p2, low2, high2), _ = results.hierarchical_ci([run(base), run([p + 0.3 for p in base])], [run(base)])
  assert p2 == pytest.approx(0.15) and low2 < 0.05 and high2 > 0.25     # the seed-to-seed spread shows
  (_, low3, high3), n3 = results.hierarchical_ci([run(base), run(base[:10])], [run(base)])
  assert n3 == 10 and low3 == pytest.approx(0.0, abs=1e-12) and high3 == pytest.approx(0.0, abs=1e-12)   # only shared episodes


def test_pretraining_fine_tuning_video_demos_and_seeds_end_to_end(tmp_path, monkeypatch):
  """The new stages on a tiny setting: video-only pretraining (2 steps), the video-only-demo arm
  fine-tuned from it at two training seeds; the outputs' structure; a rerun skips all of it. (The other
  pretrained arms differ from it in data and config changes only, which the scratch arms' test covers.)"""
  out = str(tmp_path / 'claims')
  argv = ['claims', '--out', out, '--arms', 'wam_pretrained_videodemos', '--seeds', '2',
          '--tasks', 'plate-slide-v3', '--unseen_tasks', 'hand-insert-v3', '--pretrain_tasks', 'drawer-close-v3',
          '--pretrain_episodes', '1', '--videodemo_episodes', '1', '--episodes', '1', '--eval_episodes', '1',
          '--max_steps', '16', '--vae', 'random', '--workers', '1', *TINY]
  finished_at_each_write = []
  write_outputs = claims.Suite.write_outputs

  def recording_write_outputs(suite):
    summary = write_outputs(suite)
    finished_at_each_write.append(sorted(r for r, s in summary['arms'].items() if s['status'] == 'finished'))
    return summary

  monkeypatch.setattr(claims.Suite, 'write_outputs', recording_write_outputs)
  assert experiments_cli.main(argv) == 0
  # The outputs are rewritten as each run finishes (a session cut short keeps them), then at the end.
  runs_done = ['wam_pretrained_videodemos', 'wam_pretrained_videodemos-seed1']
  assert finished_at_each_write == [runs_done[:1], runs_done, runs_done]
  monkeypatch.setattr(claims.Suite, 'write_outputs', write_outputs)
  summary = json.load(open(os.path.join(out, 'claims.json')))
  assert summary['pretrain']['status'] == 'finished' and summary['pretrain_tasks'] == ['drawer-close-v3']
  runs = summary['arms']
  for run in ('wam_pretrained_videodemos', 'wam_pretrained_videodemos-seed1'):
    assert runs[run]['status'] == 'finished' and runs[run]['pretrained'], run
  assert runs['wam_pretrained_videodemos-seed1']['seed'] == 1 and 'wam_pretrained_flash-seed1' not in runs
  assert runs['wam_pretrained']['status'] == runs['wam_pretrained_flash']['status'] == 'not started'
  # The pretraining saw no action; the video-only episodes of the unseen task carry none.
  from dreamzero_jax.datasets import episodes
  pretrain = episodes.open_dataset(os.path.join(out, 'data', 'pretrain'), 'metaworld').lowdim
  demos = episodes.open_dataset(os.path.join(out, 'data', 'videodemos'), 'metaworld').lowdim
  assert not pretrain.has_action.any() and list(demos.has_action) == [True, False]
  assert not demos.action[demos.offsets[1]:].any()
  data = summary['data']['videodemos']
  assert data['video_only_episodes'] == 1 and data['video_only_frames'] == demos.offsets[2] - demos.offsets[1]
  # Seed 1 trained its own model from the same pretrained DiT (another seed, another data order).
  from dreamzero_jax import checkpoint
  cfgs = []
  for run in ('wam_pretrained_videodemos', 'wam_pretrained_videodemos-seed1'):
    ckpt = checkpoint.Checkpointer(os.path.join(out, 'arms', run, 'train'), async_save=False)
    cfgs.append(ckpt.read_config(ckpt.latest_step()))
    ckpt.close()
  # ... the pretraining's parameters exported as a weights directory (no optimiser state).
  assert cfgs[0]['init']['pretrained'] == cfgs[1]['init']['pretrained'] == os.path.join(out, 'pretrain', 'weights')
  assert summary['pretrain']['weights'] == 'pretrain/weights'
  assert (cfgs[0]['seed'], cfgs[1]['seed']) == (0, 1)
  row = {r['name']: r for r in summary['claims']}['videodemos_lift_unseen']
  assert row['verdict'] == 'pending' and row['a']['seeds'] == 2 and row['a']['value'] is not None
  markdown = open(os.path.join(out, 'claims.md')).read()
  assert '| wam_pretrained_videodemos-seed1 |' in markdown and 'video-only demonstrations of the unseen' in markdown
  assert 'figures/train_pretrain.png' in summary['figures']

  def must_not_run(*args, **kwargs):
    raise AssertionError('a finished stage was run again')

  monkeypatch.setattr(claims.loop, 'train', must_not_run)
  monkeypatch.setattr(claims.eval_cli, 'main', must_not_run)
  assert experiments_cli.main(argv) == 0

  # DIR committed and cloned elsewhere (a fresh machine: no data, no checkpoints): nothing to redo.
  import subprocess
  git = lambda *a, cwd=out: subprocess.run(['git', *a], cwd=cwd, check=True, capture_output=True)  # noqa: E731
  git('init', '-q')
  git('add', '.')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'suite')
  clone = str(tmp_path / 'clone')
  git('clone', '-q', out, clone, cwd=str(tmp_path))
  assert not os.path.exists(os.path.join(clone, 'data', 'diverse'))
  assert not os.path.exists(os.path.join(clone, 'pretrain', 'train', 'checkpoints'))
  for run in ('pretrain', os.path.join('arms', 'wam_pretrained_videodemos')):   # rebuildable caches stay out
    assert os.path.isdir(os.path.join(out, run, 'train', 'latent_cache'))
    assert not {'latent_cache', 'tb', 'checkpoints'} & set(os.listdir(os.path.join(clone, run, 'train')))
  assert os.path.exists(os.path.join(clone, 'pretrain', 'weights', 'params.npz'))
  monkeypatch.setattr(claims.datasets_cli, 'main', must_not_run)
  moved = [clone if a == out else a for a in argv]
  assert experiments_cli.main(moved) == 0
  again = json.load(open(os.path.join(clone, 'claims.json')))
  assert again['arms'] == runs and again['pretrain']['status'] == 'finished'
  assert again['data']['videodemos']['video_only_frames'] == data['video_only_frames']
  # A rebuild is the same data (the build is deterministic; checked against the kept digest) ...
  monkeypatch.undo()
  suite = claims.Suite(*claims.parse(moved[1:]), moved[1:])
  assert suite.build_data('diverse') == 0
  # ... and a rebuild that differs is refused, not mixed into the results.
  record = suite.data_record('diverse')
  kept = json.load(open(record))
  json.dump(dict(kept, digest='0' * 64), open(record, 'w'))
  os.remove(os.path.join(clone, 'data', 'diverse', 'built.json'))
  assert suite.build_data('diverse') == 1

  # init.pretrained refuses the weights of another model, naming the field.
  from dreamzero_jax.config import load_config
  from dreamzero_jax.training import loop
  cfg = load_config('configs/metaworld_cpu.py', [o.removeprefix('--config.') for o in TINY]
                    + [f"init.pretrained={os.path.join(clone, 'pretrain', 'weights')!r}", 'model.dim=64'])
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match='init.pretrained: .* holds another model: model.dim'):
    loop.start_params(cfg)
