"""What the policy server needs from a model: the `PolicyBackend` protocol and request checks.

The server (serving/server.py) speaks the wire protocol of docs/inference.md; a backend (a robot's
adapter around the policy, serving/adapters.py) turns checked, canonical observations into actions
and owns everything model-side (normalisation, KV cache, sampler). Keeping the seam this small lets
the server be tested without a model.

Observation spec entries are {'shape': [...], 'dtype': str}. An entry of shape [T, H, W, 3] and
dtype uint8 is a camera stream: the first call of a session sends 1 frame (HxWx3 or 1xHxWx3),
later calls send the T frames observed while the last chunk ran, at the training stride. Clients
built for the official server send fewer frames over the same chunk (docs/inference.md: 1 frame,
then 4, where our DROID model trains on 8 a chunk): n frames with n dividing T are accepted and
each is repeated T/n times, which puts every frame at or just before its training position. A
later call of 1 frame restarts the episode from it (docs/inference.md: the cache resets on a
1-frame input). All cameras of a request send the same number of frames.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import numpy as np

PROTOCOL_VERSION = 1
METADATA_KEYS = ('observation_spec', 'action_shape', 'action_horizon', 'control_hz',
                 'embodiment', 'protocol_version')
# Request fields that are not observations (the server fills session_id in when a client sends none).
TEXT_FIELDS = ('session_id', 'prompt')
# Bounds on what a request may make the server keep: ids (session_id, request_id) and the prompt.
MAX_ID_CHARS = 256
MAX_PROMPT_CHARS = 4096


class PolicyBackend(Protocol):
  """A model behind the policy server. Calls come one at a time, from one worker thread."""

  @property
  def metadata(self) -> dict[str, Any]:
    """The map sent to every client on connect; keys METADATA_KEYS, msgpack-able values."""

  def new_session(self, prompt: str, observation: dict[str, np.ndarray]) -> Any:
    """Starts an episode (fresh KV cache, encoded prompt) from its 1-frame observation."""

  def infer(self, session_state: Any, observation: dict[str, np.ndarray]
            ) -> tuple[np.ndarray, Any, dict[str, float]]:
    """Returns (actions float32 [action_horizon, action_dim], new state, ms per stage).

    On a session's first call the server passes the state `new_session` just built and the
    same observation. Camera streams arrive as TxHxWx3 uint8, other fields as spec dtype.
    The server adds queue, decode, validate and total to the timing; a backend names others.
    """

  # Optional: `warmup()` runs (and so compiles) a first and a later call before the server
  # reports ready on /healthz.


def check_metadata(metadata: Mapping[str, Any]) -> None:
  """Fails early, at server start, on a backend whose metadata breaks the protocol."""
  missing = [k for k in METADATA_KEYS if k not in metadata]
  if missing:
    raise ValueError(f'backend metadata lacks {", ".join(missing)}')
  if metadata['protocol_version'] != PROTOCOL_VERSION:
    raise ValueError(f'backend speaks protocol {metadata["protocol_version"]}, '
                     f'server speaks {PROTOCOL_VERSION}')
  for key, entry in metadata['observation_spec'].items():
    if set(entry) != {'shape', 'dtype'}:
      raise ValueError(f'backend observation_spec[{key!r}] must be {{shape, dtype}}, got {entry}')
  if tuple(metadata['action_shape'])[0] != metadata['action_horizon']:
    raise ValueError(f'action_shape {metadata["action_shape"]} disagrees with '
                     f'action_horizon {metadata["action_horizon"]}')


def is_camera(entry: Mapping[str, Any]) -> bool:
  shape = tuple(entry['shape'])
  return np.dtype(entry['dtype']) == np.uint8 and len(shape) == 4 and shape[-1] == 3


def request_bytes(spec: Mapping[str, Mapping[str, Any]]) -> int:
  """Size of the observation arrays of a full (all frames) request."""
  return sum(int(np.prod(e['shape'])) * np.dtype(e['dtype']).itemsize for e in spec.values())


def frame_counts(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """What the metadata says about camera frames: 1 on a session's first call, T on later ones
  (or any divisor of T, each frame repeated to the training stride)."""
  frames = [tuple(e['shape'])[0] for e in spec.values() if is_camera(e)]
  if not frames:
    return {}
  t = frames[0]
  return dict(first_call_frames=1, later_call_frames=t,
              later_call_frames_accepted=[n for n in range(2, t + 1) if t % n == 0])


def check_text(field: str, value: Any) -> None:
  """session_id and prompt: non-empty strings within their bounds."""
  bound = MAX_PROMPT_CHARS if field == 'prompt' else MAX_ID_CHARS
  if not isinstance(value, str) or not value:
    raise ValueError(f'{field}: expected a non-empty string, got {value!r:.40}')
  if len(value) > bound:
    raise ValueError(f'{field}: {len(value)} characters, at most {bound}')


def _as_array(key: str, value: Any) -> np.ndarray:
  try:
    return np.asarray(value)
  except Exception as e:  # ragged, too deep or too large: numpy raises several types
    raise ValueError(f'{key}: not an array ({type(e).__name__})') from e


def _check_camera(key: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if value.dtype != np.uint8:
    raise ValueError(f'{key}: dtype {value.dtype}, expected uint8')
  if value.ndim == 3:
    value = value[None]
  if value.ndim != 4 or value.shape[1:] != shape[1:]:
    raise ValueError(f'{key}: image shape {value.shape}, expected '
                     f'{"x".join(map(str, shape[1:]))} (HxWx3) or TxHxWx3')
  if value.shape[0] == 0:
    raise ValueError(f'{key}: 0 frames (send 1 on a session\'s first call, then {shape[0]})')
  return value


def _frames_to_stride(key: str, value: np.ndarray, frames: int, first_call: bool) -> np.ndarray:
  """A camera's n frames as the call's canonical count: 1 on a first call or restart, else T."""
  n = value.shape[0]
  if first_call and n != 1:
    raise ValueError(f'{key}: {n} frames, expected 1 (a session sends 1 frame on its first call '
                     f'or with reset, then {frames})')
  if n == 1 or n == frames:
    return value
  if n > frames or frames % n:
    raise ValueError(f'{key}: {n} frames, expected {frames} (or a divisor of {frames}: each frame is '
                     f'repeated to the training stride; 1 frame restarts the episode)')
  return np.repeat(value, frames // n, axis=0)


def restarts_episode(spec: Mapping[str, Mapping[str, Any]], observation: Mapping[str, np.ndarray]) -> bool:
  """Whether a later call's validated observation is a 1-frame restart."""
  cameras = [k for k, entry in spec.items() if is_camera(entry)]
  return bool(cameras) and observation[cameras[0]].shape[0] == 1


