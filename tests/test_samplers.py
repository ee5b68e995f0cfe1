"""Euler / UniPC samplers, DiT-skip masks, dynamic skipping and video-only CFG on toy fields."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from dreamzero_jax.inference import samplers
from tests.wan_reference import import_wan

N = 1000
A_VIDEO, B_VIDEO = 0.7, 0.3
A_ACTION, B_ACTION = -0.4, 0.2


def _cfg(kind='unipc', num_steps=16, mask='', cfg_scale=1.0, dynamic_skip=False, **overrides):
  cfg = base.get_base_config().sampler
  cfg.update(dict(kind=kind, num_steps=num_steps, dit_step_mask=mask, cfg_scale=cfg_scale,
                  dynamic_skip=dynamic_skip, **overrides))
  return cfg


def _x_init():
  rng = np.random.RandomState(0)
  return {'video': jnp.asarray(rng.randn(2, 3, 4), jnp.float32),
          'action': jnp.asarray(rng.randn(2, 4, 2), jnp.float32)}


def _linear_field(x, timestep, with_uncond):
  """v = a x + b, a different line for video and actions; no unconditional branch."""
  assert not with_uncond
  return {'video': A_VIDEO * x['video'] + B_VIDEO,
          'action': A_ACTION * x['action'] + B_ACTION}, None


def _hand_sigmas(num_steps):
  s = 0.999 * (1 - np.arange(num_steps) / num_steps)
  return np.concatenate([5 * s / (1 + 4 * s), [0.0]])


def _hand_euler(x, a, b, sigmas, velocity_steps=None):
  """x_{k+1} = x_k + (s_{k+1} - s_k) v_k; a skipped step reuses the last computed v."""
  x = np.asarray(x, np.float64)
  v = None
  for k in range(len(sigmas) - 1):
    if velocity_steps is None or velocity_steps[k]:
      v = a * x + b
    x = x + (sigmas[k + 1] - sigmas[k]) * v
  return x


def _hand_unipc(x, a, b, sigmas):
  """UniPC-bh2 in the paper's data-prediction form, one explicit case per order.

  Returns the sample after every step. Orders: predictor min(2, steps left, step + 1),
  the corrector at step i uses the predictor order of step i - 1 (order 1: rho = 1/2).
  """
  s = np.asarray(sigmas, np.float64)
  n = len(s) - 1
  alpha = 1 - s
  with np.errstate(divide='ignore'):
    lam = np.log(alpha) - np.log(s)
  order = [min(2, n - i, i + 1) for i in range(n)]
  x = np.asarray(x, np.float64)
  m, outs, last = [], [], None
  for i in range(n):
    m.append(x - s[i] * (a * x + b))  # x0 prediction at the uncorrected sample
    if i > 0:  # corrector: redo sigma_{i-1} -> sigma_i with m_i known
      h = lam[i] - lam[i - 1]
      phi = np.expm1(-h)
      base_ = s[i] / s[i - 1] * last - alpha[i] * phi * m[i - 1]
      if order[i - 1] == 1:
        x = base_ - alpha[i] * phi * 0.5 * (m[i] - m[i - 1])
      else:
        r = (lam[i - 2] - lam[i - 1]) / h
        b1 = (phi / -h - 1) / phi
        b2 = ((phi / -h - 1) / -h - 0.5) * 2 / phi
        rho = np.linalg.solve([[1.0, 1.0], [r, 1.0]], [b1, b2])
        x = base_ - alpha[i] * phi * (rho[0] * (m[i - 2] - m[i - 1]) / r
                                      + rho[1] * (m[i] - m[i - 1]))
    last = x
    if i == n - 1:  # sigma_{i+1} = 0: the step lands on the x0 prediction
      x = m[i]
    else:
      h = lam[i + 1] - lam[i]
      phi = np.expm1(-h)
      x = s[i + 1] / s[i] * x - alpha[i + 1] * phi * m[i]
      if order[i] == 2:
        r = (lam[i - 1] - lam[i]) / h
        x = x - alpha[i + 1] * phi * 0.5 * (m[i - 1] - m[i]) / r
    outs.append(x)
  return outs


def test_schedule_matches_hand_values():
  sampler = samplers.make_sampler(_cfg(num_steps=3), N)
  np.testing.assert_allclose(sampler.sigmas, _hand_sigmas(3), rtol=1e-12)


def test_euler_by_hand():
  x = _x_init()
  out, info = samplers.sample(_linear_field, x, _cfg('euler', 3), N)
  sig = _hand_sigmas(3)
  np.testing.assert_allclose(out['video'], _hand_euler(x['video'], A_VIDEO, B_VIDEO, sig),
                             rtol=1e-5)
  np.testing.assert_allclose(out['action'], _hand_euler(x['action'], A_ACTION, B_ACTION, sig),
                             rtol=1e-5)
  assert int(info.num_evaluations) == 3


def test_unipc_by_hand():
  x = _x_init()['video']
  sampler = samplers.make_sampler(_cfg('unipc', 5), N)
  expected = _hand_unipc(x, A_VIDEO, B_VIDEO, _hand_sigmas(5))
  state = sampler.init(x)
  for k in range(5):
    state = sampler.step(state, A_VIDEO * state.x + B_VIDEO)
    np.testing.assert_allclose(state.x, expected[k], rtol=1e-5, atol=1e-6)


def _wan_unipc(num_steps):
  module = import_wan('utils.fm_solvers_unipc')
  ref = module.FlowUniPCMultistepScheduler(num_train_timesteps=N, shift=1,
                                           use_dynamic_shifting=False)
  ref.set_timesteps(num_steps, device='cpu', shift=5.0)  # as the official DreamZero policy
  return ref


@pytest.mark.parametrize('num_steps', [1, 2, 4, 16])
def test_unipc_matches_official_wan_step_by_step(num_steps):
  import torch
  ref = _wan_unipc(num_steps)
  sampler = samplers.make_sampler(_cfg('unipc', num_steps), N)
  np.testing.assert_allclose(sampler.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
  # The default sampler feeds the DiT the official integer timesteps.
  x = _x_init()['video']
  state = sampler.init(x)
  x_ref = torch.tensor(np.asarray(x))
  for i, t in enumerate(ref.timesteps):
    assert float(sampler.timestep(state)) == int(t)
    sigma = float(ref.sigmas[i])
    x_ref = ref.step(A_VIDEO * x_ref + B_VIDEO * sigma, t, x_ref, return_dict=False)[0]
    state = sampler.step(state, A_VIDEO * state.x + B_VIDEO * sampler.sigma(state))
    want = x_ref.numpy()
    assert np.abs(np.asarray(state.x) - want).max() / np.abs(want).max() < 1e-5, i


def test_guided_skipping_loop_matches_official_wan_loop():
  """The official loop: one Wan scheduler for video, one for actions, DiT on the mask's steps,
  CFG (scale 5) on the video velocity, conditional action velocity, reuse on skipped steps."""
  import torch
  mask, scale = '1110001000100111', 5.0
  x = _x_init()
  out, _ = samplers.sample(_guided_field([]), x, _cfg('unipc', 16, mask, cfg_scale=scale), N)
  video_ref, action_ref = _wan_unipc(16), _wan_unipc(16)
  video = torch.tensor(np.asarray(x['video']))
  action = torch.tensor(np.asarray(x['action']))
  for i, t in enumerate(video_ref.timesteps):
    if mask[i] == '1':
      cond, uncond = 2 * video + 1, video
      v_video = uncond + scale * (cond - uncond)
      v_action = -action
    video = video_ref.step(v_video, t, video, return_dict=False)[0]
    action = action_ref.step(v_action, t, action, return_dict=False)[0]
  for got, want in ((out['video'], video.numpy()), (out['action'], action.numpy())):
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-5


def test_unipc_matches_diffusers_on_its_schedule():
  import torch
  from diffusers import UniPCMultistepScheduler
  ref = UniPCMultistepScheduler(num_train_timesteps=N, use_flow_sigmas=True, flow_shift=5.0,
                                prediction_type='flow_prediction', solver_type='bh2',
                                solver_order=2, lower_order_final=True, final_sigmas_type='zero')
  ref.set_timesteps(8)
  sampler = samplers.sampler_from_sigmas('unipc', ref.sigmas.double().numpy(), N)
  x = _x_init()['action']
  state = sampler.init(x)
  x_ref = torch.tensor(np.asarray(x))
  for i, t in enumerate(ref.timesteps):
    x_ref = ref.step(A_ACTION * x_ref + B_ACTION, t, x_ref, return_dict=False)[0]
    state = sampler.step(state, A_ACTION * state.x + B_ACTION)
    want = x_ref.numpy()
    assert np.abs(np.asarray(state.x) - want).max() / np.abs(want).max() < 1e-5, i


def _counting_field(calls):
  def field(x, timestep, with_uncond):
    jax.debug.callback(lambda: calls.append(1))
    return _linear_field(x, timestep, with_uncond)
  return field


@pytest.mark.parametrize('kind', ['euler', 'unipc'])
def test_fixed_skip_mask_reuses_last_velocity(kind):
  mask = '1110001000100111'
  calls = []
  x = _x_init()
  out, info = samplers.sample(_counting_field(calls), x, _cfg(kind, 16, mask), N)
  jax.effects_barrier()
  steps = [ch == '1' for ch in mask]
  assert len(calls) == mask.count('1') == int(info.num_evaluations)
  np.testing.assert_array_equal(info.evaluated, steps)
  # Same trajectory as stepping by hand with the reused velocities.
  sampler = samplers.make_sampler(_cfg(kind, 16), N)
  state, v = sampler.init(x['video']), None
  for k in range(16):
    if steps[k]:
      v = A_VIDEO * state.x + B_VIDEO
    state = sampler.step(state, v)
  np.testing.assert_allclose(out['video'], state.x, rtol=1e-5, atol=1e-6)
  if kind == 'euler':
    np.testing.assert_allclose(
        out['action'], _hand_euler(x['action'], A_ACTION, B_ACTION, _hand_sigmas(16), steps),
        rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mask', ['111', '0111', '11a1'])
def test_bad_masks_are_errors(mask):
  with pytest.raises(ValueError, match='dit_step_mask'):
    samplers.sample(_linear_field, _x_init(), _cfg('euler', 4, mask), N)


def _equicorrelated_action_field(cosine, num_steps):
  """Action velocities with the same cosine between any two steps: sqrt(c) u + sqrt(1-c) e_k."""
  timesteps = jnp.asarray(samplers.make_sampler(_cfg(num_steps=num_steps), N).sigmas[:-1] * N,
                          jnp.float32)

  def field(x, timestep, with_uncond):
    del with_uncond
    k = jnp.argmin(jnp.abs(timesteps - timestep))
    direction = jnp.sqrt(cosine) * jax.nn.one_hot(0, num_steps + 1) + jnp.sqrt(
        1 - cosine) * jax.nn.one_hot(k + 1, num_steps + 1)
    action = jnp.broadcast_to(direction, x['action'].shape)
    return {'video': A_VIDEO * x['video'] + B_VIDEO, 'action': action}, None
  return field


@pytest.mark.parametrize('cosine, expected', [
    (0.96, '1100001000010000'),  # > 0.95: skip 4, run, skip 4, ...
    (0.94, '1100100100100100'),  # in (0.93, 0.95]: skip 2 at a time
    (0.90, '1111111111111111'),  # never similar enough
])
def test_dynamic_skip(cosine, expected):
  x = {'video': _x_init()['video'], 'action': jnp.zeros((2, 3, 17))}
  field = _equicorrelated_action_field(cosine, 16)
  # The rule on the action velocities (sampler.dynamic_skip_velocity='action'; the release compares
  # the video's: tests/test_release_fidelity.py).
  out, info = samplers.sample(field, x, _cfg('unipc', 16, mask='', dynamic_skip=True, dynamic_skip_velocity='action'),
                              N)
  got = ''.join('1' if e else '0' for e in np.asarray(info.evaluated))
  assert got == expected
  assert int(info.num_evaluations) == expected.count('1')
  fixed, _ = samplers.sample(field, x, _cfg('unipc', 16, mask=expected), N)
  np.testing.assert_allclose(out['video'], fixed['video'], rtol=1e-6)
  np.testing.assert_allclose(out['action'], fixed['action'], rtol=1e-6)


def _guided_field(seen):
  """cond video 2x + 1, uncond video x, actions -x; records the with_uncond flag per trace."""
  def field(x, timestep, with_uncond):
    seen.append(with_uncond)
    cond = {'video': 2 * x['video'] + 1, 'action': -x['action']}
    return cond, (x['video'] if with_uncond else None)
  return field


def test_cfg_mixes_video_only():
  seen, x, scale = [], _x_init(), 5.0
  out, _ = samplers.sample(_guided_field(seen), x, _cfg('euler', 3, cfg_scale=scale), N)
  assert seen and all(seen)
  sig = _hand_sigmas(3)
  # Guided video velocity x + 5 ((2x + 1) - x) = 6x + 5; actions keep the conditional -x.
  np.testing.assert_allclose(out['video'], _hand_euler(x['video'], 6.0, 5.0, sig), rtol=1e-5)
  np.testing.assert_allclose(out['action'], _hand_euler(x['action'], -1.0, 0.0, sig), rtol=1e-5)


@pytest.mark.parametrize('num_steps, scale', [(1, 5.0), (3, 1.0)])
def test_uncond_branch_skipped_for_flash_and_no_guidance(num_steps, scale):
  seen, x = [], _x_init()
  cfg = _cfg('unipc', num_steps, cfg_scale=scale)
  out, info = samplers.sample(_guided_field(seen), x, cfg, N)
  assert seen and not any(seen)
  sig = _hand_sigmas(num_steps)
  if num_steps == 1:  # one step lands on x0 = x - sigma v with the conditional velocity
    np.testing.assert_allclose(out['video'], x['video'] - sig[0] * (2 * x['video'] + 1),
                               rtol=1e-5)
    np.testing.assert_allclose(out['action'], x['action'] + sig[0] * x['action'], rtol=1e-5)
    assert int(info.num_evaluations) == 1


def test_velocity_fn_contract_is_checked():
  def no_uncond(x, timestep, with_uncond):
    return {'video': x['video'], 'action': x['action']}, None
  with pytest.raises(ValueError, match='uncond_video'):
    samplers.sample(no_uncond, _x_init(), _cfg('euler', 2, cfg_scale=5.0), N)


def test_sample_under_jit_matches_eager():
  x = _x_init()
  cfg = _cfg('unipc', 16, mask='1110001000100111', cfg_scale=5.0)
  field = _guided_field([])
  eager, _ = samplers.sample(field, x, cfg, N)
  jitted, info = jax.jit(lambda x: samplers.sample(field, x, cfg, N))(x)
  np.testing.assert_allclose(jitted['video'], eager['video'], rtol=1e-6)
  np.testing.assert_allclose(jitted['action'], eager['action'], rtol=1e-6)
  assert int(info.num_evaluations) == 8


def test_bfloat16_leaves_keep_their_dtype():
  x = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _x_init())
  out, _ = samplers.sample(_linear_field, x, _cfg('unipc', 4), N)
  assert out['video'].dtype == jnp.bfloat16 and out['action'].dtype == jnp.bfloat16
  ref, _ = samplers.sample(_linear_field, _x_init(), _cfg('unipc', 4), N)
  np.testing.assert_allclose(np.asarray(out['video'], np.float32), ref['video'], atol=0.1)
