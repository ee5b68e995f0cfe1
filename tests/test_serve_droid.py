"""A DROID policy end to end: a tiny DROID-layout RLDS dataset -> build -> train 1 step -> serve ->
the release's RoboArena client sequence and an openpi client, both through the registry's openpi-client.

configs/tiny.py:droid is the DROID embodiment at toy width: 3 cameras on the droid canvas, state 8,
action 8 with the 7 joints relative to the anchor state, 24 actions a chunk.
"""
import time

import numpy as np
import pytest
from openpi_client import websocket_client_policy

from dreamzero_jax.config import load_config
from dreamzero_jax.datasets import normalization
from dreamzero_jax.datasets.__main__ import main as datasets_main
from dreamzero_jax.serving import loading
from dreamzero_jax.training import loop
from tests import test_data_droid
from tests.test_serve import _health, running_server
from tests.test_serve_roboarena import release_client

HW = test_data_droid.IMAGE_HW   # the tiny config's serving camera size (16x32)
JOINTS = np.linspace(0.3, 0.9, 7)   # float64, as a robot reports them


@pytest.fixture(scope='module')
def droid_policy(tmp_path_factory):
  root = tmp_path_factory.mktemp('droid_serve')
  test_data_droid.write_rlds(str(root / 'rlds'))
  assert datasets_main(['build', 'droid', '--src', str(root / 'rlds'), '--out', str(root / 'data')]) == 0
  cfg = load_config('configs/tiny.py:droid', [
      f'data.dir={root / "data"}', 'train.steps=1', 'train.batch_size=1', 'train.checkpoint_every=1',
      'sampler.num_steps=2', 'sampler.dit_step_mask="11"'])
  assert loop.train(cfg, str(root / 'work')) == 0
  backend = loading.load_backend(str(root / 'work'))
  record = dict(sessions=0, seen=[], postprocessed=[], stats=backend.policy.stats['action'])
  new_session, infer, postprocess = backend.new_session, backend.infer, backend.policy.postprocess

  def counting_new_session(prompt, observation):
    record['sessions'] += 1
    return new_session(prompt, observation)

  def recording_infer(state, observation):   # the frames each call fed the model, by value
    record['seen'].append([int(f[0, 0, 0]) for f in observation['observation/exterior_image_1_left']])
    return infer(state, observation)

  def recording_postprocess(actions, anchor_state):
    out = postprocess(actions, anchor_state)
    record['postprocessed'].append((np.array(actions), np.array(anchor_state), out))
    return out

  backend.new_session, backend.infer = counting_new_session, recording_infer
  backend.policy.postprocess = recording_postprocess
  with running_server(backend, max_sessions=4) as port:
    deadline = time.monotonic() + 300
    while _health(port) != 200:   # 503 while the warm-up compiles (its calls are not the test's)
      assert time.monotonic() < deadline
      time.sleep(0.05)
    record['seen'].clear()
    yield backend, port, record


def frames(value, n=None):
  f = np.full((*HW, 3), value, np.uint8)
  return f if n is None else np.repeat(f[None], n, axis=0)


def check_actions(actions, record):
  """(24, 8) finite float32: joints = the anchor state the client sent + the model's delta."""
  assert actions.shape == (24, 8) and actions.dtype == np.float32 and np.isfinite(actions).all()
  normalised, anchor, out = record['postprocessed'][-1]
  np.testing.assert_array_equal(actions, out)
  np.testing.assert_allclose(anchor[:7], JOINTS, rtol=1e-6)
  delta = normalization.unnormalize(normalised[:, :8], record['stats'])[:, :7]
  np.testing.assert_allclose(actions[:, :7], delta + JOINTS, rtol=1e-5, atol=1e-5)
  assert set(np.unique(actions[:, 7])) <= {0.0, 1.0}   # the gripper, binarised


# run_sim_eval.py + eval_utils/policy_client.py: reset, then one frame per camera every 8 actions.
RELEASE_SEQUENCE = [('reset', None, None)] + [('infer', 'sim-episode-1', v) for v in range(5)] + [
    ('infer', 'sim-episode-2', 50)]


def test_the_release_client_sequence(droid_policy):
  _, port, record = droid_policy
  del record['seen'][:]
  before = record['sessions']
  with release_client(port) as client:
    assert client.metadata['image_resolution'] == list(HW) and client.metadata['n_external_cameras'] == 2
    for endpoint, session_id, value in RELEASE_SEQUENCE:
      if endpoint == 'reset':
        assert client.reset({}) == 'reset successful'
        continue
      actions = client.infer({
          'observation/exterior_image_0_left': frames(value), 'observation/exterior_image_1_left': frames(value + 1),
          'observation/wrist_image_left': frames(value + 2), 'observation/joint_position': JOINTS,
          'observation/cartesian_position': np.zeros(6), 'observation/gripper_position': np.array([0.0]),
          'prompt': 'put the marker in the cup', 'session_id': session_id})
      check_actions(actions, record)
  # One episode over the five calls (a new one for the new session_id), fed the release's frames:
  # 1, then the last 4 (the first repeated in front), each twice onto the 8 training frames a chunk.
  assert record['sessions'] - before == 2
  twice = lambda f: list(np.repeat(f, 2))
  assert record['seen'] == [[0], twice([0, 0, 0, 1]), twice([0, 0, 1, 2]), twice([0, 1, 2, 3]),
                            twice([1, 2, 3, 4]), [50]]


# An openpi client (openpi-client's WebsocketClientPolicy): no session_id, openpi's 1-indexed
# camera names, 1 frame on the first call, then the 8 frames a chunk observed (4 are accepted too).
OPENPI_SEQUENCE = [(1, False), (8, False), (4, False), (1, True)]


def test_an_openpi_client(droid_policy):
  _, port, record = droid_policy
  client = websocket_client_policy.WebsocketClientPolicy('127.0.0.1', port)
  assert client.get_server_metadata()['embodiment'] == 'droid'
  chunks = []
  for n, reset in OPENPI_SEQUENCE:
    reply = client.infer({
        'observation/exterior_image_1_left': frames(10, n), 'observation/exterior_image_2_left': frames(11, n),
        'observation/wrist_image_left': frames(12, n), 'observation/joint_position': JOINTS,
        'observation/gripper_position': np.array([0.0]), 'prompt': 'put the marker in the cup', 'reset': reset})
    assert 'error' not in reply, reply
    check_actions(reply['actions'], record)
    chunks.append(reply['server_timing']['episode_chunk'])
  assert chunks == [0, 1, 2, 0]   # one episode, then reset starts over
  client._ws.close()  # pylint: disable=protected-access
