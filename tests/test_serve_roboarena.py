"""The release's RoboArena-style protocol, driven as its clients drive it, against a model-free backend.

The client here is the registry's openpi-client codec over websockets, sending the request sequence
of the release's eval_utils/policy_client.py + run_sim_eval.py (written out below as data): reset,
then single-frame infer calls, then a new session_id. Each camera frame is one constant value (the
call's index) so the frames the model saw say which calls they came from.
"""
import contextlib
import copy

import msgpack
import numpy as np
import pytest
from dreamzero_client import msgpack_numpy
from openpi_client import msgpack_numpy as openpi_msgpack
from websockets.sync import client as ws_client

from dreamzero_jax.serving import server as server_lib
from tests.test_serve import HORIZON, ACTION_DIM, TIMEOUT_S, CountingBackend, running_server

HEIGHT, WIDTH = 180, 320
FRAMES = 8   # our DROID model's frames a chunk
OPENPI_CAMERAS = ('observation/exterior_image_1_left', 'observation/exterior_image_2_left',
                  'observation/wrist_image_left')
# RoboArena's 0-indexed names -> ours (openpi's 1-indexed ones), as the DROID embodiment says.
ROBOARENA_CAMERAS = {'observation/exterior_image_0_left': 'observation/exterior_image_1_left',
                     'observation/exterior_image_1_left': 'observation/exterior_image_2_left',
                     'observation/wrist_image_left': 'observation/wrist_image_left'}
# The release's PolicyServerConfig for its DROID server (socket_test_optimized_AR.py).
RELEASE_SERVER_CONFIG = dict(image_resolution=[180, 320], needs_wrist_camera=True, n_external_cameras=2,
                             needs_stereo_camera=False, needs_session_id=True, action_space='joint_position')


class RecordingBackend(CountingBackend):
  """CountingBackend at our DROID model's 8 frames a chunk, speaking RoboArena; records the frame
  values each camera fed the model on each call."""

  def __init__(self, frames_per_call=4):
    super().__init__()
    self.metadata = copy.deepcopy(CountingBackend.metadata)
    for key in OPENPI_CAMERAS:
      self.metadata['observation_spec'][key]['shape'] = [FRAMES, HEIGHT, WIDTH, 3]
    self.metadata['roboarena'] = dict(cameras=ROBOARENA_CAMERAS, frames_per_call=frames_per_call)
    self.seen = []   # per model call: {our camera key: [frame value, ...]}
    self.sessions = 0

  def new_session(self, prompt, observation):
    self.sessions += 1
    return super().new_session(prompt, observation)

  def infer(self, state, observation):
    self.seen.append({k: [int(f[0, 0, 0]) for f in observation[k]] for k in OPENPI_CAMERAS})
    return super().infer(state, observation)


def frame(value):
  return np.full((HEIGHT, WIDTH, 3), value, np.uint8)


def release_request(value, session_id, prompt='put the marker in the cup'):
  """run_sim_eval.py's request: 0 = right exterior, 1 = left exterior, wrist; float64 state."""
  return {
      'observation/exterior_image_0_left': frame(value),
      'observation/exterior_image_1_left': frame(100 + value),
      'observation/wrist_image_left': frame(200 + value),
      'observation/joint_position': np.full(7, 0.25, np.float64),
      'observation/cartesian_position': np.zeros(6, np.float64),   # the client's dummy
      'observation/gripper_position': np.zeros(1, np.float64),
      'prompt': prompt, 'session_id': session_id,
  }


class ReleaseClient:
  """eval_utils/policy_client.py's WebsocketClientPolicy: openpi-client's codec, `endpoint` in each
  request, a text reply raised as an error."""

  def __init__(self, port):
    self.ws = ws_client.connect(f'ws://127.0.0.1:{port}', compression=None, max_size=None,
                                open_timeout=TIMEOUT_S)
    self.packer = openpi_msgpack.Packer()
    self.metadata = openpi_msgpack.unpackb(self.ws.recv(TIMEOUT_S))

  def _call(self, request, endpoint):
    self.ws.send(self.packer.pack({**request, 'endpoint': endpoint}))
    return self.ws.recv(TIMEOUT_S)

  def infer(self, obs):
    response = self._call(obs, 'infer')
    if isinstance(response, str):
      raise RuntimeError(f'Error in inference server:\n{response}')
    return openpi_msgpack.unpackb(response)

  def reset(self, reset_info):
    return self._call(reset_info, 'reset')

  def close(self):
    self.ws.close()


@contextlib.contextmanager
def release_client(port):
  client = ReleaseClient(port)
  try:
    yield client
  finally:
    client.close()


@pytest.fixture()
def served():
  backend = RecordingBackend()
  with running_server(backend) as port:
    yield backend, port


def test_metadata_holds_the_release_server_config_beside_ours(served):
  _, port = served
  with release_client(port) as client:
    meta = client.metadata
  assert {k: meta[k] for k in RELEASE_SERVER_CONFIG} == RELEASE_SERVER_CONFIG
  assert meta['protocol_version'] == 1 and meta['action_shape'] == [HORIZON, ACTION_DIM]


