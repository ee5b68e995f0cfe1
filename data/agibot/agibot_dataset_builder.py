"""AgiBot World (LeRobot v2.x layout) into stacked episodes: head + both hand cameras, the release's
20 state dims (out of a 32-dim column, by meta/modality.json), 22-dim action, per-frame task
instructions: the LeRobot builder with AgiBot's embodiment file (embodiment_files/agibot.json)."""
from __future__ import annotations

from data.lerobot.lerobot_dataset_builder import Lerobot


class Agibot(Lerobot):
  """Converts the LeRobot directory `src`."""

  def __init__(self, *, src: str, **kwargs):
    super().__init__(src=src, embodiment='agibot', **kwargs)
