"""The VAE trained here (training/vae_training.py): the loss falls, a rerun resumes, the normalisation fold
keeps decode(encode(x)) and whitens the latents, and `init.vae` loads the result into the frozen
encoders or is refused naming the field."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamzero_jax import checkpoint, embodiments, settings
from dreamzero_jax.config import load_config
from dreamzero_jax.datasets import episodes
from dreamzero_jax.models import encoders
from dreamzero_jax.models import vae as vae_lib
from dreamzero_jax.training import vae_training
from tests import helpers

STEPS = 4
# Canvases of 32x32 (16x16 views) in clips of 9 frames (1 chunk of 8), a few steps at a high rate.
OVERRIDES = ['data.name=vae_toy_episodes', 'video.height=32', 'video.width=32', 'video.max_chunks=1',
             f'vae_train.steps={STEPS}', 'vae_train.lr=1e-2', 'vae_train.warmup_steps=0', 'vae_train.log_every=1',
             'vae_train.checkpoint_every=2']


class VaeToyEpisodes(episodes.EpisodeBuilder):
  """Meta-World-shaped episodes with drawn frames (a square crossing each view): no simulator."""

  def dataset_spec(self) -> episodes.DatasetSpec:
    e = embodiments.get('metaworld')
    return episodes.DatasetSpec(embodiment=e.name, cameras=e.cameras, image_shapes={c: (16, 16) for c in e.cameras},
                                control_hz=e.control_hz, state_dim=e.state_dim, action_dim=e.action_dim,
                                num_alternatives=1)

  def episodes(self):
    rng = np.random.default_rng(0)
    for i in range(3):
      steps = 16 + 4 * i
      images = {}
      for v, cam in enumerate(embodiments.get('metaworld').cameras):
        frames = []
        for t in range(steps):
          image = np.full((16, 16, 3), 40 + 60 * v, np.uint8)
          y, x = (t + 3 * i) % 12, (2 * t + v) % 12
          image[y:y + 4, x:x + 4] = (200, 30 + 50 * i, 90)
          frames.append(episodes.encode_image(image, 'png'))
        images[cam] = frames
      yield dict(episode_id=f'toy/{i}'.encode(), images=images,
                 state=rng.uniform(-1, 1, (steps, 4)).astype(np.float32),
                 action=rng.uniform(-1, 1, (steps, 4)).astype(np.float32),
                 language=np.zeros((steps, 1), np.int32), instructions=['reach the goal'], has_action=True,
                 success=True)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('vae_toy'))
  episodes.build(VaeToyEpisodes(data_dir=out))
  return out


def _config(data_dir, *extra):
  return load_config(os.path.join(helpers.ROOT, 'configs/tiny.py'), [f'data.dir={data_dir}', *OVERRIDES, *extra])


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A run stopped at step 2, then resumed to STEPS: (config, workdir, result)."""
  cfg = _config(data_dir)
  workdir = str(tmp_path_factory.mktemp('vae_run'))
  assert vae_training.train_vae(cfg, workdir, steps=2)['steps'] == 2
  # As if the run had logged step 3 and died before saving it: the resumed run logs step 3 again.
  with open(os.path.join(workdir, vae_training.METRICS_FILE), 'a') as f:
    f.write(json.dumps({'step': 3, 'loss': -1.0}) + '\n')
  return cfg, workdir, vae_training.train_vae(cfg, workdir)


