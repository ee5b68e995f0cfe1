"""The release's RoboArena-style wire protocol (docs/inference.md "RoboArena-style protocol").

The official release's DROID clients (eval_utils/policy_client.py, run_sim_eval.py; RoboArena's
protocol) and its server (socket_test_optimized_AR.py) speak it:
  on connect  the server's PolicyServerConfig as a map (image_resolution, needs_wrist_camera,
              n_external_cameras, needs_stereo_camera, needs_session_id, action_space)
  request     endpoint 'infer' or 'reset'; ONE HxWx3 uint8 frame per camera (or TxHxWx3) under
              0-indexed names (observation/exterior_image_0_left is the first exterior camera),
              the state fields, prompt, session_id
  reply       infer: the action array itself (N x action_dim float32); reset: the text frame
              'reset successful'; an error: a text frame (its client raises it)
Frames are buffered per session: the model sees 1 frame on a session's first call, then the last
`frames_per_call` buffered frames (the episode's first frame repeated in front while fewer exist),
each repeated to the training stride as protocol.py's divisor rule does. A new session_id on a
connection starts over, as in the release. This module is pure request/reply translation and the
frame rule; the server (server.py) owns sessions and threads.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dreamzero_client import msgpack_numpy
from dreamzero_jax.serving import protocol

NAME = 'roboarena'
PROTOCOLS = ('auto', 'openpi', NAME)
ENDPOINTS = ('infer', 'reset')
RESET_REPLY = 'reset successful'
# The release serves DROID joint-position policies under this protocol (its PolicyServerConfig).
ACTION_SPACE = 'joint_position'
# Keys the release's first request carries and an openpi-style one never does.
_MARKERS = ('endpoint', 'observation/exterior_image_0_left')


def check_metadata(metadata: Mapping[str, Any]) -> None:
  """The backend's optional `roboarena` entry: {cameras: {client key: spec key}, frames_per_call}."""
  entry = metadata['roboarena']
  spec = metadata['observation_spec']
  cameras = [k for k, e in spec.items() if protocol.is_camera(e)]
  if sorted(entry['cameras'].values()) != sorted(cameras):
    raise ValueError(f'backend roboarena cameras {entry["cameras"]} must name each camera of the '
                     f'observation spec once ({cameras})')
  frames = tuple(spec[cameras[0]]['shape'])[0]
  n = entry['frames_per_call']
  if not isinstance(n, int) or n < 1 or frames % n:
    raise ValueError(f'serve.roboarena_frames: {n} must divide video.frames_per_chunk ({frames}): '
                     'each buffered frame is repeated to the training stride')


def server_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
  """The release's PolicyServerConfig fields for this backend (sent beside our metadata keys)."""
  spec, cameras = metadata['observation_spec'], metadata['roboarena']['cameras']
  height, width = tuple(spec[next(iter(cameras.values()))]['shape'])[1:3]
  return dict(image_resolution=[height, width],
              needs_wrist_camera=any('wrist' in k for k in cameras),
              n_external_cameras=sum('exterior' in k for k in cameras),
              needs_stereo_camera=False, needs_session_id=True, action_space=ACTION_SPACE)


def speaks(request: Any) -> bool:
  """Whether a decoded first request of a connection is RoboArena-style (auto detection)."""
  return isinstance(request, dict) and any(k in request for k in _MARKERS)


class FrameBuffer:
  """One session's frames per camera: the episode's first frame and the latest `keep`."""

  def __init__(self, keep: int):
    self._keep = keep
    self._first: dict[str, np.ndarray] = {}
    self._recent: dict[str, list[np.ndarray]] = {}

  def add(self, observation: Mapping[str, np.ndarray], cameras: list[str]) -> None:
    for key in cameras:
      frames = list(observation[key])
      self._first.setdefault(key, frames[0])
      self._recent[key] = (self._recent.get(key, []) + frames)[-self._keep:]

  def frames(self, key: str, n: int) -> np.ndarray:
    """The last n frames, the first frame repeated in front while fewer exist (the release's rule)."""
    recent = self._recent[key][-n:]
    return np.stack([self._first[key]] * (n - len(recent)) + recent)


def model_observation(observation: Mapping[str, np.ndarray], buffer: FrameBuffer, cameras: list[str],
                      first_call: bool, frames_per_call: int, frames: int) -> dict[str, np.ndarray]:
  """What the model sees this call: 1 buffered frame on a first call, else the last
  frames_per_call, each repeated frames / frames_per_call times (the training stride)."""
  buffer.add(observation, cameras)
  out = dict(observation)
  for key in cameras:
    if first_call:
      out[key] = buffer.frames(key, 1)
    else:
      out[key] = np.repeat(buffer.frames(key, frames_per_call), frames // frames_per_call, axis=0)
  return out


def pack_actions(actions: np.ndarray) -> bytes:
  return msgpack_numpy.pack(np.asarray(actions, np.float32))
