"""Flow-matching ODE samplers (Euler, UniPC bh2) and the guided denoising loop with DiT skipping.

Conventions are those of `dreamzero_jax.flow`: the sample moves from sigma ~ 1 to sigma = 0 and
the model returns the velocity v = eps - x0. A sampler is a static description (its sigma
schedule and update coefficients) plus pure functions over a state pytree:
`state = sampler.init(x)`, `state = sampler.step(state, velocity)`, `sampler.timestep(state)`.
`sample()` runs the whole loop with `lax.fori_loop`, so one DiT trace serves every step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamzero_jax import flow
from dreamzero_jax.settings import SamplerSettings

SAMPLER_KINDS = ('euler', 'unipc')
# Which guided velocity the dynamic skip rule compares: the release's video, or the actions.
DYNAMIC_SKIP_VELOCITIES = ('video', 'action')
UNIPC_ORDER = 2  # the official solver_order; the bh2 coefficients below are written for it
# Official dynamic DiT skipping: (cosine threshold, steps skipped), checked in this order.
DYNAMIC_SKIP_RULE = ((0.95, 4), (0.93, 2))

Pytree = Any


class EulerState(NamedTuple):
  step: jax.Array  # int32 scalar: index of the current noise level
  x: Pytree        # the current sample


class UniPCState(NamedTuple):
  step: jax.Array
  x: Pytree        # the predictor's output: what the model is evaluated on
  last_x: Pytree   # the (corrected) sample the previous predictor started from
  x0_prev: Pytree  # x0 prediction of the previous step
  x0_prev2: Pytree  # x0 prediction of the step before that


def _lambda(sigma: np.ndarray) -> np.ndarray:
  """Half log-SNR of the flow path, log(alpha / sigma) with alpha = 1 - sigma (+inf at 0)."""
  with np.errstate(divide='ignore'):
    return np.log(1.0 - sigma) - np.log(sigma)


def _unipc_tables(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-step UniPC-bh2 coefficients in data (x0) prediction form, in float64.

  UniPC is linear in the sample and in the x0 predictions m_i = x_i - sigma_i v_i, so every
  step is a fixed linear combination whose weights depend only on the schedule:
    corrector  xc_i    = c0 x_i + c1 last_x + c2 m_i + c3 m_{i-1} + c4 m_{i-2}
    predictor  x_{i+1} = p0 xc_i + p1 m_i + p2 m_{i-1}
  Orders follow Wan's scheduler: warm-up from order 1, order 1 on the final step
  (lower_order_final), and the corrector at step i reuses the predictor order of step i-1
  (order 1 uses rho = 1/2). Step 0 has no corrector (c0 = 1).
  """
  n = len(sigmas) - 1
  lam = _lambda(sigmas)
  alpha = 1.0 - sigmas
  order = [min(UNIPC_ORDER, n - i, i + 1) for i in range(n)]
  corrector = np.zeros((n, 5))
  predictor = np.zeros((n, 3))
  with np.errstate(divide='ignore', invalid='ignore'):
    for i in range(n):
      # Predictor from sigma_i to sigma_{i+1}; h is +inf when sigma_{i+1} = 0 (final step).
      h = lam[i + 1] - lam[i]
      h_phi_1 = np.expm1(-h)  # bh2: B(h) = h_phi_1
      predictor[i, 0] = sigmas[i + 1] / sigmas[i]
      predictor[i, 1] = -alpha[i + 1] * h_phi_1
      if order[i] == 2:
        r = (lam[i - 1] - lam[i]) / h
        d = alpha[i + 1] * h_phi_1 * 0.5 / r  # weight of D1 = (m_{i-1} - m_i) / r, rho_p = 1/2
        predictor[i, 1] += d
        predictor[i, 2] = -d
      if i == 0:
        corrector[i, 0] = 1.0
        continue
      # Corrector of x_i, re-taking the step sigma_{i-1} -> sigma_i with m_i now known.
      h = lam[i] - lam[i - 1]
      hh = -h
      h_phi_1 = np.expm1(hh)
      a = alpha[i] * h_phi_1
      corrector[i, 1] = sigmas[i] / sigmas[i - 1]
      corrector[i, 3] = -a
      if order[i - 1] == 1:
        rho_t = 0.5
      else:
        b1 = (h_phi_1 / hh - 1.0) / h_phi_1
        b2 = ((h_phi_1 / hh - 1.0) / hh - 0.5) * 2.0 / h_phi_1
        r = (lam[i - 2] - lam[i - 1]) / h
        rho_d, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([b1, b2]))
        corrector[i, 4] = -a * rho_d / r          # D1 = (m_{i-2} - m_{i-1}) / r
        corrector[i, 3] += a * rho_d / r
      corrector[i, 2] = -a * rho_t                # D1_t = m_i - m_{i-1}
      corrector[i, 3] += a * rho_t
  return corrector, predictor


