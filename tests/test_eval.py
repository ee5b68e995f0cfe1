"""eval.py: closed-loop Meta-World through the policy, in-process and through the server."""
import json
import os

import numpy as np
import pytest

pytest.importorskip('metaworld')

from dreamzero_jax import settings  # noqa: E402
from dreamzero_jax.config import load_config  # noqa: E402
from dreamzero_jax.evaluation import closed_loop  # noqa: E402
from dreamzero_jax.serving import loading  # noqa: E402
from tests.helpers import synthetic_batches, train_on_synthetic  # noqa: E402

from dreamzero_jax import evaluate as eval_cli  # noqa: E402

OVERRIDES = ['video.height=32', 'video.width=32', 'video.max_chunks=2', 'train.steps=1', 'sampler.num_steps=2',
             'sampler.dit_step_mask="11"', 'sampler.cfg_scale=3.0', 'serve.camera_height=16',
             'serve.camera_width=16']


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('eval_ckpt'))
  cfg = load_config('configs/tiny.py', OVERRIDES)
  train_on_synthetic(cfg, path, n=1)
  return path


def test_server_and_in_process_rollouts_take_identical_actions(workdir):
  backend = loading.load_backend(workdir)
  cfg = backend.policy.settings
  with eval_cli.through_server(backend) as server_factory:
    via_server = closed_loop.run_episode(server_factory('a'), cfg, 'reach-v3', 'reach the goal position', 3, 20)
  in_proc = closed_loop.run_episode(closed_loop.in_process(backend)('b'), cfg, 'reach-v3', 'reach the goal position', 3,
                                    20)
  assert via_server['failure'] is None and in_proc['failure'] is None
  assert len(in_proc['actions']) == 20
  np.testing.assert_array_equal(np.stack(via_server['actions']), np.stack(in_proc['actions']))


def test_closed_loop_episode_runs_with_fp8_weights(workdir):
  """The same checkpoint served with model.quantization='fp8' (e4m3 blocks and KV cache) runs a
  closed-loop episode; its first chunk's actions stay near the unquantised policy's."""
  first_chunk = {}
  for quantization in ('none', 'fp8'):
    cfg = settings.from_config(load_config('configs/tiny.py', OVERRIDES + [f'model.quantization={quantization}']))
    backend = loading.load_backend(workdir, cfg)
    rec = closed_loop.run_episode(closed_loop.in_process(backend)('a'), cfg, 'reach-v3', 'reach the goal position', 3,
                                  cfg.video.action_horizon * 2)
    assert rec['failure'] is None and len(rec['actions']) == cfg.video.action_horizon * 2
    assert np.isfinite(np.stack(rec['actions'])).all()
    first_chunk[quantization] = np.stack(rec['actions'][:cfg.video.action_horizon])
  err = np.abs(first_chunk['fp8'] - first_chunk['none']).max()
  assert 0 < err < 0.05 * np.abs(first_chunk['none']).max()


def test_closed_loop_report_and_gif(workdir, tmp_path):
  out = str(tmp_path / 'eval')
  assert eval_cli.main(['--checkpoint', workdir, '--out', out, '--tasks', 'reach-v3', '--unseen_tasks',
                        'hand-insert-v3', '--episodes', '1', '--max_steps', '16']) == 0
  report = json.load(open(os.path.join(out, 'report.json')))
  assert set(report['tasks']) == {'reach-v3', 'hand-insert-v3'}
  assert report['tasks']['hand-insert-v3']['split'] == 'unseen'
  for task in report['tasks'].values():
    assert {'success_rate', 'progress', 'length'} <= set(task) and task['length'] > 0
    assert 0 < task['prediction_psnr_db'] < 100   # the predicted frames scored against the real ones
    # ... beside holding the last observed frame, and the real frames through the VAE
    assert 0 < task['persistence_psnr_db'] and 0 < task['reconstruction_psnr_db'] < 100
    assert task['jerk'] >= 0 and task['chunk_ms'] > 0 and task['episodes'][0]['jerk'] == task['jerk']
  for key in closed_loop.PSNR_KEYS:
    assert report['seen'][key] == report['tasks']['reach-v3'][key]
  from PIL import Image
  gif = Image.open(report['gifs'][0])
  assert gif.n_frames > 1 and gif.size == (64, 32)   # real | predicted, side by side


