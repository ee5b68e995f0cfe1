"""The frozen encoders (Wan VAE, umT5, CLIP) and the step from a data batch to DiT inputs.

Training and inference share this path: pixels -> VAE latents (+ the I2V condition y), the
instruction in its embodiment's prompt template -> umT5 embeddings through a prompt cache
(`PromptEncoder.text`, the one place a prompt becomes embeddings), frame 0 -> CLIP features.
Nothing here is ever optimised: the train step only sees its outputs.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamzero_jax import checkpoint, embodiments
from dreamzero_jax.models import clip, text_cache, umt5, vae
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.models.vae import I2V_MASK_CHANNELS
from dreamzero_jax.models.weights import release
from dreamzero_jax.settings import Settings, as_dict


class ByteTokenizer:
  """UTF-8 bytes as token ids (pad 0, EOS 1, bytes from 2) for toy configs with no tokenizer file.

  Real configs set text_encoder.tokenizer to the umT5 sentencepiece model of their checkpoint.
  """

  def __init__(self, vocab_size: int, text_len: int):
    if vocab_size < 3:
      raise ValueError(f'text_encoder.vocab_size={vocab_size} leaves no room for byte tokens')
    self.vocab_size, self.text_len = vocab_size, text_len

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(prompts), self.text_len), np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for i, prompt in enumerate(prompts):
      tokens = [2 + b % (self.vocab_size - 2) for b in prompt.encode('utf-8')][:self.text_len - 1] + [1]
      ids[i, :len(tokens)] = tokens
      lengths[i] = len(tokens)
    return ids, lengths


def make_tokenizer(settings: Settings):
  if settings.text_encoder.tokenizer:
    return umt5.UMT5Tokenizer(settings.text_encoder.tokenizer, settings.model.text_len)
  return ByteTokenizer(settings.text_encoder.vocab_size, settings.model.text_len)


def uses_i2v_condition(settings: Settings) -> bool:
  m, v = settings.model, settings.video
  extra = m.in_channels - v.latent_channels
  if extra not in (0, I2V_MASK_CHANNELS + v.latent_channels):
    raise ValueError(f'model.in_channels={m.in_channels}: expected {v.latent_channels} (T2V) or '
                     f'{2 * v.latent_channels + I2V_MASK_CHANNELS} (I2V) for video.latent_channels='
                     f'{v.latent_channels}')
  return extra > 0


class FrozenEncoders(nnx.Module):
  """VAE + umT5 + (for I2V with an image branch) CLIP, built from the config."""

  def __init__(self, settings: Settings, *, rngs: nnx.Rngs):
    m, v, text, image = settings.model, settings.video, settings.text_encoder, settings.image_encoder
    if text.dim != m.text_dim:
      raise ValueError(f'text_encoder.dim={text.dim} must equal model.text_dim={m.text_dim}')
    if settings.vae.z_dim != v.latent_channels:
      raise ValueError(f'vae.z_dim={settings.vae.z_dim} must equal video.latent_channels={v.latent_channels}')
    self.vae = vae.WanVAE(settings.vae, rngs=rngs)
    if self.vae.spatial_factor != v.vae_spatial:
      raise ValueError(f'video.vae_spatial={v.vae_spatial}: the vae config (kind {settings.vae.kind}, dim_mult '
                       f'{tuple(settings.vae.dim_mult)}) compresses {self.vae.spatial_factor}x')
    self.text = umt5.UMT5Encoder(text, rngs=rngs)
    if m.image_dim and image.width != m.image_dim:
      raise ValueError(f'image_encoder.width={image.width} must equal model.image_dim={m.image_dim}')
    self.image = clip.CLIPVision(image, rngs=rngs) if m.image_dim else None


def with_params(abstract: nnx.Module, params: dict) -> nnx.Module:
  """An abstract (nnx.eval_shape) module filled with a pure dict of parameter arrays."""
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def build_frozen_encoders(settings: Settings) -> FrozenEncoders:
  """The frozen VAE / umT5 / CLIP: the weights of settings.init.converted (a `convert` output), or
  random ones drawn at settings.seed + 1 when it is '' (toy configs and tests); then the VAE's replaced
  by settings.init.vae's (a VAE trained by `python -m dreamzero_jax.training.vae_training`) when that is set."""
  if not settings.init.converted:
    encoders = FrozenEncoders(settings, rngs=nnx.Rngs(settings.seed + 1))
  else:
    _, params = release.load_converted(settings.init.converted, settings, parts=('encoders',))
    encoders = with_params(nnx.eval_shape(lambda: FrozenEncoders(settings, rngs=nnx.Rngs(0))), params)
  if settings.init.vae:
    state = nnx.state(encoders.vae)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, trained_vae_params(settings)))
    nnx.update(encoders.vae, state)
  return encoders


