"""Clip indexing, idle filtering, variable K, normalisation and canvas layout, without any dataset."""
import io

import numpy as np
import pytest
from PIL import Image

from dreamzero_jax.datasets import canvas, chunks, normalization

LAYOUT = chunks.ChunkLayout(max_chunks=3, action_horizon=4, frames_per_chunk=2, frame_stride=2)


def _moving(t, dim=2):
  return np.cumsum(np.ones((t, dim), np.float32), 0)


def test_clip_timing_matches_the_docstring():
  assert LAYOUT.frame_steps(10, 2).tolist() == [10, 12, 14, 16, 18]
  assert LAYOUT.anchor_steps(10, 2).tolist() == [10, 14]
  assert LAYOUT.action_steps(10, 2).tolist() == list(range(10, 18))
  with pytest.raises(ValueError, match='video.frames_per_chunk'):
    chunks.ChunkLayout(4, 4, 8, 1)


def test_clips_stay_in_one_instruction_and_extend_backward():
  t = 30
  language = np.zeros((t, 1), np.int32)
  language[20:] = 1
  state = _moving(t)
  clips = chunks.episode_clips(language, state, state.copy(), True, LAYOUT, 1e-3)
  for start, k in clips:
    steps = np.arange(start, start + 4 * k)
    assert len(set(language[steps, 0])) == 1 and start + 4 * k <= t - 1
  # An anchor near a segment end gets its chunks backward: 3 chunks whenever 12 steps fit.
  assert {tuple(c) for c in clips if c[0] + 4 * c[1] in (20, 29)} >= {(8, 3)}
  assert clips[:, 1].max() == 3 and clips[:, 1].min() >= 1


def test_idle_anchors_are_dropped():
  t = 40
  state = _moving(t)
  state[10:25] = state[10]           # the robot stands still for 15 steps
  action = state.copy()
  idle = chunks.idle_anchors(state, action, 4, 1e-3)
  assert idle[10:21].all() and not idle[:6].any() and not idle[25:].any()
  # One clip per anchor that can hold a chunk, minus exactly the idle ones.
  clips = chunks.episode_clips(np.zeros((t, 1), np.int32), state, action, True, LAYOUT, 1e-3)
  num_anchors = t - 1 - 4 + 1
  assert len(clips) == num_anchors - idle[:num_anchors].sum()


def test_video_only_episodes_are_never_idle_filtered():
  state = np.zeros((20, 2), np.float32)
  clips = chunks.episode_clips(np.zeros((20, 1), np.int32), state, state, False, LAYOUT, 1e-3)
  assert len(clips) == 20 - 1 - 4 + 1


def test_normalize_clips_and_inverts():
  # The second dim has q01 == q99: it passes through unchanged, then clipped (the release's rule).
  stats = {'q01': [0.0, 5.0], 'q99': [2.0, 5.0]}
  y = normalization.normalize(np.array([[1.0, 5.0], [3.0, 7.0], [1.0, 0.25]], np.float32), stats)
  np.testing.assert_allclose(y, [[0.0, 1.0], [1.0, 1.0], [0.0, 0.25]])
  np.testing.assert_allclose(normalization.unnormalize(np.array([[-1.0, 0.0]]), stats), [[0.0, 5.0]])


def test_chunks_grow_from_the_anchor_alternately_backward_first():
  # One segment of 60 steps, horizon 4, K = 3: an anchor with room on both sides gets one chunk
  # before and one after it (backward first, then forward), as the release samples.
  layout = chunks.ChunkLayout(max_chunks=3, action_horizon=4, frames_per_chunk=2, frame_stride=2)
  state = _moving(60)
  clips = {int(a): (int(s), int(k)) for a, (s, k) in zip(range(60), chunks.episode_clips(
      np.zeros((60, 1), np.int32), state, state.copy(), True, layout, 1e-3))}
  assert clips[20] == (16, 3)        # 16 | 20 (anchor) | 24
  assert clips[2] == (2, 3)          # no room behind: both extra chunks go forward
  assert clips[5] == (1, 3)          # room for one behind (1), then forward
  assert clips[52] == (44, 3)        # anchor 52's chunk ends at 56; 59 is the last step: all behind
  layout4 = chunks.ChunkLayout(max_chunks=4, action_horizon=4, frames_per_chunk=2, frame_stride=2)
  clips4 = chunks.episode_clips(np.zeros((60, 1), np.int32), state, state.copy(), True, layout4, 1e-3)
  assert tuple(clips4[20]) == (12, 4)   # backward, forward, backward: 12 | 16 | 20 | 24


def test_relative_action_stats_cover_every_anchor_offset():
  state = np.arange(6, dtype=np.float64)[:, None] * np.ones((1, 2))
  action = state + 1.0
  rel = normalization.relative_actions(state, action, horizon=3, rel=1)
  # Actions at steps t relative to anchors t - h for h = 0, 1, 2: 1, 2 and 3 ahead.
  assert sorted(set(rel[:, 0].tolist())) == [1.0, 2.0, 3.0]
  np.testing.assert_array_equal(rel[:, 1], np.concatenate([action[h:5, 1] for h in range(3)]))


