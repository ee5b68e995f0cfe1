"""Fuzzing the server's request decoder and validator: any frame gives a Request or a one-field error.

Bounded (a fixed number of examples, each with a deadline) so it stays a few seconds in CI.
"""
import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamzero_client import msgpack_numpy
from dreamzero_jax.serving import protocol
from dreamzero_jax.serving import server as server_lib

FRAMES, HEIGHT, WIDTH = 4, 6, 8
SPEC = {
    'observation/cam_a': {'shape': [FRAMES, HEIGHT, WIDTH, 3], 'dtype': 'uint8'},
    'observation/cam_b': {'shape': [FRAMES, HEIGHT, WIDTH, 3], 'dtype': 'uint8'},
    'observation/state': {'shape': [3], 'dtype': 'float32'},
}
FIELDS = ('request', 'reset', *protocol.TEXT_FIELDS, *SPEC)
FUZZ = settings(max_examples=200, deadline=500, suppress_health_check=list(HealthCheck), derandomize=True,
                database=None)


def valid(frames=1):
  return {'observation/cam_a': np.zeros((frames, HEIGHT, WIDTH, 3), np.uint8),
          'observation/cam_b': np.zeros((frames, HEIGHT, WIDTH, 3), np.uint8),
          'observation/state': np.zeros(3, np.float32), 'prompt': 'reach', 'session_id': 's'}


# Plain msgpack values, and arrays in the msgpack-numpy layout with any (possibly lying) header.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=8),
                    st.binary(max_size=16))
fake_arrays = st.fixed_dictionaries({
    b'__ndarray__': st.just(True),
    b'data': st.one_of(st.binary(max_size=64), st.integers(-2**63, 2**63), st.none()),
    b'dtype': st.one_of(st.sampled_from(['|u1', '<f4', '<f8', '<i8', '|O', '<U3', '|V4', '?', 'bogus']),
                        st.integers(-9, 9)),
    b'shape': st.one_of(st.lists(st.integers(-2, 2**40), max_size=5), st.text(max_size=3), st.integers(-9, 9)),
})


def _array(dtype, shape, fill):
  with np.errstate(invalid='ignore', over='ignore'):
    return np.full(shape, fill).astype(dtype)


arrays = st.builds(
    _array,
    st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_, np.float16]),
    st.one_of(st.just((1, HEIGHT, WIDTH, 3)), st.just((FRAMES, HEIGHT, WIDTH, 3)), st.just((0, HEIGHT, WIDTH, 3)),
              st.just((3,)), st.lists(st.integers(0, 4), max_size=4).map(tuple)),
    st.sampled_from([0, 1, 255, np.nan, np.inf, 1e39]))
values = st.recursive(st.one_of(scalars, fake_arrays, arrays),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=8)
keys = st.sampled_from([*SPEC, 'prompt', 'session_id', 'reset', 'extra'])
mutations = st.lists(st.tuples(keys, st.one_of(st.just('delete'), values)), max_size=4)  # 'delete' drops the key


def pack(obj):
  """msgpack-numpy bytes, or None for what no client can express (an int beyond 64 bits, say)."""
  try:
    return msgpack.packb(obj, default=msgpack_numpy._encode)  # pylint: disable=protected-access
  except (TypeError, ValueError, OverflowError):
    return None


def check(frame):
  try:
    request = server_lib.decode_request(frame, SPEC, 'connection-1')
  except ValueError as e:
    field = str(e).split(': ', 1)[0]
    assert field in FIELDS and ': ' in str(e), str(e)
    return None
  for key in ('observation/cam_a', 'observation/cam_b'):
    assert request.observation[key].shape in ((1, HEIGHT, WIDTH, 3), (FRAMES, HEIGHT, WIDTH, 3))
    assert request.observation[key].dtype == np.uint8
  state = request.observation['observation/state']
  assert state.dtype == np.float32 and state.shape == (3,) and np.isfinite(state).all()
  assert isinstance(request.session_id, str) and request.session_id
  assert isinstance(request.prompt, str) and request.prompt
  return request


@FUZZ
@given(frames=st.sampled_from([1, 2, FRAMES]), changes=mutations, reset=st.one_of(st.none(), values))
def test_mutated_requests_decode_or_name_a_field(frames, changes, reset):
  request = valid(frames)
  if reset is not None:
    request['reset'] = reset
  for key, value in changes:
    if isinstance(value, str) and value == 'delete':
      request.pop(key, None)
    else:
      request[key] = value
  frame = pack(request)
  if frame is not None:
    check(frame)


@FUZZ
@given(st.one_of(st.binary(max_size=256), st.text(max_size=32), values.map(pack).filter(bool)))
def test_arbitrary_frames_decode_or_name_a_field(frame):
  check(frame)


def test_the_unmutated_request_decodes_and_the_connection_is_its_session():
  request = valid()
  del request['session_id']
  decoded = check(msgpack_numpy.pack(request))
  assert decoded.session_id == 'connection-1' and decoded.frames == 1
  assert check(msgpack_numpy.pack(valid(2))).observation['observation/cam_a'].shape[0] == FRAMES
