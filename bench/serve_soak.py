"""Soak test of the policy server: many sessions, some malformed requests, one busy model.

  python bench/serve_soak.py [--sessions 32] [--requests 20] [--malformed 0.1] [--config.x=v ...]

Starts `dreamzero_jax.serve` machinery in a child process on loopback (configs/tiny.py, random
weights, --max_sessions = sessions) and waits for /healthz 200 (the control step compiled). Then
every session runs in its own thread over its own connection: `requests` calls (1 frame, then the
chunk's frames), a seeded `malformed` fraction of them replaced by a malformed frame of a rotating
kind (garbage bytes, text, a non-map, a missing or mis-shaped camera, a wrong dtype, zero frames,
a frame count that divides nothing, NaN or float32-overflowing state, a non-bool reset). Good
requests must get finite actions of the metadata's shape; malformed ones an error naming the field.
Prints one JSON line: crashes (client exceptions or a server that did not exit 0 on SIGTERM),
misclassified replies, and p50/p99 latency (client-side, ms) of good and of malformed replies.

  python bench/serve_soak.py --client_faults [--sessions 4] [--requests 12] [--timeout_s 1.5]

Client-fault mode: each session is a dreamzero_client.PolicyClient (timeout_s) behind a proxy that
delays a seeded fraction of the server's replies past the client's timeout (--slow) and sends another
fraction twice (--double); the session retries each timed-out call with its next observation, as a
robot loop does. The proxy records which request each reply answered, so a reply's actions returned
to the caller for any other observation counts as stale (must be 0), independently of the client.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from dreamzero_client import msgpack_numpy  # noqa: E402
from dreamzero_jax.config import split_config_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600.0


def serve_random(max_sessions: int, overrides: list[str]) -> None:
  """The child process: the tiny policy with random weights behind the server, until SIGTERM."""
  from flax import nnx
  from dreamzero_jax import embodiments
  from dreamzero_jax import settings as settings_lib
  from dreamzero_jax.config import load_config
  from dreamzero_jax.inference.policy import Policy
  from dreamzero_jax.models import encoders
  from dreamzero_jax.models.dit import build_dit
  from dreamzero_jax.serving import server
  from dreamzero_jax.serving.adapters import PolicyServerBackend
  cfg = settings_lib.from_config(load_config(os.path.join(ROOT, 'configs/tiny.py'), overrides))
  model = nnx.jit(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0)))()
  frozen = nnx.jit(lambda: encoders.FrozenEncoders(cfg, rngs=nnx.Rngs(1)))()
  e = embodiments.get(cfg.data.embodiment)
  stats = {'state': dict(q01=[-1.0] * e.state_dim, q99=[1.0] * e.state_dim),
           'action': dict(q01=[-1.0] * e.action_dim, q99=[1.0] * e.action_dim)}
  server.run(PolicyServerBackend(Policy(cfg, model, frozen, stats)), '127.0.0.1', 0, max_sessions)


def malformed(kind: int, good: dict, spec: dict) -> tuple[bytes | str, str]:
  """(frame, the field its error must name) for malformed kind `kind` (rotating)."""
  cameras = [k for k, e in spec.items() if len(e['shape']) == 4]
  state = next(k for k in spec if k not in cameras)
  cam = cameras[0]
  t, h, w, _ = spec[cam]['shape']
  kinds = [
      (b'\xc1 not msgpack', 'request'),
      ('a text frame', 'request'),
      (msgpack_numpy.pack([1, 2, 3]), 'request'),
      (msgpack_numpy.pack({k: v for k, v in good.items() if k != cam}), cam),
      (msgpack_numpy.pack({**good, cam: np.zeros((1, h // 2, w, 3), np.uint8)}), cam),
      (msgpack_numpy.pack({**good, cam: good[cam].astype(np.float32)}), cam),
      (msgpack_numpy.pack({**good, **{c: np.zeros((0, h, w, 3), np.uint8) for c in cameras}}), cam),
      (msgpack_numpy.pack({**good, **{c: np.zeros((3, h, w, 3), np.uint8) for c in cameras}}), cam),
      (msgpack_numpy.pack({**good, state: np.full(spec[state]['shape'], np.nan, np.float32)}), state),
      (msgpack_numpy.pack({**good, state: np.full(spec[state]['shape'], 1e39)}), state),
      (msgpack_numpy.pack({**good, 'reset': 'yes'}), 'reset'),
  ]
  del t
  return kinds[kind % len(kinds)]


def percentile(values: list[float], q: float) -> float | None:
  return round(float(np.percentile(values, q)), 1) if values else None


def drive(port: int, session: int, requests: int, bad: set[int], out: dict, lock: threading.Lock) -> None:
  from websockets.sync import client as ws_client
  rng = np.random.default_rng(session)
  try:
    with ws_client.connect(f'ws://127.0.0.1:{port}', max_size=None, compression=None) as ws:
      meta = msgpack_numpy.unpack(ws.recv(TIMEOUT_S))
      spec = meta['observation_spec']
      later = meta['later_call_frames']
      sent_good = 0
      for i in range(requests):
        frames = 1 if sent_good == 0 else later
        good = {k: (rng.integers(0, 256, (frames, *e['shape'][1:]), dtype=np.uint8) if len(e['shape']) == 4
                    else rng.uniform(-1, 1, e['shape']).astype(np.float32)) for k, e in spec.items()}
        good.update(prompt='reach the goal', session_id=f'soak-{session}')
        if i in bad:
          frame, field = malformed(session + i, good, spec)
        else:
          frame, field = msgpack_numpy.pack(good), None
        start = time.perf_counter()
        ws.send(frame)
        reply = msgpack_numpy.unpack(ws.recv(TIMEOUT_S))
        ms = 1e3 * (time.perf_counter() - start)
        if field is None:
          ok = ('error' not in reply and reply['actions'].shape == tuple(meta['action_shape'])
                and np.isfinite(reply['actions']).all())
          sent_good += 1
        else:
          ok = 'actions' not in reply and str(reply.get('error', '')).startswith(f'{field}: ')
        with lock:
          out['good_ms' if field is None else 'malformed_ms'].append(ms)
          if not ok:
            out['misclassified'].append(f'session {session} request {i}: {str(reply)[:200]}')
  except Exception as e:  # a dropped connection or a timeout is a crash of the run
    with lock:
      out['crashes'].append(f'session {session}: {type(e).__name__}: {e}')


def fault_proxy(upstream: int, slow: float, double: float, delay_s: float, seed: int, ledger: dict,
                ready: list) -> None:
  """Forwards connections to the server at `upstream`, delaying or doubling seeded replies; records
  each request's joint 0 by request_id and the request_id of each reply's actions (ledger)."""
  import asyncio
  from websockets.asyncio import client as ws_client
  from websockets.asyncio import server as ws_server
  from websockets.exceptions import ConnectionClosed
  rng = np.random.default_rng(seed)

  async def relay(downstream):
    try:
      await forward(downstream)
    except ConnectionClosed:  # the client closed after a timeout (its documented recovery): expected
      pass

  async def forward(downstream):
    async with ws_client.connect(f'ws://127.0.0.1:{upstream}', max_size=None, compression=None) as up:
      await downstream.send(await up.recv())
      async for frame in downstream:
        request = msgpack_numpy.unpack(frame)
        ledger['joint'][request['request_id']] = float(request['observation/state'][0])
        await up.send(frame)
        reply_frame = await up.recv()
        reply = msgpack_numpy.unpack(reply_frame)
        if 'actions' in reply:
          ledger['answers'][reply['actions'].tobytes()] = reply['request_id']
        fault = rng.uniform()
        if fault < slow:
          ledger['slowed'] += 1
          await asyncio.sleep(delay_s)
        await downstream.send(reply_frame)
        if slow <= fault < slow + double:
          ledger['doubled'] += 1
          await downstream.send(reply_frame)

  async def main():
    async with ws_server.serve(relay, '127.0.0.1', 0, max_size=None, compression=None) as proxy:
      ready.append(proxy.sockets[0].getsockname()[1])
      await asyncio.Future()

  asyncio.run(main())


def drive_faulty(port: int, session: int, requests: int, timeout_s: float, ledger: dict, out: dict,
                 lock: threading.Lock) -> None:
  """A robot loop through the proxy: a new observation (joint 0 unique) per call, retried on timeouts."""
  import dreamzero_client
  rng = np.random.default_rng(1000 + session)
  try:
    with dreamzero_client.PolicyClient('127.0.0.1', port, session_id=f'fault-{session}', timeout_s=timeout_s) as client:
      spec = client.metadata['observation_spec']
      started = False
      for i in range(requests):
        joint = float(session * 1000 + i)
        frames = client.metadata['later_call_frames'] if started else 1
        obs = {k: (rng.integers(0, 256, (frames, *e['shape'][1:]), dtype=np.uint8) if len(e['shape']) == 4
                   else np.full(e['shape'], joint, np.float32)) for k, e in spec.items()}
        try:
          reply = client.infer({**obs, 'prompt': 'reach the goal'})
        except dreamzero_client.PolicyTimeoutError:
          with lock:
            out['timeouts'] += 1
          continue
        started = True
        answered = ledger['answers'].get(reply['actions'].tobytes())
        with lock:
          out['returned'] += 1
          if answered is None or ledger['joint'].get(answered) != joint:
            out['stale'].append(f'session {session} call {i}: actions of {answered}')
  except Exception as e:  # a dropped connection is a crash of the run
    with lock:
      out['crashes'].append(f'session {session}: {type(e).__name__}: {e}')


def _health(port: int) -> int:
  try:
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=10) as reply:
      return reply.status
  except urllib.error.HTTPError as e:
    return e.code


def _client_faults(port: int, args) -> tuple[dict, bool]:
  import warnings
  warnings.filterwarnings('ignore', message='discarded a reply')   # the late and duplicate replies, counted here
  ledger = {'joint': {}, 'answers': {}, 'slowed': 0, 'doubled': 0}
  ready = []
  threading.Thread(target=fault_proxy, args=(port, args.slow, args.double, 2 * args.timeout_s, args.seed, ledger,
                                             ready), daemon=True).start()
  while not ready:
    time.sleep(0.01)
  out = {'returned': 0, 'timeouts': 0, 'stale': [], 'crashes': []}
  lock = threading.Lock()
  threads = [threading.Thread(target=drive_faulty, args=(ready[0], s, args.requests, args.timeout_s, ledger, out, lock))
             for s in range(args.sessions)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for message in (out['crashes'] + out['stale'])[:10]:
    print(message, file=sys.stderr)
  report = dict(mode='client_faults', sessions=args.sessions, requests=args.requests, timeout_s=args.timeout_s,
                slowed=ledger['slowed'], doubled=ledger['doubled'], timeouts=out['timeouts'],
                returned=out['returned'], stale=len(out['stale']), crashes=len(out['crashes']))
  return report, not out['stale'] and out['returned'] > 0


def main(argv: list[str]) -> int:
  overrides, rest = split_config_args(argv)
  if rest and rest[0] == '--serve_only':
    serve_random(int(rest[1]), overrides)
    return 0
  import argparse
  p = argparse.ArgumentParser(prog='python bench/serve_soak.py')
  p.add_argument('--sessions', type=int, default=32)
  p.add_argument('--requests', type=int, default=20)
  p.add_argument('--malformed', type=float, default=0.1)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--client_faults', action='store_true', help='the client-fault mode (module docstring)')
  p.add_argument('--timeout_s', type=float, default=1.5, help='client-fault mode: the client\'s reply timeout')
  p.add_argument('--slow', type=float, default=0.2, help='client-fault mode: fraction of replies delayed')
  p.add_argument('--double', type=float, default=0.2, help='client-fault mode: fraction of replies sent twice')
  args = p.parse_args(rest)
  if args.client_faults:
    argv = [a for a in argv if a.startswith('--config.')]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  server = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--serve_only', str(args.sessions),
                             *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  crashes = []
  try:
    ready, _, _ = select.select([server.stdout], [], [], TIMEOUT_S)
    line = server.stdout.readline() if ready else ''
    if not line.startswith('serving on ws://'):
      raise RuntimeError(f'server did not start: {line!r}')
    port = int(line.rsplit(':', 1)[1])
    start = time.perf_counter()
    while _health(port) != 200:
      time.sleep(0.1)
    compile_s = time.perf_counter() - start
    if args.client_faults:
      report, ok = _client_faults(port, args)
      server.send_signal(signal.SIGTERM)
      if server.wait(120) != 0:
        report['crashes'] += 1
      print(json.dumps({**report, 'compile_s': round(compile_s, 1)}))
      return 0 if ok and report['crashes'] == 0 else 1
    rng = np.random.default_rng(args.seed)
    total = args.sessions * args.requests
    bad_flat = set(rng.choice(total, int(round(args.malformed * total)), replace=False).tolist())
    out = {'good_ms': [], 'malformed_ms': [], 'misclassified': [], 'crashes': []}
    lock = threading.Lock()
    threads = [threading.Thread(target=drive, args=(port, s, args.requests,
                                                    {i - s * args.requests for i in bad_flat
                                                     if s * args.requests <= i < (s + 1) * args.requests},
                                                    out, lock)) for s in range(args.sessions)]
    start = time.perf_counter()
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    wall = time.perf_counter() - start
    server.send_signal(signal.SIGTERM)
    if server.wait(120) != 0:
      crashes.append(f'server exited with {server.returncode}')
  finally:
    if server.poll() is None:
      server.kill()
      server.wait()
  crashes += out['crashes']
  report = dict(sessions=args.sessions, requests=args.requests, good=len(out['good_ms']),
                malformed=len(out['malformed_ms']), crashes=len(crashes), misclassified=len(out['misclassified']),
                good_p50_ms=percentile(out['good_ms'], 50), good_p99_ms=percentile(out['good_ms'], 99),
                malformed_p50_ms=percentile(out['malformed_ms'], 50),
                malformed_p99_ms=percentile(out['malformed_ms'], 99),
                wall_s=round(wall, 1), compile_s=round(compile_s, 1))
  for message in (crashes + out['misclassified'])[:10]:
    print(message, file=sys.stderr)
  print(json.dumps(report))
  return 0 if not crashes and not out['misclassified'] else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
