"""A robot never acts on a stale reply: request ids end to end, bounded waits, typed failures, and
every malformed msgpack-numpy array named by its field.

Fault servers here speak the reply side of the protocol by hand (echoing request_id) and answer
with actions that encode the request's own observation, so a stale reply shows in the actions.
"""
import contextlib
import socket
import threading
import time
import warnings

import msgpack
import numpy as np
import pytest
from websockets.sync import server as ws_server

import dreamzero_client
from dreamzero_client import client as client_lib
from dreamzero_client import msgpack_numpy
from tests.test_serve import CountingBackend, observation, raw_connection, raw_infer
from tests.test_serve import server  # noqa: F401  (the fixture: CountingBackend served on loopback)

METADATA = {**CountingBackend.metadata}


@contextlib.contextmanager
def fault_server(slow_requests=(), delay_s=0.0, replies_per_request=1):
  """Echoes each request's joint 0 as its actions; delays the requests numbered in slow_requests."""
  count = [0]

  def handler(ws):
    ws.send(msgpack_numpy.pack(METADATA))
    for frame in ws:
      request = msgpack_numpy.unpack(frame)
      index, count[0] = count[0], count[0] + 1
      if index in slow_requests:
        time.sleep(delay_s)
      actions = np.full((24, 8), request['observation/joint_position'][0], np.float32)
      for _ in range(replies_per_request):
        ws.send(msgpack_numpy.pack({'actions': actions, 'server_timing': {}, 'request_id': request['request_id']}))

  with ws_server.serve(handler, '127.0.0.1', 0, max_size=None) as server:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1]
    server.shutdown()


def test_a_retry_after_a_timeout_never_gets_the_slow_replys_actions():
  """A robot loop: each call sends a new observation (joint 0 = the attempt), retrying on timeouts."""
  with fault_server(slow_requests={0}, delay_s=1.0) as port:
    with dreamzero_client.PolicyClient('127.0.0.1', port, timeout_s=0.4) as client:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        answered = []
        for attempt in range(1, 8):
          try:
            reply = client.infer(observation(1 if attempt == 1 else 8, joint0=float(attempt)))
          except dreamzero_client.PolicyTimeoutError:
            continue
          assert (reply['actions'] == attempt).all()   # its own observation's actions, never an earlier one's
          answered.append(attempt)
      assert answered and answered[0] > 1 and answered[-1] == 7
      assert any('discarded a reply to request 0-' in str(w.message) for w in caught)


def test_a_double_replying_server_is_detected_and_its_extra_replies_never_returned():
  with fault_server(replies_per_request=2) as port:
    with dreamzero_client.PolicyClient('127.0.0.1', port, timeout_s=5) as client:
      assert (client.infer(observation(1, joint0=1.0))['actions'] == 1.0).all()
      with pytest.warns(UserWarning, match='discarded a reply'):
        for joint in (2.0, 3.0, 4.0):
          assert (client.infer(observation(8, joint0=joint))['actions'] == joint).all()


def test_old_actions_are_refused_under_max_age():
  with fault_server(slow_requests={1}, delay_s=0.3) as port:
    with dreamzero_client.PolicyClient('127.0.0.1', port, timeout_s=5, max_age_ms=200) as client:
      assert client.infer(observation(1))['age_ms'] < 200
      with pytest.raises(dreamzero_client.StaleActionsError, match='max_age_ms=200'):
        client.infer(observation(8))


@pytest.mark.parametrize('handshake', [False, True])
def test_a_silent_listener_times_out_by_default(monkeypatch, handshake):
  """A TCP listener that never answers HTTP, or a websocket server that never sends its metadata."""
  monkeypatch.setattr(client_lib, 'CONNECT_TIMEOUT_S', 0.3)
  if handshake:
    with ws_server.serve(lambda ws: time.sleep(2), '127.0.0.1', 0) as server:
      threading.Thread(target=server.serve_forever, daemon=True).start()
      with pytest.raises(dreamzero_client.PolicyTimeoutError, match='no connection or metadata within 0.3 s'):
        dreamzero_client.PolicyClient('127.0.0.1', server.socket.getsockname()[1])
      server.shutdown()
    return
  with socket.create_server(('127.0.0.1', 0)) as listener:
    start = time.monotonic()
    with pytest.raises(dreamzero_client.PolicyTimeoutError):
      dreamzero_client.PolicyClient('127.0.0.1', listener.getsockname()[1])
    assert time.monotonic() - start < 5
  assert client_lib.REPLY_TIMEOUT_S is not None   # replies are bounded by default too


