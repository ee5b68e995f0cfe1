"""The paper's ablations as configs: each file is a baseline config plus the few fields it changes.

Every ablation module names its BASELINE config file and its CHANGES ({dotted key: value}); its
get_config() is the baseline with exactly those changes (tests/test_ablations.py holds them to it).
"""
from __future__ import annotations

import importlib

import ml_collections


def derive(baseline: str, changes: dict, arg=None) -> ml_collections.ConfigDict:
  """configs/<baseline>.py's config with `changes` applied; every changed key must already exist."""
  config = importlib.import_module(f'configs.{baseline}').get_config(arg)
  for key, value in changes.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(f'ablation changes unknown config key {key}')
    node[leaf] = value
  return config
