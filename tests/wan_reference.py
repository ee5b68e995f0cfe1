"""The official Wan code as the parity tests' reference (dreamzero_jax.models.weights.wan_reference); a
test that needs it is skipped where wan22 is not installed."""
import pytest

from dreamzero_jax.models.weights import wan_reference


def import_wan(name: str):
  """wan_reference.import_wan, or a skip without wan22."""
  try:
    return wan_reference.import_wan(name)
  except wan_reference.WanNotInstalledError as e:
    pytest.skip(str(e))
