"""The DreamZero DiT: a Wan2.1/2.2 video diffusion transformer plus action and state tokens.

Layout: video latents are channels-last [B, F, H, W, C]; token sequences [B, L, D]. Blocks are
stacked on a leading 'layers' axis and applied with lax.scan (or a Python loop), with remat.

Timesteps are PER TOKEN (DreamZero), yet a sequence holds only a handful of distinct ones (clean
frames, each noisy frame's t, each action's t): the time embedding runs on those G timesteps, giving
an adaLN table [B, G, 6, D], and each token carries its group id (kernels.modulation.TimeGroups).
The blocks and the video head read the table through kernels.modulation (fused LayerNorm +
modulate, gated residual), so the per-token e0 [B, L, 6, D] is never built. Tokens attend under a
mask built from token groups (masks.py); at inference the self-attention also reads a KV cache of
earlier clean frames (past_kv) and can return the K/V of its own tokens to extend that cache.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamzero_jax import sharding
from dreamzero_jax.kernels import modulation, qk_norm_rope, registry
from dreamzero_jax.kernels.modulation import TimeGroups
from dreamzero_jax.models import attention, embodiment, kv_cache, layers, masks, rope
from dreamzero_jax.models.layers import (Dense, Fp8Dense, LayerNorm, RMSNorm, gelu_exact, gelu_tanh, normal,
                                         param, zeros)
from dreamzero_jax.settings import ModelSettings

REMAT_POLICIES = {
    'none': None,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('self_attn_out', 'cross_attn_out'),
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  dim: int
  num_layers: int
  num_heads: int
  ffn_dim: int
  freq_dim: int
  in_channels: int
  out_channels: int
  patch_size: tuple[int, int, int]
  text_dim: int
  image_dim: int
  eps: float
  rope_theta: float
  cross_attn_norm: bool
  action_dim: int
  state_dim: int
  embodiment_hidden: int
  num_embodiments: int
  dtype: Any
  param_dtype: Any
  scan_layers: bool
  remat_policy: str
  attention: str
  attention_block_q: int
  inference_attention_block_q: int
  kernels: str
  attention_mask: str
  inference_state_attention: str
  seq_pad_multiple: int

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @classmethod
  def from_config(cls, model: ModelSettings) -> 'DiTConfig':
    kw = {f.name: getattr(model, f.name) for f in dataclasses.fields(cls)}
    kw['patch_size'] = tuple(kw['patch_size'])
    kw['dtype'] = jnp.dtype(kw['dtype'])
    kw['param_dtype'] = jnp.dtype(kw['param_dtype'])
    if kw['dim'] % kw['num_heads'] or (kw['dim'] // kw['num_heads']) % 2:
      raise ValueError(f'model.dim {kw["dim"]} must split into num_heads {kw["num_heads"]} even heads')
    if kw['inference_state_attention'] not in masks.INFERENCE_STATE_ATTENTION:
      raise ValueError(f'model.inference_state_attention {kw["inference_state_attention"]!r} unknown '
                       f'(known: {", ".join(masks.INFERENCE_STATE_ATTENTION)})')
    if kw['kernels'] not in registry.FALLBACK:
      raise ValueError(f'model.kernels {kw["kernels"]!r} unknown (known: {", ".join(registry.FALLBACK)})')
    if kw['remat_policy'] not in REMAT_POLICIES:
      raise ValueError(f'model.remat_policy {kw["remat_policy"]!r} unknown (known: {", ".join(REMAT_POLICIES)})')
    return cls(**kw)


class AttentionProjections(nnx.Module):
  """The q/k/v/o projections and the q/k RMSNorms of an attention layer, for self- and cross-attention
  alike (their parameter names are what the official key maps, models/weights/dit_keys.py, target)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.cfg = cfg
    self.q = Dense(d, d, ('embed', 'heads'), rngs=rngs)
    self.k = Dense(d, d, ('embed', 'heads'), rngs=rngs)
    self.v = Dense(d, d, ('embed', 'heads'), rngs=rngs)
    self.o = Dense(d, d, ('heads', 'embed'), rngs=rngs)
    self.norm_q = RMSNorm(d, eps=cfg.eps, rngs=rngs, axis_name='heads')
    self.norm_k = RMSNorm(d, eps=cfg.eps, rngs=rngs, axis_name='heads')

  def heads(self, x):
    return x.reshape(*x.shape[:-1], self.cfg.num_heads, self.cfg.head_dim)