def _check_vector(key: str, value: np.ndarray, shape: tuple[int, ...], dtype: np.dtype
                  ) -> np.ndarray:
  floating = dtype.kind == 'f'
  # Robot stacks report float64 state; any float is cast, but an int or string is a client bug.
  if (value.dtype.kind != 'f') if floating else (value.dtype != dtype):
    raise ValueError(f'{key}: dtype {value.dtype}, expected {dtype}')
  if value.shape != shape:
    raise ValueError(f'{key}: shape {value.shape}, expected {shape}')
  if floating and not np.all(np.isfinite(value)):
    raise ValueError(f'{key}: contains NaN or inf')
  with np.errstate(over='ignore'):
    cast = value.astype(dtype, copy=False)
  if floating and not np.all(np.isfinite(cast)):  # a float64 1e39 is inf in float32
    raise ValueError(f'{key}: {np.abs(value).max():.3g} overflows {dtype}')
  return cast


def validate_observation(spec: Mapping[str, Mapping[str, Any]], request: Mapping[str, Any],
                         first_call: bool, names: Mapping[str, str] | None = None,
                         buffered: bool = False) -> dict[str, np.ndarray]:
  """Checks a request against the spec; returns its observations under the spec's keys, in
  canonical form (or, when `buffered`, cameras as sent: the caller buffers their frames).

  `names`: the request's key for a spec key where they differ (another protocol's camera names).
  Raises ValueError('<field>: <what is wrong>') for the first bad field, named as the request names
  it. Keys outside the spec are ignored, as openpi clients send extras.
  """
  for field in TEXT_FIELDS:
    if field not in request:
      raise ValueError(f'{field}: missing')
    check_text(field, request[field])
  observation, first_camera = {}, None
  for key, entry in spec.items():
    field = (names or {}).get(key, key)
    if field not in request:
      raise ValueError(f'{field}: missing')
    value = _as_array(field, request[field])
    shape = tuple(entry['shape'])
    if is_camera(entry):
      value = _check_camera(field, value, shape)
      if first_camera is None:
        first_camera = (field, value.shape[0])
      elif value.shape[0] != first_camera[1]:
        raise ValueError(f'{field}: {value.shape[0]} frames, but {first_camera[0]} has {first_camera[1]} '
                         '(all cameras send the same number)')
      observation[key] = value if buffered else _frames_to_stride(field, value, shape[0], first_call)
    else:
      observation[key] = _check_vector(field, value, shape, np.dtype(entry['dtype']))
  return observation
