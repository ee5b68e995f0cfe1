"""umT5 encoder parity (transformers and official Wan), tokenizer and prompt cache."""
import io
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dreamzero_jax.config import load_config
from dreamzero_jax.models import text_cache, umt5
from dreamzero_jax.models.weights import common as weights
from dreamzero_jax.models.weights import umt5_keys
from tests.wan_reference import import_wan
from tests.helpers import random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (config overrides, sequence length, true lengths). 'tiny' reaches the log-spaced buckets at 12
# tokens; 'xxl_positions' has umT5-XXL's 32 buckets, max distance 128, 64-wide heads and 512
# tokens at a small width. One full row and one padded row check per-sample zeroing.
GEOMETRIES = {
    'tiny': ({}, 12, (12, 5)),
    'xxl_positions': (dict(dim=256, num_heads=4, ffn_dim=640, num_buckets=32, max_distance=128),
                      512, (512, 77)),
}


def _cfg(geometry='tiny'):
  cfg = load_config(os.path.join(ROOT, 'configs/tiny.py')).text_encoder
  cfg.update(GEOMETRIES[geometry][0])
  return cfg


def _new_model(cfg, seed=0, dtype=jnp.float32):
  return random_model(lambda: umt5.UMT5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype), seed)


def _randomize(module: torch.nn.Module, seed: int, head_dim: int) -> None:
  """Random weights so a wrong term shows up: norms around 1, tables N(0, 1), linears N(0, 1/fan_in),
  q also over head_dim as in T5's own init (T5 has no softmax scale)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'norm' in name:
        p.copy_(1.0 + 0.1 * noise)
      elif 'embed' in name or 'shared' in name or 'bias' in name:
        p.copy_(noise)
      else:
        p.copy_(noise * (p.shape[1] * (head_dim if name.endswith('q.weight') else 1)) ** -0.5)


def _inputs(vocab: int, geometry: str):
  _, seq, lengths = GEOMETRIES[geometry]
  rng = np.random.default_rng(0)
  ids = rng.integers(3, vocab, size=(len(lengths), seq)).astype(np.int32)
  lengths = np.array(lengths, np.int32)
  mask = np.arange(seq)[None, :] < lengths[:, None]
  ids[~mask] = 0
  return ids, lengths, torch.from_numpy(mask.astype(np.int64))


def _ours(cfg, state_dict, key_map, ids, lengths):
  model = _new_model(cfg)
  weights.load_tensors(model, ((k, v.numpy()) for k, v in state_dict.items()), key_map)
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(lengths))), model


def _check(ours, ref, lengths):
  for row, n in enumerate(lengths):
    err = np.abs(ours[row, :n] - ref[row, :n]).max() / np.abs(ref[row, :n]).max()
    assert err < 1e-5, (row, err)
    assert not ours[row, n:].any(), f'row {row}: outputs past length {n} are not zero'


@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_matches_transformers_umt5(geometry):
  cfg = _cfg(geometry)
  ref = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim // cfg.num_heads, d_ff=cfg.ffn_dim,
      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.num_buckets,
      relative_attention_max_distance=cfg.max_distance, feed_forward_proj='gated-gelu',
      dropout_rate=0.0, attn_implementation='eager')).eval()
  _randomize(ref, 0, cfg.dim // cfg.num_heads)
  ids, lengths, mask = _inputs(cfg.vocab_size, geometry)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=mask).last_hidden_state.numpy()
  got, _ = _ours(cfg, ref.state_dict(), umt5_keys.transformers_key_map, ids, lengths)
  _check(got, want, lengths)


@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_matches_official_wan_t5(geometry):
  cfg = _cfg(geometry)
  t5 = import_wan('modules.t5')
  ref = t5.T5Encoder(vocab=cfg.vocab_size, dim=cfg.dim, dim_attn=cfg.dim, dim_ffn=cfg.ffn_dim,
                     num_heads=cfg.num_heads, num_layers=cfg.num_layers, num_buckets=cfg.num_buckets,
                     shared_pos=False).eval()
  for block in ref.blocks:   # Wan hard-codes max_dist=128; the config field is honoured here
    block.pos_embedding.max_dist = cfg.max_distance
  _randomize(ref, 1, cfg.dim // cfg.num_heads)
  ids, lengths, mask = _inputs(cfg.vocab_size, geometry)
  with torch.no_grad():
    want = ref(torch.from_numpy(ids).long(), mask).numpy()
  got, model = _ours(cfg, ref.state_dict(), umt5_keys.wan_key_map, ids, lengths)
  _check(got, want, lengths)
  # A sample alone gives what it gives in the batch: padding never leaks across rows.
  alone = np.asarray(model(jnp.asarray(ids[1:]), jnp.asarray(lengths[1:])))
  np.testing.assert_allclose(alone[0], got[1], rtol=0, atol=1e-5 * np.abs(got).max())


def test_bfloat16_compute_stays_close_to_float32():
  cfg = _cfg()
  ids, lengths, _ = _inputs(cfg.vocab_size, 'tiny')
  want = np.asarray(_new_model(cfg)(jnp.asarray(ids), jnp.asarray(lengths)))
  got = _new_model(cfg, dtype=jnp.bfloat16)(jnp.asarray(ids), jnp.asarray(lengths))
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got.astype(jnp.float32))
  assert np.abs(got - want).max() / np.abs(want).max() < 3e-2
  assert not got[1, lengths[1]:].any()


def test_full_checkpoint_decoder_keys_are_skipped():
  cfg = _cfg()
  ref = transformers.UMT5Model(transformers.UMT5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim // cfg.num_heads, d_ff=cfg.ffn_dim,
      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.num_buckets,
      relative_attention_max_distance=cfg.max_distance))
  model = _new_model(cfg)
  tensors = [(k, v.numpy()) for k, v in ref.state_dict().items()]
  with pytest.raises(weights.WeightMismatchError, match='decoder'):
    weights.load_tensors(model, tensors, umt5_keys.transformers_key_map)
  weights.load_tensors(model, tensors, umt5_keys.transformers_key_map, ignore=umt5_keys.transformers_unused)


def test_buckets_match_transformers_at_real_size():
  """umT5-XXL: 32 buckets, max distance 128, 512 tokens; several distances sit on bucket edges."""
  attn = transformers.models.umt5.modeling_umt5.UMT5Attention(
      transformers.UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128,
                              d_model=8, d_kv=4, num_heads=2), has_relative_attention_bias=True)
  rel = torch.arange(512)[None, :] - torch.arange(512)[:, None]
  want = attn._relative_position_bucket(rel).numpy()
  np.testing.assert_array_equal(umt5.relative_position_buckets(512, 32, 128), want)


SENTENCES = [
    'pick up the red block and place it in the bowl', 'open the drawer', 'close the top drawer slowly',
    'push the green button', 'move the cup to the left of the plate', 'wipe the table with the towel',
    'put the marker in the cup', 'turn on the faucet', 'stack the yellow blocks on the blue tray',
    'rotate the knob clockwise', 'slide the window open', 'press the lever down quickly']


@pytest.fixture(scope='module')
def spiece_dir(tmp_path_factory):
  """A tiny sentencepiece model with umT5's special ids (pad 0, eos 1, unk 2), trained here."""
  sentencepiece = pytest.importorskip('sentencepiece')
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES * 5), model_writer=model, vocab_size=60, model_type='unigram',
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  folder = tmp_path_factory.mktemp('umt5_tokenizer')
  (folder / 'spiece.model').write_bytes(model.getvalue())
  return str(folder)


