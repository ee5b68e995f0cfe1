"""Any RLDS dataset, converted by a field-mapping spec (dreamzero_jax/datasets/rlds_reader.py)."""
from __future__ import annotations

from typing import Any, Iterator

from dreamzero_jax.datasets import episodes, rlds_reader


class Rlds(episodes.EpisodeBuilder):
  """Converts the RLDS directory `src`; the dataset is named by the spec's "name"."""

  def __new__(cls, *, spec_path: str = '', **kwargs):
    del kwargs
    if cls is Rlds and spec_path:
      # TFDS names a dataset by its class: give each spec its own (unregistered) subclass.
      name = rlds_reader.load_spec(spec_path)['name']
      cls = type(f'Rlds_{name}', (Rlds,), {'name': name}, skip_registration=True)
    return super().__new__(cls)

  def __init__(self, *, src: str, spec_path: str = '', spec: dict[str, Any] | None = None,
               on_corrupt: str = 'fail', **kwargs):
    spec = spec or rlds_reader.load_spec(spec_path)
    self._reader = rlds_reader.RldsEpisodes(src, spec, on_corrupt)
    super().__init__(**kwargs)

  def dataset_spec(self) -> episodes.DatasetSpec:
    return self._reader.dataset_spec()

  def episodes(self) -> Iterator[dict[str, Any]]:
    return iter(self._reader)
