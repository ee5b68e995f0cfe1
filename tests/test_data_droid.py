"""DROID conversion from an RLDS directory written here without TensorFlow, and the clip layout.

Cameras are constant colours (wrist red, exterior 1 green, exterior 2 blue) whose blue/red/green
spare channel carries the step index, so every canvas pixel says which camera and step it shows.
"""
import json
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dreamzero_jax import config as config_lib
from dreamzero_jax import settings
from dreamzero_jax.datasets import episodes, normalization, pipeline
from tests.helpers import run_datasets_cli as run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMERAS = ('wrist_image_left', 'exterior_image_1_left', 'exterior_image_2_left')
IMAGE_HW = (16, 32)
STEPS = 60


def _crc32c(data: bytes) -> int:
  table = _crc32c.table
  crc = 0xFFFFFFFF
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


_crc32c.table = [0] * 256
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _crc32c.table[_i] = _c


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(path, records):
  with open(path, 'wb') as f:
    for r in records:
      length = struct.pack('<Q', len(r))
      f.write(length + struct.pack('<I', _masked_crc(length)) + r + struct.pack('<I', _masked_crc(r)))


def droid_features(image_hw=IMAGE_HW, drop=()):
  obs = {cam: tfds.features.Image(shape=(*image_hw, 3), encoding_format='png') for cam in CAMERAS}
  obs.update(joint_position=tfds.features.Tensor(shape=(7,), dtype=np.float64),
             gripper_position=tfds.features.Tensor(shape=(1,), dtype=np.float64))
  for name in drop:
    obs.pop(name)
  return tfds.features.FeaturesDict({
      'steps': tfds.features.Dataset({
          'observation': obs,
          'action_dict': {'joint_position': tfds.features.Tensor(shape=(7,), dtype=np.float64),
                          'gripper_position': tfds.features.Tensor(shape=(1,), dtype=np.float64)},
          'action': tfds.features.Tensor(shape=(7,), dtype=np.float64),
          'language_instruction': tfds.features.Text(),
          'language_instruction_2': tfds.features.Text(),
          'language_instruction_3': tfds.features.Text(),
          'is_first': tfds.features.Scalar(dtype=np.bool_),
          'is_last': tfds.features.Scalar(dtype=np.bool_),
          'is_terminal': tfds.features.Scalar(dtype=np.bool_),
      }),
      'episode_metadata': {'file_path': tfds.features.Text(),
                           'recording_folderpath': tfds.features.Text()},
  })


def camera_frame(cam_index, step, hw=IMAGE_HW):
  pixel = np.zeros(3, np.uint8)
  pixel[cam_index] = 200
  pixel[(cam_index + 2) % 3] = step   # red->blue, green->red, blue->green carry the step
  return episodes.encode_image(np.broadcast_to(pixel, (*hw, 3)).copy(), 'png')


def joints(episode, step):
  return 0.1 * episode + 0.01 * step * np.arange(1, 8)


def droid_episode(episode, steps=STEPS, hw=IMAGE_HW, drop=()):
  out = []
  for t in range(steps):
    obs = {cam: camera_frame(c, t, hw) for c, cam in enumerate(CAMERAS)}
    obs.update(joint_position=joints(episode, t), gripper_position=np.array([t / steps]))
    for name in drop:
      obs.pop(name)
    out.append(dict(
        observation=obs,
        action_dict=dict(joint_position=joints(episode, t + 1) + 0.003,
                         gripper_position=np.array([(t + 1) / steps])),
        action=np.zeros(7),
        language_instruction='put the marker in the cup', language_instruction_2='marker into cup',
        language_instruction_3='', is_first=t == 0, is_last=t == steps - 1,
        is_terminal=t == steps - 1))
  folder = 'failure' if episode == 1 else 'success'   # DROID files failed episodes under failure/
  return dict(steps=out, episode_metadata=dict(file_path=f'/raw/episode_{episode}.h5',
                                               recording_folderpath=f'/raw/{folder}/{episode}/recordings'))


def write_rlds(root, num_episodes=2, hw=IMAGE_HW, drop=(), corrupt=None):
  os.makedirs(root, exist_ok=True)
  features = droid_features(hw, drop)
  features.save_config(root)
  with open(os.path.join(root, 'dataset_info.json'), 'w') as f:
    json.dump({'name': 'droid_test', 'version': '1.0.0', 'fileFormat': 'tfrecord'}, f)
  records = [features.serialize_example(droid_episode(e, hw=hw, drop=drop)) for e in range(num_episodes)]
  if corrupt is not None:
    records[corrupt] = b'\x0a\xff\xff' + records[corrupt][3:100]
  write_tfrecord(os.path.join(root, 'droid_test-train.tfrecord-00000-of-00001'), records)


