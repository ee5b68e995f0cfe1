"""AgiBot from a LeRobot v2 directory written here (parquet + H.264 videos of constant colour)."""
import json
import os

import numpy as np
import pytest

av = pytest.importorskip('av')
pa = pytest.importorskip('pyarrow')
import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

from dreamzero_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from dreamzero_jax import settings
from dreamzero_jax.datasets import episodes, pipeline  # pylint: disable=g-import-not-at-top
from tests.helpers import run_datasets_cli as run_cli  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMERAS = ('top_head', 'hand_left', 'hand_right')
COLOURS = {'top_head': (200, 40, 40), 'hand_left': (40, 200, 40), 'hand_right': (40, 40, 200)}
HW = (32, 48)
LENGTH = 30


def write_video(path, colour, n):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, 'w') as c:
    s = c.add_stream('libx264', rate=30)
    s.width, s.height, s.pix_fmt = HW[1], HW[0], 'yuv420p'
    for _ in range(n):
      frame = av.VideoFrame.from_ndarray(np.broadcast_to(np.uint8(colour), (*HW, 3)).copy(), format='rgb24')
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


# The release's modality.json (scripts/data/convert_agibot.py's key names), for a 32-dim state column
# whose model-facing 20 dims are spread over it.
STATE_SLICES = {'left_arm_joint_position': (0, 7), 'right_arm_joint_position': (7, 14),
                'left_effector_position': (20, 21), 'right_effector_position': (21, 22),
                'head_position': (24, 26), 'waist_position': (28, 30)}


def write_lerobot(root, num_episodes=2, state_dim=32, modality=True):
  os.makedirs(os.path.join(root, 'meta'), exist_ok=True)
  if modality:
    with open(os.path.join(root, 'meta', 'modality.json'), 'w') as f:
      json.dump({'state': {k: {'original_key': 'observation.state', 'start': a, 'end': b}
                           for k, (a, b) in STATE_SLICES.items()}}, f)
  features = {'observation.state': {'dtype': 'float32', 'shape': [state_dim]},
              'action': {'dtype': 'float32', 'shape': [22]}}
  features.update({f'observation.images.{c}': {'dtype': 'video', 'shape': [*HW, 3]} for c in CAMERAS})
  info = dict(codebase_version='v2.1', fps=30, chunks_size=1000, features=features,
              data_path='data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet',
              video_path='videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4')
  with open(os.path.join(root, 'meta', 'info.json'), 'w') as f:
    json.dump(info, f)
  with open(os.path.join(root, 'meta', 'tasks.jsonl'), 'w') as f:
    f.write(json.dumps({'task_index': 0, 'task': 'pick up the bottle'}) + '\n')
    f.write(json.dumps({'task_index': 1, 'task': 'place it in the box'}) + '\n')
  with open(os.path.join(root, 'meta', 'episodes.jsonl'), 'w') as f:
    for e in range(num_episodes):
      f.write(json.dumps({'episode_index': e, 'tasks': ['pick up the bottle'], 'length': LENGTH}) + '\n')
  for e in range(num_episodes):
    t = np.arange(LENGTH, dtype=np.float32)
    table = {'observation.state': [list(e + 0.01 * i + np.arange(state_dim, dtype=np.float32)) for i in t],
             'action': [list(e + 0.01 * (i + 1) * np.ones(22, np.float32)) for i in t],
             'episode_index': [e] * LENGTH, 'frame_index': list(range(LENGTH)),
             'task_index': [0] * 5 + [1] * (LENGTH - 5)}
    path = os.path.join(root, info['data_path'].format(episode_chunk=0, episode_index=e))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(table), path)
    for c in CAMERAS:
      write_video(os.path.join(root, info['video_path'].format(
          episode_chunk=0, episode_index=e, video_key=f'observation.images.{c}')), COLOURS[c], LENGTH)


def test_agibot_builds_and_fills_the_grid(tmp_path):
  write_lerobot(str(tmp_path / 'lerobot'))
  r = run_cli('build', 'agibot', '--src', str(tmp_path / 'lerobot'), '--out', str(tmp_path / 'out'))
  assert r.returncode == 0, r.stderr
  ds = episodes.open_dataset(str(tmp_path / 'out'), 'agibot')
  rec = ds.source[1]
  # The release's 20 state dims, picked out of the 32-wide column by meta/modality.json.
  assert rec['state'].shape == (LENGTH, 20) and rec['action'].shape == (LENGTH, 22)
  picked = np.concatenate([np.arange(a, b) for a, b in STATE_SLICES.values()])
  np.testing.assert_allclose(rec['state'][3], 1 + 0.03 + picked, rtol=1e-6)
  assert rec['instructions'] == [b'pick up the bottle', b'place it in the box']
  assert rec['language'][:, 0].tolist() == [0] * 5 + [1] * 25
  cfg = config_lib.load_config(os.path.join(REPO, 'configs/tiny.py'), [
      f'data.dir={tmp_path / "out"}', 'data.name=agibot', 'data.embodiment=agibot',
      f'data.cameras={CAMERAS!r}', 'data.control_hz=30', 'data.frame_stride=3', 'data.action_dim=22',
      'data.state_dim=20', 'data.relative_action_dims=()', 'model.num_embodiments=3', 'video.action_horizon=12',
      'video.frames_per_chunk=4',
      'video.max_chunks=1', 'video.height=32', 'video.width=32'])
  batch = next(iter(pipeline.make_dataset(settings.from_config(cfg), train=False, process_index=0, process_count=1)))
  pixels = (batch['video'][0] + 1.0) * 127.5
  for (rows, cols), cam in (((slice(0, 16), slice(0, 16)), 'top_head'),
                            ((slice(16, 32), slice(0, 16)), 'hand_left'),
                            ((slice(0, 16), slice(16, 32)), 'hand_right')):
    np.testing.assert_allclose(pixels[:, rows, cols].mean((0, 1, 2)), COLOURS[cam], atol=6)
  assert batch['video'].shape == (2, 5, 32, 32, 3) and (batch['video'][0, :, 16:, 16:] == -1.0).all()
  assert batch['embodiment_id'].tolist() == [2, 2]
  # Clips stay inside one instruction: the first one's 5 steps cannot hold a 12-step chunk.
  assert batch['instruction'].tolist() == [b'place it in the box'] * 2


def test_agibot_wrong_state_dim_fails_naming_the_feature(tmp_path):
  write_lerobot(str(tmp_path / 'lerobot'), num_episodes=1, state_dim=30, modality=False)
  r = run_cli('build', 'agibot', '--src', str(tmp_path / 'lerobot'), '--out', str(tmp_path / 'out'))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      'error: meta/info.json: features.observation.state has shape [30], agibot needs [20] (or a '
      'meta/modality.json naming state keys left_arm_joint_position, right_arm_joint_position, '
      'left_effector_position, right_effector_position, head_position, waist_position)']