class SelfAttention(AttentionProjections):

  def __call__(self, x, angles, mask, past_kv, block_q):
    """Returns (output, (k, v) of these tokens after norm and RoPE); block_q: attention.attend's."""
    norm_rope = lambda y, norm: qk_norm_rope.qk_norm_rope(self.heads(y), norm.scale[...], angles, eps=norm.eps,
                                                          impl=self.cfg.kernels)
    q, k = norm_rope(self.q(x), self.norm_q), norm_rope(self.k(x), self.norm_k)
    v = self.heads(self.v(x))
    keys, values = k, v
    if past_kv is not None:
      keys = jnp.concatenate([past_kv[0].astype(k.dtype), k], axis=1)
      values = jnp.concatenate([past_kv[1].astype(v.dtype), v], axis=1)
    out = attention.attend(q, keys, values, mask, impl=self.cfg.attention, block_q=block_q)
    out = checkpoint_name(out, 'self_attn_out')
    return self.o(out.reshape(*x.shape[:-1], -1)), (k, v)


class CrossKV(NamedTuple):
  """Per-layer K/V of the text (and image) context; computed once per episode at inference."""
  k: jax.Array
  v: jax.Array
  k_img: jax.Array | None
  v_img: jax.Array | None


class CrossAttention(AttentionProjections):
  """Attention to text tokens plus, for I2V, CLIP image tokens with their own K/V; outputs summed."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    if cfg.image_dim:
      d = cfg.dim
      self.k_img = Dense(d, d, ('embed', 'heads'), rngs=rngs)
      self.v_img = Dense(d, d, ('embed', 'heads'), rngs=rngs)
      self.norm_k_img = RMSNorm(d, eps=cfg.eps, rngs=rngs, axis_name='heads')

  def context_kv(self, text: jax.Array, image: jax.Array | None) -> CrossKV:
    k = self.heads(self.norm_k(self.k(text)))
    v = self.heads(self.v(text))
    if not self.cfg.image_dim:
      return CrossKV(k, v, None, None)
    return CrossKV(k, v, self.heads(self.norm_k_img(self.k_img(image))), self.heads(self.v_img(image)))

  def __call__(self, x, kv: CrossKV):
    q = self.heads(self.norm_q(self.q(x)))
    out = attention.attend(q, kv.k.astype(q.dtype), kv.v.astype(q.dtype), None, impl=self.cfg.attention)
    if kv.k_img is not None:
      out = out + attention.attend(q, kv.k_img.astype(q.dtype), kv.v_img.astype(q.dtype), None,
                                   impl=self.cfg.attention)
    out = checkpoint_name(out, 'cross_attn_out')
    return self.o(out.reshape(*x.shape[:-1], -1))


class Block(nnx.Module):
  """x += g1*SelfAttn(LN(x)(1+s1)+b1); x += CrossAttn(LN_affine(x)); x += g2*FFN(LN(x)(1+s2)+b2).

  The modulated LNs (no affine) are fused with their modulation: kernels.modulation.
  """

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.cfg = cfg
    self.self_attn = SelfAttention(cfg, rngs=rngs)
    self.norm3 = LayerNorm(d, eps=cfg.eps, affine=True, rngs=rngs) if cfg.cross_attn_norm else None
    self.cross_attn = CrossAttention(cfg, rngs=rngs)
    self.ffn1 = Dense(d, cfg.ffn_dim, ('embed', 'mlp'), rngs=rngs)
    self.ffn2 = Dense(cfg.ffn_dim, d, ('mlp', 'embed'), rngs=rngs)
    self.modulation = param(rngs, normal(1.0 / math.sqrt(d)), (6, d), (None, 'embed'))

  def __call__(self, x, e0, group, angles, cross_kv: CrossKV, mask, past_kv=None, block_q=None):
    """x [B, L, D] fp32 residual stream; e0 [B, G, 6, D] fp32 per-group table, group [L] or [B, L]
    each token's row of it; block_q the self-attention's query block (None: model.attention_block_q).
    Returns (x, (k, v))."""
    dt, impl = self.cfg.dtype, self.cfg.kernels
    mod = self.modulation[...].astype(jnp.float32) + e0
    shift1, scale1, gate1, shift2, scale2, gate2 = [mod[:, :, i] for i in range(6)]
    modulate = lambda x, shift, scale: modulation.layer_norm_modulate(x, shift, scale, group, eps=self.cfg.eps,
                                                                       out_dtype=dt, impl=impl)
    block_q = self.cfg.attention_block_q if block_q is None else block_q
    y, kv = self.self_attn(modulate(x, shift1, scale1), angles, mask, past_kv, block_q)
    x = modulation.gated_residual(x, y, gate1, group)
    h = (self.norm3(x) if self.norm3 is not None else x).astype(dt)
    x = x + self.cross_attn(h, cross_kv).astype(jnp.float32)
    y = self.ffn2(gelu_tanh(self.ffn1(modulate(x, shift2, scale2))))
    x = modulation.gated_residual(x, y, gate2, group)
    return sharding.constrain(x, ('activation_batch', 'activation_length', 'activation_embed')), kv


def time_sinusoid(t: jax.Array, dim: int) -> jax.Array:
  """Wan's 256-dim [cos, sin] timestep embedding, t [...] -> [..., dim] (fp32)."""
  half = dim // 2
  freqs = jnp.asarray(np.power(10000.0, -np.arange(half, dtype=np.float64) / half), jnp.float32)
  angles = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1)


