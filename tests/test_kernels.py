"""Pallas kernels (in the interpreter) against their references, the group-table modulation against
per-token e0, the fp8 error bound, the registry's fallback, Triton lowering and the check CLI."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamzero_jax.config import load_config
from dreamzero_jax.kernels import check, fp8, modulation, qk_norm_rope, registry
from dreamzero_jax.models import dit, kv_cache, layers, rope
from dreamzero_jax.models.dit import build_dit
from tests.helpers import random_model


def _rel(a, b):
  a, b = (np.asarray(jnp.asarray(v, jnp.float32)) for v in (a, b))
  return float(np.abs(a - b).max() / np.abs(b).max())


def _ln_inputs(b=2, length=9, groups=3, dim=96, seed=0, batch_groups=False):
  r = np.random.default_rng(seed)
  x = jnp.asarray(3 * r.standard_normal((b, length, dim)) + 1, jnp.float32)
  shift, scale = (jnp.asarray(r.standard_normal((b, groups, dim)), jnp.float32) for _ in '01')
  group = jnp.asarray(r.integers(0, groups, (b, length) if batch_groups else (length,)), jnp.int32)
  return x, shift, scale, group, r


# ---- group-table modulation ------------------------------------------------------------------------


def test_time_groups_layout_and_padding():
  video_t = jnp.array([[100., 200.], [300., 400.]])
  action_t = jnp.array([[7., 8., 9.], [1., 2., 3.]])
  groups = modulation.time_groups([(jnp.zeros((2, 1)), 4), (video_t, 3), (action_t, 1), (jnp.zeros((2, 1)), 2)])
  np.testing.assert_array_equal(groups.group, [0] * 4 + [1] * 3 + [2] * 3 + [3, 4, 5] + [6] * 2)
  want = jnp.concatenate([jnp.zeros((2, 4)), jnp.repeat(video_t, 3, 1), action_t, jnp.zeros((2, 2))], 1)
  np.testing.assert_array_equal(groups.per_token(), want)
  padded = groups.padded(16)
  assert padded.group.shape == (16,) and list(padded.group[-1:]) == [0]
  np.testing.assert_array_equal(padded.per_token()[:, :15], want)


def test_group_table_modulation_equals_per_token_e0():
  """The DiT's time embedding on G group timesteps + group ids gives the block's and the head's
  modulated activations and gated residuals of today's per-token e0 [B, L, 6, D] path."""
  model = random_model(lambda: build_dit(load_config('configs/tiny.py').model, rngs=nnx.Rngs(0)), seed=1)
  d, b = model.cfg.dim, 2
  r = np.random.default_rng(0)
  groups = modulation.time_groups([(jnp.zeros((b, 1)), 5), (jnp.asarray(r.uniform(0, 1000, (b, 2))), 4),
                                   (jnp.asarray(r.uniform(0, 1000, (b, 3))), 1), (jnp.zeros((b, 1)), 2)])
  length = groups.group.shape[0]
  e_tok, e0_tok = model.time_embed(groups.per_token())
  e_tab, e0_tab = model.time_embed(groups.t)
  assert e0_tab.shape == (b, groups.t.shape[1], 6, d)
  np.testing.assert_allclose(modulation.gather_groups(e0_tab, groups.group), e0_tok, rtol=1e-6, atol=1e-6)

  x = jnp.asarray(r.standard_normal((b, length, d)), jnp.float32)
  y = jnp.asarray(r.standard_normal((b, length, d)), jnp.bfloat16)
  norm = layers.LayerNorm(d, eps=1e-6, affine=False)
  block_table = model.blocks.modulation[...][0]  # layer 0 of the stacked blocks
  mod_tok, mod_tab = block_table + e0_tok, block_table + e0_tab
  for shift, scale, gate in ((0, 1, 2), (3, 4, 5)):
    want = (norm(x) * (1 + mod_tok[:, :, scale]) + mod_tok[:, :, shift]).astype(jnp.bfloat16)
    got = modulation.layer_norm_modulate(x, mod_tab[:, :, shift], mod_tab[:, :, scale], groups.group,
                                         out_dtype=jnp.bfloat16, impl='xla')
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(modulation.gated_residual(x, y, mod_tab[:, :, gate], groups.group),
                               x + y.astype(jnp.float32) * mod_tok[:, :, gate], rtol=1e-6, atol=1e-6)
  head_tok = model.head_modulation[...][None, None] + e_tok[:, :, None]
  head_tab = model.head_modulation[...][None, None] + e_tab[:, :, None]
  np.testing.assert_allclose(
      modulation.layer_norm_modulate(x, head_tab[:, :, 0], head_tab[:, :, 1], groups.group, impl='xla'),
      norm(x) * (1 + head_tok[:, :, 1]) + head_tok[:, :, 0], rtol=1e-6, atol=1e-6)