def test_jerk_is_the_mean_squared_third_difference_of_executed_actions():
  ramp = [np.full(4, 0.1 * t, np.float32) for t in range(6)]
  assert closed_loop.action_jerk(ramp) == pytest.approx(0.0, abs=1e-12)   # constant velocity: no jerk
  step = [np.zeros(4, np.float32)] * 3 + [np.ones(4, np.float32)] * 3
  assert closed_loop.action_jerk(step) == pytest.approx((1 + 4 + 1) / 3)   # third differences 1, -2, 1
  assert closed_loop.action_jerk([np.full(4, 5.0, np.float32)] * 3 + [np.zeros(4, np.float32)]) == 1.0  # clipped
  assert closed_loop.action_jerk(ramp[:3]) is None


def test_a_crashed_episode_is_a_recorded_failure(workdir):
  cfg = loading.load_policy(workdir).settings

  def nan_policy(obs):
    return np.full((cfg.video.action_horizon, 4), np.nan, np.float32), None

  rec = closed_loop.run_episode(nan_policy, cfg, 'reach-v3', 'reach', 0, 16)
  assert rec['success'] is False and 'non-finite action' in rec['failure']


def test_offline_metrics_on_held_out_clips(workdir):
  from dreamzero_jax.evaluation import offline
  policy = loading.load_policy(workdir)
  batches = synthetic_batches(policy.settings, n=2)
  report = offline.evaluate(policy, iter(batches), max_clips=3)
  assert report['clips'] == 3
  assert np.isfinite(report['action_mse']) and report['action_mse'] > 0
  assert 0 < report['video_psnr_db'] < 100
  assert offline.psnr(np.zeros(4), np.zeros(4)) == float('inf')
  assert abs(offline.psnr(np.zeros(4), np.full(4, 2.0)) - 0.0) < 1e-9   # peak-to-peak 2 in [-1, 1]


def test_replay_split_reruns_training_episodes(workdir, tmp_path):
  data = str(tmp_path / 'data')
  from dreamzero_jax.datasets import __main__ as datasets_cli
  assert datasets_cli.main(['build', 'metaworld', '--out', data, '--tasks', 'reach-v3,push-v3', '--episodes', '2',
                            '--image_size', '16', '--max_steps', '4', '--workers', '1']) == 0
  out = str(tmp_path / 'eval')
  assert eval_cli.main(['--checkpoint', workdir, '--config', 'configs/tiny.py', *[f'--config.{o}' for o in OVERRIDES],
                        f'--config.data.dir={data}', '--out', out, '--tasks', '', '--unseen_tasks', '',
                        '--replay', '3', '--max_steps', '8']) == 0
  report = json.load(open(os.path.join(out, 'report.json')))
  replay = report['replay']
  assert len(replay['episodes']) == 3 and 0.0 <= replay['success_rate'] <= 1.0 and replay['length'] > 0
  # Round-robin over the tasks, each episode in its own variation and reset seed.
  assert [(t, [(e['task_index'], e['reset_seed']) for e in s['episodes']]) for t, s in replay['tasks'].items()] == [
      ('reach-v3', [(0, 0), (1, 1)]), ('push-v3', [(0, 0)])]
  assert report['tasks'] == {} and os.path.exists(os.path.join(out, 'replay-reach-v3.gif'))
  assert eval_cli.main(['--checkpoint', workdir, '--out', out, '--tasks', '', '--unseen_tasks', '',
                        '--replay', '1']) == 2   # no data.dir in this checkpoint: a one-line error