def _combine(coeffs: jax.Array, *trees: Pytree) -> Pytree:
  """sum_k coeffs[k] * trees[k], leaf by leaf, in float32, cast back to the leaf dtype."""
  def leaf(*xs):
    out = sum(c * x.astype(jnp.float32) for c, x in zip(coeffs, xs))
    return out.astype(xs[0].dtype)
  return jax.tree.map(leaf, *trees)


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
  """A flow-matching ODE solver over a fixed sigma schedule (static: build it outside jit)."""
  kind: str
  sigmas: np.ndarray  # [num_steps + 1], from ~1 down to a final 0
  num_train_timesteps: int
  timesteps: np.ndarray  # [num_steps]: the DiT's timestep input at each step
  corrector: np.ndarray | None = None  # UniPC tables, see _unipc_tables
  predictor: np.ndarray | None = None

  @property
  def num_steps(self) -> int:
    return len(self.sigmas) - 1

  def init(self, x: Pytree) -> EulerState | UniPCState:
    step = jnp.zeros((), jnp.int32)
    if self.kind == 'euler':
      return EulerState(step, x)
    zeros = jax.tree.map(jnp.zeros_like, x)
    return UniPCState(step, x, zeros, zeros, zeros)

  def sigma(self, state) -> jax.Array:
    return jnp.asarray(self.sigmas, jnp.float32)[state.step]

  def timestep(self, state) -> jax.Array:
    """The DiT's timestep input at the current step (see sampler_from_sigmas)."""
    return jnp.asarray(self.timesteps, jnp.float32)[state.step]

  def step(self, state, velocity: Pytree):
    """Advances one step given the velocity at (state.x, timestep(state))."""
    i = state.step
    sigma = self.sigma(state)
    if self.kind == 'euler':
      dt = jnp.asarray(np.diff(self.sigmas), jnp.float32)[i]
      return EulerState(i + 1, _combine(jnp.stack([1.0, dt]), state.x, velocity))
    x0 = _combine(jnp.stack([1.0, -sigma]), state.x, velocity)
    c = jnp.asarray(self.corrector, jnp.float32)[i]
    p = jnp.asarray(self.predictor, jnp.float32)[i]
    corrected = _combine(c, state.x, state.last_x, x0, state.x0_prev, state.x0_prev2)
    x_next = _combine(p, corrected, x0, state.x0_prev)
    return UniPCState(i + 1, x_next, corrected, x0, state.x0_prev)