DROID_OVERRIDES = [
    'data.name=droid', 'data.embodiment=droid', f'data.cameras={CAMERAS!r}',
    'data.canvas_layout=droid', 'data.control_hz=15', 'data.frame_stride=3', 'data.action_dim=8',
    'data.state_dim=8',
    'data.relative_action_dims=(0,1,2,3,4,5,6)', 'video.action_horizon=24', 'video.max_chunks=2',
    'video.height=32', 'video.width=64']


@pytest.fixture(scope='module')
def droid_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('droid')
  write_rlds(str(root / 'rlds'))
  r = run_cli('build', 'droid', '--src', str(root / 'rlds'), '--out', str(root / 'out'))
  assert r.returncode == 0, r.stderr
  return str(root / 'out')


def _config(data_dir, *extra):
  return config_lib.load_config(os.path.join(REPO, 'configs/tiny.py'),
                                [f'data.dir={data_dir}', *DROID_OVERRIDES, *extra])


def test_converted_episodes_keep_arrays_and_bytes(droid_dir):
  ds = episodes.open_dataset(droid_dir, 'droid')
  assert ds.spec.cameras == CAMERAS and ds.spec.image_shapes['wrist_image_left'] == IMAGE_HW
  rec = ds.source[1]
  assert rec['episode_id'] == b'/raw/episode_1.h5'
  np.testing.assert_allclose(rec['state'][5, :7], joints(1, 5), rtol=1e-6)
  assert rec['images']['exterior_image_2_left'][7] == camera_frame(2, 7)
  assert [s.decode() for s in rec['instructions']] == ['put the marker in the cup', 'marker into cup']
  np.testing.assert_array_equal(rec['language'][0], [0, 1, -1])


def test_canvas_quadrants_stride_and_relative_actions(droid_dir):
  cfg = _config(droid_dir)
  member = pipeline.open_member(settings.from_config(cfg), 'droid', 1.0, train=False)
  lay = member.loader.spec.layout
  stats = member.loader.stats
  start, k = 5, 2
  sample = member.loader.clip(member.loader.dataset.source[0], 0, start, k, np.random.default_rng(0))
  pixels = np.round((sample['video'] + 1.0) * 127.5).astype(int)   # [T, 32, 64, 3]
  assert pixels.shape == (lay.num_frames, 32, 64, 3) == (17, 32, 64, 3)
  for n in range(1 + k * 8):
    step = start + 3 * n
    np.testing.assert_array_equal(pixels[n, :16, :], np.broadcast_to([200, 0, step], (16, 64, 3)))
    np.testing.assert_array_equal(pixels[n, 16:, :32], np.broadcast_to([step, 200, 0], (16, 32, 3)))
    np.testing.assert_array_equal(pixels[n, 16:, 32:], np.broadcast_to([0, step, 200], (16, 32, 3)))
  # Relative joints + the anchor state give back the commanded absolute joints (where unclipped).
  actions = normalization.unnormalize(sample['actions'][:, :8], stats['action'])
  state = normalization.unnormalize(sample['state'][:, :8], stats['state'])
  rec = member.loader.dataset.source[0]
  anchors = np.repeat(np.arange(k), 24)
  absolute = actions[:, :7] + rec['state'][start + 24 * anchors, :7]
  expected = rec['action'][start:start + 48, :7]
  inside = np.abs(sample['actions'][:, :7]) < 1.0
  assert inside.mean() > 0.9
  np.testing.assert_allclose(absolute[inside], expected[inside], atol=1e-4)
  np.testing.assert_allclose(state[:, :7], rec['state'][[start, start + 24], :7], atol=1e-4)
  assert sample['action_mask'][:, :8].all() and not sample['action_mask'][:, 8:].any()
  assert sample['chunk_mask'].tolist() == [True, True]


def test_cli_inspect_shapes(droid_dir):
  r = run_cli('inspect', '--config', 'configs/tiny.py', f'--config.data.dir={droid_dir}',
              *[f'--config.{o}' for o in DROID_OVERRIDES], '--batches', '2')
  assert r.returncode == 0, r.stderr
  lines = [json.loads(line) for line in r.stdout.splitlines()]
  assert len(lines) == 2
  b = lines[0]
  assert b['video']['shape'] == [2, 17, 32, 64, 3] and -1 <= b['video']['min'] <= b['video']['max'] <= 1
  assert b['actions']['shape'] == [2, 48, 32] and -1 <= b['actions']['min'] <= b['actions']['max'] <= 1
  assert b['state']['shape'] == [2, 2, 64] and b['embodiment_id']['max'] == 0


