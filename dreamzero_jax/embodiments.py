"""The robots we know: each embodiment's id (its row in the model's per-embodiment tables), the
data layout its datasets use by default, and the prompt template its instructions are read in.

Every embodiment is a file of data (docs/embodiments.md): the built-in ones live in embodiment_files/,
and a new robot's file is named by its path wherever a name is taken (data.embodiment, --embodiment_file).
Ids are fixed forever so that adding an embodiment never renumbers a trained table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

from dreamzero_jax.errors import DataError

# The canvas layouts (datasets/canvas.py draws them): 'droid' = the wrist view on the top row, exterior
# views below; 'grid' = views 0, 2, 1 in reading order, the bottom-right quadrant black.
LAYOUTS = ('droid', 'grid')

# The official release's prompt templates (groot/vla/model/dreamzero/transform/dreamzero_cotrain.py,
# `collate`): the model was trained and is served reading the instruction, lower-cased, inside a
# description of the canvas layout. {instruction} marks where the lower-cased instruction goes.
_FOUR_VIEWS_HEAD_HANDS = (
    "The video is split into four views: The top-left view shows the camera view from the robot's "
    "head, the top-right view shows the camera view from the right hand, the bottom-left view shows "
    "the camera view from the left hand, and the bottom-right view is a black screen (inactive view).")
PROMPT_TEMPLATES = {
    'droid': (
        'A multi-view video shows that a robot {instruction} The video is split into three views: The '
        "top view shows the camera view from the robot's wrist, the bottom-left view shows the camera "
        'view from the left exterior camera, and the bottom-right view shows the camera view from the '
        'right exterior camera. During training, one of the two bottom exterior views may be a black '
        'screen (dropped view). The robot {instruction}'),
    'agibot': 'A multi-view video shows that a robot {instruction} ' + _FOUR_VIEWS_HEAD_HANDS
              + ' The robot {instruction}',
    'xdof': 'A multi-view video shows that a robot {instruction} ' + _FOUR_VIEWS_HEAD_HANDS
            + ' The robot {instruction}',
    'yam': (
        'A multi-view video shows that a robot {instruction} The video is split into four views: The '
        'top-left view shows the top camera, the top-right view shows the right camera, the bottom-left '
        'view shows the left camera, and the bottom-right view is a black screen. The robot '
        '{instruction}'),
    'human': 'A single view video shows that a human {instruction}',
    # Ours: the toy configs read prompts through a byte tokenizer with 8-32 tokens, so the instruction
    # comes first (a layout description after it is cut off there and kept at longer text lengths).
    'metaworld': (
        '{instruction}. A multi-view video of a robot: the top-left view shows the corner camera, the '
        'top-right view shows the camera behind the gripper, the bottom-left view shows the second '
        'corner camera, and the bottom-right view is a black screen.'),
    'plain': '{instruction}',   # the instruction as given (no lower-casing: nothing is templated)
}


DATASET_FILE = 'embodiment.json'   # a built dataset's copy of its embodiment, beside lowdim.npz
EMBODIMENT_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'embodiment_files')


@dataclasses.dataclass(frozen=True)
class Embodiment:
  """Defaults for one robot; a config's `data.*` fields override them for its primary dataset.
  Each is an embodiment file (JSON, docs/embodiments.md): the built-in ones in embodiment_files/."""
  name: str
  id: int
  cameras: tuple[str, ...]
  canvas_layout: str           # 'droid' or 'grid' (canvas.py)
  control_hz: int
  frame_stride: int            # control steps between two video frames
  state_dim: int
  action_dim: int
  relative_action_dims: tuple[int, ...]  # action dims taken relative to the same state dim at the anchor
  prompt_template: str         # a PROMPT_TEMPLATES name, or a template holding {instruction}
  # State/action keys (LeRobot GEAR modality.json names, in model order): where statistics and wider
  # LeRobot columns are read from. () = our vectors have no named layout.
  state_keys: tuple[str, ...] = ()
  action_keys: tuple[str, ...] = ()
  official_tag: str = ''       # its EmbodimentTag in the release (a metadata.json's top-level key)
  # protocol -> {camera name a client of that protocol sends: our camera name}
  camera_aliases: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
  # Where a LeRobot dataset holds it (LEROBOT_FIELDS; each optional): state_column / action_column
  # (default observation.state / action), video_keys {camera: feature}, state_ranges / action_ranges
  # {key: {original_key, start, end}} as in a GEAR modality.json (default: the dataset's own).
  lerobot: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


LEROBOT_FIELDS = ('state_column', 'action_column', 'video_keys', 'state_ranges', 'action_ranges')
_REQUIRED = ('name', 'id', 'cameras', 'canvas_layout', 'control_hz', 'frame_stride', 'state_dim',
             'action_dim', 'relative_action_dims', 'prompt_template')


def from_json(d: dict[str, Any], where: str) -> Embodiment:
  """An Embodiment from an embodiment file's content, checked: DataError naming the field."""
  def fail(field, msg):
    raise DataError(f'{where}: {field}: {msg}')
  if not isinstance(d, dict):
    fail('(top level)', 'expected a JSON object')
  fields = {f.name for f in dataclasses.fields(Embodiment)}
  for key in d:
    if key not in fields:
      fail(key, f'unknown field (known: {", ".join(sorted(fields))})')
  for key in _REQUIRED:
    if key not in d:
      fail(key, 'missing')
  if not isinstance(d['name'], str) or not re.fullmatch(r'[A-Za-z0-9_-]+', d['name']):
    fail('name', f'{d["name"]!r} must be letters, digits, _ or -')
  for key in ('id', 'control_hz', 'frame_stride', 'state_dim', 'action_dim'):
    if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < (0 if key == 'id' else 1):
      fail(key, f'{d[key]!r} must be a {"non-negative" if key == "id" else "positive"} integer')
  cameras = d['cameras']
  if not isinstance(cameras, list) or not cameras or not all(isinstance(c, str) and c for c in cameras) \
      or len(set(cameras)) != len(cameras):
    fail('cameras', f'{cameras!r} must be a non-empty list of distinct names')
  if d['canvas_layout'] not in LAYOUTS:
    fail('canvas_layout', f'{d["canvas_layout"]!r} (known: {", ".join(LAYOUTS)})')
  if len(cameras) > 3 or (d['canvas_layout'] == 'droid' and len(cameras) != 3):
    fail('cameras', f'{len(cameras)} cameras do not fit the {d["canvas_layout"]} canvas '
                    '(grid: 1 to 3, droid: 3)')
  try:
    relative_dims(d['relative_action_dims'], d['action_dim'], d['state_dim'])
    template(d['prompt_template'])
  except (ValueError, TypeError) as e:
    fail('relative_action_dims' if 'relative' in str(e) else 'prompt_template', str(e).split(': ', 1)[-1])
  for key in ('state_keys', 'action_keys'):
    if not isinstance(d.get(key, []), list) or not all(isinstance(k, str) for k in d.get(key, [])):
      fail(key, 'must be a list of modality.json key names')
  aliases = d.get('camera_aliases', {})
  if not isinstance(aliases, dict) or not all(isinstance(m, dict) for m in aliases.values()):
    fail('camera_aliases', 'must map a protocol name to {client camera name: our camera name}')
  for protocol, mapping in aliases.items():
    for ours in mapping.values():
      if ours not in cameras:
        fail(f'camera_aliases.{protocol}', f'{ours!r} is not one of cameras ({", ".join(cameras)})')
  lerobot = d.get('lerobot', {})
  if not isinstance(lerobot, dict):
    fail('lerobot', 'must be an object')
  for key in lerobot:
    if key not in LEROBOT_FIELDS:
      fail(f'lerobot.{key}', f'unknown field (known: {", ".join(LEROBOT_FIELDS)})')
  for cam in lerobot.get('video_keys', {}):
    if cam not in cameras:
      fail(f'lerobot.video_keys.{cam}', f'not one of cameras ({", ".join(cameras)})')
  for role in ('state', 'action'):
    for key, entry in lerobot.get(f'{role}_ranges', {}).items():
      if not isinstance(entry, dict) or not all(isinstance(entry.get(k), int) for k in ('start', 'end')) \
          or not 0 <= entry['start'] < entry['end']:
        fail(f'lerobot.{role}_ranges.{key}', f'{entry!r} needs integer 0 <= start < end')
  return Embodiment(
      **{k: v for k, v in d.items() if k not in ('cameras', 'relative_action_dims', 'state_keys', 'action_keys')},
      cameras=tuple(cameras), relative_action_dims=tuple(d['relative_action_dims']),
      state_keys=tuple(d.get('state_keys', ())), action_keys=tuple(d.get('action_keys', ())))


