"""Inference weights (model.quantization), the KV cache dtype and `serve --compile_only`."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamzero_jax import serve
from dreamzero_jax.config import load_config
from dreamzero_jax.models import dit, kv_cache, layers, masks
from tests import test_policy
from tests.helpers import random_model
from tests.test_kernels import _teacher_forcing_and_denoise

# fp8 (e4m3 weights per output channel, activations per token, e4m3 KV cache) against fp32 on the
# tiny policy: measured ~1% of the largest action; the bound leaves room for other seeds.
FP8_ACTION_TOLERANCE = 0.05


def test_fp8_policy_actions_stay_within_tolerance_of_fp32():
  actions = {}
  for quantization in ('none', 'fp8'):
    cfg, policy = test_policy._policy(['sampler.cfg_scale=5.0', f'model.quantization={quantization}'])
    ep = policy.reset('reach the goal', test_policy._frames(cfg, 0, 1)[0], np.zeros(4))
    first, _, ep, _ = policy.step(ep)
    ep = policy.observe(ep, test_policy._frames(cfg, 1, cfg.video.frames_per_chunk), np.zeros(4))
    second, _, ep, _ = policy.step(ep)
    actions[quantization] = np.stack([first, second])
    # umT5 and CLIP wait in host memory: only the DiT, the VAE and the caches live on the device.
    host = jax.tree.leaves(policy._prompt_encoder.state) + jax.tree.leaves(policy._image_state)
    assert host and all(isinstance(x, np.ndarray) for x in host)
    ffn1 = policy._model_state['blocks']['ffn1']
    want = jnp.float8_e4m3fn if quantization == 'fp8' else jnp.float32
    assert ep.cache.k.dtype == want and (ffn1['qweight'] if quantization == 'fp8' else ffn1['kernel']).dtype == want
  err = np.abs(actions['fp8'] - actions['none']).max() / np.abs(actions['none']).max()
  assert 0 < err < FP8_ACTION_TOLERANCE


def test_for_inference_stores_the_blocks_weights_as_they_are_used():
  cfg = load_config('configs/tiny.py', ['model.dtype="bfloat16"'])
  model = random_model(lambda: dit.build_dit(cfg.model, rngs=nnx.Rngs(0)), seed=1)
  served = dit.for_inference(model, 'none')
  # bf16 compute: the blocks' kernels held in bf16 (what every call cast them to), the rest untouched.
  assert served.blocks.ffn1.kernel.dtype == jnp.bfloat16 and model.blocks.ffn1.kernel.dtype == jnp.float32
  assert served.time_projection.kernel.dtype == jnp.float32
  for got, want in zip(_teacher_forcing_and_denoise(served, teacher_forcing=False),
                       _teacher_forcing_and_denoise(model, teacher_forcing=False)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  fp8 = dit.for_inference(model, 'fp8')
  q = fp8.blocks.self_attn.q
  assert isinstance(q, layers.Fp8Dense) and q.qweight.dtype == jnp.float8_e4m3fn
  assert q.scale.shape == (cfg.model.num_layers, cfg.model.dim)  # per layer and output channel
  assert isinstance(model.blocks.self_attn.q, layers.Dense)  # the original is left as it was
  with pytest.raises(ValueError, match='model.quantization'):
    dit.for_inference(model, 'int4')


def test_kv_cache_dtype_and_fp8_saturation():
  m = load_config('configs/tiny.py', ['model.dtype="bfloat16"']).model
  assert kv_cache.cache_dtype(m) == jnp.bfloat16
  m.quantization = 'fp8'
  assert kv_cache.cache_dtype(m) == jnp.float8_e4m3fn
  m.kv_cache_dtype = 'bfloat16'
  assert kv_cache.cache_dtype(m) == jnp.bfloat16
  m.kv_cache_dtype = 'int8'
  with pytest.raises(ValueError, match='model.kv_cache_dtype'):
    kv_cache.cache_dtype(m)
  cache = kv_cache.empty_cache(1, 1, 4, 1, 2, jnp.float8_e4m3fn)
  k = jnp.asarray([[[[[1000.0, -1000.0]], [[0.3, 2.0]]]]])
  cache = kv_cache.append(cache, k, k, masks.segment(masks.Group.CLEAN, 0, 2))
  np.testing.assert_array_equal(np.asarray(cache.k[0, 0, :2, 0], np.float32), [[448.0, -448.0], [0.3125, 2.0]])


def test_serve_compile_only_prints_the_control_steps_memory(capsys):
  assert serve.main(['--config', 'configs/tiny.py', '--config.model.quantization=fp8', '--compile_only']) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['weights_dtype'] == 'float8_e4m3fn' and report['kv_cache_dtype'] == 'float8_e4m3fn'
  assert report['cfg_batch'] == 2 and report['kernels'] and 'fp8_matmul:xla' in report['kernels']
  parts = report['argument_gib'] + report['temp_gib'] + report['output_gib'] - report['alias_gib']
  assert report['total_gib'] > 0 and abs(report['total_gib'] - parts) < 2e-3
  assert serve.main(['--compile_only']) == 2   # bad input: a one-line error, exit 2 like every command
  assert '--compile_only needs --config' in capsys.readouterr().err
