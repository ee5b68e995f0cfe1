"""The robots we know: each embodiment's id (its row in the model's per-embodiment tables) and
the data layout its datasets use by default.

Ids are fixed forever so that adding an embodiment never renumbers a trained table.
"""
from __future__ import annotations

import dataclasses


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
  relative_action_dims: int    # leading action dims taken relative to the chunk's anchor state


EMBODIMENTS = {
    'droid': Embodiment(
        name='droid', id=0,
        cameras=('wrist_image_left', 'exterior_image_1_left', 'exterior_image_2_left'),
        canvas_layout='droid', control_hz=15, frame_stride=3, state_dim=8, action_dim=8,
        relative_action_dims=7),
    # Sawyer in MuJoCo: state = hand xyz + gripper opening; actions (dx, dy, dz, grip) are used
    # as given (they are already deltas), so none is made relative.
    'metaworld': Embodiment(
        name='metaworld', id=1, cameras=('corner', 'corner2', 'behindGripper'),
        canvas_layout='grid', control_hz=80, frame_stride=1, state_dim=4, action_dim=4,
        relative_action_dims=0),
    # AgiBot G1: two 7-dof arms, grippers, head, waist and base in the state (32); 22 actions.
    'agibot': Embodiment(
        name='agibot', id=2, cameras=('head', 'hand_left', 'hand_right'), canvas_layout='grid',
        control_hz=30, frame_stride=3, state_dim=32, action_dim=22, relative_action_dims=0),
}


def get(name: str) -> Embodiment:
  if name not in EMBODIMENTS:
    raise ValueError(f'data.embodiment: unknown embodiment {name!r} (known: {", ".join(EMBODIMENTS)})')
  return EMBODIMENTS[name]
