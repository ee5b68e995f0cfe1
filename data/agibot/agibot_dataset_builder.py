"""AgiBot World (LeRobot v2.x layout) into stacked episodes: head + both hand cameras,
32-dim state, 22-dim action, per-frame task instructions."""
from __future__ import annotations

from typing import Any, Iterator

from dreamzero_jax.datasets import embodiments, episodes, lerobot_reader

STATE_KEY = 'observation.state'
ACTION_KEY = 'action'


class Agibot(episodes.EpisodeBuilder):
  """Converts the LeRobot directory `src`."""

  def __init__(self, *, src: str, **kwargs):
    cameras = {cam: f'observation.images.{cam}' for cam in embodiments.get('agibot').cameras}
    self._reader = lerobot_reader.LeRobotEpisodes(src, 'agibot', cameras, STATE_KEY, ACTION_KEY)
    super().__init__(**kwargs)

  def dataset_spec(self) -> episodes.DatasetSpec:
    return self._reader.dataset_spec()

  def episodes(self) -> Iterator[dict[str, Any]]:
    return iter(self._reader)