def with_vae_digest(settings: Settings) -> Settings:
  """settings with init.vae_sha256 set to the digest of init.vae's weights where it names a VAE and no
  digest: what a DiT trained on it records, so evaluating or resuming the run with a config that
  names the path is checked against the weights actually there."""
  if not settings.init.vae or settings.init.vae_sha256:
    return settings
  try:
    digest = checkpoint.weights_digest(settings.init.vae)
  except (OSError, ValueError) as e:
    raise ValueError(f'init.vae: {e}') from None
  return dataclasses.replace(settings, init=dataclasses.replace(settings.init, vae_sha256=digest))


def trained_vae_params(settings: Settings) -> dict:
  """The VAE parameters (pure dict of numpy arrays) in settings.init.vae, refused (ValueError naming
  init.vae) when they were trained for another vae config or hold NaN or inf."""
  directory = settings.init.vae
  try:
    meta = checkpoint.read_weights_meta(directory)
  except (OSError, ValueError) as e:
    raise ValueError(f'init.vae: {e}') from None
  diffs = checkpoint.config_differences(meta.get('config', {}), as_dict(settings), ('vae',))
  if diffs:
    raise ValueError(f'init.vae: {directory} was trained for another vae config: ' + '; '.join(diffs))
  abstract = nnx.state(nnx.eval_shape(lambda: vae.WanVAE(settings.vae, rngs=nnx.Rngs(0)))).to_pure_dict()
  try:
    digest = checkpoint.weights_digest(directory) if settings.init.vae_sha256 else None
    if digest is not None and digest != settings.init.vae_sha256:
      raise ValueError(f'{directory} holds other weights (sha256 {digest[:12]}...) than the model was trained '
                       f'with (init.vae_sha256 {settings.init.vae_sha256[:12]}...)')
    return checkpoint.load_weights(directory, abstract)
  except (OSError, ValueError) as e:
    raise ValueError(f'init.vae: {e}') from None


def initial_dit_params(settings: Settings) -> dict:
  """The DiT parameters (pure dict) a fresh run starts from: settings.init.converted's weights as host
  numpy arrays (placed by the caller, e.g. straight into a pod's shards), or random at settings.seed."""
  if not settings.init.converted:
    return nnx.state(build_dit(settings.model, rngs=nnx.Rngs(settings.seed))).to_pure_dict()
  params, _ = release.load_converted(settings.init.converted, settings, parts=('dit',))
  return params


def initial_dit_shapes(settings: Settings) -> dict:
  """The DiT's parameters (pure dict) at random initialisation; under jax.eval_shape, their shapes."""
  return nnx.state(build_dit(settings.model, rngs=nnx.Rngs(0))).to_pure_dict()


def initial_dit(settings: Settings):
  """The DiT module of initial_dit_params on the default device."""
  return with_params(nnx.eval_shape(lambda: build_dit(settings.model, rngs=nnx.Rngs(0))), initial_dit_params(settings))


