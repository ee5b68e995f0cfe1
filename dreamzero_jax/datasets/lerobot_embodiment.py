"""A draft embodiment file from a LeRobot dataset's own metadata (`datasets embodiment --from_lerobot`):
cameras, state/action keys and ranges from meta/modality.json (or the whole observation.state and
action columns), relative dims from relative_stats_dreamzero.json's keys, the rate from info.json.
What the metadata cannot say (frame stride, prompt template, canvas) gets the release's values for
its LeRobot robots (AgiBot: stride 3 on a 2x2 grid); the user checks the draft before building."""
from __future__ import annotations

import os
from typing import Any

from dreamzero_jax import embodiments
from dreamzero_jax.datasets import lerobot_reader
from dreamzero_jax.errors import DataError

MAX_CAMERAS = 3   # the grid canvas holds three views (the fourth quarter is black)


def _grid_template(cameras: list[str]) -> str:
  places = ('top-left', 'bottom-left', 'top-right')   # canvas.placements' grid order
  views = ', '.join(f'the {p} view shows the {c} camera' for p, c in zip(places, cameras))
  return (f'A multi-view video shows that a robot {{instruction}} The video is split into four views: '
          f'{views}, and the remaining views are a black screen. The robot {{instruction}}')


def _keys(role: str, modality: dict, features: dict) -> tuple[list[str], dict, int]:
  """(key names, their ranges, the vector width) of `role` by modality.json or the whole column."""
  entries = modality.get(role, {})
  if entries:
    ranges = {k: {'original_key': v.get('original_key', lerobot_reader.DEFAULT_COLUMNS[role]),
                  'start': int(v['start']), 'end': int(v['end'])} for k, v in entries.items()}
    return list(ranges), ranges, sum(r['end'] - r['start'] for r in ranges.values())
  column = lerobot_reader.DEFAULT_COLUMNS[role]
  if column not in features:
    raise DataError(f'meta/info.json: features.{column} is missing and meta/modality.json names no {role} keys')
  width = 1
  for n in features[column]['shape']:
    width *= int(n)
  return [], {}, width


def draft(src: str, name: str = '') -> dict[str, Any]:
  """The draft embodiment file's content for the LeRobot directory `src` (checked to load)."""
  meta = os.path.join(src, 'meta')
  info = lerobot_reader.read_json(os.path.join(meta, 'info.json'), 'LeRobot info')
  features = info.get('features', {})
  modality = lerobot_reader.read_modality(src)
  tag_path = os.path.join(meta, 'embodiment.json')
  tag = lerobot_reader.read_json(tag_path, 'GEAR tag').get('embodiment_tag', '') if os.path.isfile(tag_path) else ''
  video = {k: v['original_key'] for k, v in modality.get('video', {}).items()} or {
      k.removeprefix('observation.images.'): k for k, f in features.items() if f.get('dtype') == 'video'}
  if not video:
    raise DataError('meta/info.json: no video feature (DreamZero needs at least one camera)')
  cameras = list(video)[:MAX_CAMERAS]
  state_keys, state_ranges, state_dim = _keys('state', modality, features)
  action_keys, action_ranges, action_dim = _keys('action', modality, features)
  # The release's relative keys: those with relative statistics, present in state and action.
  relative_path = os.path.join(meta, 'relative_stats_dreamzero.json')
  relative = lerobot_reader.read_json(relative_path, 'relative statistics') if os.path.isfile(relative_path) else {}
  offsets = lambda keys, ranges: dict(zip(keys, [sum(ranges[k]['end'] - ranges[k]['start'] for k in keys[:i])
                                                 for i in range(len(keys))]))
  state_at, action_at = offsets(state_keys, state_ranges), offsets(action_keys, action_ranges)
  relative_dims = []
  for k in relative:
    if k in state_at and k in action_at:
      if state_at[k] != action_at[k]:
        raise DataError(f'meta/relative_stats_dreamzero.json: {k} sits at state dim {state_at[k]} but action dim '
                        f'{action_at[k]}: our relative dims pair equal positions (reorder state_keys/action_keys)')
      width = action_ranges[k]['end'] - action_ranges[k]['start']
      relative_dims += range(action_at[k], action_at[k] + width)
  lerobot = {'video_keys': {c: video[c] for c in cameras}}
  if state_ranges:
    lerobot['state_ranges'] = state_ranges
  if action_ranges:
    lerobot['action_ranges'] = action_ranges
  out = dict(
      name=name or tag or os.path.basename(os.path.abspath(src)),
      id=max(e.id for e in embodiments.EMBODIMENTS.values()) + 1,
      cameras=cameras, canvas_layout='grid', control_hz=int(info['fps']), frame_stride=3,
      state_dim=state_dim, action_dim=action_dim, relative_action_dims=sorted(relative_dims),
      prompt_template=_grid_template(cameras), state_keys=state_keys, action_keys=action_keys,
      official_tag=tag, lerobot=lerobot)
  embodiments.from_json(out, f'the draft for {src}')
  return out
