"""Policy server and client over loopback, with a model-free backend standing in for the policy."""
import asyncio
import contextlib
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import msgpack
import numpy as np
import pytest
from websockets.sync import client as ws_client

import dreamzero_client
from dreamzero_client import msgpack_numpy
from dreamzero_jax.serving import protocol
from dreamzero_jax.serving import server as server_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMERAS = ('observation/exterior_image_1_left', 'observation/exterior_image_2_left',
           'observation/wrist_image_left')
FRAMES, HEIGHT, WIDTH = 4, 180, 320
HORIZON, ACTION_DIM = 24, 8
TIMEOUT_S = 20.0


class CountingBackend:
  """Test double: actions encode the session's step count and the request's first joint.

  That makes lost or mixed-up session state and garbled arrays visible in the replies; a
  non-blocking lock records any two model calls that overlap.
  """

  metadata = {
      'observation_spec': {
          **{k: {'shape': [FRAMES, HEIGHT, WIDTH, 3], 'dtype': 'uint8'} for k in CAMERAS},
          'observation/joint_position': {'shape': [7], 'dtype': 'float32'},
          'observation/gripper_position': {'shape': [1], 'dtype': 'float32'},
      },
      'action_shape': [HORIZON, ACTION_DIM], 'action_horizon': HORIZON, 'control_hz': 15,
      'embodiment': 'droid', 'protocol_version': 1,
  }

  def __init__(self):
    self._busy = threading.Lock()
    self.overlaps = 0
    self.calls = 0
    self.prompts = []
    self.entered, self.release = threading.Event(), threading.Event()

  def new_session(self, prompt, observation):
    self.prompts.append(prompt)
    if prompt == 'explode':
      raise RuntimeError('simulated device failure')
    if prompt == 'block':  # holds the model until the test releases it
      self.entered.set()
      assert self.release.wait(TIMEOUT_S)
    assert all(observation[k].shape == (1, HEIGHT, WIDTH, 3) for k in CAMERAS)
    return {'steps': 0, 'nan': prompt == 'nan'}

  def infer(self, state, observation):
    if not self._busy.acquire(blocking=False):
      self.overlaps += 1
      self._busy.acquire()
    try:
      self.calls += 1
      time.sleep(0.002)  # long enough for overlapping calls to be caught
      assert observation['observation/joint_position'].dtype == np.float32
      actions = np.zeros((HORIZON, ACTION_DIM), np.float32)
      actions[:, 0] = state['steps']
      actions[:, 1] = observation['observation/joint_position'][0]
      actions[0, 2] = np.nan if state['nan'] else 0.0   # a diverged model
      return actions, {**state, 'steps': state['steps'] + 1}, {'model': 2.0}
    finally:
      self._busy.release()


def observation(frames, joint0=0.5, rng=np.random.default_rng(0)):
  obs = {k: rng.integers(0, 256, (frames, HEIGHT, WIDTH, 3), dtype=np.uint8) for k in CAMERAS}
  joints = np.full(7, joint0, np.float32)
  return {**obs, 'observation/joint_position': joints,
          'observation/gripper_position': np.zeros(1, np.float32), 'prompt': 'pick up the cup'}


@contextlib.contextmanager
def running_server(backend, max_sessions=16, wire_protocol='auto'):
  """Serves `backend` on an OS-chosen loopback port from a thread; stops it on exit."""
  policy_server = server_lib.PolicyServer(backend, max_sessions, wire_protocol)
  ports, handles = queue.Queue(), {}

  async def main():
    handles['loop'], handles['stop'] = asyncio.get_running_loop(), asyncio.Event()
    await policy_server.serve('127.0.0.1', 0, handles['stop'], on_ready=ports.put)

  thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
  thread.start()
  port = ports.get(timeout=TIMEOUT_S)
  try:
    yield port
  finally:
    handles['loop'].call_soon_threadsafe(handles['stop'].set)
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), 'server did not stop'


@pytest.fixture(scope='module')
def server():
  backend = CountingBackend()
  with running_server(backend) as port:
    yield backend, port


