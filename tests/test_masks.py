"""Chunk masks: cell-by-cell against docs/model.md, and what a forward can and cannot see."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamzero_jax.config import load_config
from dreamzero_jax.models import masks
from tests.helpers import random_dit

CFG = load_config('configs/tiny.py')
K = 4
LF = CFG.video.frames_per_chunk // CFG.video.vae_temporal                         # latent frames per chunk
TPF = (CFG.video.height // 16) * (CFG.video.width // 16)                         # tokens per latent frame
HA = CFG.video.action_horizon


def _tokens():
  """The teacher-forcing sequence spelled out token by token: (kind, frame or chunk)."""
  frames = range(1 + K * LF)
  return ([('clean', f) for f in frames for _ in range(TPF)] + [('noisy', f) for f in frames for _ in range(TPF)]
          + [('action', c) for c in range(K) for _ in range(HA)] + [('state', c) for c in range(K)])


def _block(frame):
  return (frame - 1) // LF


def _design_rule(q, k):
  """docs/model.md, literally."""
  (qk, qi), (kk, ki) = q, k
  if qk == 'clean' and qi == 0:
    return kk == 'clean' and ki == 0
  if qk == 'clean':
    return kk == 'clean' and (ki == 0 or _block(ki) <= _block(qi))
  if (qk == 'noisy' and qi == 0):
    return kk == 'noisy' and ki == 0
  if qk == 'state':
    return kk == 'state' and ki == qi
  i = _block(qi) if qk == 'noisy' else qi   # noisy block i or action block i
  return ((kk == 'clean' and ki == 0) or (kk == 'clean' and ki > 0 and _block(ki) < i)
          or (kk == 'noisy' and ki > 0 and _block(ki) == i) or (kk == 'action' and ki == i)
          or (kk == 'state' and ki == i))


def test_teacher_forcing_mask_equals_design_rules_cell_by_cell():
  tokens = _tokens()
  want = np.array([[_design_rule(q, k) for k in tokens] for q in tokens])
  layout = masks.teacher_forcing_layout(K, LF, TPF, HA)
  got = masks.attention_mask(layout, layout)
  assert got.shape == want.shape == (len(tokens), len(tokens))
  np.testing.assert_array_equal(got, want)


def test_bidirectional_mask_denoises_the_clip_jointly_without_seeing_clean_copies():
  layout = masks.pad_layout(masks.teacher_forcing_layout(K, LF, TPF, HA), 1000)
  got = masks.attention_mask(layout, layout, 'bidirectional')
  g = layout.group
  pad, clean = g == masks.Group.PAD, g == masks.Group.CLEAN
  joint = ~pad & ~clean
  np.testing.assert_array_equal(got[np.ix_(joint, joint)], True)       # the clip sees all of itself
  np.testing.assert_array_equal(got[np.ix_(~clean, clean)], False)     # no leak of clean later frames
  np.testing.assert_array_equal(got[np.ix_(~pad, pad)], False)
  np.testing.assert_array_equal(got[np.ix_(pad, ~pad)], False)


def test_inference_mask_is_the_teacher_forcing_rows_of_that_chunk():
  """An inference step's queries see the same clean frames their teacher-forcing twins see."""
  clean = masks.video_layout(range(1 + K * LF), TPF, LF, clean=True)
  for chunk in range(K):
    queries = masks.inference_layout(chunk, LF, TPF, HA)
    got = masks.attention_mask(queries, masks.TokenLayout.concat(clean, queries))
    denoised, state = got[:-1], got[-1]
    visible = TPF * (1 + chunk * LF)        # frame 0 and the clean blocks before this chunk
    assert denoised[:, :visible].all()
    assert not denoised[:, visible:len(clean.group)].any()
    assert denoised[:, len(clean.group):].all()   # the noisy chunk, its actions and its state
    np.testing.assert_array_equal(state, np.arange(got.shape[1]) == got.shape[1] - 1)  # state: itself


