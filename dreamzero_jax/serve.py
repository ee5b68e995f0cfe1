"""Websocket policy server: `python -m dreamzero_jax.serve --checkpoint DIR --port P`.

`--config C --compile_only` compiles the control step from abstract shapes and prints its
per-device memory as one JSON line (inference/aot.py); no checkpoint needed.

Protocol (INTERFACES.md "Policy server protocol"): on connect the server sends the backend's
metadata; each request is one msgpack-numpy map of observations + prompt + session_id
(+ reset); each reply is {actions, server_timing} or {error: '<field>: <what is wrong>'}.
The event loop only moves bytes: decoding, checking and the model run on one worker thread,
so model calls are serialised while the loop keeps answering pings, /healthz and new clients.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import http
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import numpy as np
from websockets.asyncio import server as ws_server
from websockets.exceptions import ConnectionClosed

from dreamzero_jax import config as config_lib
from dreamzero_jax import msgpack_numpy
from dreamzero_jax.inference import backend as backend_lib

log = logging.getLogger(__name__)

HEALTH_PATH = '/healthz'
# Room for msgpack framing, the prompt and float64 copies of float32 fields.
_MESSAGE_SLACK = 2


@dataclasses.dataclass
class _Session:
  prompt: str
  state: Any


def _ms(seconds: float) -> float:
  return 1e3 * seconds


class PolicyServer:
  """One backend shared by many sessions, with a least-recently-used bound on their number."""

  def __init__(self, backend: backend_lib.PolicyBackend, max_sessions: int):
    if max_sessions < 1:
      raise ValueError(f'max_sessions must be >= 1, got {max_sessions}')
    metadata = backend.metadata
    backend_lib.check_metadata(metadata)
    self._backend = backend
    self._spec = metadata['observation_spec']
    self._action_shape = tuple(metadata['action_shape'])
    self._metadata_frame = msgpack_numpy.pack(metadata)
    self._max_message_bytes = _MESSAGE_SLACK * backend_lib.request_bytes(self._spec) + (1 << 20)
    self._max_sessions = max_sessions
    # Touched only from the worker thread: the single worker is the model lock.
    self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='policy')

  def _run_request(self, request: Any, timing: dict[str, float]
                   ) -> tuple[np.ndarray, dict[str, float]]:
    if not isinstance(request, dict):
      raise ValueError(f'request: expected a msgpack map, got {type(request).__name__}')
    reset = request.get('reset', False)
    if not isinstance(reset, bool):
      raise ValueError(f'reset: expected true or false, got {reset!r:.40}')
    session_id = request.get('session_id')
    if reset and isinstance(session_id, str):
      self._sessions.pop(session_id, None)  # frees the old KV cache before a new one is built
    session = self._sessions.get(session_id) if isinstance(session_id, str) else None
    start = time.perf_counter()
    observation = backend_lib.validate_observation(self._spec, request, session is None)
    prompt = request['prompt']
    if session is not None and backend_lib.restarts_episode(self._spec, observation):
      # A 1-frame call starts a new episode from that frame (its prompt may be new); the old KV
      # cache is freed before the new one is built, as with reset.
      self._sessions.pop(session_id, None)
      session = None
    if session is not None and prompt != session.prompt:
      raise ValueError(f'prompt: changed within session {session_id}; a new instruction starts a '
                       'new episode (send 1 frame, or reset: true)')
    timing['validate'] = _ms(time.perf_counter() - start)
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
    self._sessions[session_id] = _Session(prompt, state)
    self._sessions.move_to_end(session_id)
    while len(self._sessions) > self._max_sessions:
      evicted, _ = self._sessions.popitem(last=False)
      log.info('evicted least recently used session %s', evicted)
    return actions, model_timing

  def _handle(self, message: bytes | str, received: float) -> bytes:
    """One request to one reply frame; runs on the worker thread."""
    start = time.perf_counter()
    timing = {'queue': _ms(start - received)}
    try:
      if not isinstance(message, bytes):
        raise ValueError('request: expected a binary msgpack frame, got text')
      try:
        request = msgpack_numpy.unpack(message)
      except Exception as e:  # msgpack raises many types on garbage
        raise ValueError(f'request: not msgpack ({type(e).__name__}: {e})') from e
      timing['decode'] = _ms(time.perf_counter() - start)
      actions, model_timing = self._run_request(request, timing)
    except ValueError as e:
      log.info('bad request: %s', e)
      return msgpack_numpy.pack({'error': str(e)})
    except Exception as e:  # a backend failure must not take the server down
      log.exception('inference failed')
      return msgpack_numpy.pack({'error': f'server: {type(e).__name__}: {e}'})
    timing['total'] = _ms(time.perf_counter() - received)
    return msgpack_numpy.pack({'actions': actions, 'server_timing': {**model_timing, **timing}})

  async def _connection(self, websocket: ws_server.ServerConnection) -> None:
    loop = asyncio.get_running_loop()
    try:
      await websocket.send(self._metadata_frame)
      async for message in websocket:
        received = time.perf_counter()
        reply = await loop.run_in_executor(self._worker, self._handle, message, received)
        await websocket.send(reply)
    except ConnectionClosed:
      pass  # the client left mid-request; its sessions stay for a reconnect

  def _process_request(self, connection: ws_server.ServerConnection, request):
    if request.path == HEALTH_PATH:
      return connection.respond(http.HTTPStatus.OK, 'ok\n')
    return None

  async def serve(self, host: str, port: int, stop: asyncio.Event,
                  on_ready: Callable[[int], None] = lambda port: None) -> None:
    """Serves until `stop` is set; `on_ready` gets the bound port (useful with port 0)."""
    try:
      async with ws_server.serve(
          self._connection, host, port, process_request=self._process_request,
          compression=None,  # images do not deflate well and deflating costs latency
          max_size=self._max_message_bytes) as server:
        on_ready(server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
      self._worker.shutdown(wait=True)  # lets an in-flight model call finish


def run(backend: backend_lib.PolicyBackend, host: str, port: int, max_sessions: int) -> None:
  """Serves from the main thread until SIGINT or SIGTERM."""
  policy_server = PolicyServer(backend, max_sessions)

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


def _parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  overrides, rest = config_lib.split_config_args(argv)
  parser = argparse.ArgumentParser(prog='python -m dreamzero_jax.serve', description=__doc__)
  parser.add_argument('--checkpoint', help='a train.py workdir, or a `python -m dreamzero_jax.convert` output')
  parser.add_argument('--compile_only', action='store_true',
                      help='compile the control step for --config from abstract shapes (no checkpoint) on this '
                           "host's backend, print one JSON line with its per-device memory, and exit")
  parser.add_argument('--norm_stats', help='norm_stats.json (`python -m dreamzero_jax.datasets stats`): '
                      "replaces the checkpoint's; required for a converted checkpoint")
  parser.add_argument('--config', help='configs/NAME.py[:ARG]; default: the checkpoint\'s own')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--max_sessions', type=int, default=8,
                      help='sessions kept (each holds a KV cache); least recently used go first')
  return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> int:
  args, overrides = _parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  try:
    if args.compile_only:
      if not args.config:
        raise ValueError('--compile_only needs --config')
      config = config_lib.load_config(args.config, overrides)
      from dreamzero_jax.inference import aot  # imports JAX: only once the inputs look sane
      print(json.dumps(aot.compile_only(config)), flush=True)
      return 0
    if not args.checkpoint:
      raise ValueError('--checkpoint is required (unless --compile_only)')
    if not os.path.isdir(args.checkpoint):
      raise ValueError(f'checkpoint directory not found: {args.checkpoint}')
    if overrides and not args.config:
      raise ValueError(f'{overrides[0]} needs --config')
    if args.max_sessions < 1:
      raise ValueError(f'--max_sessions must be >= 1, got {args.max_sessions}')
    config = config_lib.load_config(args.config, overrides) if args.config else None
    from dreamzero_jax.inference import policy  # imports JAX: only once the inputs look sane
    backend = policy.load_backend(args.checkpoint, config, args.norm_stats)
    run(backend, args.host, args.port, args.max_sessions)
  except (ValueError, OSError) as e:  # ConfigError is a ValueError; OSError: port in use
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
