"""CLIP ViT image encoder: parity with transformers CLIPVisionModel.hidden_states[-2], the official
Wan2.1 and open_clip checkpoint names, and the Wan2.1 preprocessing."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dreamzero_jax.config import load_config
from dreamzero_jax.models import clip
from dreamzero_jax.models.weights import clip_keys
from dreamzero_jax.models.weights import common as weights
from tests.helpers import random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# 'tiny' is configs/tiny.py; 'vit_h_tokens' has ViT-H/14's 224-pixel input, 257 tokens and
# 80-wide heads at a small width.
GEOMETRIES = {'tiny': {}, 'vit_h_tokens': dict(image_size=224, width=160, num_heads=2, mlp_dim=640,
                                                num_layers=3)}


def _cfg(geometry='tiny'):
  cfg = load_config(os.path.join(ROOT, 'configs/tiny.py')).image_encoder
  cfg.update(GEOMETRIES[geometry])
  return cfg


def _new_model(cfg, seed=0, dtype=jnp.float32):
  return random_model(lambda: clip.CLIPVision(cfg, rngs=nnx.Rngs(0), dtype=dtype), seed)


@pytest.fixture(scope='module', params=list(GEOMETRIES))
def reference(request):
  """A small transformers CLIPVisionModel with exact GELU (open-clip ViT-H/14) and random weights."""
  cfg = _cfg(request.param)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
      hidden_act='gelu', layer_norm_eps=1e-5, attn_implementation='eager')).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim > 1 and 'position' not in name:   # linear / conv: N(0, 1/fan_in)
        p.copy_(noise * p[0].numel() ** -0.5)
      else:
        p.copy_(0.3 * noise)
  pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen)
  with torch.no_grad():
    want = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].numpy()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return cfg, state, pixels.numpy().transpose(0, 2, 3, 1), want


def _run(cfg, tensors, pixels):
  model = _new_model(cfg)
  weights.load_tensors(model, tensors, clip_keys.transformers_key_map,
                       ignore=clip_keys.unused_keys(cfg.num_layers))
  return np.asarray(model(jnp.asarray(pixels)))


def _assert_close(got, want):
  assert got.shape == want.shape, (got.shape, want.shape)
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err < 1e-5, err


def test_matches_transformers_penultimate_layer(reference):
  cfg, state, pixels, want = reference
  _assert_close(_run(cfg, state.items(), pixels), want)
  # Checkpoints saved by a full CLIPModel carry the `vision_model.` prefix and a text tower.
  prefixed = [('vision_model.' + k, v) for k, v in state.items()] + [('logit_scale', np.ones(()))]
  _assert_close(_run(cfg, prefixed, pixels), want)


def _wan_names(state, num_layers):
  """The official Wan2.1 XLMRobertaCLIP layout of the same weights (fused qkv, [1, 1, D] cls)."""
  out = {'visual.cls_embedding': state['embeddings.class_embedding'][None, None],
         'visual.pos_embedding': state['embeddings.position_embedding.weight'][None],
         'visual.patch_embedding.weight': state['embeddings.patch_embedding.weight'],
         'visual.pre_norm.weight': state['pre_layrnorm.weight'],
         'visual.pre_norm.bias': state['pre_layrnorm.bias'],
         'visual.post_norm.weight': state['post_layernorm.weight'],
         'visual.post_norm.bias': state['post_layernorm.bias'],
         'visual.head': np.zeros((state['pre_layrnorm.weight'].shape[0], 4), np.float32),
         'textual.token_embedding.weight': np.zeros((5, 4), np.float32), 'log_scale': np.ones(())}
  for i in range(num_layers):
    hf = f'encoder.layers.{i}.'
    wan = f'visual.transformer.{i}.'
    for kind in ('weight', 'bias'):
      out[wan + 'attn.to_qkv.' + kind] = np.concatenate(
          [state[hf + f'self_attn.{n}_proj.{kind}'] for n in 'qkv'], axis=0)
      out[wan + 'attn.proj.' + kind] = state[hf + 'self_attn.out_proj.' + kind]
      out[wan + 'norm1.' + kind] = state[hf + 'layer_norm1.' + kind]
      out[wan + 'norm2.' + kind] = state[hf + 'layer_norm2.' + kind]
      out[wan + 'mlp.0.' + kind] = state[hf + 'mlp.fc1.' + kind]
      out[wan + 'mlp.2.' + kind] = state[hf + 'mlp.fc2.' + kind]
  return out


def _open_clip_names(state, num_layers):
  """open_clip's VisionTransformer layout (nn.MultiheadAttention in_proj, ln_1, c_fc, ...)."""
  out = {'visual.class_embedding': state['embeddings.class_embedding'],
         'visual.positional_embedding': state['embeddings.position_embedding.weight'],
         'visual.conv1.weight': state['embeddings.patch_embedding.weight'],
         'visual.ln_pre.weight': state['pre_layrnorm.weight'],
         'visual.ln_pre.bias': state['pre_layrnorm.bias'],
         'visual.ln_post.weight': state['post_layernorm.weight'],
         'visual.ln_post.bias': state['post_layernorm.bias'],
         'visual.proj': np.zeros((state['pre_layrnorm.weight'].shape[0], 4), np.float32),
         'transformer.resblocks.0.ln_1.weight': np.ones((4,), np.float32), 'logit_scale': np.ones(())}
  for i in range(num_layers):
    hf = f'encoder.layers.{i}.'
    oc = f'visual.transformer.resblocks.{i}.'
    for kind in ('weight', 'bias'):
      out[oc + f'attn.in_proj_{kind}'] = np.concatenate(
          [state[hf + f'self_attn.{n}_proj.{kind}'] for n in 'qkv'], axis=0)
      out[oc + 'attn.out_proj.' + kind] = state[hf + 'self_attn.out_proj.' + kind]
      out[oc + 'ln_1.' + kind] = state[hf + 'layer_norm1.' + kind]
      out[oc + 'ln_2.' + kind] = state[hf + 'layer_norm2.' + kind]
      out[oc + 'mlp.c_fc.' + kind] = state[hf + 'mlp.fc1.' + kind]
      out[oc + 'mlp.c_proj.' + kind] = state[hf + 'mlp.fc2.' + kind]
  return out


