"""fp32 parity of our DiT with the official Wan code (wan22) and diffusers on tiny random weights."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dreamzero_jax.config import load_config
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.models.weights import dit_keys
from dreamzero_jax.models.weights.common import WeightMismatchError, load_tensors
from tests.wan_reference import import_wan

DIM, HEADS, FFN, FREQ, TEXT_DIM, LAYERS = 32, 2, 64, 16, 16, 2


def _randomize(module: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _state(module):
  return [(k, v.detach().numpy()) for k, v in module.state_dict().items()]


def _ours(in_channels, image_dim, key_map, tensors):
  cfg = load_config('configs/tiny.py', [
      f'model.dim={DIM}', f'model.num_heads={HEADS}', f'model.ffn_dim={FFN}', f'model.freq_dim={FREQ}',
      f'model.text_dim={TEXT_DIM}', f'model.num_layers={LAYERS}', f'model.in_channels={in_channels}',
      f'model.image_dim={image_dim}', 'model.dtype="float32"'])
  model = build_dit(cfg.model, rngs=nnx.Rngs(1))
  load_tensors(model, tensors, key_map,
               may_stay=dit_keys.is_dreamzero_key)
  return model


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def _wan(model_type, in_dim, text_len=8):
  wan = import_wan('modules.model')
  ref = wan.WanModel(model_type=model_type, patch_size=(1, 2, 2), text_len=text_len, in_dim=in_dim, dim=DIM,
                     ffn_dim=FFN, freq_dim=FREQ, text_dim=TEXT_DIM, out_dim=16, num_heads=HEADS,
                     num_layers=LAYERS).eval()
  _randomize(ref, 0)
  return ref


@pytest.mark.parametrize('model_type,per_token_t', [('t2v', False), ('i2v', False), ('t2v', True)])
def test_matches_official_wan(model_type, per_token_t):
  in_dim = 36 if model_type == 'i2v' else 16
  ref = _wan(model_type, in_dim)
  rng = np.random.default_rng(0)
  b, f, h, w = 2, 3, 4, 6
  x = rng.standard_normal((b, 16, f, h, w)).astype(np.float32)
  y = rng.standard_normal((b, 20, f, h, w)).astype(np.float32) if model_type == 'i2v' else None
  seq_len = f * (h // 2) * (w // 2)
  t = (rng.uniform(0, 1000, (b, seq_len)) if per_token_t else np.array([3.0, 917.0])).astype(np.float32)
  lengths = [5, 8]
  context = [rng.standard_normal((n, TEXT_DIM)).astype(np.float32) for n in lengths]
  # wan22 expands a [B] timestep only for B == 1: hand it the per-token form.
  t_ref = t if per_token_t else np.repeat(t[:, None], seq_len, 1)
  with torch.no_grad():
    out = ref([torch.from_numpy(u) for u in x], torch.from_numpy(t_ref), [torch.from_numpy(c) for c in context],
              seq_len, y=None if y is None else [torch.from_numpy(u) for u in y])
  want = np.stack([o.numpy() for o in out]).transpose(0, 2, 3, 4, 1)

  model = _ours(in_dim, 0, dit_keys.wan_key_map, _state(ref))
  video = x if y is None else np.concatenate([x, y], 1)
  text = np.zeros((b, 8, TEXT_DIM), np.float32)
  for i, c in enumerate(context):
    text[i, :len(c)] = c
  got = model.wan_forward(jnp.asarray(video.transpose(0, 2, 3, 4, 1)), jnp.asarray(t), jnp.asarray(text))
  assert got.shape == want.shape
  print("rel err", _rel(got, want))
  assert _rel(got, want) < 1e-5


@pytest.mark.parametrize('image', [True, False])
def test_matches_diffusers(image):
  from diffusers import WanTransformer3DModel
  in_ch = 36 if image else 16
  ref = WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=DIM // HEADS, in_channels=in_ch,
      out_channels=16, text_dim=TEXT_DIM, freq_dim=FREQ, ffn_dim=FFN, num_layers=LAYERS,
      cross_attn_norm=True, image_dim=12 if image else None, added_kv_proj_dim=DIM if image else None).eval()
  _randomize(ref, 1)
  rng = np.random.default_rng(1)
  b, f, h, w = 2, 3, 4, 4
  x = rng.standard_normal((b, in_ch, f, h, w)).astype(np.float32)
  t = np.array([10.0, 640.0], np.float32)
  text = rng.standard_normal((b, 512, TEXT_DIM)).astype(np.float32)  # diffusers I2V splits at 512
  img = rng.standard_normal((b, 5, 12)).astype(np.float32) if image else None
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text),
               encoder_hidden_states_image=None if img is None else torch.from_numpy(img)).sample.numpy()
  model = _ours(in_ch, 12 if image else 0, dit_keys.diffusers_key_map, _state(ref))
  got = model.wan_forward(jnp.asarray(x.transpose(0, 2, 3, 4, 1)), jnp.asarray(t), jnp.asarray(text),
                          None if img is None else jnp.asarray(img))
  print("rel err", _rel(got, want.transpose(0, 2, 3, 4, 1)))
  assert _rel(got, want.transpose(0, 2, 3, 4, 1)) < 1e-5


def test_official_and_diffusers_names_place_the_same_weights():
  """The diffusers -> official rename covers every key of an I2V model with the image branch."""
  from diffusers import WanTransformer3DModel
  ref = WanTransformer3DModel(
      num_attention_heads=HEADS, attention_head_dim=DIM // HEADS, in_channels=36, text_dim=TEXT_DIM,
      freq_dim=FREQ, ffn_dim=FFN, num_layers=LAYERS, image_dim=12, added_kv_proj_dim=DIM)
  for key in ref.state_dict():
    assert dit_keys.diffusers_key_map(key) is not None, key


def test_mismatched_checkpoint_is_refused_naming_keys():
  ref = _wan('t2v', 16)
  tensors = _state(ref)
  tensors = [(k, v) for k, v in tensors if k != 'blocks.1.ffn.2.weight'] + [('blocks.0.extra.weight', np.ones(3))]
  with pytest.raises(WeightMismatchError) as err:
    _ours(16, 0, dit_keys.wan_key_map, tensors)
  assert 'blocks.0.extra.weight' in str(err.value)
  assert 'blocks/ffn2/kernel (layers [0] of 2)' in str(err.value)
