"""Meta-World: build with the scripted experts, read batches of the contract, resume exactly."""
import dataclasses
import json
import os
import shutil
import sys
import time
import zipfile

import numpy as np
import pytest

os.environ.setdefault('MUJOCO_GL', 'egl')   # before MuJoCo's first import, or it picks GLFW
pytest.importorskip('metaworld')

from dreamzero_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from dreamzero_jax import settings
from dreamzero_jax.datasets import episodes, normalization, pipeline  # pylint: disable=g-import-not-at-top
from dreamzero_jax.training import loop  # pylint: disable=g-import-not-at-top
from tests.helpers import build_metaworld, run_datasets_cli as run_cli  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/tiny.py has 8 frames per chunk at stride 1 but a 4-step horizon; 8 makes them agree.
TINY = ['video.action_horizon=8']


@pytest.fixture(scope='module')
def mw_dir(tmp_path_factory):
  return build_metaworld(str(tmp_path_factory.mktemp('mw')), image_size=64)


def _config(data_dir, *extra):
  return config_lib.load_config(os.path.join(REPO, 'configs/tiny.py'),
                                [f'data.dir={data_dir}', *TINY, *extra])


def test_build_records_expert_episodes(mw_dir):
  ds = episodes.open_dataset(mw_dir, 'metaworld')
  assert ds.lowdim.episode_id.tolist() == [b'reach-v3/0', b'push-v3/0']
  rec = ds.source[1]
  assert rec['instructions'] == [b'push the puck to the goal']
  assert rec['state'].shape == (41, 4) and len(rec['images']['behindGripper']) == 41
  assert np.abs(rec['action']).max() <= 1.0 and np.abs(np.diff(rec['state'][:, :3], axis=0)).max() > 0


def test_inspect_prints_contract_batches(mw_dir):
  r = run_cli('inspect', '--config', 'configs/tiny.py', f'--config.data.dir={mw_dir}',
              *[f'--config.{o}' for o in TINY], '--batches', '2')
  assert r.returncode == 0, r.stderr
  lines = [json.loads(line) for line in r.stdout.splitlines()]
  assert len(lines) == 2
  for b in lines:
    assert b['video']['shape'] == [2, 33, 64, 64, 3] and b['video']['dtype'] == 'float32'
    assert -1.0 <= b['video']['min'] < b['video']['max'] <= 1.0
    assert b['actions']['shape'] == [2, 32, 32] and -1.0 <= b['actions']['min'] <= b['actions']['max'] <= 1.0
    assert b['action_mask']['shape'] == [2, 32, 32] and b['state']['shape'] == [2, 4, 64]
    assert b['chunk_mask']['shape'] == [2, 4] and b['embodiment_id']['min'] == 1
    assert b['instruction']['dtype'] == 'object'


def test_grid_canvas_has_black_bottom_right(mw_dir):
  cfg = _config(mw_dir)
  batch = next(iter(pipeline.make_dataset(settings.from_config(cfg), train=False, process_index=0, process_count=1)))
  real = batch['chunk_mask'][0].sum() * 8 + 1
  assert (batch['video'][0, :real, 32:, 32:] == -1.0).all()
  assert (batch['video'][0, :real, :32, :32] > -1.0).any()
  assert not batch['action_mask'][:, :, 4:].any() and batch['action_mask'][0, :8, :4].all()


def test_training_batches_pass_the_contract_check_of_the_loop(mw_dir):
  cfg = _config(mw_dir)
  batch = next(iter(pipeline.make_dataset(settings.from_config(cfg), process_index=0, process_count=1)))
  loop.check_data_batch(batch, cfg)   # every field's shape and dtype kind (pipeline.check_batch)
  with pytest.raises(ValueError, match=r"^batch\['chunk_mask'\]: has type int64 but expected bool$"):
    loop.check_data_batch(dict(batch, chunk_mask=batch['chunk_mask'].astype(np.int64)), cfg)