def teacher_forcing_groups(video_t: jax.Array, action_t: jax.Array, tokens_per_frame: int,
                           num_chunks: int) -> TimeGroups:
  """Timestep groups of [clean video | noisy video | actions | states]: one group for the clean
  tokens (t=0), one per noisy frame (video_t [B, F]), one per action (action_t [B, K*Ha]); the
  state token of chunk k joins its chunk's first action (the official DiT's
  timestep_action[:, ::horizon]), so it runs at chunk k's action timestep, not 0."""
  b, f = video_t.shape
  horizon = action_t.shape[1] // num_chunks
  groups = modulation.time_groups([(jnp.zeros((b, 1)), f * tokens_per_frame), (video_t, tokens_per_frame),
                                   (action_t, 1)])
  state = 1 + f + horizon * np.arange(num_chunks, dtype=np.int32)
  return TimeGroups(groups.t, np.concatenate([groups.group, state]))


def teacher_forcing_timesteps(video_t: jax.Array, action_t: jax.Array, tokens_per_frame: int,
                              num_chunks: int) -> jax.Array:
  """Per-token t [B, L] of teacher_forcing_groups."""
  return teacher_forcing_groups(video_t, action_t, tokens_per_frame, num_chunks).per_token()


def per_token_groups(t: jax.Array) -> TimeGroups:
  """Per-token timesteps [B, L] as groups: each token its own (the modulation of e0 [B, L, 6, D])."""
  return TimeGroups(t, np.arange(t.shape[1], dtype=np.int32))


