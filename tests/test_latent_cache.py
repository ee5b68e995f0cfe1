"""data.latent_cache: every distinct clip encoded once, and training on it equals encoding on the fly."""
import os

import jax
import numpy as np
import pytest

pytest.importorskip('metaworld')

from dreamzero_jax import config as config_lib  # noqa: E402
from dreamzero_jax import settings
from dreamzero_jax.datasets import pipeline  # noqa: E402
from dreamzero_jax.datasets.episodes import DataError  # noqa: E402
from dreamzero_jax.models import encoders  # noqa: E402
from dreamzero_jax.training import latent_cache, loop, objective  # noqa: E402
from tests.helpers import build_metaworld  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHED = ['data.latent_cache=True', 'data.anchor_stride=8', 'data.augment_brightness=0.0',
          'data.augment_contrast=0.0']


@pytest.fixture(scope='module')
def mw_dir(tmp_path_factory):
  return build_metaworld(str(tmp_path_factory.mktemp('mw')), image_size=32)


def _config(data_dir, *extra):
  return config_lib.load_config(os.path.join(REPO, 'configs/tiny.py'), [f'data.dir={data_dir}', *CACHED, *extra])


def test_anchor_stride_anchors_clips_on_the_replanning_grid(mw_dir):
  member = pipeline.open_member(settings.from_config(_config(mw_dir)), 'metaworld', 1.0, train=True)
  every = pipeline.open_member(settings.from_config(_config(mw_dir, 'data.anchor_stride=1')), 'metaworld', 1.0,
                               train=True)
  assert (member.index[:, 1] % 8 == 0).all()
  assert len(pipeline.distinct_clips(member.index)[0]) < len(pipeline.distinct_clips(every.index)[0])


def test_cached_batch_gives_the_same_loss_as_encoding_on_the_fly(mw_dir, tmp_path):
  cfg = _config(mw_dir)
  frozen = encoders.build_frozen_encoders(settings.from_config(cfg))
  encode = encoders.BatchEncoder(frozen, settings.from_config(cfg))
  cache = latent_cache.build_or_load(cfg, str(tmp_path), encode, frozen)
  assert cache.valid.all() and len(cache.valid) == sum(len(r) for r, _ in cache.member_rows)
  direct = next(iter(pipeline.make_dataset(settings.from_config(cfg), train=False, process_index=0, process_count=1)))
  cached = next(iter(pipeline.make_dataset(settings.from_config(cfg), train=False, process_index=0, process_count=1,
                                           latent_rows=cache.member_rows)))
  assert 'video' not in cached and cached['latent_row'].shape == (2,)
  for k in ('actions', 'state', 'action_mask', 'chunk_mask'):
    np.testing.assert_array_equal(direct[k], cached[k])
  on_the_fly = encode(direct)
  encode.cache = cache
  from_cache = encode(cached)
  np.testing.assert_allclose(from_cache.latents, on_the_fly.latents, rtol=0, atol=1e-6)
  np.testing.assert_allclose(from_cache.i2v_cond, on_the_fly.i2v_cond, rtol=0, atol=1e-6)
  np.testing.assert_allclose(from_cache.image, on_the_fly.image, rtol=0, atol=1e-6)
  model = encoders.initial_dit(settings.from_config(cfg))
  rng = jax.random.key(3)
  want, _ = objective.flow_matching_loss(model, on_the_fly, rng, cfg.train)
  got, _ = objective.flow_matching_loss(model, from_cache, rng, cfg.train)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  # Built once: a second call reads the same directory; other encoder weights build another.
  assert latent_cache.build_or_load(cfg, str(tmp_path), encode, frozen).path == cache.path
  other_cfg = _config(mw_dir, 'seed=7')
  other = encoders.build_frozen_encoders(settings.from_config(other_cfg))
  members = [pipeline.open_member(settings.from_config(other_cfg), 'metaworld', 1.0, train=False)]
  distinct = [pipeline.distinct_clips(m.index)[0] for m in members]
  assert latent_cache.fingerprint(other_cfg, other, members, distinct) != os.path.basename(cache.path)


@pytest.mark.slow   # ~36 s; training on the cache runs in CI through test_experiments and test_quickstart
def test_training_on_the_cache_runs_and_resumes(mw_dir, tmp_path, capsys):
  cfg = _config(mw_dir, 'train.steps=3', 'train.checkpoint_every=2')
  assert loop.train(cfg, str(tmp_path), stop_at=2) == 0
  assert 'latent cache:' in capsys.readouterr().out
  built = os.listdir(tmp_path / 'latent_cache')
  assert loop.train(cfg, str(tmp_path)) == 0
  assert os.listdir(tmp_path / 'latent_cache') == built
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert lines and 'video_loss' in lines[-1]


def test_augmentation_with_the_cache_is_a_one_line_error(mw_dir, tmp_path):
  cfg = _config(mw_dir, 'data.augment_brightness=0.1')
  with pytest.raises(DataError, match='data.augment_brightness'):
    latent_cache.check_config(cfg)
