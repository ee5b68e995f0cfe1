"""Host-side inference: q01/q99 unnormalisation, relative -> absolute, smoothing, gripper, and
the asynchronous chunk executor (fake timing with short sleeps)."""
import threading
import time

import numpy as np
import pytest

from dreamzero_jax.inference import executor
from dreamzero_jax.datasets import normalization
from dreamzero_jax.inference import postprocess

signal = pytest.importorskip('scipy.signal')


@pytest.mark.parametrize('length, window, polyorder', [(47, 7, 2), (47, 11, 3), (9, 9, 2),
                                                       (30, 5, 1)])
def test_savgol_matrix_matches_scipy(length, window, polyorder):
  x = np.random.RandomState(0).randn(length, 3)
  ours = postprocess.savgol_matrix(length, window, polyorder) @ x
  ref = signal.savgol_filter(x, window, polyorder, axis=0, mode='interp')
  np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_smoothing_matches_scipy_recipe():
  actions = np.random.RandomState(1).randn(2, 24, 8).astype(np.float32)
  ours = postprocess.smooth_actions(actions, window=9, polyorder=3)
  t = np.arange(24)
  t_up = np.arange(47) / 2
  up = np.stack([[np.interp(t_up, t, actions[b, :, d]) for d in range(8)] for b in range(2)])
  up = up.transpose(0, 2, 1)  # [B, 47, 8]
  ref = signal.savgol_filter(up, 9, 3, axis=1, mode='interp')[:, ::2]
  assert ours.shape == actions.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_smoothing_keeps_lines_and_damps_noise():
  t = np.linspace(0, 1, 24)[:, None]
  line = (0.3 + 2 * t).astype(np.float32)
  np.testing.assert_allclose(postprocess.smooth_actions(line, 7, 2), line, atol=1e-5)
  noisy = line + 0.1 * np.random.RandomState(2).randn(24, 1).astype(np.float32)
  smoothed = postprocess.smooth_actions(noisy, 7, 2)
  assert np.std(smoothed - line) < 0.8 * np.std(noisy - line)


@pytest.mark.parametrize('window, polyorder, length', [(8, 2, 47), (7, 7, 47), (49, 2, 47)])
def test_bad_smoothing_arguments(window, polyorder, length):
  with pytest.raises(ValueError):
    postprocess.savgol_matrix(length, window, polyorder)


def test_relative_to_absolute_roundtrip_with_normalisation():
  rng = np.random.RandomState(3)
  horizon, relative = 24, 7
  state = rng.uniform(-2, 2, (3, 8)).astype(np.float32)  # 7 joints + gripper, raw
  absolute = state[:, None, :] + 0.05 * rng.randn(3, horizon, 8).astype(np.float32)
  absolute[..., 7] = rng.uniform(0, 1, (3, horizon))  # gripper is absolute
  # Training side: joints relative to the anchor state, then q01/q99 -> [-1, 1].
  relative_actions = absolute.copy()
  relative_actions[..., :relative] -= state[:, None, :relative]
  q01 = np.quantile(relative_actions.reshape(-1, 8), 0.0, axis=0)
  q99 = np.quantile(relative_actions.reshape(-1, 8), 1.0, axis=0)
  summary = dict(q01=q01.tolist(), q99=q99.tolist())
  model_space = normalization.normalize(relative_actions, summary)   # the pipeline's own map
  # Inference side.
  raw = normalization.unnormalize(model_space, summary)
  back = postprocess.relative_to_absolute(raw, state, relative)
  np.testing.assert_allclose(back, absolute, atol=1e-5)


def test_unnormalize_endpoints_and_clipping_range():
  q01, q99 = np.array([-1.0, 0.0]), np.array([3.0, 0.5])
  summary = dict(q01=q01.tolist(), q99=q99.tolist())
  np.testing.assert_allclose(normalization.unnormalize(np.array([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]), summary),
                             [[-1.0, 0.0], [3.0, 0.5], [1.0, 0.25]])