def test_stats_with_wrong_dims_fail_naming_the_field(droid_dir, tmp_path):
  cfg = _config(droid_dir)
  path = pipeline.stats_path(settings.from_config(cfg).data, 'droid')
  stats = normalization.compute_stats(episodes.open_dataset(droid_dir, 'droid').lowdim, 24, 7)
  stats['action']['q01'] = stats['action']['q01'][:7]
  normalization.save_stats(stats, path)
  try:
    with pytest.raises(episodes.DataError, match=r'action\.q01 has 7 dims'):
      pipeline.open_member(settings.from_config(cfg), 'droid', 1.0, train=False)
  finally:
    os.remove(path)


def test_missing_feature_fails_naming_it(tmp_path):
  write_rlds(str(tmp_path / 'rlds'), num_episodes=1, drop=('wrist_image_left',))
  r = run_cli('build', 'droid', '--src', str(tmp_path / 'rlds'), '--out', str(tmp_path / 'out'))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      'error: features.json: missing feature steps/observation/wrist_image_left '
      '(needed for cameras.wrist_image_left)']


def test_wrong_image_size_fails_naming_the_camera(tmp_path):
  write_rlds(str(tmp_path / 'rlds'), num_episodes=1)
  # Same declared size, frames of another size: rewrite the records with 8x32 images.
  features = droid_features()
  bad = droid_episode(0, hw=(8, 32))
  write_tfrecord(str(tmp_path / 'rlds' / 'droid_test-train.tfrecord-00000-of-00001'),
                 [features.serialize_example(bad)])
  r = run_cli('build', 'droid', '--src', str(tmp_path / 'rlds'), '--out', str(tmp_path / 'out'))
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and 'images/wrist_image_left' in lines[0] and '8x32' in lines[0], lines


@pytest.mark.parametrize('mode', ['fail', 'skip'])
def test_corrupted_record_is_reported_and_skipped_or_fails(tmp_path, mode):
  write_rlds(str(tmp_path / 'rlds'), num_episodes=3, corrupt=1)
  r = run_cli('build', 'droid', '--src', str(tmp_path / 'rlds'), '--out', str(tmp_path / 'out'),
              '--on_corrupt', mode)
  if mode == 'fail':
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith('error: episode droid_test-train.tfrecord-00000-of-00001:1')
  else:
    assert r.returncode == 0, r.stderr
    assert 'droid_test-train.tfrecord-00000-of-00001:1' in r.stderr
    ids = episodes.open_dataset(str(tmp_path / 'out'), 'droid').lowdim.episode_id.tolist()
    assert ids == [b'/raw/episode_0.h5', b'/raw/episode_2.h5']


def _build_video_only_rlds(tmp_path, name: str, language: str, out: str):
  """One RLDS episode built through a spec file that maps no actions (video-only data)."""
  write_rlds(str(tmp_path / 'rlds'), num_episodes=1)
  spec = dict(name=name, embodiment='droid',
              cameras={cam: f'steps/observation/{cam}' for cam in CAMERAS},
              state=['steps/observation/joint_position', 'steps/observation/gripper_position'],
              action=[], language=[f'steps/{language}'])
  with open(tmp_path / 'spec.json', 'w') as f:
    json.dump(spec, f)
  return run_cli('build', 'rlds', '--src', str(tmp_path / 'rlds'), '--spec', str(tmp_path / 'spec.json'),
                 '--out', out)


def test_generic_rlds_spec_builds_video_only_data(tmp_path):
  r = _build_video_only_rlds(tmp_path, 'my_robot', 'language_instruction', str(tmp_path / 'out'))
  assert r.returncode == 0, r.stderr
  cfg = _config(str(tmp_path / 'out'), 'data.name=my_robot')
  batch = next(iter(pipeline.make_dataset(settings.from_config(cfg), train=True, process_index=0, process_count=1)))
  assert not batch['has_real_action'].any() and not batch['action_mask'].any()
  assert (batch['actions'] == 0).all() and batch['state_mask'][:, :, :8].all()
  assert batch['instruction'].tolist() == [b'put the marker in the cup'] * 2