def test_tokenizer_pads_truncates_and_matches_hf(spiece_dir):
  text_len = 10
  tok = umt5.UMT5Tokenizer(spiece_dir, text_len)
  prompts = ['open the drawer', 'pick up the red block and place it in the bowl please',
             '  close   the\n drawer &amp; push ']
  ids, lengths = tok(prompts)
  assert ids.shape == (3, text_len) and ids.dtype == np.int32
  for row, n in enumerate(lengths):
    assert ids[row, n - 1] == 1 and not ids[row, n:].any()
  assert lengths[1] == text_len   # truncated, still ends with EOS
  # The official pipeline: HF T5 tokenizer on whitespace-cleaned text, padded to max_length.
  hf = transformers.T5Tokenizer.from_pretrained(spiece_dir, extra_ids=0)
  cleaned = ['open the drawer', 'pick up the red block and place it in the bowl please',
             'close the drawer & push']
  want = hf(cleaned, padding='max_length', truncation=True, max_length=text_len)
  np.testing.assert_array_equal(ids, np.array(want['input_ids']))
  np.testing.assert_array_equal(lengths, np.array(want['attention_mask']).sum(1))


def test_tokenizer_missing_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='spiece.model'):
    umt5.UMT5Tokenizer(str(tmp_path), 8)


def test_prompt_cache_encodes_each_prompt_once(spiece_dir):
  cfg = _cfg()
  tok = umt5.UMT5Tokenizer(spiece_dir, 8)
  cfg.vocab_size = tok.processor.get_piece_size()
  encode = umt5.prompt_encoder(_new_model(cfg), tok)
  seen = []

  def counting(prompts):
    seen.extend(prompts)
    return encode(prompts)

  cache = text_cache.PromptCache(counting)
  first = cache(['open the drawer', 'push the green button', 'open the drawer'])
  second = cache(['push the green button', 'turn on the faucet'])
  assert seen == ['open the drawer', 'push the green button', 'turn on the faucet']
  assert first.shape == (3, 8, cfg.dim)
  np.testing.assert_array_equal(first[0], first[2])
  np.testing.assert_array_equal(first[1], second[0])
  direct, lengths = encode(['push the green button', 'turn on the faucet'])
  np.testing.assert_array_equal(second, direct)
  assert not second[0, lengths[0]:].any() and second[0, :lengths[0]].any()
