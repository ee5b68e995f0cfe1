"""chex's assertions at the array boundaries, failing as one-line ValueErrors that name the field.

A layer checks the arrays it is handed (the latent batch into the objective, the policy's inputs,
the rollout functions' pytrees, the data pipeline's batches) with chex's static checks: shapes,
ranks, dtypes, tree structure. Inside a jitted function they run while it is traced, on the
abstract shapes, so they cost nothing per call. chex reports a failure as an AssertionError whose
message names no field; `check` re-raises it as ValueError('<field>: <what chex found>').
"""
from __future__ import annotations

import re
from typing import Any, Callable

# chex's boilerplate before what it found: '[Chex] Assertion assert_shape failed: Error in shape
# compatibility check: input 0 has shape (2, 1) but expected (2, 2).'
_PREFIXES = (r'\[Chex\] Assertion \w+ failed:\s*', r'Error in \w+ compatibility check:\s*', r'input 0 (?=has )')


def reason(error: AssertionError) -> str:
  """A chex assertion's message on one line, less its boilerplate (a tree-structure mismatch spans
  lines: each tree's structure on its own)."""
  text = ' '.join(str(error).split()) or type(error).__name__
  for prefix in _PREFIXES:
    text = re.sub('^' + prefix, '', text)
  return re.sub(r"<class '(?:numpy\.)?(\w+)'>", r'\1', text).rstrip('.')   # expected <class 'int'> -> int


def check(field: str, assertion: Callable[..., Any], *args, **kwargs) -> None:
  """Runs one chex assertion on `field`'s arrays; its failure is ValueError('{field}: {reason}')."""
  try:
    assertion(*args, **kwargs)
  except AssertionError as e:
    raise ValueError(f'{field}: {reason(e)}') from None
