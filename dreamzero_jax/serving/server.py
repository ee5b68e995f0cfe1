"""The websocket policy server (docs/inference.md "Server protocol"); `python -m dreamzero_jax.serve`
(serve.py) runs it.

On connect the server sends the backend's metadata (plus the camera frame counts of first and later
calls, and the release's PolicyServerConfig keys where the backend speaks RoboArena); each request is
one msgpack-numpy map (the client package's codec, clients/python) of observations + prompt
(+ session_id, + reset); each reply is {actions, server_timing} or {error: '<field>: <what is wrong>'}.
A connection whose first request is RoboArena-style (serving/roboarena.py: the release's clients)
speaks that protocol instead, or every connection does under protocol='roboarena'.

Threads: the event loop only moves bytes; requests are decoded and checked on a small decode
pool, so a malformed one is answered at once even while the model is busy; well-formed ones
queue for the single model thread, which owns the sessions (it is the model lock). A request
whose client has left before the model reached it is dropped. Without a session_id the
connection is the session (openpi clients send none). At most max_sessions sessions keep a
KV cache; the least recently used one is evicted, and its next call is told so.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import http
import logging
import signal
import time
import uuid
from typing import Any, Callable, Collection

import numpy as np
from websockets.asyncio import server as ws_server
from websockets.exceptions import ConnectionClosed

from dreamzero_client import msgpack_numpy
from dreamzero_jax.serving import protocol, roboarena

log = logging.getLogger(__name__)

HEALTH_PATH = '/healthz'
# Room for msgpack framing, the prompt and float64 copies of float32 fields.
_MESSAGE_SLACK = 2
# Evicted session ids remembered so that their next call hears why its episode is gone.
_EVICTED_REMEMBERED = 4096
_DECODE_THREADS = 2
# Request fields besides the observations that either protocol reads.
_CONTROL_FIELDS = (*protocol.TEXT_FIELDS, 'reset', 'request_id', 'endpoint')


@dataclasses.dataclass
class _Session:
  prompt: str
  state: Any
  chunks: int = 0                               # calls answered in this episode
  frames: roboarena.FrameBuffer | None = None   # RoboArena sessions: the frames sent so far


@dataclasses.dataclass
class _Connection:
  """Per-connection state: its protocol (set by its first request) and, under RoboArena, the
  session it last named (a new session_id on it starts over, as in the release)."""
  session: str
  protocol: str | None = None
  current: str | None = None


@dataclasses.dataclass
class Request:
  """A decoded, checked request: everything the model thread needs, nothing it must re-check."""
  session_id: str
  prompt: str
  reset: bool
  observation: dict[str, np.ndarray]   # canonical: cameras of 1 or T frames (RoboArena: as sent)
  frames: int                          # camera frames as sent (0 without cameras)
  connection: _Connection | None = None
  endpoint: str = 'infer'              # RoboArena's endpoint ('infer' or 'reset')
  request_id: str | int | None = None  # echoed in the reply


def _ms(seconds: float) -> float:
  return 1e3 * seconds


def _malformed_array(value: Any) -> msgpack_numpy.MalformedArray | None:
  if isinstance(value, msgpack_numpy.MalformedArray):
    return value
  for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
    found = _malformed_array(item)
    if found is not None:
      return found
  return None


def unpack_request(message: Any) -> dict[str, Any]:
  """A frame -> its map (arrays that do not decode left as MalformedArray: check_arrays names them)."""
  if not isinstance(message, bytes):
    raise ValueError('request: expected a binary msgpack frame, got text')
  try:
    request = msgpack_numpy.unpack(message, lenient=True)
  except Exception as e:  # msgpack raises many types on garbage
    raise ValueError(f'request: not msgpack ({type(e).__name__}: {e})'[:300]) from e
  if not isinstance(request, dict):
    raise ValueError(f'request: expected a msgpack map, got {type(request).__name__}')
  return request


def check_arrays(request: dict[str, Any], used: Collection[str]) -> None:
  """ValueError naming a field the server reads (`used`) whose array does not decode; other such
  fields are dropped, as extras are ignored."""
  for key, value in list(request.items()):
    bad = _malformed_array(value)
    if bad is not None:
      if key in used:
        raise ValueError(f'{key}: bad array encoding ({bad.reason})')
      del request[key]


def request_id(request: dict[str, Any]) -> str | int | None:
  """The request's `request_id` (echoed in its reply), None without one; ValueError if malformed."""
  rid = request.get('request_id')
  if rid is None or (isinstance(rid, int) and not isinstance(rid, bool)):
    return rid
  if not isinstance(rid, str) or not 0 < len(rid) <= protocol.MAX_ID_CHARS:
    raise ValueError(f'request_id: expected an int or a string of 1-{protocol.MAX_ID_CHARS} characters, '
                     f'got {rid!r:.40}')
  return rid