def load_file(path: str) -> Embodiment:
  """Reads and checks one embodiment file."""
  try:
    with open(path) as f:
      d = json.load(f)
  except OSError as e:
    raise DataError(f'{path}: cannot read the embodiment file ({e.strerror})') from None
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not JSON ({e.msg} at line {e.lineno})') from None
  return from_json(d, path)


def save_file(embodiment: Embodiment, path: str) -> None:
  with open(path, 'w') as f:
    json.dump(embodiment.to_json(), f, indent=2)
    f.write('\n')


def _builtin() -> dict[str, Embodiment]:
  out = {}
  for name in sorted(os.listdir(EMBODIMENT_FILES)):
    if name.endswith('.json'):
      e = load_file(os.path.join(EMBODIMENT_FILES, name))
      out[e.name] = e
  return dict(sorted(out.items(), key=lambda item: item[1].id))


# The Embodiment fields a config's data section carries under the same names.
DATA_FIELDS = ('cameras', 'canvas_layout', 'control_hz', 'frame_stride', 'action_dim', 'state_dim',
               'relative_action_dims')


def data_config(name: str) -> dict:
  """data.embodiment and its layout (DATA_FIELDS) as config fields: configs start their data section
  from it, so each fact lives here once; a config may still set any of them differently. An
  embodiment file stays named by its absolute path (what training, convert and serving read)."""
  e = get(name)
  return dict(embodiment=os.path.abspath(name) if name.endswith('.json') else e.name,
              **{field: getattr(e, field) for field in DATA_FIELDS})


