"""The closed-loop policy: observations -> KV cache -> denoised chunk -> robot actions.

The device work is inference/rollout.py's pure jitted chunk functions (start, observe, denoise);
the Policy holds the host side: the episode's bookkeeping (which chunk is next, which real frames
are written), the prompt embeddings, state normalisation, and the actions' post-processing
(inference/postprocess.py). An episode's device pytrees are explicit: the self-attention KV cache of REAL
observed frames, the text/image cross-attention K/V (computed once per episode), the VAE's
streaming cache and the I2V condition. Shapes are static; the host only moves the chunk index,
which is why every step reuses one compilation.

Chunks: after reset (the first frame), `step` predicts chunk 0. Each later `step` first writes the
frames observed while the previous chunk executed (video.frames_per_chunk canvas frames at the
training stride) into the cache, then predicts the next chunk. When the cache holds
video.max_chunks chunks it restarts from the newest observed frame as the new frame 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamzero_jax import checks, embodiments, sharding
from dreamzero_jax.datasets import normalization
from dreamzero_jax.inference import postprocess, rollout
from dreamzero_jax.models import dit as dit_lib
from dreamzero_jax.models import encoders as encoders_lib
from dreamzero_jax.models import kv_cache
from dreamzero_jax.models.dit import DreamZeroDiT
from dreamzero_jax.settings import Settings


@dataclasses.dataclass
class Episode:
  """One robot's episode: device pytrees plus host bookkeeping."""
  cache: kv_cache.KVCache
  cross_kv: Any
  vae_cache: Any
  i2v_cond: jax.Array | None  # I2V y for the whole context window [B, F, h, w, 20]
  chunk: int                  # the chunk `step` predicts next
  written: int                # chunks whose real frames are in the cache
  anchor_state: np.ndarray    # raw robot state at the start of the chunk being predicted
  rng: jax.Array
  instruction: str