def decode_request(message: Any, spec: dict[str, Any], connection_session: str) -> Request:
  """One openpi-style websocket frame -> Request, or ValueError('<field>: <what is wrong>'). Needs
  no session state, so it runs off the model thread."""
  request = unpack_request(message)
  check_arrays(request, (*spec, *_CONTROL_FIELDS))
  return _openpi_request(request, spec, connection_session)


def _openpi_request(request: dict[str, Any], spec: dict[str, Any], connection_session: str) -> Request:
  reset = request.get('reset', False)
  if not isinstance(reset, bool):
    raise ValueError(f'reset: expected true or false, got {reset!r:.40}')
  if 'session_id' not in request:  # openpi clients send none: the connection is the session
    request = {**request, 'session_id': connection_session}
  observation = protocol.validate_observation(spec, request, first_call=reset)
  cameras = [k for k, e in spec.items() if protocol.is_camera(e)]
  frames = np.shape(request[cameras[0]])[0] if cameras and np.ndim(request[cameras[0]]) == 4 else int(bool(cameras))
  return Request(request['session_id'], request['prompt'], reset, observation, frames)


def _roboarena_request(request: dict[str, Any], spec: dict[str, Any], cameras: dict[str, str],
                       connection_session: str) -> Request:
  endpoint = request.get('endpoint', 'infer')
  if endpoint not in roboarena.ENDPOINTS:
    raise ValueError(f'endpoint: {endpoint!r:.40} is not one of {", ".join(roboarena.ENDPOINTS)}')
  request = {'session_id': connection_session, **request}
  if endpoint == 'reset':
    protocol.check_text('session_id', request['session_id'])
    return Request(request['session_id'], '', True, {}, 0, endpoint=endpoint)
  # Cameras as sent (the model thread buffers them), named as the client names them.
  observation = protocol.validate_observation(spec, request, first_call=False,
                                              names={ours: theirs for theirs, ours in cameras.items()},
                                              buffered=True)
  frames = observation[next(iter(cameras.values()))].shape[0]
  return Request(request['session_id'], request['prompt'], False, observation, frames)


