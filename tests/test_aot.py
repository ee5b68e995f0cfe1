"""Ahead-of-time compile of the sharded train step for a TPU slice, on a machine without a TPU.

Needs libtpu (`pip install -e ".[tpu]"`): it provides the compile-only TPU devices and compiler.
"""
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dreamzero_jax import sharding
from dreamzero_jax.config import load_config
from dreamzero_jax.training import train_aot, trainer

try:
  import libtpu  # noqa: F401
  HAVE_LIBTPU = True
except ImportError:
  HAVE_LIBTPU = False

needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason='libtpu is not installed (pip install -e ".[tpu]"): '
                                'compiling for a TPU topology needs its compiler')

TOPOLOGY = 'v5p:2x2x1'   # 4 chips
MESH = (1, 2, 1, 2)      # data, fsdp, context, tensor
# A 2-layer model wide enough that TPU tile padding is negligible next to the sharded arrays.
OVERRIDES = ['model.dim=512', 'model.num_heads=4', 'model.ffn_dim=1024', 'model.embodiment_hidden=256',
             'model.text_dim=256', 'model.image_dim=256', f'mesh.shape={MESH}', 'train.batch_size=4']


def _per_device_bytes(tree, specs, sizes) -> int:
  """Bytes one device holds of `tree` under `specs`: each array divided by its shard count."""
  shards = lambda s: math.prod(sizes[a] for e in s for a in ((e,) if isinstance(e, str) else e or ()))
  leaves = jax.tree.leaves(jax.tree.map(lambda x, s: x.size * x.dtype.itemsize / shards(s), tree, specs,
                                        is_leaf=lambda x: isinstance(x, PartitionSpec)))
  return int(sum(leaves))


@needs_libtpu
def test_compile_only_reports_sharded_memory_for_a_tpu_slice():
  cfg = load_config('configs/tiny.py', OVERRIDES)
  report = train_aot.compile_only(cfg, TOPOLOGY)

  assert report['devices'] == 4 and report['device_kind'].startswith('TPU')
  assert report['mesh'] == dict(data=1, fsdp=2, context=1, tensor=2)
  for key in ('argument_gib', 'temp_gib', 'output_gib'):
    assert report[key] > 0, report
  assert report['total_gib'] == pytest.approx(
      report['argument_gib'] + report['temp_gib'] + report['output_gib'] - report['alias_gib'], abs=2e-3)
  assert report['alias_gib'] > 0.9 * report['output_gib']   # the donated state is updated in place
  assert report['attention'] == ['xla']   # tiny's 324-token sequence is no splash block multiple
  assert 'encoders not included' in report['scope']

  # The arguments are the state and batch as sharded over the mesh, not replicated copies.
  _, state = trainer.abstract_train_state(cfg)
  sizes = dict(zip(cfg.mesh.axes, MESH))
  batch = train_aot.abstract_batch(cfg, cfg.train.batch_size)
  rules = sharding.config_rules(cfg)
  state_specs = sharding.train_state_specs(state, trainer.abstract_model(cfg), trainer.make_optimizer(cfg.train),
                                           rules, sizes)
  want = (_per_device_bytes(state, state_specs, sizes) +
          _per_device_bytes(batch, sharding.batch_specs(batch, rules, sizes), sizes))
  assert report['argument_gib'] * train_aot.GIB == pytest.approx(want, rel=0.1), (report, want / train_aot.GIB)


def test_sequence_length_of_droid_14b():
  """K=4 chunks on the 352x640 canvas: 2 x 9 x 880 video + 96 action + 4 state tokens (docs/model.md)."""
  cfg = load_config('configs/dreamzero_14b_droid.py')
  assert train_aot.sequence_length(cfg) == (15_940, 16_000)
  batch = train_aot.abstract_batch(cfg, 128)
  assert batch.latents.shape == (128, 9, 44, 80, 16) and batch.i2v_cond.shape == (128, 9, 44, 80, 20)
  assert np.dtype(batch.embodiment_id.dtype) == np.int32


@pytest.mark.slow  # 29 s; the TPU compile path is also run by the sharded-memory test
@needs_libtpu
def test_compile_for_tpu_uses_splash_attention_on_a_cpu_host():
  # The registry takes the platform from the mesh's devices (TPU here), not the CPU backend:
  # self-attention (128-multiple lengths and head_dim) compiles to the splash kernel inside
  # shard_map; the 8-token text cross-attention falls back to XLA.
  cfg = load_config('configs/tiny.py', OVERRIDES + ['model.seq_pad_multiple=128'])
  assert cfg.model.attention == 'auto'
  report = train_aot.compile_only(cfg, TOPOLOGY)
  assert report['attention'] == ['splash', 'xla'], report