class DreamZeroDiT(nnx.Module):
  """Wan DiT backbone + DreamZero action/state modules."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.cfg = cfg
    pt, ph, pw = cfg.patch_size
    # Conv3d with stride = kernel is a Dense over (pt, ph, pw, C_in) patches.
    self.patch_embedding = Dense(pt * ph * pw * cfg.in_channels, d, ('conv_in', 'embed'), rngs=rngs)
    self.text_embedding1 = Dense(cfg.text_dim, d, ('input', 'embed'), rngs=rngs, init=normal(0.02))
    self.text_embedding2 = Dense(d, d, (None, 'embed'), rngs=rngs, init=normal(0.02))
    self.time_embedding1 = Dense(cfg.freq_dim, d, ('input', 'embed'), rngs=rngs, init=normal(0.02))
    self.time_embedding2 = Dense(d, d, (None, 'embed'), rngs=rngs, init=normal(0.02))
    self.time_projection = Dense(d, 6 * d, (None, 'embed'), rngs=rngs)
    if cfg.image_dim:
      self.img_norm1 = LayerNorm(cfg.image_dim, eps=1e-5, affine=True, rngs=rngs)
      self.img_proj1 = Dense(cfg.image_dim, cfg.image_dim, ('input', None), rngs=rngs)
      self.img_proj2 = Dense(cfg.image_dim, d, ('input', 'embed'), rngs=rngs)
      self.img_norm2 = LayerNorm(d, eps=1e-5, affine=True, rngs=rngs)

    with layers.stacked(cfg.num_layers):
      self.blocks = Block(cfg, rngs=rngs)  # every parameter [layers, ...], applied by lax.scan
    self.head = Dense(d, pt * ph * pw * cfg.out_channels, ('embed', None), rngs=rngs, init=zeros)
    self.head_modulation = param(rngs, normal(1.0 / math.sqrt(d)), (2, d), (None, 'embed'))

    e, a, s, h = cfg.num_embodiments, cfg.action_dim, cfg.state_dim, cfg.embodiment_hidden
    self.action_encoder = embodiment.ActionEncoder(e, a, d, rngs=rngs)
    self.state_encoder = embodiment.EmbodimentMLP(e, s, h, d, ('input', 'embed'), rngs=rngs)
    self.action_decoder = embodiment.EmbodimentMLP(e, d, h, a, ('embed', 'input'), rngs=rngs)

  # ---- inputs to tokens -------------------------------------------------------------------------

  def embed_video(self, latents: jax.Array) -> jax.Array:
    """[B, F, H, W, C_in] -> tokens [B, F'*H'*W', D] in (f, h, w) raster order."""
    b, f, hh, ww, c = latents.shape
    pt, ph, pw = self.cfg.patch_size
    x = latents.reshape(b, f // pt, pt, hh // ph, ph, ww // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, pt * ph * pw * c)
    return self.patch_embedding(x.astype(self.cfg.dtype)).astype(jnp.float32)

  def unpatchify(self, tokens: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """Head output [B, f*h*w, pt*ph*pw*C_out] -> [B, F, H, W, C_out]."""
    b = tokens.shape[0]
    f, h, w = grid
    pt, ph, pw = self.cfg.patch_size
    c = self.cfg.out_channels
    x = tokens.reshape(b, f, h, w, pt, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f * pt, h * ph, w * pw, c)

  def embed_context(self, text: jax.Array, image: jax.Array | None = None):
    """Text [B, Lt, text_dim] (zeros past each prompt) and CLIP features [B, Li, image_dim]."""
    dt = self.cfg.dtype
    txt = self.text_embedding2(gelu_tanh(self.text_embedding1(text.astype(dt))))
    if not self.cfg.image_dim:
      return txt, None
    if image is None:
      raise ValueError('this model has an image branch (model.image_dim > 0): pass CLIP features')
    img = self.img_norm1(image.astype(jnp.float32)).astype(dt)
    img = self.img_proj2(gelu_exact(self.img_proj1(img)))
    return txt, self.img_norm2(img.astype(jnp.float32)).astype(dt)

  def time_embed(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Timesteps t [B, G] (a group table's, or per token) -> (e [B, G, D], e0 [B, G, 6, D]), fp32."""
    # Split by batch like the tokens they modulate, whole along the (few) groups: left alone, XLA
    # shards the modulation by width and gathers the batch (per-token e0 was 3x the memory of the
    # 5B step on a v5p slice).
    rows = ('activation_batch', None, 'activation_embed')
    h = sharding.constrain(self.time_embedding1(time_sinusoid(t, self.cfg.freq_dim)), rows)
    e = sharding.constrain(self.time_embedding2(jax.nn.silu(h)), rows)
    e0 = self.time_projection(jax.nn.silu(e)).reshape(*t.shape, 6, self.cfg.dim)
    return e, sharding.constrain(e0, ('activation_batch', None, None, 'activation_embed'))

  def embed_actions(self, actions, t, embodiment_id):
    return self.action_encoder(actions.astype(self.cfg.dtype), t, embodiment_id).astype(jnp.float32)

  def embed_state(self, state, embodiment_id):
    return self.state_encoder(state.astype(self.cfg.dtype), embodiment_id).astype(jnp.float32)

  # ---- the transformer ----------------------------------------------------------------------------

  def cross_kv(self, text_tokens, image_tokens) -> CrossKV:
    """Stacked per-layer cross-attention K/V [layers, B, L, H, Dh] (precompute once per episode)."""
    graphdef, state = nnx.split(self.blocks)

    def one(layer_state):
      return nnx.merge(graphdef, layer_state).cross_attn.context_kv(text_tokens, image_tokens)

    return jax.lax.map(one, state)

  def backbone(self, x, t: TimeGroups | jax.Array, angles, mask, *, cross_kv: CrossKV, past_kv=None,
               kv_dtype=None, block_q=None):
    """Runs the blocks. x [B, L, D] fp32, angles [L, Dh/2], mask [Lq, Lk] or None; t the tokens'
    timestep groups (TimeGroups), or per-token timesteps [B, L] (each token its own group).

    past_kv: (k, v) each [layers, B, Lc, H, Dh] of cached tokens that precede x in the keys.
    kv_dtype: return x's own (k, v), stacked over layers and stored in this dtype layer by layer (the
    KV cache's: an fp8 cache never holds the 40 layers' K/V in bf16); None: return none. block_q:
    the self-attention's query block on the XLA path (None: model.attention_block_q).
    Returns (hidden [B, L, D], e [B, G, D] per group, (k, v) of x [layers, B, L, H, Dh] or None).
    """
    groups = t if isinstance(t, TimeGroups) else per_token_groups(t)
    e, e0 = self.time_embed(groups.t)
    x = sharding.constrain(x, ('activation_batch', 'activation_length', 'activation_embed'))
    graphdef, state = nnx.split(self.blocks)

    def body(x, xs):
      layer_state, ckv, pkv = xs
      x, kv = nnx.merge(graphdef, layer_state)(x, e0, groups.group, angles, ckv, mask, pkv, block_q)
      return x, (None if kv_dtype is None else jax.tree.map(lambda a: kv_cache.stored(a, kv_dtype), kv))

    policy = self.cfg.remat_policy
    if policy != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=not self.cfg.scan_layers)
    xs = (state, cross_kv, past_kv)
    if self.cfg.scan_layers:
      x, kvs = jax.lax.scan(body, x, xs)
    else:
      outs = []
      for i in range(self.cfg.num_layers):
        x, kv = body(x, jax.tree.map(lambda a: a[i], xs))
        outs.append(kv)
      kvs = None if kv_dtype is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, e, kvs

  def video_head(self, hidden, e, group):
    """Modulated LN + Linear on video tokens: hidden [B, N, D], e [B, G, D] per group, group [N] or
    [B, N] each token's -> [B, N, pt*ph*pw*C_out] (fp32)."""
    mod = self.head_modulation[...].astype(jnp.float32)[None, None] + e[:, :, None, :]
    h = modulation.layer_norm_modulate(hidden, mod[:, :, 0], mod[:, :, 1], group, eps=self.cfg.eps,
                                       out_dtype=self.cfg.dtype, impl=self.cfg.kernels)
    return self.head(h).astype(jnp.float32)

  def action_head(self, hidden, embodiment_id):
    return self.action_decoder(hidden.astype(self.cfg.dtype), embodiment_id).astype(jnp.float32)

  # ---- whole forwards ------------------------------------------------------------------------------

  def wan_forward(self, video, t, text, image=None, frame_offset=0):
    """The plain Wan DiT: all video tokens see each other. video [B, F, H, W, C_in], t [B] or
    [B, L] (per token) -> velocity [B, F, H, W, C_out]."""
    tokens = self.embed_video(video)
    length = tokens.shape[1]
    pt, ph, pw = self.cfg.patch_size
    grid = (video.shape[1] // pt, video.shape[2] // ph, video.shape[3] // pw)
    groups = (TimeGroups(t[:, None], np.zeros(length, np.int32)) if t.ndim == 1 else per_token_groups(t))
    angles = rope.video_angles(*grid, self.cfg.head_dim, self.cfg.rope_theta, frame_offset)
    txt, img = self.embed_context(text, image)
    hidden, e, _ = self.backbone(tokens, groups, angles, None, cross_kv=self.cross_kv(txt, img))
    return self.unpatchify(self.video_head(hidden, e, groups.group), grid)

  def teacher_forcing(self, clean, noisy, video_t, actions, action_t, state, embodiment_id, text,
                      image=None, i2v_cond=None):
    """The training forward over [clean video | noisy video | K*Ha actions | K states].

    clean, noisy: latents [B, F, H, W, C] with F = 1 + K * latent_frames_per_chunk; video_t [B, F]
    timesteps of the noisy frames (clean frames run at t=0); actions [B, K*Ha, A] noisy, action_t
    [B, K*Ha] (constant within a chunk; chunk k's state token runs at it); state [B, K, S];
    i2v_cond: the I2V condition y [B, F, H, W, 20] appended to both copies.
    Returns (video velocity [B, F, H, W, C_out], action velocity [B, K*Ha, A]).
    """
    b, f, hh, ww, _ = clean.shape
    k = state.shape[1]
    if (f - 1) % k or actions.shape[1] % k:
      raise ValueError(f'{f} latent frames / {actions.shape[1]} actions do not split into {k} chunks')
    lf, ha = (f - 1) // k, actions.shape[1] // k
    pt, ph, pw = self.cfg.patch_size
    grid = (f // pt, hh // ph, ww // pw)
    n = grid[0] * grid[1] * grid[2]
    if i2v_cond is not None:
      clean, noisy = (jnp.concatenate([z, i2v_cond.astype(z.dtype)], -1) for z in (clean, noisy))
    x = jnp.concatenate([self.embed_video(clean), self.embed_video(noisy),
                         self.embed_actions(actions, action_t, embodiment_id),
                         self.embed_state(state, embodiment_id)], 1)
    groups = teacher_forcing_groups(video_t, action_t, n // f, k)
    hd, theta = self.cfg.head_dim, self.cfg.rope_theta
    video_angles = rope.video_angles(*grid, hd, theta)
    angles = jnp.concatenate([video_angles, video_angles, rope.linear_angles(jnp.arange(k * ha), hd, theta),
                              rope.linear_angles(jnp.arange(k), hd, theta)], 0)
    layout = masks.teacher_forcing_layout(k, lf, n // f, ha)
    length = -(-x.shape[1] // self.cfg.seq_pad_multiple) * self.cfg.seq_pad_multiple
    if length > x.shape[1]:  # block-multiple lengths for flash kernels; padding is masked out
      extra = length - x.shape[1]
      x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
      groups = groups.padded(length)
      angles = jnp.pad(angles, ((0, extra), (0, 0)))
      layout = masks.pad_layout(layout, length)
    mask = masks.attention_mask(layout, layout, self.cfg.attention_mask)
    hidden, e, _ = self.backbone(x, groups, angles, mask, cross_kv=self.cross_kv(*self.embed_context(text, image)))
    video_v = self.unpatchify(self.video_head(hidden[:, n:2 * n], e, groups.group[n:2 * n]), grid)
    action_v = self.action_head(hidden[:, 2 * n:2 * n + k * ha], embodiment_id)
    return video_v, action_v

  # ---- inference against a KV cache ---------------------------------------------------------------

  def _with_i2v_cond(self, latents, i2v_cond):
    return latents if i2v_cond is None else jnp.concatenate([latents, i2v_cond.astype(latents.dtype)], -1)

  def write_clean_frames(self, latents, cache, cross_kv, *, chunk=None, i2v_cond=None):
    """Runs observed latent frames (t=0) through the model against the cache; appends their K/V.

    latents [B, n, H, W, C]. chunk=None: the episode's conditioning frame 0 (n == 1); otherwise
    the n latent frames of chunk `chunk` (may be traced), absolute frames 1 + chunk*n onwards.
    """
    _, n, hh, ww, _ = latents.shape
    pt, ph, pw = self.cfg.patch_size
    grid = (n // pt, hh // ph, ww // pw)
    if chunk is None:
      if n != 1:
        raise ValueError(f'the conditioning frame is one latent frame, got {n}')
      layout, first = masks.segment(masks.Group.CLEAN0, 0, grid[1] * grid[2]), 0
    else:
      layout = masks.segment(masks.Group.CLEAN, 0, n * grid[1] * grid[2]).shifted(chunk)
      first = 1 + chunk * n
    x = self.embed_video(self._with_i2v_cond(latents, i2v_cond))
    angles = rope.video_angles(*grid, self.cfg.head_dim, self.cfg.rope_theta, first)
    mask = masks.attention_mask(layout, masks.TokenLayout.concat(cache.layout, layout), self.cfg.attention_mask)
    clean = TimeGroups(jnp.zeros((x.shape[0], 1)), np.zeros(x.shape[1], np.int32))
    _, _, (k, v) = self.backbone(x, clean, angles, mask, cross_kv=cross_kv, past_kv=(cache.k, cache.v),
                                 kv_dtype=cache.k.dtype, block_q=self.cfg.inference_attention_block_q)
    return kv_cache.append(cache, k, v, layout)

  def denoise(self, noisy, video_t, actions, action_t, state, embodiment_id, chunk, cache, cross_kv,
              i2v_cond=None):
    """One velocity evaluation for chunk `chunk` against the cache of earlier real frames.

    noisy [B, lf, H, W, C] latents of the chunk, video_t [B], actions [B, Ha, A], action_t [B] (also
    the state token's), state [B, 1, S]. State queries see what model.inference_state_attention says. Returns (video velocity [B, lf, H, W, C_out], action velocity [B, Ha, A]).
    """
    b, lf, hh, ww, _ = noisy.shape
    ha = actions.shape[1]
    pt, ph, pw = self.cfg.patch_size
    grid = (lf // pt, hh // ph, ww // pw)
    n = grid[0] * grid[1] * grid[2]
    x = jnp.concatenate([
        self.embed_video(self._with_i2v_cond(noisy, i2v_cond)),
        self.embed_actions(actions, jnp.broadcast_to(action_t[:, None], (b, ha)), embodiment_id),
        self.embed_state(state, embodiment_id)], 1)
    # Two groups: the video tokens at video_t; actions and the state token at action_t.
    groups = modulation.time_groups([(video_t[:, None], n), (action_t[:, None], ha + state.shape[1])])
    hd, theta = self.cfg.head_dim, self.cfg.rope_theta
    angles = jnp.concatenate([
        rope.video_angles(*grid, hd, theta, 1 + chunk * lf),
        rope.linear_angles(chunk * ha + jnp.arange(ha), hd, theta),
        rope.linear_angles(chunk + jnp.arange(state.shape[1]), hd, theta)], 0)
    queries = masks.inference_layout(0, lf, grid[1] * grid[2], ha, state.shape[1]).shifted(chunk)
    mask = masks.attention_mask(queries, masks.TokenLayout.concat(cache.layout, queries), self.cfg.attention_mask,
                                self.cfg.inference_state_attention)
    hidden, e, _ = self.backbone(x, groups, angles, mask, cross_kv=cross_kv, past_kv=(cache.k, cache.v),
                                 block_q=self.cfg.inference_attention_block_q)
    video_v = self.unpatchify(self.video_head(hidden[:, :n], e, groups.group[:n]), grid)
    return video_v, self.action_head(hidden[:, n:n + ha], embodiment_id)


QUANTIZATION = ('none', 'fp8')


def for_inference(model: DreamZeroDiT, quantization: str) -> DreamZeroDiT:
  """A copy of model (arrays shared) whose blocks' linear layers (q, k, v, o, k_img, v_img, ffn: 98% of
  the 14B weights) hold their kernels as inference uses them: quantization 'none' in model.dtype (the
  values every call casts them to anyway: same outputs, fp32 master weights at half the memory);
  'fp8' as e4m3 with per-output-channel scales, run by the fp8 GEMM (kernels/fp8.py, impl
  model.kernels). The other weights (embeddings, time MLP, heads, embodiment tables) stay as they are.
  """
  if quantization not in QUANTIZATION:
    raise ValueError(f'model.quantization {quantization!r} unknown (known: {", ".join(QUANTIZATION)})')
  model = nnx.clone(model)
  dt = model.cfg.dtype
  for path, dense in list(nnx.iter_graph(model.blocks)):
    if not isinstance(dense, Dense):
      continue
    if quantization == 'fp8':
      setattr(functools.reduce(getattr, path[:-1], model.blocks), path[-1], Fp8Dense(dense, model.cfg.kernels))
    else:
      for var in (dense.kernel, dense.bias):
        if var is not None and var.dtype != dt:
          var.set_value(var[...].astype(dt))
  return model


def build_dit(model: ModelSettings, *, rngs: nnx.Rngs) -> DreamZeroDiT:
  cfg = DiTConfig.from_config(model)
  with layers.param_dtype(cfg.param_dtype):
    return DreamZeroDiT(cfg, rngs=rngs)
