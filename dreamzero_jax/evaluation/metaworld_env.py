"""Which Meta-World task instances an evaluation runs: ML45's seen and unseen tasks, and the
variations a built dataset's episodes ran in (replay). The simulator itself: envs/metaworld.py.
"""
from __future__ import annotations

import re

from dreamzero_jax.datasets import episodes
from dreamzero_jax.envs.metaworld import Variation, training_variation


def dataset_variations(data_dir: str, name: str = 'metaworld') -> list[Variation]:
  """The variations of a built Meta-World dataset's episodes, in dataset order (episode ids
  'task/index'; the build seed, and the variations per task of a repeated build, in the dataset's
  source line)."""
  stored = episodes.open_dataset(data_dir, name)
  seed = re.search(r'\bseed=(\d+)', stored.spec.source)
  if not stored.spec.source.startswith('metaworld') or seed is None:
    raise ValueError(f'--replay: {stored.path} is not a Meta-World dataset built here (source {stored.spec.source!r})')
  variations = re.search(r'\bvariations=(\d+)', stored.spec.source)
  out = []
  for eid in stored.lowdim.episode_id:
    task, _, index = (eid.decode() if isinstance(eid, bytes) else str(eid)).rpartition('/')
    out.append(training_variation(task, int(index), int(seed.group(1)), int(variations.group(1)) if variations else 0))
  return out


def ml45_split() -> tuple[list[str], list[str]]:
  """Meta-World's ML45 (train tasks = seen, test tasks = unseen)."""
  import metaworld.env_dict as env_dict  # pylint: disable=g-import-not-at-top
  return list(env_dict.ML45_V3['train']), list(env_dict.ML45_V3['test'])


def all_tasks() -> set[str]:
  """Every Meta-World v3 task name."""
  import metaworld.env_dict as env_dict  # pylint: disable=g-import-not-at-top
  return set(env_dict.ALL_V3_ENVIRONMENTS)