def _teacher_forcing_and_denoise(model, teacher_forcing=True, denoise=True):
  """Teacher forcing over 2 chunks and a cached denoise of chunk 1: [video, actions] of each asked."""
  m = model.cfg
  k, lf, ha, h = 2, 2, 8, 8
  f = 1 + k * lf
  r = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
  clean, noisy, i2v_cond = arr(1, f, h, h, 16), arr(1, f, h, h, 16), arr(1, f, h, h, 20)
  actions, state = arr(1, k * ha, m.action_dim), arr(1, k, m.state_dim)
  text, image = arr(1, 8, m.text_dim), arr(1, 5, m.image_dim)
  emb = jnp.array([1], jnp.int32)
  out = []
  if teacher_forcing:
    video_t = jnp.asarray([[3.0, 900.0, 900.0, 250.0, 250.0]])
    action_t = jnp.repeat(jnp.asarray([[700.0, 60.0]]), ha, 1)
    out += model.teacher_forcing(clean, noisy, video_t, actions, action_t, state, emb, text, image, i2v_cond)
  if denoise:
    cross_kv = model.cross_kv(*model.embed_context(text, image))
    cache = kv_cache.empty_cache(m.num_layers, 1, f * (h // 2) ** 2, m.num_heads, m.head_dim)
    cache = model.write_clean_frames(clean[:, :1], cache, cross_kv, i2v_cond=i2v_cond[:, :1])
    cache = model.write_clean_frames(clean[:, 1:3], cache, cross_kv, chunk=jnp.int32(0), i2v_cond=i2v_cond[:, 1:3])
    out += model.denoise(noisy[:, 3:5], jnp.asarray([250.0]), actions[:, ha:], jnp.asarray([60.0]), state[:, 1:],
                         emb, jnp.int32(1), cache, cross_kv, i2v_cond[:, 3:5])
  return out


def test_dit_group_tables_equal_the_per_token_e0_path(monkeypatch):
  """Teacher forcing and the cached denoise with [B, G, 6, D] tables (G: 1 clean + 5 frames + 16
  actions; 2 in the denoise) give the outputs of the per-token e0 [B, L, 6, D] path (G = L)."""
  model = random_model(lambda: build_dit(load_config('configs/tiny.py', ['model.seq_pad_multiple=16']).model,
                                         rngs=nnx.Rngs(0)), seed=1)
  rows = []
  embed = model.time_embed
  monkeypatch.setattr(model, 'time_embed', lambda t: rows.append(t.shape[1]) or embed(t))
  grouped = _teacher_forcing_and_denoise(model)
  as_tokens = lambda groups: dit.per_token_groups(groups.per_token())
  with monkeypatch.context() as patch:
    tf_groups = dit.teacher_forcing_groups
    patch.setattr(dit, 'teacher_forcing_groups', lambda *a: as_tokens(tf_groups(*a)))
    per_token = _teacher_forcing_and_denoise(model, denoise=False)
  with monkeypatch.context() as patch:
    time_groups = modulation.time_groups
    patch.setattr(modulation, 'time_groups', lambda segments: as_tokens(time_groups(segments)))
    per_token += _teacher_forcing_and_denoise(model, teacher_forcing=False)
  # Rows embedded: groups (22 of 178 tokens; the clean writes' 1; the denoise's 2 of 41) vs tokens.
  assert rows == [22, 1, 1, 2, 2 * 5 * 16 + 16 + 2, 1, 1, 2 * 16 + 8 + 1]
  for got, want in zip(grouped, per_token):
    assert _rel(got, want) < 1e-6


def test_dit_runs_the_configured_kernels():
  """model.kernels picks the registry implementation of the model's modulation and q/k norm + RoPE."""
  model = lambda impl: random_model(
      lambda: build_dit(load_config('configs/tiny.py', [f'model.kernels={impl}']).model, rngs=nnx.Rngs(0)), seed=1)
  with registry.record() as used:
    interpreted = _teacher_forcing_and_denoise(model('interpret'), teacher_forcing=False)
  assert {('layer_norm_modulate', 'interpret'), ('qk_norm_rope', 'interpret')} <= used
  for got, want in zip(interpreted, _teacher_forcing_and_denoise(model('xla'), teacher_forcing=False)):
    assert _rel(got, want) < 1e-5
  with pytest.raises(ValueError, match='model.kernels'):
    build_dit(load_config('configs/tiny.py', ['model.kernels=triton']).model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('batch_groups', [False, True])
def test_layer_norm_modulate_kernel_and_gradients(batch_groups):
  x, shift, scale, group, r = _ln_inputs(batch_groups=batch_groups)
  cot = jnp.asarray(r.standard_normal(x.shape), jnp.float32)
  ref = modulation.layer_norm_modulate_reference(x, shift, scale, group)
  assert _rel(modulation.layer_norm_modulate(x, shift, scale, group, impl='interpret'), ref) < 1e-6
  grads = lambda impl: jax.grad(lambda *a: jnp.sum(modulation.layer_norm_modulate(*a, group, impl=impl) * cot),
                                argnums=(0, 1, 2))(x, shift, scale)
  for got, want in zip(grads('interpret'), grads('xla')):
    assert _rel(got, want) < 1e-5
  # Groups no token uses get zero gradient rows; used ones do not.
  unused = shift.shape[1] + 1
  wide = jnp.concatenate([shift, shift[:, :2]], 1), jnp.concatenate([scale, scale[:, :2]], 1)
  g_shift = jax.grad(lambda s: jnp.sum(modulation.layer_norm_modulate(x, s, wide[1], group, impl='interpret')
                                       * cot))(wide[0])
  assert not np.any(g_shift[:, unused]) and np.all(np.abs(g_shift[:, 0]).sum(-1) > 0)


# ---- q/k RMSNorm + RoPE ------------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_qk_norm_rope_reference_is_the_models_math_and_kernel_matches(dtype):
  b, length, h, dh = 2, 6, 4, 16
  r = np.random.default_rng(1)
  x = jnp.asarray(r.standard_normal((b, length, h, dh)), dtype)
  norm = layers.RMSNorm(h * dh, eps=1e-6)
  norm.scale[...] = jnp.asarray(1 + 0.1 * r.standard_normal(h * dh), jnp.float32)
  angles = rope.video_angles(2, 1, 3, dh, 1e4)
  model = rope.apply_rope(norm(x.reshape(b, length, -1)).reshape(x.shape), angles)
  ref = qk_norm_rope.qk_norm_rope_reference(x, norm.scale[...], angles)
  np.testing.assert_array_equal(np.asarray(ref, np.float32), np.asarray(model, np.float32))
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  assert _rel(qk_norm_rope.qk_norm_rope(x, norm.scale[...], angles, impl='interpret'), ref) < tol
  per_example = jnp.stack([angles, angles + 1])
  assert _rel(qk_norm_rope.qk_norm_rope(x, norm.scale[...], per_example, impl='interpret'),
              qk_norm_rope.qk_norm_rope_reference(x, norm.scale[...], per_example)) < tol


def test_qk_norm_rope_gradient_is_the_references():
  r = np.random.default_rng(2)
  x = jnp.asarray(r.standard_normal((1, 5, 2, 8)), jnp.float32)
  w = jnp.asarray(r.standard_normal(16), jnp.float32)
  angles = jnp.asarray(r.uniform(0, 10, (5, 4)), jnp.float32)
  grads = lambda impl: jax.grad(lambda x, w: jnp.sum(jnp.sin(qk_norm_rope.qk_norm_rope(x, w, angles, impl=impl))),
                                argnums=(0, 1))(x, w)
  for got, want in zip(grads('interpret'), grads('xla')):
    assert _rel(got, want) < 1e-5


# ---- fp8 ------------------------------------------------------------------------------------------


def test_fp8_quantisation_edges():
  w = jnp.asarray(np.random.default_rng(3).standard_normal((32, 4)), jnp.float32).at[:, 1].set(0.)
  q = fp8.quantize_weight(w)
  assert q.qweight.dtype == jnp.float8_e4m3fn and q.scale.shape == (4,)
  amax = np.abs(np.asarray(q.qweight, np.float32)).max(0)
  np.testing.assert_array_equal(amax, [448., 0., 448., 448.])  # each column's largest maps to 448
  assert float(q.scale[1]) == 1.0 and np.all(np.isfinite(np.asarray(fp8.dequantize(q.qweight, q.scale, -2))))


def test_fp8_kernel_equals_dequantised_reference():
  r = np.random.default_rng(4)
  x = jnp.asarray(r.standard_normal((2, 19, 64)), jnp.float32)  # 38 rows: padded to a tile inside
  w = fp8.quantize_weight(jnp.asarray(r.standard_normal((64, 48)) / 8, jnp.float32))
  bias = jnp.asarray(r.standard_normal(48), jnp.float32)
  got = fp8.fp8_matmul(x, w, bias, out_dtype=jnp.float32, impl='interpret')
  assert got.shape == (2, 19, 48)
  assert _rel(got, fp8.fp8_matmul_reference(x, w, bias)) < 1e-5
  xla = fp8.fp8_matmul(x, w, bias, out_dtype=jnp.float32, impl='xla')
  assert _rel(xla, fp8.fp8_matmul_reference(x, w, bias)) < 1e-5


@pytest.mark.parametrize('data', ['gaussian', 'outliers'])
def test_fp8_error_within_the_stated_bound(data):
  """The fp8 product stays within fp8.error_bound of the unquantised one, also where a per-token
  outlier pushes the rest of the row into e4m3's subnormal range (the bound's a-terms)."""
  r = np.random.default_rng(5)
  x = r.standard_normal((40, 128))
  w = r.standard_normal((128, 32)) / 11
  if data == 'outliers':
    x[:, 0] *= 1e4
    w[3] *= 1e4
  x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  exact = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  got = fp8.fp8_matmul(x, fp8.quantize_weight(w), out_dtype=jnp.float32, impl='interpret')
  bound = fp8.error_bound(x, w)
  err = np.asarray(jnp.abs(got - exact))
  assert np.all(err <= bound)
  scale = np.asarray(jnp.matmul(jnp.abs(x.astype(jnp.float32)), jnp.abs(w.astype(jnp.float32))))
  if data == 'gaussian':
    assert np.all(bound <= 0.13 * scale)  # the worst case, ~2u of |x| @ |w|
    assert err.max() / np.abs(exact).max() < 0.05  # typical: errors of random sign partly cancel
  else:
    assert float(err.max()) > 0  # the subnormal rows do lose precision, and the bound covers it


# ---- registry, lowering and the check CLI -----------------------------------------------------------


def test_fallback_warns_once_per_kernel_and_records_xla(monkeypatch):
  monkeypatch.setattr(registry, '_WARNED', set())
  x, shift, scale, group, _ = _ln_inputs()
  with pytest.warns(RuntimeWarning, match='layer_norm_modulate: pallas cannot run') as caught:
    with registry.record() as used:
      got = modulation.layer_norm_modulate(x, shift, scale, group, impl='pallas')  # CPU: not lowerable
      modulation.layer_norm_modulate(x, shift, scale, group, impl='pallas')
  assert len(caught) == 1 and used == {('layer_norm_modulate', 'xla')}
  np.testing.assert_array_equal(got, modulation.layer_norm_modulate_reference(x, shift, scale, group))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # 'auto' off a GPU is XLA by design: no warning
    modulation.layer_norm_modulate(x, shift, scale, group, impl='auto')
  with pytest.raises(ValueError, match='unknown kernel implementation'):
    modulation.layer_norm_modulate(x, shift, scale, group, impl='triton')


def test_unsupported_shapes_fall_back_even_in_the_interpreter(monkeypatch):
  monkeypatch.setattr(registry, '_WARNED', set())
  x = jnp.ones((1, 3, 2, 12))  # head_dim 12: 6 pairs, not a power of two
  with pytest.warns(RuntimeWarning, match='head_dim/2 must be a power of two'):
    with registry.record() as used:
      qk_norm_rope.qk_norm_rope(x, jnp.ones(24), jnp.zeros((3, 6)), impl='interpret')
  assert used == {('qk_norm_rope', 'xla')}


def _lowers_to_triton(fn, *avals) -> bool:
  text = jax.jit(fn).trace(*avals).lower(lowering_platforms=('cuda',)).as_text()
  return 'xla.gpu.triton' in text


def test_kernels_lower_to_triton_at_14b_shapes():
  """Lowering for CUDA from the CPU runs the whole Pallas -> Triton IR translation (power-of-two
  vectors, supported ops); only the final PTX compile needs the GPU."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  sds = jax.ShapeDtypeStruct
  table = sds((1, 3, 5120), f32)
  group = jnp.zeros((1785,), jnp.int32)
  assert _lowers_to_triton(lambda x, a, b: modulation._probe(x, a, b, group, out_dtype=bf16),
                           sds((1, 1785, 5120), f32), table, table)
  assert _lowers_to_triton(lambda x, w, a: qk_norm_rope._kernel(x, w, a), sds((2, 1785, 40, 128), bf16),
                           sds((5120,), f32), sds((1785, 64), f32))
  assert _lowers_to_triton(lambda x, q, s: fp8._kernel(x, fp8.Fp8Weight(q, s), out_dtype=bf16),
                           sds((1785, 5120), bf16), sds((5120, 13824), fp8.E4M3), sds((13824,), f32))


def test_check_cli_passes_in_the_interpreter(capsys):
  assert check.main(['--interpret']) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert {(r['kernel'], r['dtype']) for r in records} == {
      (k, d) for k in check.CHECKS for d in ('float32', 'bfloat16')}
  assert all(r['ok'] and r['impl'] == 'interpret' for r in records)
  assert all(r['max_rel_err'] < 1e-5 for r in records if r['dtype'] == 'float32')
  assert next(r for r in records if r['kernel'] == 'fp8_matmul' and r['dtype'] == 'float32')['within_bound']


def test_check_cli_exits_1_on_a_mismatch(monkeypatch, capsys):
  right = qk_norm_rope.qk_norm_rope_reference
  wrong = lambda *a, **kw: right(*a, **kw) * 1.001
  monkeypatch.setattr(check, 'CHECKS', {'qk_norm_rope': check.check_qk_norm_rope})
  monkeypatch.setattr(qk_norm_rope, 'qk_norm_rope_reference', wrong)
  assert check.main(['--interpret']) == 1
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert records[0]['dtype'] == 'float32' and not records[0]['ok']  # 1e-3 off fails fp32's 1e-5


def test_gpu_benchmark_smoke_run_in_the_interpreter(capsys):
  from bench import kernels_gpu
  assert kernels_gpu.main([]) == 2  # no GPU here: it says so instead of timing the XLA fallback
  assert kernels_gpu.main(['--interpret', '--repeats', '1']) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ') and 'interpret' in line]
  assert len(rows) == 6  # 2 modulation + 1 qk + 3 fp8 GEMM shapes


@pytest.mark.slow  # 25 s; bench/dit_forward.py's own smoke run (the kernels are tested above)
def test_dit_forward_benchmark_smoke_run(capsys):
  from bench import kernels_gpu
  assert kernels_gpu.main(['--dit', '--interpret', '--repeats', '1']) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| jax DiT forward')]
  assert len(rows) == 4 and all(row.rstrip(' |').endswith('x') for row in rows)  # over the torch peer's time  # {float32 (tiny's dtype), e4m3} weights x B in {1, 2}
  assert sum('fp8_matmul:interpret' in row and 'float8_e4m3fn cache' in row for row in rows) == 2
