"""Tiny LeRobot datasets written by the tests: v2.1 (with GEAR meta/modality.json) and v3.0 (several
episodes per parquet and mp4 file), of a made-up bimanual robot: two cameras, a 10-dim state and
action (per arm: 4 joints + a gripper), a task per episode part. Frame t of episode e of camera c is
one flat colour (COLOURS[c], 20 + 14 t, 40 + 60 e), so a test can tell every frame apart."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CAMERAS = ('head', 'wrist')
COLOURS = {'head': 200, 'wrist': 60}
HW = (32, 48)
FPS = 10
LENGTHS = (14, 16, 14)
TASKS = ('lift the cup', 'put the cup down')
# GEAR sub-keys of the 10-dim vectors (the release's modality.json shape).
KEYS = {'left_arm': (0, 4), 'left_gripper': (4, 5), 'right_arm': (5, 9), 'right_gripper': (9, 10)}
RELATIVE_KEYS = ('left_arm', 'right_arm')


def colour(cam, e, t):
  return (COLOURS[cam], 20 + 14 * t, 40 + 60 * e)


def state(e, t):
  return (e + 0.1 * t + np.arange(10)).astype(np.float32)


def action(e, t):
  return state(e, t + 1) + np.float32(0.5)


def task_index(t):
  return 0 if t < 4 else 1


def write_video(path, frames):
  import av  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, 'w') as c:
    s = c.add_stream('libx264', rate=FPS)
    s.width, s.height, s.pix_fmt = HW[1], HW[0], 'yuv420p'
    for rgb in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(np.broadcast_to(np.uint8(rgb), (*HW, 3)).copy(), format='rgb24')):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def _features():
  f = {'observation.state': {'dtype': 'float32', 'shape': [10]}, 'action': {'dtype': 'float32', 'shape': [10]},
       'episode_index': {'dtype': 'int64', 'shape': [1]}, 'task_index': {'dtype': 'int64', 'shape': [1]}}
  f.update({f'observation.images.{c}': {'dtype': 'video', 'shape': [*HW, 3]} for c in CAMERAS})
  return f


def _rows(e, offset=0):
  n = LENGTHS[e]
  return {'observation.state': [state(e, t).tolist() for t in range(n)],
          'action': [action(e, t).tolist() for t in range(n)],
          'episode_index': [e] * n, 'frame_index': list(range(n)), 'index': [offset + t for t in range(n)],
          'timestamp': [t / FPS for t in range(n)], 'task_index': [task_index(t) for t in range(n)]}


def _dump(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def write_v21(root, gear=True):
  """LeRobot v2.1, one parquet and one mp4 per camera per episode; GEAR metadata when `gear`."""
  info = dict(codebase_version='v2.1', fps=FPS, chunks_size=1000, features=_features(), total_episodes=len(LENGTHS),
              data_path='data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet',
              video_path='videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4')
  _dump(os.path.join(root, 'meta', 'info.json'), info)
  with open(os.path.join(root, 'meta', 'tasks.jsonl'), 'w') as f:
    f.writelines(json.dumps({'task_index': i, 'task': t}) + '\n' for i, t in enumerate(TASKS))
  with open(os.path.join(root, 'meta', 'episodes.jsonl'), 'w') as f:
    f.writelines(json.dumps({'episode_index': e, 'tasks': list(TASKS), 'length': n}) + '\n'
                 for e, n in enumerate(LENGTHS))
  for e in range(len(LENGTHS)):
    path = os.path.join(root, info['data_path'].format(episode_chunk=0, episode_index=e))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(_rows(e)), path)
    for c in CAMERAS:
      write_video(os.path.join(root, info['video_path'].format(
          episode_chunk=0, episode_index=e, video_key=f'observation.images.{c}')),
          [colour(c, e, t) for t in range(LENGTHS[e])])
  if gear:
    _dump(os.path.join(root, 'meta', 'modality.json'), {
        'state': {k: {'original_key': 'observation.state', 'start': a, 'end': b} for k, (a, b) in KEYS.items()},
        'action': {k: {'original_key': 'action', 'start': a, 'end': b} for k, (a, b) in KEYS.items()},
        'video': {c: {'original_key': f'observation.images.{c}'} for c in CAMERAS},
        'annotation': {'task': {'original_key': 'task_index'}}})
    _dump(os.path.join(root, 'meta', 'embodiment.json'), {'embodiment_tag': 'twoarm'})
    stats = dict(q01=[0.0] * 4, q99=[1.0] * 4, mean=[0.5] * 4, std=[0.1] * 4, min=[0.0] * 4, max=[1.0] * 4)
    _dump(os.path.join(root, 'meta', 'relative_stats_dreamzero.json'), {k: stats for k in RELATIVE_KEYS})
  return root


def write_v30(root):
  """LeRobot v3.0: all episodes in one parquet file and one mp4 per camera, meta/episodes/*.parquet
  giving each episode's rows and its timestamps in the shared video, meta/tasks.parquet."""
  info = dict(codebase_version='v3.0', fps=FPS, chunks_size=1000, features=_features(), total_episodes=len(LENGTHS),
              data_path='data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet',
              video_path='videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4')
  _dump(os.path.join(root, 'meta', 'info.json'), info)
  pq.write_table(pa.table({'task_index': list(range(len(TASKS))), 'task': list(TASKS)}),
                 os.path.join(root, 'meta', 'tasks.parquet'))
  starts = np.concatenate([[0], np.cumsum(LENGTHS)])
  rows = {}
  for e in range(len(LENGTHS)):
    for k, v in _rows(e, int(starts[e])).items():
      rows.setdefault(k, []).extend(v)
  path = os.path.join(root, info['data_path'].format(chunk_index=0, file_index=0))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table(rows), path)
  episodes = {'episode_index': list(range(len(LENGTHS))), 'length': list(LENGTHS),
              'tasks': [list(TASKS)] * len(LENGTHS), 'data/chunk_index': [0] * len(LENGTHS),
              'data/file_index': [0] * len(LENGTHS), 'dataset_from_index': starts[:-1].tolist(),
              'dataset_to_index': starts[1:].tolist()}
  for c in CAMERAS:
    key = f'observation.images.{c}'
    write_video(os.path.join(root, info['video_path'].format(video_key=key, chunk_index=0, file_index=0)),
                [colour(c, e, t) for e in range(len(LENGTHS)) for t in range(LENGTHS[e])])
    episodes.update({f'videos/{key}/chunk_index': [0] * len(LENGTHS), f'videos/{key}/file_index': [0] * len(LENGTHS),
                     f'videos/{key}/from_timestamp': (starts[:-1] / FPS).tolist(),
                     f'videos/{key}/to_timestamp': (starts[1:] / FPS).tolist()})
  path = os.path.join(root, 'meta', 'episodes', 'chunk-000', 'file-000.parquet')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table(episodes), path)
  return root


def embodiment_file(path, **changes):
  """The made-up robot's embodiment file (what a user writes or `datasets embodiment` drafts)."""
  d = dict(name='twoarm', id=3, cameras=list(CAMERAS), canvas_layout='grid', control_hz=FPS, frame_stride=2,
           state_dim=10, action_dim=10, relative_action_dims=[0, 1, 2, 3, 5, 6, 7, 8],
           prompt_template='{instruction}', lerobot={'video_keys': {c: f'observation.images.{c}' for c in CAMERAS}})
  d.update(changes)
  _dump(path, d)
  return path