def _metrics(workdir):
  with open(os.path.join(workdir, vae_training.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_training_raises_the_psnr_and_resumes_at_the_saved_step(trained, capsys):
  cfg, workdir, result = trained
  records = _metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))   # 1-2, then 3-4 resumed
  assert all(r['loss'] > 0 for r in records)
  state = np.load(os.path.join(workdir, vae_training.STATE_FILE), allow_pickle=False)
  assert int(state['step']) == STEPS
  meta = checkpoint.read_weights_meta(result['path'])
  assert result['steps'] == meta['steps'] == STEPS
  assert meta['heldout_episodes'] == ['toy/2'] and meta['config']['vae'] == json.loads(json.dumps(cfg.vae.to_dict()))
  initial = nnx.state(vae_lib.WanVAE(cfg.vae, rngs=nnx.Rngs(cfg.seed + 1))).to_pure_dict()
  assert result['psnr_db'] > vae_training.heldout_psnr(cfg, initial) + 1.0
  # Already trained that far: the CLI answers from workdir/vae without training.
  assert vae_training.main(['--config', 'configs/tiny.py', '--workdir', workdir,
                            *[f'--config.{o}' for o in [f'data.dir={cfg.data.dir}', *OVERRIDES]]]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out == dict(vae_psnr_db=round(result['psnr_db'], 2), mean_frame_psnr_db=round(result['mean_frame_psnr_db'], 2),
                     path=result['path'], steps=STEPS)


def test_folded_vae_gives_unit_latents_on_the_training_frames(trained):
  cfg, _, result = trained
  frames = vae_training.episode_frames(cfg)
  graphdef, params = nnx.split(vae_lib.WanVAE(cfg.vae, rngs=nnx.Rngs(0)))
  params = checkpoint.load_weights(result['path'], params.to_pure_dict())
  clips = vae_training.tiled_clips(frames.train, vae_training.clip_frames(cfg), frames.stride)
  latents = np.concatenate([np.asarray(vae_training.encode(graphdef, params, vae_training.canvas.to_float(c)[None]))
                            .reshape(-1, 16) for c in clips])
  np.testing.assert_allclose(latents.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(latents.std(0), 1.0, atol=1e-4)
  assert vae_training.heldout_psnr(cfg, params, frames) == pytest.approx(result['psnr_db'], abs=1e-4)


def test_fold_keeps_decode_of_encode_and_whitens_the_latents():
  cfg = load_config(os.path.join(helpers.ROOT, 'configs/tiny.py')).vae
  model = helpers.random_model(lambda: vae_lib.WanVAE(cfg, rngs=nnx.Rngs(0)), scale=0.2)
  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  rng = np.random.default_rng(0)
  clips = [rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8) for _ in range(3)]   # the trainer's shape
  encode = lambda p, video: vae_training.encode(graphdef, p, video)
  decode = lambda p, latents: vae_training.decode(graphdef, p, latents)
  mean, std = vae_training.latent_moments(graphdef, params, clips, cfg.kind)
  folded = vae_training.fold_normalisation(params, cfg.kind, mean, std)
  video = vae_training.canvas.to_float(clips[0])[None]
  np.testing.assert_allclose(decode(folded, encode(folded, video)), decode(params, encode(params, video)), atol=2e-5)
  latents = np.concatenate([np.asarray(encode(folded, vae_training.canvas.to_float(c)[None])).reshape(-1, 16)
                            for c in clips])
  np.testing.assert_allclose(latents.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(latents.std(0), 1.0, atol=1e-4)
  # The training path (posterior, one pass) agrees with the folded encode's normalisation.
  mu, _ = nnx.merge(graphdef, folded).posterior(jnp.asarray(video))
  mean_k, std_k = vae_lib.latent_statistics(cfg.kind)
  np.testing.assert_allclose((mu - mean_k) / std_k, encode(folded, video), atol=1e-4)


def _encode_with(vae, video):
  """`vae`'s encode through the jitted function the trainer compiled (same graph and shape)."""
  graphdef, state = nnx.split(vae)
  return vae_training.encode(graphdef, state.to_pure_dict(), video)


def test_init_vae_replaces_the_frozen_vae(trained):
  cfg, _, result = trained
  video = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 9, 32, 32, 3)), jnp.float32)
  random_latents = _encode_with(encoders.build_frozen_encoders(settings.from_config(cfg)).vae, video)
  cfg = _config(cfg.data.dir, f'init.vae={result["path"]}')
  loaded = _encode_with(encoders.build_frozen_encoders(settings.from_config(cfg)).vae, video)
  graphdef, params = nnx.split(vae_lib.WanVAE(cfg.vae, rngs=nnx.Rngs(0)))
  params = checkpoint.load_weights(result['path'], params.to_pure_dict())   # the trained module's weights
  np.testing.assert_array_equal(loaded, vae_training.encode(graphdef, params, video))
  assert float(jnp.abs(loaded - random_latents).max()) > 0.1