def test_relative_to_absolute_touches_only_leading_dims():
  actions = np.zeros((1, 4, 3), np.float32)
  out = postprocess.relative_to_absolute(actions, np.array([[1.0, 2.0, 5.0]]), 2)
  np.testing.assert_array_equal(out[0], np.tile([1.0, 2.0, 0.0], (4, 1)))
  assert np.all(actions == 0)  # input untouched
  with pytest.raises(ValueError, match='relative dims'):
    postprocess.relative_to_absolute(actions, np.zeros((1, 2)), 3)


def test_binarize_gripper():
  actions = np.array([[[0.2, 0.49], [0.3, 0.5], [0.4, 0.9]]], np.float32)
  out = postprocess.binarize_dims(actions, [1], threshold=0.5, low=0.0, high=1.0)
  np.testing.assert_array_equal(out[0, :, 1], [0.0, 0.0, 1.0])   # strictly above, as the release's client
  np.testing.assert_array_equal(out[0, :, 0], actions[0, :, 0])


HZ, HORIZON = 100.0, 5  # a chunk executes in 50 ms


class _FakeRobot:
  def __init__(self, stop_after=None):
    self.times, self.actions, self.stop_after = [], [], stop_after

  def __call__(self, action):
    self.times.append(time.perf_counter())
    self.actions.append(np.asarray(action).copy())
    return self.stop_after is not None and len(self.actions) >= self.stop_after


def _policy(latency, log):
  def compute(k):
    log.append((k, threading.current_thread() is threading.main_thread()))
    time.sleep(latency)
    return np.full((HORIZON, 2), k, np.float32) + np.arange(HORIZON)[:, None] / 10
  return compute


def test_executor_overlaps_compute_and_meets_deadlines():
  robot, log = _FakeRobot(), []
  t_before = time.perf_counter()
  report = executor.AsyncChunkExecutor(_policy(0.004, log), robot, HZ).run(5)
  assert report.actions_executed == 5 * HORIZON and not report.stopped_early
  got = np.stack(robot.actions)
  np.testing.assert_allclose(got[:, 0], np.repeat(np.arange(5), HORIZON) + np.tile(
      np.arange(HORIZON) / 10, 5))
  assert [k for k, _ in log] == list(range(5))
  assert log[0][1] and not any(main for _, main in log[1:])  # chunks >= 1 in the worker
  assert report.deadline_misses == 0 and report.max_lateness == 0.0
  chunks = report.chunks
  for prev, cur in zip(chunks, chunks[1:]):
    # chunk k+1 is computed while chunk k executes, and starts exactly at its deadline.
    assert prev.exec_start <= cur.compute_start < cur.deadline
    assert cur.deadline == pytest.approx(prev.exec_start + HORIZON / HZ)
    assert cur.exec_start == cur.deadline
  # Paced at the control rate: no action before its tick (times since run() began).
  scheduled = np.array([c.exec_start + i / HZ for c in chunks for i in range(HORIZON)])
  assert np.all(np.asarray(robot.times) - t_before >= scheduled)


def test_executor_records_deadline_misses():
  robot, log = _FakeRobot(), []
  latency = 0.09  # longer than the 50 ms chunk
  report = executor.AsyncChunkExecutor(_policy(latency, log), robot, HZ).run(4)
  assert report.actions_executed == 4 * HORIZON
  assert not report.chunks[0].missed
  assert report.deadline_misses == 3
  assert 0.02 < report.max_lateness < 0.1
  for rec in report.chunks[1:]:
    assert rec.exec_start == rec.compute_end  # a late chunk starts as soon as it is ready


def test_executor_stops_when_the_episode_ends():
  robot, log = _FakeRobot(stop_after=6), []
  report = executor.AsyncChunkExecutor(_policy(0.002, log), robot, HZ).run(10)
  assert report.stopped_early and report.actions_executed == 6
  assert len(report.chunks) == 2 and len(log) == 3  # chunk 2 was computed, never executed
