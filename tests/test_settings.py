"""The typed config slices (dreamzero_jax/settings.py): every key of a config lands in one field."""
import dataclasses
import glob
import os

import pytest

from dreamzero_jax import config as config_lib
from dreamzero_jax import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree: dict, prefix=''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def test_every_key_of_the_base_config_lands_in_a_field_and_comes_back_exactly():
  cfg = config_lib.get_base_config()
  s = settings.from_config(cfg)
  assert settings.as_dict(s) == cfg.to_dict()
  fields = set(_leaves(settings.as_dict(s)))
  assert fields == set(_leaves(cfg.to_dict()))
  assert s.data.cameras == tuple(cfg.data.cameras) and s.mesh.rules == tuple(cfg.mesh.rules)
  hash(s)   # every slice is hashable (a jit static argument)
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.model.dim = 1


@pytest.mark.parametrize('path', sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'), recursive=True)
                                        if os.path.basename(p) not in ('__init__.py', 'base.py', 'dreamzero_14b_finetune.py')))
def test_every_config_file_converts_exactly(path):
  cfg = config_lib.load_config(path)
  assert settings.as_dict(settings.from_config(cfg)) == cfg.to_dict()


def test_unknown_missing_and_mistyped_keys_are_errors_naming_the_key():
  cfg = config_lib.get_base_config()
  cfg.model.bogus = 1
  with pytest.raises(ValueError, match=r'^model\.bogus: not a field of ModelSettings'):
    settings.from_config(cfg)
  cfg = config_lib.get_base_config().to_dict()
  del cfg['sampler']['cfg_scale']
  with pytest.raises(ValueError, match=r'^sampler\.cfg_scale: missing'):
    settings.from_config(cfg)
  cfg = config_lib.get_base_config().to_dict()
  cfg['video']['height'] = '352'
  with pytest.raises(ValueError, match=r'^video\.height: expected int, got str'):
    settings.from_config(cfg)
  cfg = config_lib.get_base_config().to_dict()
  del cfg['serve']
  with pytest.raises(ValueError, match=r'^serve: missing'):
    settings.from_config(cfg)


def test_json_lists_become_tuples_and_ints_floats():
  cfg = config_lib.get_base_config().to_dict()
  cfg['data']['cameras'] = list(cfg['data']['cameras'])
  cfg['mesh']['rules'] = [list(r) if isinstance(r[1], str) or r[1] is None else [r[0], list(r[1])]
                          for r in cfg['mesh']['rules']]
  cfg['train']['lr'] = 1
  s = settings.from_config(cfg)
  assert s.data.cameras == config_lib.get_base_config().data.cameras
  assert s.mesh.rules == config_lib.get_base_config().mesh.rules
  assert s.train.lr == 1.0 and isinstance(s.train.lr, float)
