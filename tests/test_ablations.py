"""configs/ablations/*.py: each is its baseline plus exactly its declared CHANGES, and loads."""
import glob
import importlib.util
import os

import pytest

from dreamzero_jax import config as config_lib
from dreamzero_jax import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs/ablations/*.py'))
                   if not p.endswith('__init__.py'))


def _flat(node, prefix=''):
  out = {}
  for k, v in node.items():
    key = f'{prefix}{k}'
    out.update(_flat(v, key + '.') if hasattr(v, 'items') else {key: v})
  return out


def _module(path):
  spec = importlib.util.spec_from_file_location('ablation_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_ablations():
  assert len(ABLATIONS) >= 8


@pytest.mark.parametrize('path', ABLATIONS, ids=lambda p: os.path.basename(p)[:-3])
def test_ablation_is_its_baseline_plus_its_changes(path):
  got = _flat(config_lib.load_config(path))
  module = _module(path)
  base = _flat(config_lib.load_config(os.path.join(ROOT, 'configs', module.BASELINE + '.py')))
  assert module.CHANGES, 'an ablation must change something'
  differing = {k for k in got if got[k] != base[k]}
  assert differing == set(module.CHANGES), differing ^ set(module.CHANGES)
  assert set(got) == set(base)


@pytest.mark.parametrize('path', ABLATIONS, ids=lambda p: os.path.basename(p)[:-3])
def test_ablation_runs_through_the_command_line(path, capsys):
  # Overrides apply on top of an ablation, and the model it describes builds (abstractly).
  cfg = config_lib.load_config(path, ['train.steps=7'])
  assert cfg.train.steps == 7
  summary.main(['--config', path])
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith('total_params=')
