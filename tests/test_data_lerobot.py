"""Your own robot from a LeRobot dataset, no code: v2.1 with GEAR metadata (draft embodiment file
from it) and v3.0 without -> build -> exact episodes -> relative actions -> tiny fine-tune -> served."""
import io
import json
import os

import numpy as np
import pytest

pytest.importorskip('av')
pytest.importorskip('pyarrow')
from PIL import Image  # pylint: disable=g-import-not-at-top

from dreamzero_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from dreamzero_jax import settings
from dreamzero_jax import embodiments
from dreamzero_jax.datasets import episodes, normalization, pipeline  # pylint: disable=g-import-not-at-top
from tests import lerobot_fixtures as lr  # pylint: disable=g-import-not-at-top
from tests.helpers import run_datasets_cli as run_cli  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny model at 32x32, one 4-frame chunk of 8 actions at stride 2.
TINY = ['video.height=32', 'video.width=32', 'video.max_chunks=1', 'video.frames_per_chunk=4',
        'video.action_horizon=8', 'data.frame_stride=2', 'serve.camera_height=16', 'serve.camera_width=16']


def _config(embodiment_file, data_dir, *extra):
  return config_lib.load_config(f'{REPO}/configs/dreamzero_14b_finetune.py:{embodiment_file},tiny',
                                [f'data.dir={data_dir}', *TINY, *extra])


def _build(src, out, embodiment_file):
  r = run_cli('build', 'lerobot', '--src', src, '--out', out, '--embodiment_file', embodiment_file)
  assert r.returncode == 0, r.stderr
  return episodes.open_dataset(out, 'twoarm')


def _check_exact_episodes(ds):
  assert ds.spec.cameras == lr.CAMERAS and ds.spec.control_hz == lr.FPS and ds.spec.state_dim == 10
  assert ds.lowdim.episode_id.tolist() == [b'episode_000000', b'episode_000001', b'episode_000002']
  for e, n in enumerate(lr.LENGTHS):
    rec = ds.source[e]
    np.testing.assert_allclose(rec['state'], [lr.state(e, t) for t in range(n)], rtol=1e-6)
    np.testing.assert_allclose(rec['action'], [lr.action(e, t) for t in range(n)], rtol=1e-6)
    assert rec['instructions'] == [t.encode() for t in lr.TASKS]
    assert rec['language'][:, 0].tolist() == [lr.task_index(t) for t in range(n)]
    for cam in lr.CAMERAS:
      assert len(rec['images'][cam]) == n
      for t in (0, n // 2, n - 1):   # the right frame of the right episode (v3.0: of the shared file)
        mean = np.asarray(Image.open(io.BytesIO(rec['images'][cam][t]))).reshape(-1, 3).mean(0)
        np.testing.assert_allclose(mean, lr.colour(cam, e, t), atol=6)


def _check_relative_actions(cfg, relative):
  member = pipeline.open_member(settings.from_config(cfg), 'twoarm', 1.0, train=False)
  record = member.loader.dataset.source[1]
  out = member.loader.clip(record, 1, 5, 1, np.random.default_rng(0))
  anchor = lr.state(1, 5)
  expected = np.stack([lr.action(1, t) for t in range(5, 13)])
  expected[:, relative] -= anchor[relative]
  np.testing.assert_allclose(out['actions'][:8, :10], normalization.normalize(expected, member.loader.stats['action']),
                             atol=1e-5)
  assert out['action_mask'][:8, :10].all() and not out['action_mask'][:, 10:].any()
  assert int(out['embodiment_id']) == 3


@pytest.fixture(scope='module')
def v21(tmp_path_factory):
  """The GEAR v2.1 dataset, its drafted embodiment file (stride set to 2) and the built dataset."""
  root = tmp_path_factory.mktemp('v21')
  src = lr.write_v21(str(root / 'lerobot'))
  r = run_cli('embodiment', '--from_lerobot', src, '--out', str(root / 'twoarm.json'))
  assert r.returncode == 0, r.stderr
  with open(root / 'twoarm.json') as f:
    draft = json.load(f)
  draft['frame_stride'] = 2   # what the user checks: the drafted 3 is the release's, 2 suits these clips
  with open(root / 'twoarm.json', 'w') as f:
    json.dump(draft, f)
  return src, str(root / 'twoarm.json'), draft, _build(src, str(root / 'out'), str(root / 'twoarm.json'))


def test_draft_embodiment_reads_gear_metadata(v21):
  _, _, draft, _ = v21
  assert draft['name'] == 'twoarm' and draft['official_tag'] == 'twoarm' and draft['id'] == 3
  assert draft['cameras'] == list(lr.CAMERAS) and draft['control_hz'] == lr.FPS
  assert draft['state_keys'] == draft['action_keys'] == list(lr.KEYS)
  assert draft['state_dim'] == draft['action_dim'] == 10
  assert draft['relative_action_dims'] == [0, 1, 2, 3, 5, 6, 7, 8]   # left_arm, right_arm
  assert draft['lerobot']['state_ranges']['right_arm'] == {'original_key': 'observation.state', 'start': 5, 'end': 9}


def test_v21_with_gear_builds_exact_episodes_and_relative_actions(v21, tmp_path):
  _, path, draft, ds = v21
  _check_exact_episodes(ds)
  # The dataset keeps its embodiment file: a mixture member is read by it.
  assert pipeline.dataset_embodiment(ds) == embodiments.load_file(path)
  _check_relative_actions(_config(path, os.path.dirname(os.path.dirname(ds.path))), draft['relative_action_dims'])


def test_v30_without_gear_builds_the_same_episodes(tmp_path):
  src = lr.write_v30(str(tmp_path / 'lerobot'))
  path = lr.embodiment_file(str(tmp_path / 'twoarm.json'))
  ds = _build(src, str(tmp_path / 'out'), path)
  _check_exact_episodes(ds)
  _check_relative_actions(_config(path, str(tmp_path / 'out')), [0, 1, 2, 3, 5, 6, 7, 8])


@pytest.mark.slow
def test_fine_tune_on_the_new_robot_then_serve_its_spec(v21, tmp_path):
  from dreamzero_jax.serving import loading  # pylint: disable=g-import-not-at-top
  from dreamzero_jax.training import loop  # pylint: disable=g-import-not-at-top
  _, path, _, ds = v21
  cfg = _config(path, os.path.dirname(os.path.dirname(ds.path)), 'train.steps=2', 'train.batch_size=1',
                'sampler.num_steps=1', 'sampler.dit_step_mask="1"', 'train.checkpoint_every=2')
  assert loop.train(cfg, str(tmp_path / 'run')) == 0
  backend = loading.load_backend(str(tmp_path / 'run'))
  meta = backend.metadata
  assert meta['embodiment'] == 'twoarm' and meta['action_shape'] == [8, 10]
  assert set(meta['observation_spec']) == {'observation/head', 'observation/wrist', 'observation/state'}
  assert meta['observation_spec']['observation/state']['shape'] == [10]
  obs = {'observation/head': np.zeros((1, 16, 16, 3), np.uint8), 'observation/wrist': np.zeros((1, 16, 16, 3), np.uint8),
         'observation/state': lr.state(0, 0)}
  actions, _, _ = backend.infer(backend.new_session('lift the cup', obs), obs)
  assert actions.shape == (8, 10) and np.isfinite(actions).all()


def _one_line_error(r, *parts):
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), r.stderr
  for part in parts:
    assert part in lines[0], lines[0]