def sampler_from_sigmas(kind: str, sigmas: np.ndarray, num_train_timesteps: int,
                        integer_timesteps: bool = False) -> Sampler:
  """A solver over an explicit decreasing schedule ending at 0 (e.g. another library's).

  The DiT reads sigma * N at each step, truncated to an integer with `integer_timesteps` (the
  release's flow UniPC scheduler: `(sigmas * N).to(int64)` from the float64 schedule, 999, 986, ...)
  or as the float (999.8, 986.6, ...: the level the noise is actually at).
  """
  if kind not in SAMPLER_KINDS:
    raise ValueError(f'sampler.kind={kind!r}: expected one of {SAMPLER_KINDS}')
  sigmas = np.asarray(sigmas, np.float64)
  timesteps = flow.sigma_to_timestep(sigmas[:-1], num_train_timesteps)
  if integer_timesteps:
    timesteps = np.trunc(timesteps)
  if kind == 'euler':
    return Sampler('euler', sigmas, num_train_timesteps, timesteps)
  corrector, predictor = _unipc_tables(sigmas)
  return Sampler('unipc', sigmas, num_train_timesteps, timesteps, corrector, predictor)


def make_sampler(cfg_sampler: SamplerSettings, num_train_timesteps: int) -> Sampler:
  """The `sampler.kind` solver over `sampler.num_steps` levels shifted by `sampler.shift`, feeding
  the DiT integer timesteps with `sampler.integer_timesteps`."""
  sigmas = flow.sampling_sigmas(cfg_sampler.num_steps, cfg_sampler.shift, num_train_timesteps)
  return sampler_from_sigmas(cfg_sampler.kind, sigmas, num_train_timesteps, cfg_sampler.integer_timesteps)


def dit_step_mask(cfg_sampler: SamplerSettings) -> np.ndarray:
  """The fixed DiT-evaluation mask as bools; '' means evaluate at every step."""
  text, n = cfg_sampler.dit_step_mask, cfg_sampler.num_steps
  if not text:
    return np.ones(n, bool)
  if len(text) != n or set(text) - {'0', '1'} or text[0] != '1':
    raise ValueError(
        f'sampler.dit_step_mask={text!r}: expected {n} characters of 0/1 starting with 1 '
        f'(one per step of sampler.num_steps={n}), or "" for every step')
  return np.array([ch == '1' for ch in text])


def guided_velocity(cond: Pytree, uncond_video: jax.Array | None, cfg_scale: float) -> Pytree:
  """Classifier-free guidance on the video only; actions keep the conditional prediction."""
  if uncond_video is None:
    return cond
  video = uncond_video + cfg_scale * (cond['video'] - uncond_video)
  return {**cond, 'video': video}


def uses_uncond(cfg_sampler: SamplerSettings) -> bool:
  """Whether the unconditional branch is needed: not without guidance, and not in one step.

  With a single step the actions (conditional only) are final before the video could matter.
  """
  return cfg_sampler.cfg_scale != 1.0 and cfg_sampler.num_steps > 1


class SampleInfo(NamedTuple):
  evaluated: jax.Array        # [num_steps] bool: the DiT ran at this step
  num_evaluations: jax.Array  # int32: DiT calls (each possibly a cond + uncond batch)


class _DynamicSkip(NamedTuple):
  countdown: jax.Array      # steps of the current skip run still to pass (1 = run next)
  evaluations: jax.Array
  velocity_last: jax.Array  # the compared velocity (sampler.dynamic_skip_velocity) of the last DiT call
  velocity_prev: jax.Array  # ... and of the call before it


