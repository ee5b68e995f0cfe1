"""Synchronous client for the policy server; needs only numpy, msgpack and websockets.

    from dreamzero_client import PolicyClient
    client = PolicyClient('127.0.0.1', 8000)
    client.metadata['action_shape']             # what the server will return
    reply = client.infer({**observation, 'prompt': 'pick up the cup'})
    reply['actions']                            # float32 [action_horizon, action_dim]
    client.reset()                              # the next infer starts a new episode

The first request of a session (and the one after reset) carries 1 camera frame, later ones the
frame count of `metadata['observation_spec']` (docs/inference.md "Server protocol").

A robot never acts on a stale reply: every request carries a fresh `request_id`, the server echoes
it, and a reply to another request (one that arrived after its call timed out) is discarded with a
warning. Every wait is bounded by default (CONNECT_TIMEOUT_S for the connection and the server's
metadata, REPLY_TIMEOUT_S for each reply), and `max_age_ms` refuses actions computed from an
observation sent longer ago than that. Each failure is its own exception type, all PolicyClientError.
"""
from __future__ import annotations

import contextlib
import itertools
import time
import uuid
import warnings
from typing import Any

from websockets.sync import client as ws_client

from dreamzero_client import msgpack_numpy

PROTOCOL_VERSION = 1
CONNECT_TIMEOUT_S = 10.0   # the websocket handshake, and then the server's metadata frame
REPLY_TIMEOUT_S = 60.0     # each reply (a first call may wait for a server still compiling)


class PolicyClientError(Exception):
  """Any failure of a PolicyClient call."""


class PolicyServerError(PolicyClientError, RuntimeError):
  """The server rejected a request; the message names the offending field."""


class PolicyTimeoutError(PolicyClientError, TimeoutError):
  """No connection, metadata or reply within the timeout. A reply that arrives later is discarded."""


class ProtocolMismatchError(PolicyClientError):
  """The peer does not speak this protocol (version, frame type, or no request_id echo)."""


class StaleActionsError(PolicyClientError):
  """The reply came, but its actions are older than `max_age_ms`: they are not returned."""


class PolicyClient:
  """One websocket connection; `session_id` is filled into requests that carry none.

  timeout_s: seconds to wait for each reply (None: forever); connect_timeout_s: for the connection
  and the metadata; max_age_ms: refuse actions whose observation was sent longer ago than this.
  """

  def __init__(self, host: str = '127.0.0.1', port: int = 8000, session_id: str | None = None,
               timeout_s: float | None = REPLY_TIMEOUT_S, connect_timeout_s: float | None = None,
               max_age_ms: float | None = None):
    self._uri = f'ws://{host}:{port}'
    self.session_id = session_id or uuid.uuid4().hex
    self._timeout_s = timeout_s
    self._connect_timeout_s = CONNECT_TIMEOUT_S if connect_timeout_s is None else connect_timeout_s
    self._max_age_ms = max_age_ms
    self._ids = itertools.count()
    self._reset_next = False
    self._connect()

  def _connect(self) -> None:
    # Entered as a context manager: websockets 17.1+ deprecates connect() used bare.
    self._connection = contextlib.ExitStack()
    try:
      # No deflate: camera frames barely compress and compressing them costs control-loop latency.
      self._websocket = self._connection.enter_context(ws_client.connect(
          self._uri, compression=None, max_size=None, open_timeout=self._connect_timeout_s))
      metadata = self._websocket.recv(self._connect_timeout_s)
    except TimeoutError as e:
      self._connection.close()  # a retrying robot loop must not leak sockets
      raise PolicyTimeoutError(f'{self._uri}: no connection or metadata within {self._connect_timeout_s} s') from e
    except BaseException:
      self._connection.close()
      raise
    if not isinstance(metadata, bytes):
      self._connection.close()
      raise ProtocolMismatchError(f'{self._uri}: metadata is a text frame: {metadata[:200]}')
    self.metadata: dict[str, Any] = msgpack_numpy.unpack(metadata)
    version = self.metadata.get('protocol_version') if isinstance(self.metadata, dict) else None
    if version != PROTOCOL_VERSION:
      self._connection.close()
      raise ProtocolMismatchError(f'{self._uri}: server speaks protocol {version}, this client {PROTOCOL_VERSION}')

  def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
    """Sends one request; returns {'actions', 'server_timing', 'session_id', 'episode_chunk',
    'request_id', 'age_ms'} or raises a PolicyClientError."""
    rid = f'{next(self._ids)}-{uuid.uuid4().hex[:8]}'
    request = {'session_id': self.session_id, **observation, 'request_id': rid}
    if self._reset_next:
      request['reset'] = True
    sent = time.monotonic()
    self._websocket.send(msgpack_numpy.pack(request))
    reply = self._reply_to(rid, sent)
    age_ms = 1e3 * (time.monotonic() - sent)
    if 'error' in reply:
      raise PolicyServerError(reply['error'])
    self._reset_next = False
    if self._max_age_ms is not None and age_ms > self._max_age_ms:
      raise StaleActionsError(f'actions of request {rid} are {age_ms:.0f} ms old (max_age_ms={self._max_age_ms})')
    return {**reply, 'age_ms': age_ms}

  def _reply_to(self, rid: str, sent: float) -> dict[str, Any]:
    """The reply echoing `rid`; replies to other (timed-out) requests are discarded."""
    while True:
      left = None if self._timeout_s is None else self._timeout_s - (time.monotonic() - sent)
      try:
        if left is not None and left <= 0:
          raise TimeoutError
        frame = self._websocket.recv(left)
      except TimeoutError as e:
        raise PolicyTimeoutError(f'request {rid}: no reply within {self._timeout_s} s (a late reply '
                                 'will be discarded)') from e
      if not isinstance(frame, bytes):
        raise ProtocolMismatchError(f'request {rid}: the server sent a text frame: {frame[:200]}')
      reply = msgpack_numpy.unpack(frame)
      if not isinstance(reply, dict) or 'request_id' not in reply:
        raise ProtocolMismatchError(f'request {rid}: the reply echoes no request_id (not a dreamzero server '
                                    f'of protocol {PROTOCOL_VERSION}?)')
      if reply['request_id'] == rid:
        return reply
      warnings.warn(f'discarded a reply to request {reply["request_id"]} while waiting for {rid}', stacklevel=3)

  def reset(self) -> None:
    """Makes the next `infer` start a new episode (send it 1 frame per camera)."""
    self._reset_next = True

  def reconnect(self, new_session: bool = True) -> None:
    """A fresh connection (after a timeout or a dropped link); by default with a new session_id,
    so the next `infer` (1 frame per camera) starts a new episode cleanly."""
    self.close()
    if new_session:
      self.session_id = uuid.uuid4().hex
    self._reset_next = not new_session
    self._connect()

  def close(self) -> None:
    self._connection.close()

  def __enter__(self) -> PolicyClient:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
