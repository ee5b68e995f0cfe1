"""Which Meta-World task instances an evaluation runs: ML45's seen and unseen tasks (or the ones
named), and the variations a built dataset's episodes ran in (replay). The simulator itself: envs/metaworld.py.
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


def spread(variations: list, n: int) -> list:
  """n of the dataset's episodes, round-robin over its tasks (each task's first episodes first)."""
  by_task = {}
  for v in variations:
    by_task.setdefault(v.task, []).append(v)
  order = [eps[i] for i in range(max(map(len, by_task.values()), default=0)) for eps in by_task.values() if i < len(eps)]
  return order[:n]


def seen_and_unseen(tasks: str | None, unseen_tasks: str | None) -> tuple[list[str], list[str]]:
  """(seen, unseen) Meta-World tasks from comma lists (None: ML45's train / test tasks); an unknown
  name is refused (ValueError naming the flag) before any model is loaded."""
  seen, unseen = ml45_split()
  seen = seen if tasks is None else [t for t in tasks.split(',') if t]
  unseen = unseen if unseen_tasks is None else [t for t in unseen_tasks.split(',') if t]
  known = all_tasks()
  for flag, names in (('--tasks', seen), ('--unseen_tasks', unseen)):
    unknown = [t for t in names if t not in known]
    if unknown:
      raise ValueError(f'{flag}: unknown Meta-World task {", ".join(unknown)} (e.g. {", ".join(sorted(known)[:3])})')
  return seen, unseen
