"""Synchronous client for the policy server; needs only numpy, msgpack and websockets.

    from dreamzero_client import PolicyClient
    client = PolicyClient('127.0.0.1', 8000)
    client.metadata['action_shape']             # what the server will return
    reply = client.infer({**observation, 'prompt': 'pick up the cup'})
    reply['actions']                            # float32 [action_horizon, action_dim]
    client.reset()                              # the next infer starts a new episode

The first request of a session (and the one after reset) carries 1 camera frame, later ones the
frame count of `metadata['observation_spec']` (docs/inference.md "Server protocol").
"""
from __future__ import annotations

import contextlib
import uuid
from typing import Any

from websockets.sync import client as ws_client

from dreamzero_client import msgpack_numpy


class PolicyServerError(RuntimeError):
  """The server rejected a request; the message names the offending field."""


class PolicyClient:
  """One websocket connection; `session_id` is filled into requests that carry none."""

  def __init__(self, host: str = '127.0.0.1', port: int = 8000, session_id: str | None = None,
               timeout_s: float | None = None):
    self.session_id = session_id or uuid.uuid4().hex
    self._timeout_s = timeout_s
    # Entered as a context manager: websockets 17.1+ deprecates connect() used bare.
    self._connection = contextlib.ExitStack()
    # No deflate: camera frames barely compress and compressing them costs control-loop latency.
    self._websocket = self._connection.enter_context(ws_client.connect(
        f'ws://{host}:{port}', compression=None, max_size=None, open_timeout=timeout_s))
    try:
      self.metadata: dict[str, Any] = msgpack_numpy.unpack(self._websocket.recv(timeout_s))
    except BaseException:
      self._connection.close()  # a retrying robot loop must not leak sockets
      raise
    self._reset_next = False

  def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
    """Sends one request; returns {'actions', 'server_timing'} or raises PolicyServerError."""
    request = {'session_id': self.session_id, **observation}
    if self._reset_next:
      request['reset'] = True
    self._websocket.send(msgpack_numpy.pack(request))
    reply = msgpack_numpy.unpack(self._websocket.recv(self._timeout_s))
    if 'error' in reply:
      raise PolicyServerError(reply['error'])
    self._reset_next = False
    return reply

  def reset(self) -> None:
    """Makes the next `infer` start a new episode (send it 1 frame per camera)."""
    self._reset_next = True

  def close(self) -> None:
    self._connection.close()

  def __enter__(self) -> PolicyClient:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
