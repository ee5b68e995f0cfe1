"""Which steps of an episode make one training clip (docs/data_and_sharding.md).

A clip starts at step `s` and holds k <= K chunks of Hz actions. With frame stride f and
F = frames_per_chunk (F * f == Hz):
  chunk j (0 <= j < k): anchor step a_j = s + j*Hz; state[j] = state at a_j;
                        actions[j*Hz + h] = action taken at step a_j + h, h = 0..Hz-1.
  video frame n (0 <= n <= k*F): the observation at step s + n*f.
So frame 0 is the anchor observation (the VAE's lone first latent frame), and frames
1 + j*F .. (j+1)*F (chunk j's latent frames) are the observations at a_j + f, ..., a_j + Hz,
i.e. what the scene looks like while and right after chunk j's actions run. Equivalently each
chunk's F frames sit at stride f from its first action step, plus one final frame at s + k*Hz.
DROID (f=3, Hz=24, F=8): frames at s + [0, 3, ..., 21] per chunk and one final frame.

Clips never cross a change of the (primary) instruction. From a sampled anchor, chunks are added
alternately backward and forward (backward first) while they fit, up to K: the release's order
(lerobot_sharded.py), so an anchor in the middle of a long segment sits in the middle of its clip.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
  max_chunks: int        # K
  action_horizon: int    # Hz
  frames_per_chunk: int  # F
  frame_stride: int      # f

  def __post_init__(self):
    if self.frames_per_chunk * self.frame_stride != self.action_horizon:
      raise ValueError(
          f'video.frames_per_chunk ({self.frames_per_chunk}) * data.frame_stride '
          f'({self.frame_stride}) must equal video.action_horizon ({self.action_horizon}): a '
          "chunk's frames and actions must span the same time")

  @property
  def num_frames(self) -> int:
    return 1 + self.max_chunks * self.frames_per_chunk

  def frame_steps(self, start: int, k: int) -> np.ndarray:
    return start + self.frame_stride * np.arange(1 + k * self.frames_per_chunk)

  def anchor_steps(self, start: int, k: int) -> np.ndarray:
    return start + self.action_horizon * np.arange(k)

  def action_steps(self, start: int, k: int) -> np.ndarray:
    return start + np.arange(k * self.action_horizon)


def segments(primary_language: np.ndarray) -> list[tuple[int, int]]:
  """[begin, end) runs of steps that share one instruction."""
  change = np.flatnonzero(primary_language[1:] != primary_language[:-1]) + 1
  bounds = np.concatenate([[0], change, [len(primary_language)]])
  return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def idle_anchors(state: np.ndarray, action: np.ndarray, horizon: int, threshold: float) -> np.ndarray:
  """idle[a] for a in 0..T-horizon-1: neither state nor action moves by `threshold` over the chunk."""
  state_range = np.ptp(sliding_window_view(state, horizon + 1, axis=0), axis=-1).max(-1)
  action_range = np.ptp(sliding_window_view(action[:-1], horizon, axis=0), axis=-1).max(-1)
  return (state_range < threshold) & (action_range < threshold)


def episode_clips(language: np.ndarray, state: np.ndarray, action: np.ndarray, has_action: bool,
                  layout: ChunkLayout, idle_threshold: float, anchor_stride: int = 1) -> np.ndarray:
  """[N, 2] (start, k) of every clip of one episode, one per non-idle anchor.

  Anchors are every `anchor_stride`-th step of each instruction segment (1: every step, as the
  release). A stride of action_horizon puts every chunk where a policy replans from the episode's
  start, and leaves few enough distinct clips to encode each once (data.latent_cache).
  """
  hz, kmax = layout.action_horizon, layout.max_chunks
  num_steps = len(state)
  idle = (idle_anchors(state, action, hz, idle_threshold) if has_action and num_steps > hz
          else np.zeros(max(num_steps - hz, 0), bool))
  out = []
  for begin, end in segments(language[:, 0]):
    last = min(end, num_steps - 1)   # the final frame after a chunk must exist
    anchors = np.arange(begin, last - hz + 1, anchor_stride)
    if not len(anchors):
      continue
    anchors = anchors[~idle[anchors]]
    ahead = (last - anchors) // hz - 1      # whole chunks after the anchor's own
    behind = (anchors - begin) // hz        # whole chunks before it
    extra = np.minimum(kmax - 1, ahead + behind)
    # Alternating, backward first: backward takes ceil(extra / 2) unless either side runs out.
    backward = np.minimum(behind, np.maximum(extra - ahead, (extra + 1) // 2))
    out.append(np.stack([anchors - backward * hz, 1 + extra], axis=1))
  return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def clip_index(lowdim, layout: ChunkLayout, idle_threshold: float, anchor_stride: int = 1) -> np.ndarray:
  """[N, 3] (episode, start, k) over all episodes of a `LowDim`."""
  parts = []
  for i in range(len(lowdim)):
    ep = lowdim.episode(i)
    clips = episode_clips(ep['language'], ep['state'], ep['action'], bool(lowdim.has_action[i]),
                          layout, idle_threshold, anchor_stride)
    parts.append(np.concatenate([np.full((len(clips), 1), i), clips], axis=1))
  return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 3), np.int64)