def test_official_wan_checkpoint_names(reference):
  cfg, state, pixels, want = reference
  tensors = _wan_names(state, cfg.num_layers).items()
  _assert_close(_run(cfg, clip_keys.wan_to_transformers(tensors), pixels), want)


def test_open_clip_names(reference):
  cfg, state, pixels, want = reference
  tensors = _open_clip_names(state, cfg.num_layers).items()
  _assert_close(_run(cfg, clip_keys.open_clip_to_transformers(tensors), pixels), want)


def test_unknown_keys_are_refused(reference):
  cfg, state, pixels, _ = reference
  tensors = list(state.items()) + [('encoder.layers.0.self_attn.extra.weight', np.zeros((2,)))]
  with pytest.raises(weights.WeightMismatchError, match='extra'):
    _run(cfg, tensors, pixels)


@pytest.mark.parametrize('size_in,size', [((20, 36), 28), ((9, 13), 28), ((352, 640), 224)])
def test_preprocess_matches_wan_bicubic_and_normalisation(size_in, size):
  """The official Wan2.1 CLIP input: F.interpolate(bicubic, align_corners=False) on [-1, 1] pixels,
  then *0.5 + 0.5 and CLIP mean/std. The reference runs in float64: torch's float32 bicubic
  computes source coordinates in float32 and is itself 8e-5 off at 352x640 -> 224."""
  rng = np.random.default_rng(0)
  frames = rng.uniform(-1, 1, size=(2, *size_in, 3))
  x = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2), size=(size, size),
                                      mode='bicubic', align_corners=False)
  mean = torch.tensor(clip.CLIP_MEAN, dtype=torch.float64)[:, None, None]
  std = torch.tensor(clip.CLIP_STD, dtype=torch.float64)[:, None, None]
  want = ((x * 0.5 + 0.5 - mean) / std).permute(0, 2, 3, 1).numpy()
  got = np.asarray(clip.preprocess(jnp.asarray(frames.astype(np.float32)), size))
  _assert_close(got, want)


def test_encode_first_frame_uses_frame_zero():
  cfg = _cfg()
  model = _new_model(cfg)
  rng = np.random.default_rng(1)
  video = jnp.asarray(rng.uniform(-1, 1, size=(2, 3, 40, 64, 3)).astype(np.float32))
  out = clip.encode_first_frame(model, video)
  assert out.shape == (2, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)
  changed = video.at[:, 1:].set(0.0)
  np.testing.assert_array_equal(np.asarray(clip.encode_first_frame(model, changed)), np.asarray(out))
  with pytest.raises(ValueError, match='pixels'):
    model(video[:, 0])


def test_bfloat16_compute_stays_close_to_float32():
  cfg = _cfg()
  pixels = jnp.asarray(np.random.default_rng(2).standard_normal((2, cfg.image_size, cfg.image_size, 3)),
                       jnp.float32)
  want = np.asarray(_new_model(cfg)(pixels))
  got = _new_model(cfg, dtype=jnp.bfloat16)(pixels)
  assert got.dtype == jnp.bfloat16
  assert np.abs(np.asarray(got.astype(jnp.float32)) - want).max() / np.abs(want).max() < 3e-2