def test_resume_restores_the_exact_batches(mw_dir):
  cfg = _config(mw_dir)
  it = iter(pipeline.make_dataset(settings.from_config(cfg), process_index=0, process_count=1))
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(pipeline.make_dataset(settings.from_config(cfg), process_index=0, process_count=1))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_hosts_see_disjoint_clips(mw_dir):
  cfg = _config(mw_dir, 'train.batch_size=2')
  firsts = [next(iter(pipeline.make_dataset(settings.from_config(cfg), train=False, process_index=i, process_count=2)))
            for i in range(2)]
  assert not np.array_equal(firsts[0]['video'], firsts[1]['video'])


def test_config_mismatches_fail_naming_the_field(mw_dir):
  with pytest.raises(episodes.DataError, match=r'^data\.cameras: .topview.'):
    pipeline.make_dataset(settings.from_config(_config(mw_dir, "data.cameras=('topview',)")), process_index=0,
                          process_count=1)
  with pytest.raises(episodes.DataError, match=r'^data\.action_dim: config says 7'):
    pipeline.make_dataset(settings.from_config(_config(mw_dir, 'data.action_dim=7')), process_index=0, process_count=1)
  r = run_cli('inspect', '--config', 'configs/tiny.py', f'--config.data.dir={mw_dir}',
              '--config.video.action_horizon=4')
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: video.frames_per_chunk (8) * data.frame_stride (1) must equal "
      "video.action_horizon (4): a chunk's frames and actions must span the same time"]


def _copy(mw_dir, tmp_path, name='copy'):
  """A copy of the built dataset and its version directory, to damage."""
  root = str(tmp_path / name)
  shutil.copytree(mw_dir, root)
  return root, os.path.join(root, 'metaworld', '1.0.0')


def _rewrite_lowdim(version, change):
  path = os.path.join(version, episodes.LOWDIM_FILE)
  with np.load(path, allow_pickle=True) as z:   # the test's own file (older builds stored objects)
    arrays = {k: z[k] for k in z.files}
  change(arrays)
  np.savez(path, **arrays)