def test_release_sequence_keeps_one_episode_with_the_release_frame_rule(served):
  backend, port = served
  with release_client(port) as client:
    assert client.reset({}) == 'reset successful'
    replies = [client.infer(release_request(i, 'episode-a')) for i in range(5)]
  for i, actions in enumerate(replies):   # the raw (N, 8) array; column 0 counts the episode's calls
    assert isinstance(actions, np.ndarray) and actions.shape == (HORIZON, ACTION_DIM)
    assert actions.dtype == np.float32 and (actions[:, 0] == i).all()
    assert (actions[:, 1] == 0.25).all()   # float64 joints arrive as float32
  assert backend.sessions == 1   # no restart
  # The release: 1 frame, then the last 4 buffered (the first repeated in front while fewer exist);
  # each of the 4 is repeated twice onto our 8 training frames a chunk.
  release_rule = [[0], [0, 0, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4]]
  for seen, frames in zip(backend.seen, release_rule):
    expected = frames if len(frames) == 1 else list(np.repeat(frames, 2))
    assert seen['observation/exterior_image_1_left'] == expected                 # RoboArena's 0
    assert seen['observation/exterior_image_2_left'] == [100 + f for f in expected]   # its 1
    assert seen['observation/wrist_image_left'] == [200 + f for f in expected]


def test_reset_and_a_new_session_id_start_over(served):
  backend, port = served
  with release_client(port) as client:
    for i in range(2):
      assert client.infer(release_request(i, 'a'))[0, 0] == i
    assert client.infer(release_request(7, 'b'))[0, 0] == 0   # a new session: a new episode
    assert backend.seen[-1]['observation/exterior_image_1_left'] == [7]
    assert client.infer(release_request(8, 'b'))[0, 0] == 1
    assert backend.seen[-1]['observation/exterior_image_1_left'] == list(np.repeat([7, 7, 7, 8], 2))
    assert client.reset({}) == 'reset successful'
    assert client.infer(release_request(9, 'b'))[0, 0] == 0   # same id after a reset: starts over
    assert backend.seen[-1]['observation/exterior_image_1_left'] == [9]
  assert backend.sessions == 3


@pytest.mark.parametrize('change, field', [
    (dict(drop='observation/exterior_image_0_left'), 'observation/exterior_image_0_left: missing'),
    ({'observation/wrist_image_left': np.zeros((HEIGHT, WIDTH, 3), np.float32)},
     'observation/wrist_image_left: dtype float32, expected uint8'),
    ({'observation/exterior_image_1_left': np.zeros((90, 160, 3), np.uint8)},
     'observation/exterior_image_1_left: image shape (1, 90, 160, 3)'),
    ({'observation/joint_position': np.zeros(6)}, 'observation/joint_position: shape (6,), expected (7,)'),
    ({'observation/gripper_position': np.array([1e39])}, 'observation/gripper_position: 1e+39 overflows'),
    ({'prompt': ''}, 'prompt: expected a non-empty string'),
])
def test_errors_are_text_frames_naming_the_field_and_the_connection_survives(served, change, field):
  backend, port = served
  request = release_request(0, 'bad')
  request.pop(change.get('drop'), None)
  request.update({k: v for k, v in change.items() if k != 'drop'})
  with release_client(port) as client:
    with pytest.raises(RuntimeError, match='Error in inference server') as e:
      client.infer(request)
    assert str(e.value).splitlines()[1].startswith(field)
    assert client.infer(release_request(0, 'bad'))[0, 0] == 0   # still usable
  assert backend.sessions == 1


def test_an_unknown_endpoint_is_refused_naming_it(served):
  _, port = served
  with release_client(port) as client:
    reply = client._call(release_request(0, 's'), 'act')
    assert reply.startswith("endpoint: 'act' is not one of infer, reset")


def test_auto_tells_the_protocols_apart_per_connection(served):
  backend, port = served
  from tests.test_serve import connect, observation   # pylint: disable=g-import-not-at-top
  with release_client(port) as client, connect(port, 'openpi-session') as ours:
    assert client.infer(release_request(0, 'r')).shape == (HORIZON, ACTION_DIM)
    reply = ours.infer(observation(1))   # openpi's names: the first exterior is exterior_image_1_left
    assert reply['actions'].shape == (HORIZON, ACTION_DIM) and reply['server_timing']['episode_chunk'] == 0
    assert ours.infer(observation(FRAMES))['server_timing']['episode_chunk'] == 1


def test_fixed_protocols_and_a_frame_count_that_does_not_divide_are_refused_at_start():
  with pytest.raises(ValueError, match='embodiment droid has no RoboArena camera names'):
    server_lib.PolicyServer(CountingBackend(), 4, 'roboarena')
  with pytest.raises(ValueError, match=r'serve.roboarena_frames: 3 must divide video.frames_per_chunk \(8\)'):
    server_lib.PolicyServer(RecordingBackend(frames_per_call=3), 4)
  with pytest.raises(ValueError, match="protocol: 'grpc' is not one of auto, openpi, roboarena"):
    server_lib.PolicyServer(RecordingBackend(), 4, 'grpc')


def test_under_openpi_only_the_release_names_are_not_ours():
  with running_server(RecordingBackend(), wire_protocol='openpi') as port:
    with release_client(port) as client:
      assert 'image_resolution' not in client.metadata
      reply = openpi_msgpack.unpackb(client._call(release_request(0, 's'), 'infer'))
  assert reply == {'error': 'observation/exterior_image_2_left: missing'}


def test_a_first_request_with_a_malformed_array_is_answered_in_its_own_protocol(served):
  """Auto detection reads the map before any check: the release's client gets its text frame."""
  _, port = served
  request = release_request(0, 'm')
  request['observation/joint_position'] = {b'__ndarray__': True, b'data': bytes(28), b'dtype': '|O',
                                           b'shape': [7]}
  with release_client(port) as client:
    client.ws.send(msgpack.packb({**request, 'endpoint': 'infer'}, default=msgpack_numpy._encode))  # pylint: disable=protected-access
    reply = client.ws.recv(TIMEOUT_S)
    assert isinstance(reply, str) and reply.startswith('observation/joint_position: bad array encoding ('), reply
    assert client.infer(release_request(0, 'm'))[0, 0] == 0   # still usable
