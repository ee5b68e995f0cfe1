"""The served policy as the release serves it (README, "Fidelity to the official release"): integer
sampler timesteps, a whole guided chunk against the official Wan scheduler, the per-call VAE encode
against the official Wan VAE, dynamic skipping on the guided video velocities, the same starting
noise every chunk, and actions returned unsmoothed with the gripper unthresholded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dreamzero_jax import embodiments
from dreamzero_jax import settings
from dreamzero_jax.config import load_config
from dreamzero_jax.datasets import normalization
from dreamzero_jax.inference import postprocess, rollout, samplers
from dreamzero_jax.models import kv_cache
from tests.helpers import random_dit
from tests.wan_reference import import_wan

N = 1000
DROID = 'configs/dreamzero_14b_droid.py'


def _droid_sampler():
  return load_config(DROID).sampler


def _wan_scheduler(num_steps=16, shift=5.0):
  """The official flow UniPC scheduler as the release's policy sets it up."""
  ref = import_wan('utils.fm_solvers_unipc').FlowUniPCMultistepScheduler(
      num_train_timesteps=N, shift=1, use_dynamic_shifting=False)
  ref.set_timesteps(num_steps, device='cpu', shift=shift)
  return ref


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _reference_loop(velocity, x, mask, scale, timesteps_of):
  """The release's loop (wan_flow_matching_action_tf.py): one official scheduler each for video and
  actions, the DiT on the mask's steps at timesteps_of(scheduler, i), CFG on the video, the
  conditional action velocity, the last velocities reused on skipped steps."""
  video_ref, action_ref = _wan_scheduler(), _wan_scheduler()
  video, action = (torch.tensor(np.asarray(x[k])) for k in ('video', 'action'))
  for i, t in enumerate(video_ref.timesteps):
    if mask[i] == '1':
      cond_video, uncond_video, cond_action = velocity(video, action, timesteps_of(video_ref, i))
      v_video = uncond_video + scale * (cond_video - uncond_video)
      v_action = cond_action
    video = video_ref.step(v_video, t, video, return_dict=False)[0]
    action = action_ref.step(v_action, t, action, return_dict=False)[0]
  return video.numpy(), action.numpy()


def _integer(ref, i):
  return float(ref.timesteps[i])


def _float(ref, i):
  return float(ref.sigmas[i]) * N


def test_sampler_feeds_the_dit_the_release_integer_timesteps():
  ref = _wan_scheduler()
  float_cfg = _droid_sampler()
  float_cfg.integer_timesteps = False

  def timesteps(cfg):   # what sampler.timestep(state) reads at each step
    return [float(t) for t in samplers.make_sampler(cfg, N).timesteps]

  got = timesteps(_droid_sampler())
  assert got == [float(t) for t in ref.timesteps]   # 999, 986, ... exactly
  floats = timesteps(float_cfg)
  assert floats[0] == pytest.approx(999.8, abs=1e-3) and max(np.abs(np.subtract(floats, got))) < 1


def test_guided_chunk_with_timestep_dependent_velocities_matches_official_scheduler():
  """A field that reads its timestep (cond 2x + t/N, uncond x, actions -x + t/N) under the DROID
  sampler: equal to the official scheduler's loop at its integer timesteps, not at the float ones."""
  cfg = _droid_sampler()
  rng = np.random.RandomState(0)
  x = {'video': jnp.asarray(rng.randn(2, 3, 4), jnp.float32), 'action': jnp.asarray(rng.randn(2, 4, 2), jnp.float32)}

  def field(x, timestep, with_uncond):
    assert with_uncond
    return {'video': 2 * x['video'] + timestep / N, 'action': -x['action'] + timestep / N}, x['video']

  out, info = samplers.sample(field, x, cfg, N)
  assert int(info.num_evaluations) == cfg.dit_step_mask.count('1') == 8
  torch_field = lambda v, a, t: (2 * v + t / N, v, -a + t / N)
  for timesteps_of, agrees in ((_integer, True), (_float, False)):
    video, action = _reference_loop(torch_field, x, cfg.dit_step_mask, cfg.cfg_scale, timesteps_of)
    errors = _rel(out['video'], video), _rel(out['action'], action)
    assert (max(errors) < 1e-5) == agrees, (timesteps_of.__name__, errors)