def test_mixture_draws_from_both_datasets(droid_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(os.path.join(droid_dir, 'droid'), tmp_path / 'droid')
  assert _build_video_only_rlds(tmp_path, 'other', 'language_instruction_2', str(tmp_path)).returncode == 0
  cfg = _config(str(tmp_path), 'train.batch_size=8')
  cfg.data.mixture = 'droid:1,other:1'
  batch = next(iter(pipeline.make_dataset(settings.from_config(cfg), process_index=0, process_count=1)))
  assert batch['has_real_action'].any() and not batch['has_real_action'].all()


def test_stats_cli_saves_checked_stats(droid_dir):
  r = run_cli('stats', '--config', 'configs/tiny.py', f'--config.data.dir={droid_dir}',
              *[f'--config.{o}' for o in DROID_OVERRIDES])
  assert r.returncode == 0, r.stderr
  path = json.loads(r.stdout)['stats']
  try:
    with open(path) as f:
      stats = json.load(f)
    assert len(stats['state']['q01']) == 8 and stats['settings'] == {
        'action_horizon': 24, 'relative_action_dims': list(range(7))}
    # Joint d moves 0.01*(d+1) a step and commands 0.003 past the next state: relative to an
    # anchor h steps back that is 0.01*(d+1)*(h+1) + 0.003, h < 24. The gripper stays absolute.
    top = 0.01 * np.arange(1, 8) * 24 + 0.003
    q99 = np.array(stats['action']['q99'][:7])
    assert (q99 <= top + 1e-6).all() and (q99 >= 0.9 * top).all()
    assert 0.9 < stats['action']['q99'][7] <= 1.0
    r = run_cli('inspect', '--config', 'configs/tiny.py', f'--config.data.dir={droid_dir}',
                *[f'--config.{o}' for o in DROID_OVERRIDES], '--config.video.action_horizon=12',
                '--config.video.frames_per_chunk=4')
    assert r.returncode == 2 and 'settings.action_horizon=24 but the config has 12' in r.stderr
  finally:
    os.remove(path)


def test_success_flags_and_a_tfds_data_dir_as_src(droid_dir, tmp_path):
  # The flag comes from the episode (DROID: its recording folder lies under success/ or failure/).
  assert episodes.open_dataset(droid_dir, 'droid').lowdim.success.tolist() == [True, False]
  # --src may be the data_dir one gives tfds.load: it holds droid_100/<version>/.
  write_rlds(str(tmp_path / 'tfds' / 'droid_100' / '1.0.0'), num_episodes=1)
  r = run_cli('build', 'droid', '--src', str(tmp_path / 'tfds'), '--out', str(tmp_path / 'out'))
  assert r.returncode == 0, r.stderr
  assert episodes.open_dataset(str(tmp_path / 'out'), 'droid').lowdim.success.tolist() == [True]
  r = run_cli('build', 'droid', '--src', str(tmp_path), '--out', str(tmp_path / 'out2'))
  assert r.returncode == 2 and 'has no features.json, nor a droid/<version>/ or droid_100/<version>/' in r.stderr


def test_stats_rerun_after_a_horizon_change_recomputes(droid_dir):
  """`datasets stats` replaces statistics made for other settings instead of refusing them."""
  stats_cli = lambda *extra: run_cli('stats', '--config', 'configs/tiny.py', f'--config.data.dir={droid_dir}',
                                     *[f'--config.{o}' for o in DROID_OVERRIDES], *extra)
  r = stats_cli()
  assert r.returncode == 0, r.stderr
  path = json.loads(r.stdout)['stats']
  try:
    with open(path) as f:
      before = json.load(f)
    r = stats_cli('--config.video.action_horizon=12', '--config.video.frames_per_chunk=4')
    assert r.returncode == 0, r.stderr
    with open(path) as f:
      after = json.load(f)
    assert before['settings']['action_horizon'] == 24 and after['settings']['action_horizon'] == 12
    # Relative joints over 12 steps reach about half as far as over 24.
    ratio = np.array(after['action']['q99'][:7]) / np.array(before['action']['q99'][:7])
    assert (ratio < 0.6).all() and (ratio > 0.4).all()
    cfg = _config(droid_dir, 'video.action_horizon=12', 'video.frames_per_chunk=4')
    assert pipeline.open_member(settings.from_config(cfg), 'droid', 1.0, train=False).loader.stats == after
  finally:
    os.remove(path)


def test_training_samples_draw_among_instruction_phrasings(droid_dir):
  member = pipeline.open_member(settings.from_config(_config(droid_dir)), 'droid', 1.0, train=True)
  rec = member.loader.dataset.source[0]
  seen = {member.loader.clip(rec, 0, 0, 1, np.random.default_rng(i))['instruction'].item()
          for i in range(12)}
  assert seen == {b'put the marker in the cup', b'marker into cup'}
  member = pipeline.open_member(settings.from_config(_config(droid_dir)), 'droid', 1.0, train=False)
  assert member.loader.clip(rec, 0, 0, 1, np.random.default_rng(3))['instruction'].item() == \
      b'put the marker in the cup'