def _png(colour, hw):
  buf = io.BytesIO()
  Image.fromarray(np.broadcast_to(np.uint8(colour), (*hw, 3)).copy()).save(buf, format='PNG')
  return buf.getvalue()


@pytest.mark.parametrize('layout', ['droid', 'grid'])
def test_canvas_layouts(layout):
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
  frames = [[_png(c, (10, 20))] * 2 for c in colours]
  out = np.zeros((3, 8, 16, 3), np.float32)
  canvas.compose(frames, layout, out, [(10, 20)] * 3, None, canvas.Augment())
  px = np.round((out[:2] + 1) * 127.5)
  if layout == 'droid':
    quads = {(0, 0): colours[0], (0, 8): colours[0], (4, 0): colours[1], (4, 8): colours[2]}
  else:
    quads = {(0, 0): colours[0], (4, 0): colours[1], (0, 8): colours[2], (4, 8): (0, 0, 0)}
  for (r, c), colour in quads.items():
    np.testing.assert_array_equal(px[:, r:r + 4, c:c + 8], np.broadcast_to(colour, (2, 4, 8, 3)))
  assert (out[2] == 0).all()   # frames past the clip are left to the caller (padding zeros)


def test_augmentation_is_the_same_for_every_frame_of_a_view():
  yy, xx = np.mgrid[0:32, 0:32]
  img = np.stack([xx * 8, yy * 8, np.zeros_like(xx)], -1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')
  frames = [[buf.getvalue()] * 3]
  out = np.zeros((3, 32, 32, 3), np.float32)
  canvas.compose(frames, 'grid', out, [(32, 32)], np.random.default_rng(1),
                 canvas.Augment(crop_scale=0.5, brightness=0.2, contrast=0.2))
  assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
  plain = np.zeros_like(out)
  canvas.compose(frames, 'grid', plain, [(32, 32)], None, canvas.Augment(0.5, 0.2, 0.2))
  assert not np.allclose(out[0, :16, :16], plain[0, :16, :16])
  assert out.min() >= -1 and out.max() <= 1


def test_evaluation_crops_the_centre_of_each_view():
  # A 20x20 view whose pixels say where they are; crop 0.5 keeps int(10) rows and columns from
  # round(5) on (torchvision CenterCrop), which the 10x10 quadrant shows unresampled.
  yy, xx = np.mgrid[0:20, 0:20]
  img = np.stack([yy * 10, xx * 10, np.full_like(xx, 7)], -1).astype(np.uint8)
  got = canvas.compose_arrays([img[None]], 'grid', 20, 20, crop_scale=0.5)
  np.testing.assert_array_equal(np.round((got[0, :10, :10] + 1) * 127.5), img[5:15, 5:15])
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')
  out = np.zeros((1, 20, 20, 3), np.float32)
  canvas.compose([[buf.getvalue()]], 'grid', out, [(20, 20)], None, canvas.Augment(crop_scale=0.5, brightness=0.3))
  np.testing.assert_array_equal(out[0, :10, :10], got[0, :10, :10])   # training data in eval mode: the same
  assert canvas.crop_box((20, 20), 1.0, None) is None


def test_colour_jitter_follows_torchvision():
  px = np.array([[[[0.4, 0.2, 0.1], [0.8, 0.6, 0.2]]]], np.float32)    # [T=1, 1, 2, 3] in [0, 1]
  u8 = np.round(px * 255).astype(np.uint8)
  jit = lambda **kw: canvas.apply_jitter(u8, canvas.Jitter(**kw)).astype(np.float32) / 255
  np.testing.assert_allclose(jit(brightness=1.5), np.clip(u8 / 255 * 1.5, 0, 1), atol=1 / 255)
  grey = (0.2989 * u8[..., 0] + 0.587 * u8[..., 1] + 0.114 * u8[..., 2])[..., None] / 255
  np.testing.assert_allclose(jit(saturation=0.0), np.broadcast_to(grey, u8.shape), atol=1 / 255)
  np.testing.assert_allclose(jit(contrast=0.0), np.broadcast_to(grey.mean(), u8.shape), atol=1 / 255)
  red = np.zeros((1, 1, 1, 3), np.uint8)
  red[..., 0] = 255
  np.testing.assert_array_equal(canvas.apply_jitter(red, canvas.Jitter(hue=1 / 3))[0, 0, 0], [0, 255, 0])
  # Factors from [1-x, 1+x] and a hue shift from [-h, h], drawn per view.
  rng = np.random.default_rng(0)
  draws = [canvas.draw_jitter(rng, canvas.Augment(brightness=0.3, contrast=0.4, saturation=0.5, hue=0.08))
           for _ in range(200)]
  b = np.array([d.brightness for d in draws])
  h = np.array([d.hue for d in draws])
  assert 0.7 <= b.min() < 0.75 and 1.25 < b.max() <= 1.3 and -0.08 <= h.min() < -0.07 and 0.07 < h.max() <= 0.08
  assert len({d.order for d in draws}) > 10