def test_unknown_mask_kind_is_an_error():
  layout = masks.teacher_forcing_layout(1, LF, TPF, HA)
  with pytest.raises(ValueError, match='unknown attention mask kind'):
    masks.attention_mask(layout, layout, 'causal')


def test_backbone_sees_exactly_what_the_mask_allows():
  """Perturb one input token: an output row changes iff the mask's transitive reach allows it."""
  model = random_dit(CFG)
  layout = masks.teacher_forcing_layout(K, LF, 1, 2)
  mask = masks.attention_mask(layout, layout)
  n = len(layout.group)
  reach = mask.copy()
  for _ in range(CFG.model.num_layers - 1):
    reach = (reach.astype(int) @ mask.astype(int) > 0) | reach
  np.testing.assert_array_equal(reach, mask)  # block-causal visibility is already transitively closed
  d = CFG.model.dim
  x = jax.random.normal(jax.random.key(2), (1, n, d))
  t = jnp.linspace(0, 999, n)[None]
  angles = jnp.zeros((n, d // CFG.model.num_heads // 2))
  kv = model.cross_kv(*model.embed_context(jnp.ones((1, CFG.model.text_len, CFG.model.text_dim)),
                                           jnp.ones((1, CFG.model.image_tokens, CFG.model.image_dim))))
  run = jax.jit(lambda x: model.backbone(x, t, angles, mask, cross_kv=kv)[0])
  base = run(x)
  for k in range(n):
    moved = run(x.at[0, k].add(jax.random.normal(jax.random.key(k), (d,))))  # LN hides a constant shift
    changed = np.asarray(jnp.abs(moved - base).max(-1)[0] > 1e-6)
    np.testing.assert_array_equal(changed, reach[:, k], err_msg=f'perturbed token {k} {layout.group[k]}')


def test_teacher_forcing_forward_respects_chunk_causality():
  """Future clean frames and other chunks' actions cannot reach a chunk's predictions; past ones do."""
  model = random_dit(CFG)
  rng = np.random.default_rng(0)
  f = 1 + K * LF
  h = CFG.video.height // 8
  args = dict(
      clean=rng.standard_normal((1, f, h, h, 16)), noisy=rng.standard_normal((1, f, h, h, 16)),
      video_t=np.full((1, f), 700.0), actions=rng.standard_normal((1, K * HA, 32)),
      action_t=np.full((1, K * HA), 700.0), state=rng.standard_normal((1, K, 64)),
      embodiment_id=np.array([1]), text=rng.standard_normal((1, CFG.model.text_len, CFG.model.text_dim)),
      image=rng.standard_normal((1, CFG.model.image_tokens, CFG.model.image_dim)),
      i2v_cond=rng.standard_normal((1, f, h, h, 20)))
  args = {k: jnp.asarray(v, jnp.int32 if k == 'embodiment_id' else jnp.float32) for k, v in args.items()}
  fwd = jax.jit(model.teacher_forcing)
  video, actions = fwd(**args)

  def chunk_frames(c):
    return slice(1 + c * LF, 1 + (c + 1) * LF)

  def changes(name, index, value=3.0):
    v, a = fwd(**{**args, name: args[name].at[index].add(value)})
    dv = [float(jnp.abs(v - video)[:, chunk_frames(c)].max()) for c in range(K)]
    da = [float(jnp.abs(a - actions)[:, c * HA:(c + 1) * HA].max()) for c in range(K)]
    return [x > 1e-6 for x in dv], [x > 1e-6 for x in da]

  # Clean frames of chunk 1 are seen by chunks 2 and 3 only.
  assert changes('clean', (0, chunk_frames(1))) == ([False, False, True, True], [False, False, True, True])
  # The first frame conditions every chunk.
  assert changes('clean', (0, 0)) == ([True] * K, [True] * K)
  # Chunk 2's noisy actions and state reach only chunk 2.
  assert changes('actions', (0, slice(2 * HA, 3 * HA))) == ([False, False, True, False], [False, False, True, False])
  assert changes('state', (0, 2)) == ([False, False, True, False], [False, False, True, False])