class Policy:
  """DreamZero as a policy for one embodiment (B = 1 per episode, 2 with CFG).

  The DiT is prepared for inference (dit.for_inference: model.quantization). During control the
  devices of serve.mesh hold the DiT and the episodes' caches (split over the mesh as
  inference/rollout.py says) and the VAE (whole on each); umT5 (once per prompt) and CLIP (once per
  episode) keep their weights in host memory and visit the device only to encode.
  """

  def __init__(self, settings: Settings, model: DreamZeroDiT, encoders: encoders_lib.FrozenEncoders,
               norm_stats: dict):
    self.settings = settings
    self.spec = spec = rollout.RolloutSpec.from_config(settings)
    self.lf, self.num_frames, self.latent_hw = spec.lf, spec.num_frames, spec.latent_hw
    self.tokens_per_frame, self.capacity = spec.tokens_per_frame, spec.capacity
    self.with_uncond, self.batch, self.i2v = spec.with_uncond, spec.batch, spec.i2v
    self.embodiment = embodiments.get(settings.data.embodiment)
    self.relative_dims = embodiments.relative_dims(settings.data.relative_action_dims, self.embodiment.action_dim,
                                                   self.embodiment.state_dim)
    self.stats = norm_stats
    self.mesh = rollout.device_mesh(spec)
    self._prompt_encoder = encoders_lib.PromptEncoder(encoders.text, settings, host=True)
    self._model_def, model_state = nnx.split(dit_lib.for_inference(model, settings.model.quantization))
    self._vae_def, vae_state = nnx.split(encoders.vae)
    # The DiT split over the mesh by its logical axes (serve.mesh), the VAE replicated on each
    # device; CLIP in host memory.
    self._model_state = sharding.place_state(model_state, self.mesh, spec.rules)
    self._vae_state = sharding.replicate(vae_state, self.mesh)
    self._image_def, self._image_state = None, None
    if encoders.image is not None:
      self._image_def, image_state = nnx.split(encoders.image)
      self._image_state = jax.device_get(image_state)

  @property
  def _enc_state(self) -> nnx.State:
    """The frozen encoders' parameters (the VAE's on the device, umT5's and CLIP's in host memory)."""
    parts = dict(vae=self._vae_state, text=self._prompt_encoder.state)
    if self._image_state is not None:
      parts['image'] = self._image_state
    return nnx.State(parts)

  @property
  def networks(self) -> tuple[rollout.Network, rollout.Network, rollout.Network | None]:
    """(DiT, VAE, CLIP or None) as the rollout functions take them."""
    image = None if self._image_def is None else (self._image_def, self._image_state)
    return (self._model_def, self._model_state), (self._vae_def, self._vae_state), image

  # ---- the episode API --------------------------------------------------------------------------

  def _text(self, instruction: str) -> jax.Array:
    """The instruction in this embodiment's prompt template (+ the negative prompt with CFG)."""
    return self._prompt_encoder.text([instruction], [self.embodiment.id],
                                     self.settings.sampler.negative_prompt if self.with_uncond else None)

  def _check_inputs(self, field: str, frames: np.ndarray, num_frames: int | None,
                    robot_state: np.ndarray) -> None:
    """`field` (canvas frames [num_frames, H, W, 3], or one [H, W, 3] for None) and the raw robot
    state [embodiment's state_dim] against the config; a mismatch is a one-line ValueError naming it."""
    v = self.settings.video
    frames, robot_state = (x if hasattr(x, 'shape') else np.asarray(x) for x in (frames, robot_state))
    checks.check(field, chex.assert_shape, frames, (v.height, v.width, 3) if num_frames is None else
                 (num_frames, v.height, v.width, 3))
    checks.check('robot_state', chex.assert_shape, robot_state, (self.embodiment.state_dim,))

  def reset(self, instruction: str, first_frame: np.ndarray, robot_state: np.ndarray, seed: int = 0) -> Episode:
    """first_frame: one canvas frame [H, W, 3] in [-1, 1]; robot_state: raw [state_dim]."""
    self._check_inputs('first_frame', first_frame, None, robot_state)
    frame = jnp.asarray(first_frame, jnp.float32)[None, None]
    dit, vae, image = self.networks
    cache, cross_kv, vae_cache, i2v_cond = rollout.start(self.spec, dit, vae, image, frame, self._text(instruction),
                                                         frame)
    return Episode(cache, cross_kv, vae_cache, i2v_cond, chunk=0, written=0,
                   anchor_state=np.asarray(robot_state, np.float32), rng=jax.random.key(seed),
                   instruction=instruction)

  def fork(self, ep: Episode) -> Episode:
    """An independent copy (observe donates the episode's cache buffers to the update)."""
    return dataclasses.replace(ep, cache=jax.tree.map(jnp.copy, ep.cache), vae_cache=jax.tree.map(jnp.copy, ep.vae_cache))

  def normalised_state(self, robot_state: np.ndarray) -> jax.Array:
    """Raw robot state -> normalised and zero-padded to the model's state width [1, 1, state_dim]."""
    s = normalization.normalize(np.asarray(robot_state, np.float32), self.stats['state'])
    out = np.zeros((1, 1, self.settings.model.state_dim), np.float32)
    out[0, 0, :s.shape[-1]] = s
    return jnp.asarray(out)

  def observe(self, ep: Episode, frames: np.ndarray, robot_state: np.ndarray) -> Episode:
    """Writes the REAL frames [frames_per_chunk, H, W, 3] observed while chunk ep.chunk - 1 ran."""
    self._check_inputs('observed frames', frames, self.settings.video.frames_per_chunk, robot_state)
    if ep.written >= ep.chunk:
      raise ValueError('no predicted chunk is waiting for its observations: call step first')
    if ep.chunk == self.settings.video.max_chunks:
      # The context window is full: restart it from the newest real frame as frame 0.
      ep = self.reset(ep.instruction, frames[-1], robot_state, seed=int(jax.random.randint(ep.rng, (), 0, 2**30)))
      return ep
    dit, vae, _ = self.networks
    cache, vae_cache = rollout.observe(self.spec, dit, vae, ep.cache, ep.cross_kv, ep.vae_cache, ep.i2v_cond,
                                       jnp.asarray(frames, jnp.float32)[None], jnp.int32(ep.written))
    return dataclasses.replace(ep, cache=cache, vae_cache=vae_cache, written=ep.written + 1,
                               anchor_state=np.asarray(robot_state, np.float32))

  def step(self, ep: Episode) -> tuple[np.ndarray, np.ndarray, Episode, dict]:
    """Predicts chunk ep.chunk: (raw actions [horizon, action_dim], video latents, episode, info)."""
    if ep.written != ep.chunk:
      raise ValueError('the previous chunk\'s observations have not been written: call observe first')
    rng, sub = jax.random.split(ep.rng)
    video, actions, evaluations = rollout.denoise(
        self.spec, self.networks[0], ep.cache, ep.cross_kv, ep.i2v_cond, self.normalised_state(ep.anchor_state),
        jnp.int32(self.embodiment.id), jnp.int32(ep.chunk), sub)
    normalised = np.asarray(actions[0])
    raw = self.postprocess(normalised, ep.anchor_state)
    return raw, np.asarray(video), dataclasses.replace(ep, chunk=ep.chunk + 1, rng=rng), dict(
        dit_evaluations=int(evaluations), normalised_actions=normalised)

  def encode_video(self, video: np.ndarray) -> np.ndarray:
    """Canvas frames [1, 1 + 4k, H, W, 3] in [-1, 1] -> normalised latents [1, 1 + k, h, w, C]."""
    return np.asarray(rollout.encode_video(self.networks[1], jnp.asarray(video, jnp.float32)))

  def decode_video(self, latents: np.ndarray) -> np.ndarray:
    """Predicted latents [1, F, h, w, C] -> frames [T, H, W, 3] in [-1, 1] (for evaluation videos)."""
    return np.asarray(rollout.decode_video(self.networks[1], jnp.asarray(latents))[0])

  def postprocess(self, actions: np.ndarray, anchor_state: np.ndarray) -> np.ndarray:
    """Normalised padded actions -> raw robot actions (postprocess.robot_actions)."""
    return postprocess.robot_actions(actions, anchor_state, self.stats['action'], self.embodiment.action_dim,
                                     self.relative_dims, self.settings.postprocess)