class PolicyServer:
  """One backend shared by many sessions, with a least-recently-used bound on their number."""

  def __init__(self, backend: protocol.PolicyBackend, max_sessions: int, wire_protocol: str = 'auto'):
    """wire_protocol: 'auto' (each connection's first request decides), 'openpi' or 'roboarena'."""
    if max_sessions < 1:
      raise ValueError(f'max_sessions must be >= 1, got {max_sessions}')
    if wire_protocol not in roboarena.PROTOCOLS:
      raise ValueError(f'protocol: {wire_protocol!r} is not one of {", ".join(roboarena.PROTOCOLS)}')
    metadata = backend.metadata
    protocol.check_metadata(metadata)
    self._backend = backend
    self._spec = metadata['observation_spec']
    self._cameras = [k for k, e in self._spec.items() if protocol.is_camera(e)]
    self._action_shape = tuple(metadata['action_shape'])
    metadata = {**metadata, **protocol.frame_counts(self._spec)}
    # The RoboArena protocol: the backend's camera names for it and frames per call, when it has them.
    self._roboarena = metadata.get('roboarena') if wire_protocol != 'openpi' else None
    if self._roboarena is not None:
      roboarena.check_metadata(metadata)
      metadata.update(roboarena.server_config(metadata))
    elif wire_protocol == roboarena.NAME:
      raise ValueError(f'protocol: embodiment {metadata["embodiment"]} has no RoboArena camera names '
                       '(camera_aliases in its embodiment file)')
    self._protocol = wire_protocol
    self._used_fields = {*self._spec, *_CONTROL_FIELDS, *(self._roboarena or {}).get('cameras', ())}
    self._metadata_frame = msgpack_numpy.pack(metadata)
    self._max_message_bytes = _MESSAGE_SLACK * protocol.request_bytes(self._spec) + (1 << 20)
    self._max_sessions = max_sessions
    # Touched only from the model thread: the single worker is the model lock.
    self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
    self._evicted: collections.OrderedDict[str, None] = collections.OrderedDict()
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='policy')
    self._decoder = concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix='decode')
    self._ready = False

  def _evict_over_limit(self) -> None:
    while len(self._sessions) > self._max_sessions:
      evicted, _ = self._sessions.popitem(last=False)
      self._evicted[evicted] = None
      if len(self._evicted) > _EVICTED_REMEMBERED:
        self._evicted.popitem(last=False)
      log.info('evicted least recently used session %s', evicted)

  def _evicted_error(self, session_id: str, how: str) -> ValueError:
    return ValueError(f'session_id: session {session_id} was evicted (more than --max_sessions='
                      f'{self._max_sessions} sessions were active); its episode is gone: {how}')

  def _roboarena_session(self, request: Request) -> _Session | None:
    """RoboArena's session rules: a reset or a new session_id on the connection starts over; a
    later 1-frame call continues the episode (its frames are buffered, not a restart)."""
    connection, session_id = request.connection, request.session_id
    if request.reset or connection.current not in (None, session_id):
      self._sessions.pop(connection.current, None)
    connection.current = None if request.reset else session_id
    if request.reset:
      self._sessions.pop(session_id, None)
      return None
    if session_id in self._evicted and session_id not in self._sessions:
      self._evicted.pop(session_id)   # said once; its next call starts a new episode
      raise self._evicted_error(session_id, 'call again to start a new one')
    return self._sessions.get(session_id)

  def _run_request(self, request: Request, timing: dict[str, float]
                   ) -> tuple[np.ndarray | None, dict[str, float]]:
    """The session-dependent checks and the model call; runs on the model thread. A RoboArena
    reset returns no actions."""
    start = time.perf_counter()
    session_id, observation, prompt = request.session_id, request.observation, request.prompt
    if request.connection is not None and request.connection.protocol == roboarena.NAME:
      session = self._roboarena_session(request)
      if request.endpoint == 'reset':
        return None, {}
      if session is not None and prompt != session.prompt:
        raise ValueError(f'prompt: changed within session {session_id}; a new instruction starts a '
                         'new episode (a new session_id, or the reset endpoint)')
      frames = session.frames if session else roboarena.FrameBuffer(self._roboarena['frames_per_call'])
      observation = roboarena.model_observation(
          observation, frames, self._cameras, session is None, self._roboarena['frames_per_call'],
          self._spec[self._cameras[0]]['shape'][0])
      return self._infer(session_id, session, prompt, observation, frames, timing, start)
    if request.reset:
      self._sessions.pop(session_id, None)  # frees the old KV cache before a new one is built
    session = self._sessions.get(session_id)
    if session is not None and protocol.restarts_episode(self._spec, observation):
      # A 1-frame call starts a new episode from that frame (its prompt may be new); the old KV
      # cache is freed before the new one is built, as with reset.
      self._sessions.pop(session_id, None)
      session = None
    if session is None and request.frames > 1:
      later = self._spec[self._cameras[0]]['shape'][0]
      if session_id in self._evicted:
        raise self._evicted_error(session_id, 'start a new one with 1 frame per camera')
      raise ValueError(f'{self._cameras[0]}: {request.frames} frames, expected 1 (a session sends 1 frame on '
                       f'its first call or with reset, then {later})')
    if session is not None and prompt != session.prompt:
      raise ValueError(f'prompt: changed within session {session_id}; a new instruction starts a '
                       'new episode (send 1 frame, or reset: true)')
    self._evicted.pop(session_id, None)
    return self._infer(session_id, session, prompt, observation, None, timing, start)

  def _infer(self, session_id: str, session: _Session | None, prompt: str,
             observation: dict[str, np.ndarray], frames: roboarena.FrameBuffer | None,
             timing: dict[str, float], start: float) -> tuple[np.ndarray, dict[str, float]]:
    """The model call of a checked request, and the session kept for the next."""
    timing['validate'] += _ms(time.perf_counter() - start)
    try:
      state = session.state if session else self._backend.new_session(prompt, observation)
      actions, state, model_timing = self._backend.infer(state, observation)
    except Exception:
      self._sessions.pop(session_id, None)  # its state may be half-updated
      raise
    actions = np.asarray(actions, np.float32)
    if actions.shape != self._action_shape:
      raise RuntimeError(f'backend returned actions of shape {actions.shape}, '
                         f'metadata says {self._action_shape}')
    if not np.isfinite(actions).all():  # never sent to a robot
      self._sessions.pop(session_id, None)
      raise RuntimeError('the model produced non-finite actions (NaN or inf); none are sent and the '
                         'session is dropped (start a new episode with 1 frame)')
    chunk = session.chunks if session else 0
    self._sessions[session_id] = _Session(prompt, state, chunk + 1, frames)
    self._sessions.move_to_end(session_id)
    self._evict_over_limit()
    return actions, {**model_timing, 'episode_chunk': chunk}

  def _decode(self, message: bytes | str, received: float, connection: _Connection
              ) -> tuple[Request | None, bytes | str | None, dict[str, float]]:
    """(request, None, timing) or (None, error reply, timing); runs on the decode pool. A
    connection's first map fixes its protocol (under 'auto')."""
    start = time.perf_counter()
    timing = {'decode': _ms(start - received)}
    rid = None
    try:
      fields = unpack_request(message)
      if connection.protocol is None:   # before any check, so its errors come in the client's protocol
        if self._roboarena is not None and (self._protocol == roboarena.NAME or roboarena.speaks(fields)):
          connection.protocol = roboarena.NAME
        else:
          connection.protocol = 'openpi'
      rid = request_id(fields)
      check_arrays(fields, self._used_fields)
      if connection.protocol == roboarena.NAME:
        request = _roboarena_request(fields, self._spec, self._roboarena['cameras'], connection.session)
      else:
        request = _openpi_request(fields, self._spec, connection.session)
    except Exception as e:  # every malformed input is the client's: a ValueError or not
      if not isinstance(e, ValueError):
        e = ValueError(f'request: {type(e).__name__}: {e}')
      log.info('bad request: %s', e)
      return None, self._error_reply(connection, str(e), rid), timing
    request.connection, request.request_id = connection, rid
    timing['validate'] = _ms(time.perf_counter() - start)
    return request, None, timing

  def _error_reply(self, connection: _Connection, message: str, rid: str | int | None) -> bytes | str:
    if connection.protocol == roboarena.NAME or (connection.protocol is None and self._protocol == roboarena.NAME):
      return message   # a text frame: the release's clients raise it
    return msgpack_numpy.pack({'error': message, **({} if rid is None else {'request_id': rid})})

  def _handle(self, request: Request, received: float, decoded: float, timing: dict[str, float]
              ) -> bytes | str:
    """One checked request to one reply frame; runs on the model thread."""
    timing['queue'] = _ms(time.perf_counter() - decoded)
    try:
      actions, model_timing = self._run_request(request, timing)
    except ValueError as e:
      log.info('bad request: %s', e)
      return self._error_reply(request.connection, str(e), request.request_id)
    except Exception as e:  # a backend failure must not take the server down
      log.exception('inference failed')
      return self._error_reply(request.connection, f'server: {type(e).__name__}: {e}', request.request_id)
    timing['total'] = _ms(time.perf_counter() - received)
    if request.connection.protocol == roboarena.NAME:
      return roboarena.RESET_REPLY if actions is None else roboarena.pack_actions(actions)
    # Which request and which observation the actions answer: the session and the chunk's index.
    reply = {'actions': actions, 'server_timing': {**model_timing, **timing}, 'session_id': request.session_id,
             'episode_chunk': model_timing['episode_chunk']}
    if request.request_id is not None:
      reply['request_id'] = request.request_id
    return msgpack_numpy.pack(reply)

  def _forget(self, session_id: str) -> None:
    """Drops a connection's own session when it closes (nobody else can name it)."""
    try:
      self._worker.submit(self._sessions.pop, session_id, None)
    except RuntimeError:
      pass  # shutting down

  async def _connection(self, websocket: ws_server.ServerConnection) -> None:
    loop = asyncio.get_running_loop()
    connection = _Connection(f'connection-{uuid.uuid4().hex}')
    closed = asyncio.ensure_future(websocket.wait_closed())
    try:
      await websocket.send(self._metadata_frame)
      async for message in websocket:
        received = time.perf_counter()
        request, reply, timing = await loop.run_in_executor(
            self._decoder, self._decode, message, received, connection)
        if request is not None:
          job = self._worker.submit(self._handle, request, received, time.perf_counter(), timing)
          answer = asyncio.wrap_future(job)
          await asyncio.wait({answer, closed}, return_when=asyncio.FIRST_COMPLETED)
          if not answer.done():
            job.cancel()  # the client left: its queued model call is dropped (a running one ends)
            break
          reply = answer.result()
        await websocket.send(reply)
    except ConnectionClosed:
      pass  # the client left mid-request; named sessions stay for a reconnect
    finally:
      closed.cancel()
      self._forget(connection.session)

  def _process_request(self, connection: ws_server.ServerConnection, request):
    if request.path == HEALTH_PATH:
      if not self._ready:
        return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, 'compiling\n')
      return connection.respond(http.HTTPStatus.OK, 'ok\n')
    return None

  def _warmup(self) -> None:
    warmup = getattr(self._backend, 'warmup', None)
    if warmup is not None:
      start = time.perf_counter()
      warmup()
      log.info('control step compiled in %.1f s', time.perf_counter() - start)

  async def serve(self, host: str, port: int, stop: asyncio.Event,
                  on_ready: Callable[[int], None] = lambda port: None) -> None:
    """Serves until `stop` is set; `on_ready` gets the bound port (useful with port 0). /healthz
    answers 200 once the backend's warmup (its compile) is done; requests meanwhile queue."""
    loop = asyncio.get_running_loop()
    try:
      async with ws_server.serve(
          self._connection, host, port, process_request=self._process_request,
          compression=None,  # images do not deflate well and deflating costs latency
          max_size=self._max_message_bytes) as server:
        on_ready(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(self._worker, self._warmup)
        self._ready = True
        await stop.wait()
    finally:
      self._decoder.shutdown(wait=True)
      self._worker.shutdown(wait=True)  # lets an in-flight model call finish


def run(backend: protocol.PolicyBackend, host: str, port: int, max_sessions: int,
        wire_protocol: str = 'auto') -> None:
  """Serves from the main thread until SIGINT or SIGTERM."""
  policy_server = PolicyServer(backend, max_sessions, wire_protocol)

  async def serve_until_signal():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    await policy_server.serve(
        host, port, stop,
        on_ready=lambda p: print(f'serving on ws://{host}:{p}', flush=True))

  asyncio.run(serve_until_signal())
  print('server stopped', flush=True)
