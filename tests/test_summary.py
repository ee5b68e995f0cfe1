"""The parameter summary: the Wan backbone count equals the reference implementation's count."""
import subprocess
import sys

import pytest
import torch

from dreamzero_jax import settings
from dreamzero_jax.config import load_config
from dreamzero_jax.summary import summarize


def _diffusers_count(**kw) -> int:
  from diffusers import WanTransformer3DModel
  with torch.device('meta'):
    ref = WanTransformer3DModel(**kw)
  return sum(p.numel() for p in ref.parameters())


def test_14b_cli_prints_the_wan21_i2v_14b_count():
  out = subprocess.run([sys.executable, '-m', 'dreamzero_jax.summary', '--config', 'configs/dreamzero_14b_droid.py'],
                       capture_output=True, text=True, timeout=120, check=True).stdout
  lines = out.strip().splitlines()
  assert 'wan_backbone_params=16394878784' in lines
  total = int(lines[-1].removeprefix('total_params='))
  dreamzero = int(next(l for l in lines if l.startswith('dreamzero_params=')).split('=')[1])
  assert total == 16394878784 + dreamzero
  assert 85e6 < dreamzero < 95e6  # docs/model.md: about 89M


@pytest.mark.parametrize('config,reference', [
    ('configs/dreamzero_14b_droid.py', dict(num_attention_heads=40, attention_head_dim=128, in_channels=36,
                                            out_channels=16, ffn_dim=13824, num_layers=40, image_dim=1280,
                                            added_kv_proj_dim=5120)),
    ('configs/dreamzero_5b_droid.py', dict(num_attention_heads=24, attention_head_dim=128, in_channels=48,
                                           out_channels=48, ffn_dim=14336, num_layers=30)),
])
def test_backbone_count_matches_diffusers(config, reference):
  assert summarize(settings.from_config(load_config(config)).model)['wan_backbone'] == _diffusers_count(**reference)


def test_unknown_override_is_a_one_line_error():
  res = subprocess.run([sys.executable, '-m', 'dreamzero_jax.summary', '--config', 'configs/tiny.py',
                        '--config.model.widht=3'], capture_output=True, text=True, timeout=120)
  assert res.returncode != 0
  assert res.stderr.strip() == 'error: unknown config key: model.widht'


def test_negative_layer_count_is_a_one_line_error():
  r = subprocess.run([sys.executable, '-m', 'dreamzero_jax.summary', '--config', 'configs/tiny.py',
                      '--config.model.num_layers=-1'], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == ['error: model.num_layers: -1 (must be positive)']