def test_v30_frame_range_past_its_video_is_refused(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  src = lr.write_v30(str(tmp_path / 'lerobot'))
  path = os.path.join(src, 'meta', 'episodes', 'chunk-000', 'file-000.parquet')
  table = pq.read_table(path).to_pydict()
  table['videos/observation.images.wrist/from_timestamp'][2] = 3.5   # 14 frames from 3.5 s of a 4.4 s video
  pq.write_table(pa.table(table), path)
  r = run_cli('build', 'lerobot', '--src', src, '--out', str(tmp_path / 'out'),
              '--embodiment_file', lr.embodiment_file(str(tmp_path / 'e.json')))
  _one_line_error(r, 'episode episode_000002: images/wrist: its frame range (14 frames from 3.5 s) runs past the video')


def test_modality_range_past_the_vector_is_refused(tmp_path):
  src = lr.write_v21(str(tmp_path / 'lerobot'))
  modality_path = os.path.join(src, 'meta', 'modality.json')
  with open(modality_path) as f:
    modality = json.load(f)
  modality['action']['right_gripper']['end'] = 12
  with open(modality_path, 'w') as f:
    json.dump(modality, f)
  e = lr.embodiment_file(str(tmp_path / 'e.json'), state_keys=list(lr.KEYS), action_keys=list(lr.KEYS))
  r = run_cli('build', 'lerobot', '--src', src, '--out', str(tmp_path / 'out'), '--embodiment_file', e)
  _one_line_error(r, 'meta/modality.json: action.right_gripper: range [9, 12) runs past features.action, 10 wide')


def test_missing_video_is_refused_naming_episode_and_camera(tmp_path):
  src = lr.write_v21(str(tmp_path / 'lerobot'), gear=False)
  os.remove(os.path.join(src, 'videos', 'chunk-000', 'observation.images.head', 'episode_000001.mp4'))
  r = run_cli('build', 'lerobot', '--src', src, '--out', str(tmp_path / 'out'),
              '--embodiment_file', lr.embodiment_file(str(tmp_path / 'e.json')))
  _one_line_error(r, 'episode episode_000001: images/head: missing video')


@pytest.mark.parametrize('change, message', [
    (dict(id=2), 'id: 2 is taken by the built-in embodiment agibot'),
    (dict(cameras=['head', 'wrist', 'a', 'b']), 'cameras: 4 cameras do not fit the grid canvas'),
    (dict(relative_action_dims=[10]), 'relative_action_dims'),
    (dict(colour='red'), 'colour: unknown field'),
])
def test_bad_embodiment_files_are_refused_naming_the_field(tmp_path, change, message):
  path = lr.embodiment_file(str(tmp_path / 'e.json'), **change)
  with pytest.raises(ValueError, match=message) as err:
    embodiments.get(path)
  assert '\n' not in str(err.value)
