"""Wan VAE: fp32 parity with diffusers AutoencoderKLWan and the official wan22 WanVAE_ (Wan2.1 and
Wan2.2), streaming encode against whole-clip encode, and the I2V y against Wan's construction."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dreamzero_jax.config import load_config
from dreamzero_jax.models import vae as vae_lib
from dreamzero_jax.models.weights import vae_keys
from dreamzero_jax.models.weights.common import load_tensors
from tests.wan_reference import import_wan

B, T = 2, 9   # 9 frames = the first frame + two groups of 4
SIZE = {'wan2.1': 16, 'wan2.2': 32}   # the smallest frames with a 2x2 latent
WAN22 = dict(kind='wan2.2', z_dim=48, decoder_base_dim=16)


def _cfg(**overrides):
  cfg = load_config('configs/tiny.py').vae
  cfg.update(overrides)
  return cfg


def _randomize(module: torch.nn.Module, seed: int) -> None:
  """Non-trivial weights everywhere (gammas off 1, biases off 0, zero-initialised proj filled)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith('gamma'):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


class Ours:
  """Our model (with the torch weights when given) and its jitted entry points, compiled once."""

  def __init__(self, cfg, state_dict=None, key_map=None):
    self.model = vae_lib.WanVAE(cfg, rngs=nnx.Rngs(0))
    if state_dict is not None:
      load_tensors(self.model, ((k, v.numpy()) for k, v in state_dict.items()), key_map(cfg))
    self.encode = jax.jit(self.model.encode)
    self.decode = jax.jit(self.model.decode)


def _to_torch(x) -> torch.Tensor:
  """[B, T, H, W, C] -> torch [B, C, T, H, W]."""
  return torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3).contiguous()


def _from_torch(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 4, 1).numpy()


def _rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _video(seed=0, t=T, size=SIZE['wan2.1']):
  return np.random.default_rng(seed).uniform(-1, 1, (B, t, size, size, 3)).astype(np.float32)


def _latent_stats(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  if kind == 'wan2.1':
    return vae_lib.WAN21_LATENT_MEAN, vae_lib.WAN21_LATENT_STD
  return vae_lib.WAN22_LATENT_MEAN, vae_lib.WAN22_LATENT_STD


def _stats(kind='wan2.1'):
  return tuple(torch.tensor(v) for v in _latent_stats(kind))


def _reference(cfg, reference: str) -> torch.nn.Module:
  """The torch reference VAE ('diffusers' AutoencoderKLWan or 'official' WanVAE_) for cfg."""
  wan22 = cfg.kind == 'wan2.2'
  if reference == 'diffusers':
    from diffusers import AutoencoderKLWan
    mean, std = _latent_stats(cfg.kind)
    return AutoencoderKLWan(
        base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_base_dim or None, z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample), latents_mean=list(mean),
        latents_std=list(std), is_residual=wan22, in_channels=12 if wan22 else 3,
        out_channels=12 if wan22 else 3, patch_size=2 if wan22 else None,
        scale_factor_spatial=16 if wan22 else 8).eval()
  kwargs = dict(dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                num_res_blocks=cfg.num_res_blocks,
                temperal_downsample=list(cfg.temporal_downsample))
  if wan22:
    return import_wan('modules.vae2_2').WanVAE_(dec_dim=cfg.decoder_base_dim, **kwargs).eval()
  return import_wan('modules.vae2_1').WanVAE_(**kwargs).eval()


def _key_map(reference: str):
  return vae_keys.diffusers_key_map if reference == 'diffusers' else vae_keys.official_key_map


def _pair(cfg, reference: str, seed: int):
  """A randomised reference and our model with its weights, mapped through our key map."""
  ref = _reference(cfg, reference)
  _randomize(ref, seed)
  with torch.no_grad():  # keep decoded pixels inside the [-1, 1] clamp
    (ref.decoder.conv_out if reference == 'diffusers' else ref.decoder.head[2]).weight.mul_(0.05)
  return ref, Ours(cfg, ref.state_dict(), _key_map(reference))


def _encode_ref(ref, video, kind):
  """Reference normalised mu [B, F, h, w, z] of a channels-last clip."""
  mean, std = _stats(kind)
  with torch.no_grad():
    if not hasattr(ref, 'config'):  # official WanVAE_: normalises inside
      return _from_torch(ref.encode(_to_torch(video), [mean, 1 / std]))
    mu = ref.encode(_to_torch(video)).latent_dist.mean
    return _from_torch((mu - mean.view(1, -1, 1, 1, 1)) * (1 / std).view(1, -1, 1, 1, 1))


def _decode_ref(ref, latents, kind):
  mean, std = _stats(kind)
  with torch.no_grad():
    if not hasattr(ref, 'config'):
      return _from_torch(ref.decode(_to_torch(latents), [mean, 1 / std]))
    z = _to_torch(latents) / (1 / std).view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
    return _from_torch(ref.decode(z).sample)


# (kind, reference, num_res_blocks): the official WanVAE_ at its default depth of 2.
PAIRS = [('wan2.1', 'diffusers', 1), ('wan2.1', 'official', 2), ('wan2.2', 'official', 2),
         pytest.param(('wan2.2', 'diffusers', 1), marks=pytest.mark.slow)]