def test_bad_tasks_and_data_dir_are_one_line_errors(workdir, tmp_path, capsys):
  out = str(tmp_path / 'eval')
  assert eval_cli.main(['--checkpoint', workdir, '--out', out, '--tasks', 'nonexistent-v3']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['error: --tasks: unknown Meta-World task nonexistent-v3 (e.g. assembly-v3, basketball-v3, '
                 'bin-picking-v3)']
  # The checkpoint was trained on synthetic batches: its data.dir is unset.
  assert eval_cli.main(['--checkpoint', workdir, '--out', out, '--mode', 'offline']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: data.dir: not set'), err
  assert eval_cli.main(['--checkpoint', workdir, '--out', out, '--mode', 'offline', '--config', 'configs/tiny.py',
                        *[f'--config.{o}' for o in OVERRIDES], f'--config.data.dir={tmp_path}/nothing']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: data.dir: no dataset'), err


def test_prediction_psnr_scores_predicted_frames_against_the_frames_that_followed():
  real = np.zeros((9, 4, 4, 3), np.float32)
  predicted = real.copy()
  predicted[0] = 1.0                      # frame 0 is the observed one: never scored
  assert closed_loop.prediction_psnr(real, predicted) > 100
  predicted[1:] = 0.2                     # error 0.1 on the [0, 1] scale: 20 dB
  np.testing.assert_allclose(closed_loop.prediction_psnr(real, predicted[:5]), 20.0, rtol=1e-5)


def test_expert_and_random_baselines_run_through_the_same_loop(tmp_path):
  """The reference rows of a results table: the scripted expert solves reach, random actions do not."""
  rates = {}
  for kind in ('expert', 'random'):
    out = str(tmp_path / kind)
    assert eval_cli.main(['--config', 'configs/tiny.py', '--checkpoint', str(tmp_path / 'none'), '--out', out,
                          '--policy', kind, '--tasks', 'reach-v3', '--unseen_tasks', '', '--episodes', '1',
                          '--max_steps', '80', *[f'--config.{o}' for o in OVERRIDES]]) == 0
    report = json.load(open(os.path.join(out, 'report.json')))
    rates[kind] = report['seen']['success_rate']
  assert rates == {'expert': 1.0, 'random': 0.0}


def test_persistence_holds_the_last_frame_seen_before_each_chunk():
  real = np.arange(17, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3), np.float32)
  held = closed_loop.persistence_frames(real, 8)[:, 0, 0, 0]
  np.testing.assert_array_equal(held, [0] * 9 + [8] * 8)   # frame 0; frames 1-8 from 0; 9-16 from 8


def _tagging_vae(size: int, calls: list):
  """A stand-in VAE whose latents carry frame tags: encode keeps one value per latent frame (the
  first frame alone, then the last of every 4) and records each clip's length; decode spreads each
  value back over its frames."""
  def encode(video):
    calls.append(video.shape[1])
    return np.asarray(video)[:, ::4, :1, :1, :1]     # [1, 1 + k, 1, 1, 1]
  def decode(latents):
    values = np.asarray(latents)[0, :, 0, 0, 0]
    return np.concatenate([values[:1], np.repeat(values[1:], 4)])[:, None, None, None] * np.ones((1, size, size, 3))
  return encode, decode


def test_context_windows_follow_the_policy_restarts():
  cfg = load_config('configs/metaworld_cpu.py:quick')           # 2 chunks of 8 frames: windows of 17
  assert closed_loop.context_windows(cfg, 40) == [(0, 17), (16, 33), (32, 37)]
  assert closed_loop.context_windows(cfg, 17) == [(0, 17)]
  assert closed_loop.context_windows(cfg, 1) == [(0, 1)]


def test_predicted_video_and_reconstruction_are_decoded_per_context_window():
  """After video.max_chunks chunks the policy restarts from the newest real frame: a window's
  predicted latents follow that frame's encoding, never one long clip through the whole episode."""
  cfg = load_config('configs/metaworld_cpu.py:quick')
  calls = []
  encode, decode = _tagging_vae(cfg.video.height, calls)
  side = cfg.serve.camera_height
  real = [{c: np.full((side, side, 3), 5 * i, np.uint8) for c in cfg.data.cameras} for i in range(41)]
  tag = lambda i: 2 * 5 * i / 255 - 1                               # frame i's pixels on [-1, 1]
  predicted = [np.full((1, 2, 1, 1, 1), 100.0 + c) for c in range(5)]   # chunks 0-4, 2 latents each
  frames = closed_loop.predicted_video(cfg, real, predicted, encode, decode)[:, 0, 0, 0]
  # Window 0: frame 0's encoding, chunks 0-1; window 1 (from real frame 16): chunks 2-3; window 2: chunk 4.
  np.testing.assert_allclose(frames, [tag(0)] + [100 + c for c in range(5) for _ in range(8)], rtol=1e-6)
  assert calls == [1, 1, 1]                                          # frames 0, 16 and 32 alone
  calls.clear()
  video = closed_loop.canvas_frames(cfg, real[:38])
  references = closed_loop.reference_psnrs(cfg, video, video, encode, decode)
  assert calls == [17, 17, 5]                                        # frames 0-16, 16-32, 32-36
  assert np.isfinite(references['reconstruction_psnr_db'])