class PromptEncoder:
  """Instructions -> umT5 embeddings: each read in its embodiment's prompt template and encoded once
  (`prompts`, a PromptCache). `text` is the one place a prompt becomes embeddings, so training,
  evaluation and serving template it the same way.

  host=True keeps the weights in host memory and puts them on the device only for a batch of new
  prompts (inference: umT5-XXL's 5.7B parameters need not sit beside the DiT and its KV cache during
  control); host=False keeps them on the device (training meets new prompts every step).
  """

  def __init__(self, text: umt5.UMT5Encoder, settings: Settings, host: bool = False):
    graphdef, state = nnx.split(text)
    self.state = jax.device_get(state) if host else state
    encode_fn = jax.jit(lambda state, ids, lengths: nnx.merge(graphdef, state)(ids, lengths))
    tokenizer = make_tokenizer(settings)

    def encode(prompts):
      ids, lengths = tokenizer(prompts)
      return np.asarray(encode_fn(self.state, ids, lengths)), lengths

    self.prompts = text_cache.PromptCache(encode)
    self.templates = embodiments.prompt_templates(settings.data)

  def text(self, instructions: Sequence[str | bytes], embodiment_ids: Sequence[int],
           negative_prompt: str | None = None) -> jax.Array:
    """[B (+1), text_len, text_dim]: each instruction in its embodiment's prompt template, then
    `negative_prompt` as given (CFG's unconditional branch) if one is given."""
    prompts = []
    for instruction, eid in zip(instructions, np.asarray(embodiment_ids).reshape(-1), strict=True):
      text = instruction.decode('utf-8') if isinstance(instruction, bytes) else str(instruction)
      if int(eid) not in self.templates:
        raise ValueError(f'embodiment_id: {int(eid)} has no prompt template')
      prompts.append(embodiments.prompt(text, self.templates[int(eid)]))
    if negative_prompt is not None:
      prompts.append(negative_prompt)
    return jnp.asarray(self.prompts(prompts))


class LatentBatch(NamedTuple):
  """A training batch after the frozen encoders: what the DiT consumes."""
  latents: jax.Array          # [B, F, h, w, C] clean VAE latents, F = 1 + K * lf
  i2v_cond: jax.Array | None  # [B, F, h, w, 20] the I2V condition y, or None (T2V / TI2V)
  text: jax.Array             # [B, Lt, text_dim] umT5 embeddings, zero past each prompt
  image: jax.Array | None     # [B, Li, image_dim] CLIP features, or None
  actions: jax.Array          # [B, K*Ha, A] normalised to [-1, 1]
  action_mask: jax.Array      # [B, K*Ha, A] bool
  state: jax.Array            # [B, K, S]
  chunk_mask: jax.Array       # [B, K] bool
  embodiment_id: jax.Array    # [B] int32


class BatchEncoder:
  """Turns data batches (the pipeline's contract) into LatentBatch, caching prompt embeddings.

  A batch with `latent_row` instead of `video` (data.latent_cache) takes its latents, I2V condition
  and CLIP features from `cache` (training/latent_cache.py), which `pixels` filled.
  """

  def __init__(self, encoders: FrozenEncoders, settings: Settings, cache=None):
    self.i2v = uses_i2v_condition(settings)
    self.cache = cache
    graphdef, state = nnx.split(encoders)
    self._state = state

    def pixels(state, video):
      enc = nnx.merge(graphdef, state)
      latents = enc.vae.encode(video)
      i2v_cond = enc.vae.i2v_condition(video[:, 0], video.shape[1]) if self.i2v else None
      image = clip.encode_first_frame(enc.image, video) if enc.image is not None else None
      return jax.lax.stop_gradient((latents, i2v_cond, image))

    self._pixels = jax.jit(pixels)
    self.prompts = PromptEncoder(encoders.text, settings)

  def pixels(self, video) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Video [B, T, H, W, 3] in [-1, 1] -> (VAE latents, I2V condition or None, CLIP features or None)."""
    return self._pixels(self._state, jnp.asarray(video))

  def __call__(self, batch: dict) -> LatentBatch:
    if 'latent_row' in batch:
      if self.cache is None:
        raise ValueError('batch has latent_row but no latent cache was given')
      latents, i2v_cond, image = (None if x is None else jnp.asarray(x)
                                  for x in self.cache.gather(batch['latent_row']))
    else:
      latents, i2v_cond, image = self.pixels(batch['video'])
    return LatentBatch(
        latents=latents, i2v_cond=i2v_cond, text=self.prompts.text(batch['instruction'], batch['embodiment_id']),
        image=image,
        actions=jnp.asarray(batch['actions']), action_mask=jnp.asarray(batch['action_mask']),
        state=jnp.asarray(batch['state']), chunk_mask=jnp.asarray(batch['chunk_mask']),
        embodiment_id=jnp.asarray(batch['embodiment_id'], jnp.int32))
