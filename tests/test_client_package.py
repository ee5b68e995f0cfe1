"""The client package (clients/python) installs and runs without JAX, and dreamzero-jax ships it too."""
import configparser
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import setuptools

from tests.test_serve import ACTION_DIM, HORIZON, CountingBackend, running_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT_DIR = os.path.join(ROOT, 'clients', 'python')
# Distributions and modules a robot computer must not need.
HEAVY_DISTRIBUTIONS = {'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow',
                       'tensorflow-datasets', 'grain', 'dreamzero-jax'}
HEAVY_MODULES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'tensorflow', 'tensorflow_datasets',
                 'grain', 'dreamzero_jax')

# A robot loop: builds its first observation from the server's metadata alone.
CLIENT_SCRIPT = '''
import json, sys
import numpy as np
import dreamzero_client

with dreamzero_client.PolicyClient('127.0.0.1', int(sys.argv[1]), timeout_s=60) as client:
  meta = client.metadata
  observation = {}
  for key, entry in meta['observation_spec'].items():
    shape = entry['shape']
    if len(shape) == 4:  # a camera: [frames, height, width, 3]
      shape = [meta['first_call_frames'], *shape[1:]]
    observation[key] = np.zeros(shape, entry['dtype'])
  reply = client.infer({**observation, 'prompt': 'pick up the cup'})
  try:
    client.infer(observation)  # no prompt
    error = None
  except dreamzero_client.PolicyServerError as e:
    error = str(e)
print(json.dumps({'shape': list(reply['actions'].shape), 'dtype': str(reply['actions'].dtype),
                  'error': error, 'client': dreamzero_client.__file__, 'refused': refused,
                  'heavy': sorted(m for m in sys.modules if m.split('.')[0] in HEAVY)}))
'''


@pytest.fixture(scope='module')
def port():
  with running_server(CountingBackend()) as server_port:
    yield server_port


def _run_client(python, port, cwd, env, prelude=''):
  code = f'HEAVY = {HEAVY_MODULES!r}\nrefused = []\n{prelude}\n{CLIENT_SCRIPT}'
  result = subprocess.run([python, '-c', code, str(port)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  reply = json.loads(result.stdout.strip().splitlines()[-1])
  assert reply['shape'] == [HORIZON, ACTION_DIM] and reply['dtype'] == 'float32'
  assert reply['error'].startswith('prompt: '), reply['error']
  assert reply['heavy'] == [] and reply['refused'] == []
  return reply


def _env_without_pythonpath():
  return {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}


def test_client_from_the_source_tree_never_imports_jax(port, tmp_path):
  # A finder ahead of all others refuses the heavy modules, and records them: an import that a
  # library catches (try: import jax) is still seen.
  blocker = '''
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in HEAVY:
      refused.append(name)
      raise ImportError(f'the client imported {name}')
sys.meta_path.insert(0, Refuse())
'''
  env = {**_env_without_pythonpath(), 'PYTHONPATH': CLIENT_DIR}
  reply = _run_client(sys.executable, port, tmp_path, env, prelude=blocker)
  assert reply['client'] == os.path.join(CLIENT_DIR, 'dreamzero_client', '__init__.py')


def test_client_installs_alone_in_a_fresh_venv(port, tmp_path):
  """`pip install ./clients/python` into a venv without system packages: no JAX, and it talks to the server.

  pip uses this machine's configuration: an index (or a local mirror) must offer numpy, msgpack,
  websockets and setuptools. Installing from a copy keeps pip's build/ and egg-info out of the tree.
  """
  source = shutil.copytree(CLIENT_DIR, tmp_path / 'client-src',
                           ignore=shutil.ignore_patterns('build', '*.egg-info', '__pycache__'))
  venv = tmp_path / 'venv'
  env = _env_without_pythonpath()
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, env=env, timeout=120)
  python = str(venv / 'bin' / 'python')
  install = subprocess.run([python, '-m', 'pip', 'install', '-q', str(source)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
  names = 'import importlib.metadata as m; print(*(d.metadata["Name"] for d in m.distributions()))'
  listing = subprocess.run([python, '-c', names], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60, check=True)
  installed = {re.sub(r'[-_.]+', '-', name).lower() for name in listing.stdout.split()}
  assert {'dreamzero-client', 'numpy', 'msgpack', 'websockets'} <= installed
  assert not installed & HEAVY_DISTRIBUTIONS, installed & HEAVY_DISTRIBUTIONS
  reply = _run_client(python, port, tmp_path, env)
  assert reply['client'].startswith(str(venv))


def test_setup_cfg_ships_every_package_and_the_client():
  """setup.cfg lists packages (its find searches one folder); a new dreamzero_jax package must be listed."""
  options = configparser.ConfigParser()
  options.read(os.path.join(ROOT, 'setup.cfg'))
  listed = options['options']['packages'].split()
  found = setuptools.find_packages(ROOT, include=['dreamzero_jax', 'dreamzero_jax.*'])
  assert sorted(listed) == sorted([*found, 'dreamzero_client'])
  package_dir = dict(line.split(' = ') for line in options['options']['package_dir'].strip().splitlines())
  assert package_dir == {'dreamzero_client': 'clients/python/dreamzero_client'}
  assert setuptools.find_packages(CLIENT_DIR) == ['dreamzero_client']