@pytest.fixture(scope='module', params=PAIRS, ids=lambda p: f'{p[0]}-{p[1]}')
def pair(request):
  kind, reference, num_res_blocks = request.param
  cfg = _cfg(num_res_blocks=num_res_blocks, **(WAN22 if kind == 'wan2.2' else {}))
  return (kind,) + _pair(cfg, reference, seed=num_res_blocks)


def test_encode_decode_parity(pair):
  kind, ref, ours = pair
  size = SIZE[kind]
  video = _video(1, size=size)
  want_mu = _encode_ref(ref, video, kind)
  got_mu = ours.encode(jnp.asarray(video))
  assert got_mu.shape == (B, 3, 2, 2, ours.model.z_dim)
  assert _rel_err(got_mu, want_mu) < 1e-5
  latents = np.random.default_rng(2).normal(size=want_mu.shape).astype(np.float32)
  want_video = _decode_ref(ref, latents, kind)
  assert np.abs(want_video).max() < 1  # the clamp is not hiding differences
  got_video = ours.decode(jnp.asarray(latents))
  assert got_video.shape == (B, T, size, size, 3)
  assert _rel_err(got_video, want_video) < 1e-5


@pytest.mark.parametrize('kind', ['wan2.1', pytest.param('wan2.2', marks=pytest.mark.slow)])
def test_streaming_encode_equals_whole_clip(kind):
  cfg = _cfg(**(WAN22 if kind == 'wan2.2' else {}))
  ours = Ours(cfg)
  H = W = SIZE[kind]
  video = jnp.asarray(_video(4, t=13, size=H))
  whole = ours.encode(video)
  graphdef, state = nnx.split(ours.model)
  step = jax.jit(lambda s, c, f: nnx.merge(graphdef, s).encode_stream(c, f))
  for chunks in [(1, 4, 4, 4), (5, 4, 4)]:
    cache = ours.model.init_encode_cache(B, H, W)
    outs, t = [], 0
    for n in chunks:
      out, cache = step(state, cache, video[:, t:t + n])
      outs.append(out)
      t += n
    streamed = jnp.concatenate(outs, axis=1)
    assert streamed.shape == whole.shape == (B, 4, 2, 2, cfg.z_dim)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-5 * float(jnp.abs(whole).max()),
                               err_msg=f'chunks {chunks}')


def test_encode_stream_rejects_bad_chunk():
  model = vae_lib.WanVAE(_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='1 \\+ 4k'):
    model.encode_stream(model.init_encode_cache(B, 16, 16), jnp.zeros((B, 3, 16, 16, 3)))


def test_i2v_condition_matches_official():
  ref, ours = _pair(_cfg(num_res_blocks=2), 'official', 5)
  H = W = SIZE['wan2.1']
  image = np.random.default_rng(5).uniform(-1, 1, (1, H, W, 3)).astype(np.float32)
  frame_num, lat_h, lat_w = T, H // 8, W // 8
  mean, std = _stats()
  # Wan2.1 image2video.generate: the mask over 4 * F pixel positions, then VAE(image, zeros).
  msk = torch.ones(1, frame_num, lat_h, lat_w)
  msk[:, 1:] = 0
  msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
  msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]
  img = torch.from_numpy(image[0]).permute(2, 0, 1)
  clip = torch.concat([img[:, None], torch.zeros(3, frame_num - 1, H, W)], dim=1)
  with torch.no_grad():
    y = ref.encode(clip[None], [mean, 1 / std])[0]
  want = torch.concat([msk, y]).permute(1, 2, 3, 0).numpy()[None]
  got = jax.jit(ours.model.i2v_condition, static_argnums=1)(jnp.asarray(image), frame_num)
  assert got.shape == want.shape == (1, 3, lat_h, lat_w, 20)
  np.testing.assert_array_equal(got[..., :4], want[..., :4])
  assert _rel_err(got[..., 4:], want[..., 4:]) < 1e-5


def test_key_maps_reject_unknown_keys():
  cfg = _cfg()
  assert vae_keys.official_key_map(cfg)('encoder.downsamples.0.residual.5.weight') is None
  assert vae_keys.diffusers_key_map(cfg)('decoder.up_blocks.0.attentions.0.proj.weight') is None


@pytest.mark.parametrize('reference', ['official', 'diffusers'])
@pytest.mark.parametrize('config',
                         ['configs/dreamzero_14b_droid.py', 'configs/dreamzero_5b_droid.py'])
def test_key_maps_cover_full_size_checkpoints(config, reference):
  """Every tensor of a full-size checkpoint lands on one parameter of ours with its shape."""
  cfg = load_config(config).vae
  if cfg.kind == 'wan2.2':
    cfg.update(decoder_base_dim=256)  # Wan2.2's decoder is wider than its encoder
  model = nnx.eval_shape(lambda: vae_lib.WanVAE(cfg, rngs=nnx.Rngs(0)))
  params = {tuple(k): v.shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  with torch.device('meta'):
    ref = _reference(cfg, reference)
  key_map, filled = _key_map(reference)(cfg), set()
  for key, tensor in ref.state_dict().items():
    target = key_map(key)
    assert target is not None and target.path in params, key
    shape = target.transform(np.broadcast_to(np.float32(0), tuple(tensor.shape))).shape
    assert shape == params[target.path], key
    filled.add(target.path)
  assert filled == set(params)