def test_another_protocol_is_a_mismatch_not_a_hang():
  def roboarena_like(ws):
    ws.send(msgpack_numpy.pack({**METADATA, 'protocol_version': 2}))
  with ws_server.serve(roboarena_like, '127.0.0.1', 0) as server:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with pytest.raises(dreamzero_client.ProtocolMismatchError, match='protocol 2'):
      dreamzero_client.PolicyClient('127.0.0.1', server.socket.getsockname()[1])
    server.shutdown()


def test_replies_echo_the_request_id_and_say_which_observation_they_answer(server):
  _, port = server
  with dreamzero_client.PolicyClient('127.0.0.1', port, session_id='ids', timeout_s=20) as client:
    first = client.infer(observation(1))
    later = client.infer(observation(4))
    assert (first['session_id'], first['episode_chunk'], later['episode_chunk']) == ('ids', 0, 1)
    assert first['request_id'] != later['request_id']
    with pytest.raises(dreamzero_client.PolicyServerError, match='observation/joint_position'):
      client.infer({**observation(4), 'observation/joint_position': np.zeros(3, np.float32)})
    client.reconnect()   # a new connection and a new session: 1 frame starts its episode
    assert client.session_id != 'ids' and client.infer(observation(1))['episode_chunk'] == 0
  with raw_connection(port) as ws:
    reply = raw_infer(ws, {**observation(1), 'request_id': 7, 'observation/joint_position': 'x'})
    assert reply['request_id'] == 7 and reply['error'].startswith('observation/joint_position')
    reply = raw_infer(ws, {**observation(1), 'session_id': 's' * 300})
    assert reply['error'] == 'session_id: 300 characters, at most 256'
    assert raw_infer(ws, {**observation(1), 'prompt': 'p' * 5000})['error'] == 'prompt: 5000 characters, at most 4096'


def _ndarray(**fields):
  """A float32 (7,) array map with some fields replaced."""
  return {b'__ndarray__': True, b'data': bytes(28), b'dtype': '<f4', b'shape': [7],
          **{k.encode(): v for k, v in fields.items()}}


def _without(key):
  arr = _ndarray()
  del arr[key.encode()]
  return arr


# Malformed encodings of observation/joint_position (a float32 (7,) array): each is answered naming it.
MALFORMED = {
    'dtype object': _ndarray(dtype='|O'),
    'dtype void': _ndarray(dtype='|V4'),
    'unknown dtype': _ndarray(dtype='float99'),
    'dtype not a string': _ndarray(dtype=12),
    'int data': _ndarray(data=5),
    'text data': _ndarray(data='abc'),
    'data too short': _ndarray(data=bytes(3)),
    'shape too big': _ndarray(shape=[10 ** 9, 10 ** 9]),
    'shape not a list': _ndarray(shape=7),
    'shape of text': _ndarray(shape=['a']),
    'negative shape': _ndarray(shape=[-7]),
    'missing data': _without('data'),
    'missing dtype': _without('dtype'),
    'missing shape': _without('shape'),
    'scalar of object dtype': {b'__npgeneric__': True, b'data': 1, b'dtype': '|O'},
}


@pytest.mark.parametrize('kind', MALFORMED)
def test_each_malformed_array_encoding_is_answered_naming_its_field(server, kind):
  _, port = server
  frame = msgpack.packb({**{k: v for k, v in observation(1).items() if k != 'observation/joint_position'},
                         'observation/joint_position': MALFORMED[kind], 'request_id': kind},
                        default=msgpack_numpy._encode)  # pylint: disable=protected-access
  with raw_connection(port) as ws:
    ws.send(frame)
    reply = msgpack_numpy.unpack(ws.recv(20))
  assert reply['request_id'] == kind
  assert reply['error'].startswith('observation/joint_position: bad array encoding ('), reply['error']