def _mean_cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Per-sample cosine of the flattened velocities, averaged over the batch."""
  a = a.reshape(a.shape[0], -1).astype(jnp.float32)
  b = b.reshape(b.shape[0], -1).astype(jnp.float32)
  norms = (jnp.maximum(jnp.linalg.norm(a, axis=1), eps)
           * jnp.maximum(jnp.linalg.norm(b, axis=1), eps))
  return jnp.mean(jnp.sum(a * b, axis=1) / norms)


def _dynamic_decision(skip: _DynamicSkip, rule: Sequence[tuple[float, int]]):
  """The release's rule: after two DiT calls, similar consecutive velocities start a skip run.

  A run of k skips covers the deciding step and the k - 1 after it; the DiT runs again on the
  step after the run and the rule is then re-checked on the two newest calls.
  """
  similarity = _mean_cosine(skip.velocity_last, skip.velocity_prev)
  start = jnp.int32(0)
  for threshold, steps in reversed(rule):  # the first matching entry wins
    start = jnp.where(similarity > threshold, steps, start)
  warming_up = skip.evaluations < 2
  counting = skip.countdown > 0
  run = warming_up | (skip.countdown == 1) | (~counting & (start == 0))
  countdown = jnp.where(warming_up, 0, jnp.where(counting, skip.countdown - 1, start))
  return run, skip._replace(countdown=countdown)


def sample(velocity_fn: Callable, x_init: Pytree, cfg_sampler: SamplerSettings,
           num_train_timesteps: int,
           dynamic_rule: Sequence[tuple[float, int]] = DYNAMIC_SKIP_RULE
           ) -> tuple[Pytree, SampleInfo]:
  """Denoises {'video', 'action'} from noise to sigma = 0 with guidance and DiT skipping.

  velocity_fn(x, timestep, with_uncond) -> (cond, uncond_video): `cond` holds the conditional
  'video' and 'action' velocities at x, `uncond_video` the unconditional video velocity when
  `with_uncond` (a Python bool, fixed per call site: batch both branches in one forward) and
  None otherwise. `timestep` is a float32 scalar shared by video and actions.
  Skipped steps reuse the last guided velocity: the fixed `sampler.dit_step_mask`, or with
  `sampler.dynamic_skip` the release's cosine rule (`dynamic_rule`) on consecutive calls' guided
  velocities of `sampler.dynamic_skip_velocity` ('video': the release's; 'action') instead.
  Returns the final {'video', 'action'} and which steps ran the DiT.
  """
  sampler = make_sampler(cfg_sampler, num_train_timesteps)
  with_uncond = uses_uncond(cfg_sampler)
  mask = None if cfg_sampler.dynamic_skip else jnp.asarray(dit_step_mask(cfg_sampler))
  compared = cfg_sampler.dynamic_skip_velocity
  if compared not in DYNAMIC_SKIP_VELOCITIES:
    raise ValueError(f'sampler.dynamic_skip_velocity={compared!r}: expected one of {DYNAMIC_SKIP_VELOCITIES}')

  def evaluate(x, timestep):
    cond, uncond_video = velocity_fn(x, timestep, with_uncond)
    if with_uncond == (uncond_video is None):
      raise ValueError(f'velocity_fn(with_uncond={with_uncond}) returned uncond_video='
                       f'{"None" if uncond_video is None else "an array"}')
    velocity = guided_velocity(cond, uncond_video, cfg_sampler.cfg_scale)
    return jax.tree.map(lambda v, ref: v.astype(ref.dtype), velocity, x)

  def body(i, carry):
    state, velocity, skip, evaluated = carry
    if mask is None:
      run, skip = _dynamic_decision(skip, dynamic_rule)
    else:
      run = mask[i]
    velocity = jax.lax.cond(run, evaluate, lambda x, t: velocity, state.x, sampler.timestep(state))
    if mask is None:
      skip = skip._replace(
          evaluations=skip.evaluations + run.astype(jnp.int32),
          velocity_last=jnp.where(run, velocity[compared], skip.velocity_last),
          velocity_prev=jnp.where(run, skip.velocity_last, skip.velocity_prev))
    return sampler.step(state, velocity), velocity, skip, evaluated.at[i].set(run)

  zeros = jax.tree.map(jnp.zeros_like, x_init)
  skip = ()
  if mask is None:
    skip = _DynamicSkip(jnp.int32(0), jnp.int32(0), zeros[compared], zeros[compared])
  carry = (sampler.init(x_init), zeros, skip, jnp.zeros(sampler.num_steps, bool))
  state, _, _, evaluated = jax.lax.fori_loop(0, sampler.num_steps, body, carry)
  return state.x, SampleInfo(evaluated, jnp.sum(evaluated.astype(jnp.int32)))