class _Payload:
  """Unpickling it creates a file: the stand-in for code a dataset from someone else would run."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, 'w')


def test_a_pickled_payload_is_refused_without_running(mw_dir, tmp_path):
  root, version = _copy(mw_dir, tmp_path)
  marker = tmp_path / 'pwned'

  def plant(arrays):
    arrays['episode_id'] = np.array([_Payload(str(marker)), b'push-v3/0'], dtype=object)
  _rewrite_lowdim(version, plant)
  r = run_cli('stats', '--config', 'configs/tiny.py', f'--config.data.dir={root}', *[f'--config.{o}' for o in TINY])
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr
  assert lines[0].startswith('error: ') and 'episode_id holds pickled Python objects' in lines[0]
  with pytest.raises(episodes.DataError, match='never loaded'):
    episodes.open_dataset(root, 'metaworld')
  assert not marker.exists()


@pytest.mark.parametrize('damage, message', [
    ('shift', r'episode boundaries disagree with the dataset index at episode 0 \(42 steps vs 41'),
    ('header', r'lowdim\.npz: not a readable lowdim\.npz'),
    ('nan', r'episode push-v3/0: action contains NaN or inf'),
    ('rows', r'state has 81 rows, the offsets end at 82'),
    ('npy_header', r'lowdim\.npz: action is not a \.npy array \(its header is damaged\)'),
    ('float64', r'episode push-v3/0: state holds 1e\+39 at step 2, beyond float32 range'),
    ('language', r'episode reach-v3/0: language index 999 at step 4 is past its 1 instruction\(s\)'),
    ('language_negative', r'episode push-v3/0: language index -1 at step 0 is not an instruction'),
])
def test_damaged_lowdim_is_refused_at_open(mw_dir, tmp_path, damage, message):
  root, version = _copy(mw_dir, tmp_path)
  _damage_lowdim(version, damage)
  with pytest.raises(episodes.DataError, match=message) as err:
    episodes.open_dataset(root, 'metaworld')
  assert '\n' not in str(err.value)


def test_inspect_refuses_a_damaged_npy_header_in_one_line(mw_dir, tmp_path):
  root, version = _copy(mw_dir, tmp_path)
  _damage_lowdim(version, 'npy_header')
  r = run_cli('inspect', '--config', 'configs/tiny.py', f'--config.data.dir={root}', *[f'--config.{o}' for o in TINY])
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f'error: {os.path.join(version, episodes.LOWDIM_FILE)}: action is not a .npy array (its header is '
      'damaged): rebuild the dataset'], r.stderr


def _damage_lowdim(version, damage):
  path = os.path.join(version, episodes.LOWDIM_FILE)
  if damage == 'header':
    with open(path, 'r+b') as f:
      f.write(bytes(64))
  elif damage == 'npy_header':   # a valid zip whose action.npy starts with zeros instead of its header
    with zipfile.ZipFile(path) as z:
      members = {n: z.read(n) for n in z.namelist()}
    members['action.npy'] = bytes(128) + members['action.npy'][128:]
    with zipfile.ZipFile(path, 'w') as z:
      for n, data in members.items():
        z.writestr(n, data)
  else:
    def change(arrays):
      if damage == 'shift':
        arrays['offsets'][1] += 1
      elif damage == 'nan':
        arrays['action'][50, 2] = np.nan
      elif damage == 'float64':   # finite in float64, inf once the pipeline reads it as float32
        arrays['state'] = arrays['state'].astype(np.float64)
        arrays['state'][41 + 2, 0] = 1e39
      elif damage == 'language':
        arrays['language'][4, 0] = 999
      elif damage == 'language_negative':
        arrays['language'][41, 0] = -1
      else:
        arrays['state'] = arrays['state'][:-1]
    _rewrite_lowdim(version, change)


def test_statistics_refuse_non_finite_values_naming_episode_and_field(mw_dir):
  lowdim = episodes.open_dataset(mw_dir, 'metaworld').lowdim
  state = lowdim.state.copy()
  state[3, 1] = np.inf
  with pytest.raises(episodes.DataError, match='episode reach-v3/0: state contains NaN or inf'):
    normalization.compute_stats(dataclasses.replace(lowdim, state=state), 8, 0)
  stats = normalization.compute_stats(lowdim, 8, 0)
  stats['action']['q99'][1] = float('nan')
  with pytest.raises(episodes.DataError, match=r'^here: action\.q99 contains NaN or inf'):
    normalization.check_stats(stats, 4, 4, 8, 0, 'here')


def test_unreadable_dataset_info_and_odd_version_folders_are_named(mw_dir, tmp_path):
  root, version = _copy(mw_dir, tmp_path)
  with open(os.path.join(version, 'dataset_info.json'), 'w') as f:
    f.write('{not json')
  with pytest.raises(episodes.DataError, match=r'dataset_info\.json is unreadable \(ParseError: Failed to load'):
    episodes.open_dataset(root, 'metaworld')
  root, version = _copy(mw_dir, tmp_path, 'latest')
  os.rename(version, os.path.join(os.path.dirname(version), 'latest'))
  with pytest.raises(episodes.DataError, match=r'holds no built version .*found latest\)'):
    episodes.open_dataset(root, 'metaworld')
  shutil.copytree(os.path.join(os.path.dirname(version), 'latest'), version)
  assert episodes.open_dataset(root, 'metaworld').path == version   # beside a real version, ignored


def test_skipping_unreadable_records_gives_up_with_a_clear_error(mw_dir, tmp_path, caplog):
  root, version = _copy(mw_dir, tmp_path)
  shard = os.path.join(version, 'metaworld-train.array_record-00000-of-00001')
  os.truncate(shard, 20000)
  start = time.monotonic()
  it = iter(pipeline.make_dataset(settings.from_config(_config(root, 'data.on_corrupt=skip')), process_index=0,
                                  process_count=1))
  with pytest.raises(episodes.DataError, match=r'giving up \(data\.on_corrupt=skip\): 2 unreadable records'):
    next(it)
  assert time.monotonic() - start < 30
  skipped = [r.getMessage() for r in caplog.records if 'skipping corrupted record' in r.getMessage()]
  assert len(skipped) == 2 and len(set(skipped)) == 2   # each bad record logged once


def test_rollouts_are_reproducible():
  sys.path.insert(0, REPO)
  from data.metaworld import metaworld_dataset_builder as mw  # pylint: disable=g-import-not-at-top
  a, b = (mw._run_episode(('reach-v3', 3, 7, 16, 6, 0, 'png', 0, False)) for _ in range(2))  # pylint: disable=protected-access
  np.testing.assert_array_equal(a['state'], b['state'])
  np.testing.assert_array_equal(a['action'], b['action'])
  assert a['images']['corner'] == b['images']['corner']


def test_replay_variations_restart_the_training_episodes_themselves(mw_dir):
  """dataset_variations gives each episode's variation and reset seed: in its environment the
  scripted expert repeats the recorded episode (same states and actions), unlike in a new variation."""
  from metaworld.policies import ENV_POLICY_MAP
  from dreamzero_jax.envs.metaworld import MetaWorldEnv, Variation
  from dreamzero_jax.evaluation import tasks as tasks_lib
  variations = tasks_lib.dataset_variations(mw_dir, 'metaworld')
  assert variations == [Variation('reach-v3', 0, 0, 0), Variation('push-v3', 0, 0, 0)]
  rec = episodes.open_dataset(mw_dir, 'metaworld').source[1]

  def expert(v, steps=5):
    env = MetaWorldEnv(v.task, v.seed, ('corner',), 16, 16, task_index=v.task_index, reset_seed=v.reset_seed)
    obs, _ = env.env.reset(seed=env.reset_seed)
    policy, states, actions = ENV_POLICY_MAP[v.task](), [obs[:4]], []
    for _ in range(steps):
      actions.append(np.clip(policy.get_action(obs), -1, 1))
      obs = env.env.step(actions[-1])[0]
      states.append(obs[:4])
    env.close()
    return np.stack(states), np.stack(actions)

  states, actions = expert(variations[1])
  np.testing.assert_allclose(states, rec['state'][:6], atol=1e-6)
  np.testing.assert_allclose(actions, rec['action'][:5], atol=1e-6)
  _, other = expert(Variation('push-v3', 1000, 1000, 1000))
  assert np.abs(other - rec['action'][:5]).max() > 1e-3


def test_a_repeated_build_reuses_variations_and_replays_them(tmp_path):
  """--variations 2: episode i runs variation i mod 2 (the scripted expert repeats itself there), and
  dataset_variations gives --replay those variations with each episode's own reset seed."""
  from dreamzero_jax.envs.metaworld import Variation
  from dreamzero_jax.evaluation import tasks as tasks_lib
  out = str(tmp_path / 'repeated')
  r = run_cli('build', 'metaworld', '--out', out, '--tasks', 'reach-v3', '--episodes', '3', '--image_size', '16',
              '--max_steps', '6', '--variations', '2', '--workers', '1')
  assert r.returncode == 0, r.stderr
  assert tasks_lib.dataset_variations(out, 'metaworld') == [
      Variation('reach-v3', 0, 0, 0), Variation('reach-v3', 0, 1, 1), Variation('reach-v3', 0, 0, 2)]
  low = episodes.open_dataset(out, 'metaworld').lowdim
  first, second, third = (low.episode(i)['action'] for i in range(3))
  np.testing.assert_allclose(first, third, atol=1e-6)
  assert np.abs(first - second).max() > 1e-3


def test_progress_of_a_task_without_a_distance_is_its_success():
  """box-close reports obj_to_target 0 at every step (metaworld 3.1.1): its progress must not read 1
  while random actions achieve nothing; a task with a distance (drawer-close, driven by its expert)
  still reads fractions before success."""
  from metaworld.policies import ENV_POLICY_MAP

  from dreamzero_jax.envs.metaworld import MetaWorldEnv
  rng = np.random.default_rng(0)
  env = MetaWorldEnv('box-close-v3', 1000, ('corner',), 16, 16)
  env.reset()
  steps = [env.step(rng.uniform(-1, 1, 4)) for _ in range(20)]
  env.close()
  assert [(s[2], s[3]) for s in steps] == [(False, 0.0)] * 20
  env, expert = MetaWorldEnv('drawer-close-v3', 1000, ('corner',), 16, 16), ENV_POLICY_MAP['drawer-close-v3']()
  env.reset()
  progress = []
  for _ in range(150):
    _, _, success, p, _ = env.step(expert.get_action(env.last_obs))
    progress.append(p)
    if success:
      break
  env.close()
  assert success and progress[-1] == 1.0 and any(0.0 < p < 1.0 for p in progress), progress
