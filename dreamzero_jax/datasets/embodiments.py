"""The robots we know: each embodiment's id (its row in the model's per-embodiment tables), the
data layout its datasets use by default, and the prompt template its instructions are read in.

Ids are fixed forever so that adding an embodiment never renumbers a trained table.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

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


@dataclasses.dataclass(frozen=True)
class Embodiment:
  """Defaults for one robot; a config's `data.*` fields override them for its primary dataset."""
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
  # The release's state/action keys (LeRobot GEAR modality.json names, in model order): where its
  # statistics and wider LeRobot columns are read from. () = our vectors have no official layout.
  official_state_keys: tuple[str, ...] = ()
  official_action_keys: tuple[str, ...] = ()
  official_tag: str = ''       # its EmbodimentTag in the release (a metadata.json's top-level key)
  # Other wire protocols' names for our cameras: protocol -> {client's camera key: ours}, in the
  # order that protocol lists them (serving/roboarena.py reads 'roboarena').
  camera_aliases: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


_AGIBOT_KEYS = ('left_arm_joint_position', 'right_arm_joint_position', 'left_effector_position',
                'right_effector_position', 'head_position', 'waist_position')

EMBODIMENTS = {
    'droid': Embodiment(
        name='droid', id=0,
        cameras=('wrist_image_left', 'exterior_image_1_left', 'exterior_image_2_left'),
        canvas_layout='droid', control_hz=15, frame_stride=3, state_dim=8, action_dim=8,
        relative_action_dims=tuple(range(7)), prompt_template='droid',
        official_state_keys=('joint_position', 'gripper_position'),
        official_action_keys=('joint_position', 'gripper_position'), official_tag='oxe_droid',
        # RoboArena (the release's eval_utils clients) counts exterior cameras from 0; openpi, whose
        # names we use, from 1: the same name is another camera in each.
        camera_aliases={'roboarena': {'exterior_image_0_left': 'exterior_image_1_left',
                                      'exterior_image_1_left': 'exterior_image_2_left',
                                      'wrist_image_left': 'wrist_image_left'}}),
    # Sawyer in MuJoCo: state = hand xyz + gripper opening; actions (dx, dy, dz, grip) are used
    # as given (they are already deltas), so none is made relative.
    'metaworld': Embodiment(
        name='metaworld', id=1, cameras=('corner', 'corner2', 'behindGripper'),
        canvas_layout='grid', control_hz=80, frame_stride=1, state_dim=4, action_dim=4,
        relative_action_dims=(), prompt_template='metaworld'),
    # AgiBot G1 as the release trains it (scripts/data/convert_agibot.py, agibot_relative.yaml): state
    # = both 7-dof arms, both effectors, head (2), waist (2) = 20; action = the same 20 + base velocity
    # (2) = 22. The 20 position dims are relative to the anchor state, the velocity absolute.
    'agibot': Embodiment(
        name='agibot', id=2, cameras=('top_head', 'hand_left', 'hand_right'), canvas_layout='grid',
        control_hz=30, frame_stride=3, state_dim=20, action_dim=22,
        relative_action_dims=tuple(range(20)), prompt_template='agibot',
        official_state_keys=_AGIBOT_KEYS, official_action_keys=_AGIBOT_KEYS + ('robot_velocity',),
        official_tag='agibot'),
}


# The Embodiment fields a config's data section carries under the same names.
DATA_FIELDS = ('cameras', 'canvas_layout', 'control_hz', 'frame_stride', 'action_dim', 'state_dim',
               'relative_action_dims')


def data_config(name: str) -> dict:
  """data.embodiment and its layout (DATA_FIELDS) as config fields: configs start their data section
  from it, so each fact lives here once; a config may still set any of them differently."""
  e = get(name)
  return dict(embodiment=e.name, **{field: getattr(e, field) for field in DATA_FIELDS})


def get(name: str) -> Embodiment:
  if name not in EMBODIMENTS:
    raise ValueError(f'data.embodiment: unknown embodiment {name!r} (known: {", ".join(EMBODIMENTS)})')
  return EMBODIMENTS[name]


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
  """Embodiment id -> template text: the registry's, with data.prompt_template ('' = the registry's)
  overriding the config's own embodiment."""
  out = {e.id: template(e.prompt_template) for e in EMBODIMENTS.values()}
  if data_cfg.prompt_template:
    out[get(data_cfg.embodiment).id] = template(data_cfg.prompt_template)
  return out
