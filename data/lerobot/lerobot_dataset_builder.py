"""Any LeRobot dataset (v2.x, v3.0; GEAR metadata or not) as the embodiment its file describes
(dreamzero_jax/datasets/lerobot_reader.py); the dataset is named by the embodiment."""
from __future__ import annotations

from typing import Any, Iterator

from dreamzero_jax import embodiments
from dreamzero_jax.datasets import episodes, lerobot_reader


class Lerobot(episodes.EpisodeBuilder):
  """Converts the LeRobot directory `src` for `embodiment` (a built-in name or an embodiment file)."""

  def __new__(cls, *, embodiment: str = '', **kwargs):
    del kwargs
    if cls is Lerobot and embodiment:
      # TFDS names a dataset by its class: give each embodiment its own (unregistered) subclass.
      name = embodiments.get(embodiment).name
      cls = type(f'Lerobot_{name}', (Lerobot,), {'name': name}, skip_registration=True)
    return super().__new__(cls)

  def __init__(self, *, src: str, embodiment: str, **kwargs):
    self._reader = lerobot_reader.LeRobotEpisodes(src, embodiments.get(embodiment))
    super().__init__(**kwargs)

  def dataset_spec(self) -> episodes.DatasetSpec:
    return self._reader.dataset_spec()

  def episodes(self) -> Iterator[dict[str, Any]]:
    return iter(self._reader)