def _chunk_setup():
  """The tiny DiT with the DROID config's sampler, and an episode whose cache holds frame 0."""
  cfg = load_config('configs/tiny.py', ['video.height=32', 'video.width=32', 'video.max_chunks=2'])
  droid = _droid_sampler()
  assert set(droid) == set(cfg.sampler)
  cfg.sampler.update({k: v for k, v in droid.items() if k != 'negative_prompt'})
  assert cfg.train.num_train_timesteps == load_config(DROID).train.num_train_timesteps
  spec = rollout.RolloutSpec.from_config(settings.from_config(cfg))
  assert spec.batch == 2   # CFG: the prompt and the negative prompt in one forward
  m = cfg.model
  model = random_dit(cfg)
  arr = lambda *s: jnp.asarray(np.random.default_rng(sum(s)).standard_normal(s), jnp.float32)
  h, w = spec.latent_hw
  i2v = arr(1, spec.num_frames // 4 + 1, h, w, 20)

  @jax.jit
  def start(text, image, frame0):
    cross_kv = model.cross_kv(*model.embed_context(text, image))
    cache = kv_cache.empty_cache(m.num_layers, 2, spec.capacity, m.num_heads, m.dim // m.num_heads)
    dup = lambda a: jnp.broadcast_to(a, (2, *a.shape[1:]))
    return model.write_clean_frames(dup(frame0), cache, cross_kv, i2v_cond=dup(i2v[:, :1])), cross_kv

  cache, cross_kv = start(arr(2, m.text_len, m.text_dim), arr(2, m.image_tokens, m.image_dim), arr(1, 1, h, w, 16))
  return spec, model, cache, cross_kv, i2v, arr(1, 1, m.state_dim)


def test_full_droid_chunk_equals_the_release_pipeline():
  """Acceptance: one 16-step chunk (UniPC, 8 DiT calls, CFG 5, integer timesteps, the release's
  noise) through rollout.denoise equals the release's loop over the official Wan scheduler driving
  the same DiT, to < 1e-4 relative in fp32."""
  spec, model, cache, cross_kv, i2v, state_vec = _chunk_setup()
  emb, chunk = jnp.int32(1), jnp.int32(0)
  network = nnx.split(model)
  video, actions, evaluations = rollout.denoise(spec, network, cache, cross_kv, i2v, state_vec, emb, chunk,
                                                jax.random.key(0))
  assert int(evaluations) == 8
  # The release's noise rule: another chunk's key gives the same starting noise, so the same chunk.
  video_again, actions_again, _ = rollout.denoise(spec, network, cache, cross_kv, i2v, state_vec, emb, chunk,
                                                  jax.random.key(1))
  np.testing.assert_array_equal(video_again, video)
  np.testing.assert_array_equal(actions_again, actions)

  chunk_i2v = jnp.broadcast_to(i2v[:, 1:1 + spec.lf], (2, spec.lf, *i2v.shape[2:]))
  state_b = jnp.broadcast_to(state_vec, (2, 1, state_vec.shape[-1]))
  dit = jax.jit(lambda v, a, t: model.denoise(v, t, a, t, state_b, jnp.full((2,), emb), chunk, cache, cross_kv,
                                              chunk_i2v))

  def velocity(v, a, timestep):
    both = lambda x: jnp.broadcast_to(jnp.asarray(x.numpy()), (2, *x.shape[1:]))
    vid, act = dit(both(v), both(a), jnp.full((2,), timestep, jnp.float32))
    return torch.tensor(np.asarray(vid[:1])), torch.tensor(np.asarray(vid[1:])), torch.tensor(np.asarray(act[:1]))

  x0 = _chunk_noise(spec, jax.random.key(0))
  ref_video, ref_actions = _reference_loop(velocity, x0, spec.sampler.dit_step_mask, spec.sampler.cfg_scale, _integer)
  assert _rel(video, ref_video) < 1e-4 and _rel(actions, ref_actions) < 1e-4
  float_video, _ = _reference_loop(velocity, x0, spec.sampler.dit_step_mask, spec.sampler.cfg_scale, _float)
  assert _rel(video, float_video) > 1e-3   # the float-timestep loop is measurably another chunk


_chunk_noise = jax.jit(rollout.chunk_noise, static_argnums=0)


def test_release_noise_is_the_same_every_chunk_and_ours_is_fresh():
  droid = rollout.RolloutSpec.from_config(settings.from_config(load_config(DROID)))
  a, b = _chunk_noise(droid, jax.random.key(0)), _chunk_noise(droid, jax.random.key(5))
  seeded = _chunk_noise(droid, jax.random.key(1140))
  for k in ('video', 'action'):
    np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(a[k], seeded[k])   # the seed, whatever the chunk's key
  tiny = rollout.RolloutSpec.from_config(settings.from_config(load_config('configs/tiny.py')))
  a, b = _chunk_noise(tiny, jax.random.key(0)), _chunk_noise(tiny, jax.random.key(5))
  assert float(jnp.abs(a['video'] - b['video']).max()) > 0.1


def test_per_call_vae_encode_equals_a_fresh_official_encode_of_first_plus_call_frames():
  from tests.test_vae import _cfg as vae_cfg, _encode_ref, _pair
  ref, ours = _pair(vae_cfg(), 'official', seed=3)
  size = 16
  cfg = load_config('configs/tiny.py', [f'video.height={size}', f'video.width={size}',
                                        'serve.observation_encode=per_call'])
  spec = rollout.RolloutSpec.from_config(settings.from_config(cfg))
  call = np.random.default_rng(7).uniform(-1, 1, (1, cfg.video.frames_per_chunk, size, size, 3)).astype(np.float32)
  stream = ours.model.init_encode_cache(1, size, size)   # the episode's stream: unused and passed through
  latents, passed = rollout.encode_observed(spec, nnx.split(ours.model), stream, jnp.asarray(call))
  want = _encode_ref(ref, np.concatenate([call[:, :1], call], axis=1), 'wan2.1')[:, 1:]
  assert latents.shape == want.shape == (1, 2, 2, 2, 16)
  assert _rel(latents, want) < 1e-5
  assert jax.tree.structure(passed) == jax.tree.structure(stream)


def _similar_guided_video_field(cosine, scale):
  """Guided video velocities at `cosine` between any two steps, while the conditional video and the
  actions change direction every step: g_k = sqrt(c) e0 + sqrt(1 - c) e_{1+k}, uncond u_k = 3 e_{20+k},
  cond = (g_k + (scale - 1) u_k) / scale (so u + scale (cond - u) = g_k), actions e_{40+k}."""
  timesteps = jnp.asarray(samplers.make_sampler(_droid_sampler(), N).timesteps, jnp.float32)
  e = lambda i: jax.nn.one_hot(i, 64)[None]

  def field(x, timestep, with_uncond):
    assert with_uncond
    k = jnp.argmin(jnp.abs(timesteps - timestep))
    guided = jnp.sqrt(cosine) * e(0) + jnp.sqrt(1 - cosine) * e(1 + k)
    uncond = 3.0 * e(20 + k)
    cond = (guided + (scale - 1) * uncond) / scale
    return {'video': cond, 'action': e(40 + k)}, uncond
  return field


@pytest.mark.parametrize('compared, expected', [
    ('video', '1100001000010000'),   # the release's: guided video at cosine 0.96 > 0.95, skip 4
    ('action', '1111111111111111'),  # orthogonal action velocities: never skip
])
def test_dynamic_skip_decides_on_the_guided_video_velocities(compared, expected):
  cfg = _droid_sampler()
  cfg.update(dict(dynamic_skip=True, dynamic_skip_velocity=compared))
  x = {'video': jnp.zeros((1, 64)), 'action': jnp.zeros((1, 64))}
  _, info = samplers.sample(_similar_guided_video_field(0.96, cfg.cfg_scale), x, cfg, N)
  assert ''.join('1' if r else '0' for r in np.asarray(info.evaluated)) == expected


def test_dynamic_skip_velocity_is_checked():
  cfg = load_config('configs/ablations/dynamic_dit_cache.py').sampler
  assert cfg.dynamic_skip and cfg.dynamic_skip_velocity == 'video'
  cfg.dynamic_skip_velocity = 'state'
  with pytest.raises(ValueError, match='dynamic_skip_velocity'):
    samplers.sample(_similar_guided_video_field(0.96, cfg.cfg_scale), {'video': jnp.zeros((1, 64)),
                    'action': jnp.zeros((1, 64))}, cfg, N)


def test_release_returns_actions_unsmoothed_and_the_gripper_unthresholded():
  cfg = load_config(DROID)
  e = embodiments.get(cfg.data.embodiment)
  relative = embodiments.relative_dims(cfg.data.relative_action_dims, e.action_dim, e.state_dim)
  stats = {'q01': [-1.0] * 7 + [0.0], 'q99': [1.0] * 8}   # joints in [-1, 1], the gripper in [0, 1]
  assert e.action_dim == 8
  horizon = cfg.video.action_horizon
  actions = np.random.default_rng(0).uniform(-1, 1, (horizon, cfg.model.action_dim)).astype(np.float32)
  actions[:3, 7] = [-0.4, 0.0, 0.4]   # gripper 0.3, 0.5, 0.7 once unnormalised
  anchor = np.linspace(-1, 1, e.state_dim).astype(np.float32)
  got = postprocess.robot_actions(actions, anchor, stats, e.action_dim, relative, cfg.postprocess)
  want = postprocess.relative_to_absolute(normalization.unnormalize(actions[:, :e.action_dim], stats), anchor,
                                          relative)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got[:3, 7], [0.3, 0.5, 0.7], rtol=1e-6)
  smoothed = postprocess.robot_actions(actions, anchor, stats, e.action_dim, relative,
                                       load_config('configs/ablations/smoothing.py').postprocess)
  assert np.abs(smoothed - want).max() > 1e-2
  cfg.postprocess.gripper_dims = (7,)   # the release's sim client: 1 strictly above 0.5
  snapped = postprocess.robot_actions(actions, anchor, stats, e.action_dim, relative, cfg.postprocess)
  np.testing.assert_array_equal(snapped[:3, 7], [0.0, 0.0, 1.0])


@pytest.mark.parametrize('config, release', [
    ('configs/dreamzero_14b_droid.py', True), ('configs/dreamzero_14b_agibot.py', True),
    ('configs/dreamzero_5b_droid.py', True), ('configs/ablations/no_cfg.py', True),
    ('configs/tiny.py', False), ('configs/metaworld_cpu.py', False), ('configs/metaworld.py', False)])
def test_configs_serving_official_weights_default_to_the_release(config, release):
  c = load_config(config)
  assert (c.sampler.integer_timesteps, c.sampler.noise_seed == 1140, c.serve.observation_encode == 'per_call',
          not c.postprocess.smooth) == (release,) * 4
  assert c.sampler.dynamic_skip_velocity == 'video' and not c.postprocess.gripper_dims