def get(name: str) -> Embodiment:
  """A built-in embodiment by name, or the embodiment file at the path `name` (ending in .json): a
  new robot needs no edit of the package. A file may not take a built-in's name or id (its row)."""
  if name in EMBODIMENTS:
    return EMBODIMENTS[name]
  if not name.endswith('.json'):
    raise ValueError(f'data.embodiment: unknown embodiment {name!r} (known: {", ".join(EMBODIMENTS)}; '
                     'or the path of an embodiment file, NAME.json)')
  e = load_file(name)
  taken = next((b for b in EMBODIMENTS.values() if b.id == e.id or b.name == e.name), None)
  if taken is not None:
    free = max(b.id for b in EMBODIMENTS.values()) + 1
    field, value = ('id', e.id) if taken.id == e.id else ('name', repr(e.name))
    raise DataError(f'{name}: {field}: {value} is taken by the built-in embodiment {taken.name} (a new robot '
                    f'takes its own name and row: id >= {free})')
  return e


def by_id(embodiment_id: int) -> Embodiment:
  for e in EMBODIMENTS.values():
    if e.id == embodiment_id:
      return e
  raise ValueError(f'embodiment_id: no embodiment has id {embodiment_id}')


def relative_dims(value: int | Sequence[int], action_dim: int, state_dim: int) -> tuple[int, ...]:
  """data.relative_action_dims as a sorted tuple of action dims: an int N means the leading N."""
  dims = tuple(range(value)) if isinstance(value, int) else tuple(sorted(int(d) for d in value))
  if len(set(dims)) != len(dims) or any(not 0 <= d < min(action_dim, state_dim) for d in dims):
    raise ValueError(f'data.relative_action_dims: {value} must be distinct dims below the action '
                     f'({action_dim}) and state ({state_dim}) dims')
  return dims


def template(name_or_text: str) -> str:
  """A PROMPT_TEMPLATES name or a literal template -> the template text."""
  text = PROMPT_TEMPLATES.get(name_or_text, name_or_text)
  if '{instruction}' not in text:
    raise ValueError(f'data.prompt_template: {name_or_text!r} is neither a known template '
                     f'({", ".join(PROMPT_TEMPLATES)}) nor a text holding {{instruction}}')
  return text


def prompt(instruction: str, template_text: str) -> str:
  """The text the model reads for `instruction`: the template with the instruction lower-cased in
  place of every {instruction} (the release lower-cases it; 'plain' keeps it as given)."""
  if template_text == '{instruction}':
    return instruction
  return template_text.replace('{instruction}', instruction.lower())


def prompt_templates(data_cfg) -> dict[int, str]:
  """Embodiment id -> template text: the built-ins', and the config's own embodiment's (a file's too)
  with data.prompt_template ('' = the embodiment's) overriding it."""
  out = {e.id: template(e.prompt_template) for e in EMBODIMENTS.values()}
  own = get(data_cfg.embodiment)
  out[own.id] = template(data_cfg.prompt_template or own.prompt_template)
  return out


EMBODIMENTS = _builtin()   # the built-in embodiments by name, in id order