def connect(port, session_id):
  return dreamzero_client.PolicyClient('127.0.0.1', port, session_id=session_id, timeout_s=TIMEOUT_S)


def test_metadata_frame_has_protocol_keys(server):
  _, port = server
  with connect(port, 'meta') as client:
    assert set(client.metadata) >= {'observation_spec', 'action_shape', 'action_horizon',
                                    'control_hz', 'embodiment', 'protocol_version'}
    for entry in client.metadata['observation_spec'].values():
      assert set(entry) == {'shape', 'dtype'}
    assert client.metadata['action_shape'] == [HORIZON, ACTION_DIM]
    assert client.metadata['first_call_frames'] == 1 and client.metadata['later_call_frames'] == FRAMES
    assert client.metadata['later_call_frames_accepted'] == [2, 4]


def test_healthz(server):
  _, port = server
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=TIMEOUT_S) as reply:
    assert reply.status == 200


def test_concurrent_sessions_get_their_own_actions(server):
  backend, port = server
  num_sessions, per_session = 4, 25
  failures = []

  def drive(index):
    try:
      with connect(port, f'concurrent-{index}') as client:
        for step in range(per_session):
          reply = client.infer(observation(1 if step == 0 else FRAMES, joint0=index))
          actions = reply['actions']
          assert actions.dtype == np.float32 and actions.shape == (HORIZON, ACTION_DIM)
          assert actions[0, 0] == step and actions[0, 1] == index, (index, step, actions[0])
          assert {'queue', 'decode', 'validate', 'model', 'total'} <= set(reply['server_timing'])
    except Exception as e:  # surfaced in the main thread below
      failures.append(e)

  threads = [threading.Thread(target=drive, args=(i,)) for i in range(num_sessions)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(4 * TIMEOUT_S)
  assert not any(t.is_alive() for t in threads)
  assert not failures, failures
  assert backend.overlaps == 0


def corrupt(field_changes):
  obs = observation(FRAMES)
  for key, value in field_changes.items():
    if value is None:
      del obs[key]
    else:
      obs[key] = value
  return obs


@pytest.mark.parametrize('changes, field', [
    ({'observation/wrist_image_left': None}, 'observation/wrist_image_left'),
    ({'prompt': None}, 'prompt'),
    ({CAMERAS[0]: np.zeros((FRAMES, 90, 160, 3), np.uint8)}, CAMERAS[0]),
    ({CAMERAS[1]: np.zeros((FRAMES, HEIGHT, WIDTH, 3), np.float32)}, CAMERAS[1]),
    ({CAMERAS[2]: np.zeros((2, HEIGHT, WIDTH, 3), np.uint8)}, CAMERAS[2]),
    ({'observation/joint_position': np.zeros(7, np.int64)}, 'observation/joint_position'),
    ({'observation/joint_position': np.zeros(6, np.float32)}, 'observation/joint_position'),
    ({'observation/gripper_position': np.array([np.nan], np.float32)},
     'observation/gripper_position'),
    # float64 state that is finite but overflows float32
    ({'observation/joint_position': np.full(7, 1e39)}, 'observation/joint_position'),
    ({k: np.zeros((0, HEIGHT, WIDTH, 3), np.uint8) for k in CAMERAS}, CAMERAS[0]),  # zero frames
])
def test_bad_request_names_field_and_connection_survives(server, changes, field):
  _, port = server
  session = uuid.uuid4().hex
  with connect(port, session) as client, connect(port, f'{session}-other') as other:
    client.infer(observation(1))
    other.infer(observation(1))
    with pytest.raises(dreamzero_client.PolicyServerError, match=f'^{field}: '):
      client.infer(corrupt(changes))
    # The same connection and session go on where they were; the other session is untouched.
    assert client.infer(observation(FRAMES))['actions'][0, 0] == 1
    assert other.infer(observation(FRAMES))['actions'][0, 0] == 1


@pytest.mark.parametrize('frame, field', [
    (b'\xc1 garbage that is not msgpack', 'request'),
    (msgpack.packb([1, 2, 3]), 'request'),
    ('a text frame', 'request'),
    (msgpack_numpy.pack({**observation(1), 'session_id': 5}), 'session_id'),
    (msgpack_numpy.pack({**observation(1), 'session_id': 'raw', 'reset': 'yes'}), 'reset'),
])
def test_undecodable_request_gets_error_reply(server, frame, field):
  """Raw frames, as a non-Python or buggy client would send them."""
  _, port = server
  with ws_client.connect(f'ws://127.0.0.1:{port}', max_size=None) as ws:
    ws.recv(TIMEOUT_S)  # metadata
    ws.send(frame)
    reply = msgpack_numpy.unpack(ws.recv(TIMEOUT_S))
    assert reply['error'].startswith(f'{field}: '), reply
    ws.send(msgpack_numpy.pack({**observation(1), 'session_id': uuid.uuid4().hex}))
    assert msgpack_numpy.unpack(ws.recv(TIMEOUT_S))['actions'].shape == (HORIZON, ACTION_DIM)


def test_reset_prompt_change_and_frame_counts(server):
  _, port = server
  with connect(port, 'episodes') as client:
    with pytest.raises(dreamzero_client.PolicyServerError, match='frames, expected 1'):
      client.infer(observation(FRAMES))  # a new session starts from 1 frame
    assert client.infer(observation(1))['actions'][0, 0] == 0
    assert client.infer(observation(FRAMES))['actions'][0, 0] == 1
    assert client.infer(observation(FRAMES // 2))['actions'][0, 0] == 2   # official-client stride
    with pytest.raises(dreamzero_client.PolicyServerError, match='^observation/exterior_image_1_left: 3 frames, '
                       'expected 4 \\(or a divisor of 4'):
      client.infer(observation(3))
    with pytest.raises(dreamzero_client.PolicyServerError, match='^prompt: changed'):
      client.infer({**observation(FRAMES), 'prompt': 'open the drawer'})
    assert client.infer(observation(1))['actions'][0, 0] == 0   # 1 frame restarts the episode
    assert client.infer(observation(FRAMES))['actions'][0, 0] == 1
    # A new instruction with 1 frame is a new episode too; so is reset.
    assert client.infer({**observation(1), 'prompt': 'open the drawer'})['actions'][0, 0] == 0
    assert client.infer({**observation(FRAMES), 'prompt': 'open the drawer'})['actions'][0, 0] == 1
    client.reset()
    assert client.infer({**observation(1), 'prompt': 'open the drawer'})['actions'][0, 0] == 0
    assert client.infer({**observation(FRAMES), 'prompt': 'open the drawer'}
                        )['actions'][0, 0] == 1


def test_fewer_frames_are_repeated_to_the_training_stride():
  spec = CountingBackend.metadata['observation_spec']
  request = {**observation(2), 'session_id': 's'}
  got = protocol.validate_observation(spec, request, first_call=False)
  for key in CAMERAS:
    assert got[key].shape == (FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(got[key], request[key][[0, 0, 1, 1]])
  mixed = {**request, CAMERAS[1]: request[CAMERAS[1]][:1]}
  with pytest.raises(ValueError, match=f'^{CAMERAS[1]}: 1 frames, but {CAMERAS[0]} has 2'):
    protocol.validate_observation(spec, mixed, first_call=False)
  assert protocol.restarts_episode(spec, protocol.validate_observation(
      spec, {**observation(1), 'session_id': 's'}, first_call=False))


def test_sessions_survive_reconnect(server):
  _, port = server
  with connect(port, 'roaming') as client:
    client.infer(observation(1))
  with connect(port, 'roaming') as client:
    assert client.infer(observation(FRAMES))['actions'][0, 0] == 1


def test_loop_answers_while_model_is_busy(server):
  backend, port = server
  replies = []
  with connect(port, 'blocking') as client:
    caller = threading.Thread(
        target=lambda: replies.append(client.infer({**observation(1), 'prompt': 'block'})))
    caller.start()
    try:
      assert backend.entered.wait(TIMEOUT_S)
      with urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=5) as reply:
        assert reply.status == 200
      with connect(port, 'waiting') as other:  # the metadata frame arrives meanwhile
        assert other.metadata['action_horizon'] == HORIZON
      assert not replies
    finally:
      backend.release.set()
      caller.join(TIMEOUT_S)
  assert replies[0]['server_timing']['total'] > 0


def test_backend_failure_is_an_error_reply(server):
  _, port = server
  with connect(port, 'fragile') as client:
    with pytest.raises(dreamzero_client.PolicyServerError, match='^server: RuntimeError'):
      client.infer({**observation(1), 'prompt': 'explode'})
    assert client.infer(observation(1))['actions'][0, 0] == 0


def test_least_recently_used_session_is_evicted():
  with running_server(CountingBackend(), max_sessions=2) as port:
    clients = [connect(port, name) for name in ('a', 'b', 'c')]
    try:
      for c in clients:
        c.infer(observation(1))
      with pytest.raises(dreamzero_client.PolicyServerError, match='^session_id: session a was evicted .*'
                         'max_sessions=2'):
        clients[0].infer(observation(FRAMES))  # 'a' was dropped for 'c', and is told so
      assert clients[1].infer(observation(FRAMES))['actions'][0, 0] == 1
      assert clients[2].infer(observation(FRAMES))['actions'][0, 0] == 1
      assert clients[0].infer(observation(1))['actions'][0, 0] == 0   # 'a' starts over
    finally:
      for c in clients:
        c.close()


def raw_connection(port):
  ws = ws_client.connect(f'ws://127.0.0.1:{port}', max_size=None)
  ws.recv(TIMEOUT_S)  # metadata
  return ws


def raw_infer(ws, request):
  ws.send(msgpack_numpy.pack(request))
  return msgpack_numpy.unpack(ws.recv(TIMEOUT_S))


def test_without_session_id_the_connection_is_the_session(server):
  """openpi clients send no session_id: one connection runs one episode over several chunks."""
  _, port = server
  with raw_connection(port) as ws, raw_connection(port) as other:
    assert raw_infer(ws, observation(1))['actions'][0, 0] == 0
    assert raw_infer(other, observation(1))['actions'][0, 0] == 0   # its own session
    assert raw_infer(ws, observation(FRAMES))['actions'][0, 0] == 1
    assert raw_infer(ws, observation(FRAMES))['actions'][0, 0] == 2
    assert raw_infer(other, observation(FRAMES))['actions'][0, 0] == 1


def test_malformed_request_is_answered_while_the_model_is_busy():
  backend = CountingBackend()
  with running_server(backend) as port, connect(port, 'busy') as busy, raw_connection(port) as ws:
    caller = threading.Thread(target=lambda: busy.infer({**observation(1), 'prompt': 'block'}))
    caller.start()
    try:
      assert backend.entered.wait(TIMEOUT_S)
      start = time.perf_counter()
      ws.send(b'\xc1 not msgpack')
      reply = msgpack_numpy.unpack(ws.recv(5.0))   # the model is still blocked
      assert reply['error'].startswith('request: ')
      bad = {**observation(1), 'observation/joint_position': np.zeros(6, np.float32)}
      assert raw_infer(ws, bad)['error'].startswith('observation/joint_position: ')
      assert time.perf_counter() - start < 2.0 and not backend.release.is_set()
    finally:
      backend.release.set()
      caller.join(TIMEOUT_S)


def test_work_of_a_disconnected_client_is_dropped():
  backend = CountingBackend()
  with running_server(backend) as port, connect(port, 'holder') as holder:
    caller = threading.Thread(target=lambda: holder.infer({**observation(1), 'prompt': 'block'}))
    caller.start()
    try:
      assert backend.entered.wait(TIMEOUT_S)
      ws = raw_connection(port)
      ws.send(msgpack_numpy.pack({**observation(1), 'prompt': 'left before its turn', 'session_id': 'gone'}))
      time.sleep(0.3)   # queued behind the blocked model call
      ws.close()
      time.sleep(0.3)
    finally:
      backend.release.set()
      caller.join(TIMEOUT_S)
    with connect(port, 'after') as client:
      assert client.infer({**observation(1), 'prompt': 'after'})['actions'][0, 0] == 0
  assert backend.prompts == ['block', 'after']


def test_non_finite_actions_are_an_error_never_actions(server):
  _, port = server
  with connect(port, 'diverged') as client:
    with pytest.raises(dreamzero_client.PolicyServerError, match='^server: .*non-finite actions'):
      client.infer({**observation(1), 'prompt': 'nan'})
    # The session was dropped: a later-call frame count is refused, a new episode works.
    with pytest.raises(dreamzero_client.PolicyServerError, match='frames, expected 1'):
      client.infer(observation(FRAMES))
    assert client.infer(observation(1))['actions'][0, 0] == 0


class WarmingBackend(CountingBackend):
  """Its warmup (the compile of a real backend) waits until the test lets it finish."""

  def __init__(self):
    super().__init__()
    self.warm = threading.Event()

  def warmup(self):
    assert self.warm.wait(TIMEOUT_S)


def _health(port):
  try:
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=TIMEOUT_S) as reply:
      return reply.status
  except urllib.error.HTTPError as e:
    return e.code


def test_healthz_is_ready_only_after_the_warmup():
  backend = WarmingBackend()
  with running_server(backend) as port:
    assert _health(port) == 503
    backend.warm.set()
    deadline = time.monotonic() + TIMEOUT_S
    while _health(port) != 200:
      assert time.monotonic() < deadline
      time.sleep(0.02)


def test_msgpack_numpy_uses_openpi_layout():
  arrays = {'u8': np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 'f64': np.linspace(0, 1, 5),
            'f32_strided': np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
            'bool': np.array([True, False])}
  message = msgpack_numpy.pack({'nested': [arrays], 'scalar': np.float32(2.5), 'text': 'hi'})
  raw = msgpack.unpackb(message)
  assert set(raw['nested'][0]['u8']) == {b'__ndarray__', b'data', b'dtype', b'shape'}
  assert raw['nested'][0]['u8'][b'shape'] == [2, 3, 4]
  back = msgpack_numpy.unpack(message)
  for name, value in arrays.items():
    assert back['nested'][0][name].dtype == value.dtype
    np.testing.assert_array_equal(back['nested'][0][name], value)
  assert back['scalar'] == np.float32(2.5) and back['scalar'].dtype == np.float32
  assert back['text'] == 'hi'
  with pytest.raises(TypeError):
    msgpack_numpy.pack(np.array([object()]))


def test_main_rejects_missing_checkpoint(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'dreamzero_jax.serve', '--checkpoint', str(tmp_path / 'nope'),
       '--port', '0'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode != 0
  assert result.stderr.strip() == f'error: checkpoint directory not found: {tmp_path / "nope"}'


def test_main_rejects_a_bad_port_before_loading_the_model(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'dreamzero_jax.serve', '--checkpoint', str(tmp_path), '--port', '99999'],
      cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert result.stderr.strip() == 'error: --port: 99999 is not a TCP port (0-65535)'


def test_sigterm_stops_server_gracefully():
  code = ('from tests.test_serve import CountingBackend; from dreamzero_jax.serving import server; '
          'server.run(CountingBackend(), "127.0.0.1", 0, 4)')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)
  try:
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
    assert ready, 'server did not start'
    line = proc.stdout.readline()
    assert line.startswith('serving on ws://127.0.0.1:'), line
    port = int(line.rsplit(':', 1)[1])
    with connect(port, 'signal') as client:
      assert client.infer(observation(1))['actions'].shape == (HORIZON, ACTION_DIM)
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(TIMEOUT_S) == 0
    assert proc.stdout.read().strip() == 'server stopped'
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