def test_init_vae_of_another_config_or_non_finite_is_refused(trained, tmp_path):
  cfg, _, result = trained
  other = _config(cfg.data.dir, 'vae.base_dim=16', f'init.vae={result["path"]}')
  with pytest.raises(ValueError) as e:
    encoders.build_frozen_encoders(settings.from_config(other))
  assert str(e.value).startswith('init.vae: ') and 'vae.base_dim: 8 (checkpoint) vs 16 (config)' in str(e.value)
  assert '\n' not in str(e.value)
  # Nor does the trainer continue (or answer with) a run of another vae config.
  with pytest.raises(ValueError, match=r'holds a VAE trained for another vae config: vae\.base_dim: 8'):
    vae_training.train_vae(other, os.path.dirname(result['path']))
  # A NaN written around save_arrays (which refuses it) is refused when read.
  bad = str(tmp_path / 'bad')
  os.makedirs(bad)
  with np.load(os.path.join(result['path'], checkpoint.WEIGHTS_FILE), allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  arrays['decoder/conv_out/bias'] = np.full_like(arrays['decoder/conv_out/bias'], np.nan)
  np.savez(os.path.join(bad, checkpoint.WEIGHTS_FILE), **arrays)
  with open(os.path.join(bad, checkpoint.META_FILE), 'w') as f:
    json.dump(checkpoint.read_weights_meta(result['path']), f)
  cfg_bad = _config(cfg.data.dir, f'init.vae={bad}')
  with pytest.raises(ValueError, match=r'^init\.vae: .*decoder/conv_out/bias: non-finite'):
    encoders.build_frozen_encoders(settings.from_config(cfg_bad))
  with pytest.raises(ValueError, match='not saved, non-finite values in decoder/conv_out/bias'):
    checkpoint.save_arrays(str(tmp_path / 'x.npz'), {'decoder': {'conv_out': {'bias': arrays['decoder/conv_out/bias']}}})
  assert not os.path.exists(tmp_path / 'x.npz')


def test_init_vae_other_weights_than_the_recorded_digest_are_refused(trained):
  cfg, _, result = trained
  digest = checkpoint.weights_digest(result['path'])
  assert len(digest) == 64
  same = _config(cfg.data.dir, f'init.vae={result["path"]}', f'init.vae_sha256={digest}')
  encoders.build_frozen_encoders(settings.from_config(same))
  other = _config(cfg.data.dir, f'init.vae={result["path"]}', 'init.vae_sha256=' + 'ab' * 32)
  with pytest.raises(ValueError, match=r'^init\.vae: .* holds other weights \(sha256 [0-9a-f]{12}\.\.\.\) than the '
                                       r'model was trained with \(init\.vae_sha256 abababababab\.\.\.\)$'):
    encoders.build_frozen_encoders(settings.from_config(other))


def test_short_training_clips_on_given_frames_keep_the_heldout_clip(tmp_path):
  """vae_train.clip_frames trains on shorter clips (frames handed in, no dataset) while the held-out
  PSNR stays in the DiT's clips; a length that is not 1 + 4k is refused naming the field."""
  from dreamzero_jax.config import ConfigError
  with pytest.raises(ConfigError, match=r'^vae_train\.clip_frames: 6 '):
    _config('', 'vae_train.clip_frames=6')
  cfg = _config('', 'vae_train.clip_frames=5')
  assert (vae_training.train_clip_frames(cfg), vae_training.clip_frames(cfg)) == (5, 9)
  assert vae_training.train_clip_frames(_config('')) == 9
  rng = np.random.default_rng(0)
  frames = vae_training.EpisodeFrames(train=[rng.integers(0, 255, (n, 32, 32, 3), np.uint8) for n in (7, 8)],
                                      heldout=[rng.integers(0, 255, (9, 32, 32, 3), np.uint8)],
                                      heldout_ids=['toy/held'], stride=1)
  # Training clips of 5 frames fit the 7- and 8-frame episodes; a 9-frame training clip would not.
  result = vae_training.train_vae(cfg, str(tmp_path / 'short'), steps=2, frames=frames)
  assert result['steps'] == 2 and np.isfinite(result['psnr_db'])
  with pytest.raises(episodes.DataError, match='no training episode has 9 frames'):
    vae_training.train_vae(_config(''), str(tmp_path / 'full'), steps=2, frames=frames)


def test_a_vae_of_other_compression_than_the_video_config_is_refused():
  cfg = _config('', 'vae.dim_mult=(1, 2, 2)', 'vae.temporal_downsample=(True, True)')
  with pytest.raises(ValueError, match=r'^video\.vae_spatial=8: .* compresses 4x'):
    nnx.eval_shape(lambda: encoders.FrozenEncoders(settings.from_config(cfg), rngs=nnx.Rngs(0)))
  nnx.eval_shape(lambda: encoders.FrozenEncoders(settings.from_config(load_config(
      os.path.join(helpers.ROOT, 'configs/tiny.py'),
      [*OVERRIDES, 'vae.dim_mult=(1, 2, 2)', 'vae.temporal_downsample=(True, True)', 'video.vae_spatial=4'])),
      rngs=nnx.Rngs(0)))
