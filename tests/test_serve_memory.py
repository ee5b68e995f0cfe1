"""The 14B DROID control step's device memory (`serve --compile_only`) stays within 2% of the README's."""
import os

import pytest

from dreamzero_jax import settings
from dreamzero_jax.config import load_config
from dreamzero_jax.inference import serve_aot
from tests.helpers import ROOT


def readme_total_gib(quantization: str) -> float:
  """total GiB/device of the README's "Serving memory" row for model.quantization."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    section = f.read().split('## Serving memory', 1)[1].split('\n## ', 1)[0]
  row = next(line for line in section.splitlines() if line.startswith(f'| `{quantization}` |'))
  return float(row.strip().strip('|').split('|')[-1])


@pytest.mark.parametrize('quantization', ['fp8', 'none'])
def test_14b_droid_control_step_memory_stays_at_the_readme_figure(quantization):
  cfg = load_config(os.path.join(ROOT, 'configs/dreamzero_14b_droid.py'), [f'model.quantization={quantization}'])
  report = serve_aot.compile_only(settings.from_config(cfg))
  assert report['cfg_batch'] == 2 and report['cache_tokens'] == 7920
  assert report['total_gib'] <= 1.02 * readme_total_gib(quantization), report
  if quantization == 'fp8':
    assert report['total_gib'] <= 28.0, report  # fits a 32 GB card beside the CUDA context
