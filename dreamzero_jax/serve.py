"""The policy server's entry point: `python -m dreamzero_jax.serve --checkpoint DIR --port P`.

The server and the robots' wire formats are `dreamzero_jax/serving/` (server.py, adapters.py,
protocol.py; loading.py reads the checkpoint); docs/inference.md "Server protocol" describes them.
`--config C --compile_only` compiles the control step from abstract shapes and prints its
per-device memory as one JSON line (inference/serve_aot.py); no checkpoint needed. `--mesh tensor=N`
(config serve.mesh) serves over N devices, the DiT's heads and MLP split between them;
`--compile_only --topology v5e:2x4` compiles for a TPU slice this host lacks (needs libtpu).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dreamzero_jax import config as config_lib
from dreamzero_jax import settings as settings_lib
from dreamzero_jax.inference import rollout, serve_aot
from dreamzero_jax.serving import loading, roboarena, server

# eval.py's through_server still reads the server class from here.
PolicyServer = server.PolicyServer


def _parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  overrides, rest = config_lib.split_config_args(argv)
  parser = argparse.ArgumentParser(prog='python -m dreamzero_jax.serve', description=__doc__)
  parser.add_argument('--checkpoint', help='a train.py workdir, or a `python -m dreamzero_jax.convert` output')
  parser.add_argument('--compile_only', action='store_true',
                      help='compile the control step for --config from abstract shapes (no checkpoint) on this '
                           "host's backend, print one JSON line with its per-device memory, and exit")
  parser.add_argument('--mesh', help="the devices to serve on (config serve.mesh): 'tensor=N' splits the DiT's "
                      "heads and MLP and the KV cache's heads over N devices, 'data=2' the CFG branches, or "
                      "'data=2,tensor=N'; default: the config's ('' = one device)")
  parser.add_argument('--topology', default='', help='with --compile_only: compile for this TPU slice\'s '
                      'compile-only devices (e.g. v5e:2x4; needs libtpu) instead of this host\'s')
  parser.add_argument('--norm_stats', help='norm_stats.json (`python -m dreamzero_jax.datasets stats`) or the '
                      "release's meta/relative_stats_dreamzero.json (beside its stats.json and modality.json) "
                      "or experiment_cfg/metadata.json: replaces the checkpoint's; required for a converted checkpoint")
  parser.add_argument('--config', help='configs/NAME.py[:ARG]; default: the checkpoint\'s own')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--protocol', choices=roboarena.PROTOCOLS, default='auto',
                      help="wire protocol: openpi-style (ours), the release's RoboArena-style one (its "
                           "eval_utils clients), or auto: each connection's first request decides")
  parser.add_argument('--max_sessions', type=int, default=8,
                      help='sessions kept (each holds a KV cache); past it the least recently used is '
                           'evicted and its next call gets an error saying so')
  return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> int:
  args, overrides = _parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  try:
    if args.mesh is not None:
      rollout.parse_serve_mesh(args.mesh, '--mesh')   # before any checkpoint is read
    if args.compile_only:
      if not args.config:
        raise ValueError('--compile_only needs --config')
      settings = rollout.with_serve_mesh(settings_lib.from_config(config_lib.load_config(args.config, overrides)),
                                         args.mesh)
      print(json.dumps(serve_aot.compile_only(settings, args.topology)), flush=True)
      return 0
    if args.topology:
      raise ValueError('--topology is for --compile_only (a served policy runs on this host\'s devices)')
    if not args.checkpoint:
      raise ValueError('--checkpoint is required (unless --compile_only)')
    if not os.path.isdir(args.checkpoint):
      raise ValueError(f'checkpoint directory not found: {args.checkpoint}')
    if overrides and not args.config:
      raise ValueError(f'{overrides[0]} needs --config')
    if args.max_sessions < 1:
      raise ValueError(f'--max_sessions must be >= 1, got {args.max_sessions}')
    if not 0 <= args.port <= 65535:
      raise ValueError(f'--port: {args.port} is not a TCP port (0-65535)')
    settings = settings_lib.from_config(config_lib.load_config(args.config, overrides)) if args.config else None
    server.run(loading.load_backend(args.checkpoint, settings, args.norm_stats, args.mesh), args.host, args.port,
               args.max_sessions, args.protocol)
  except (ValueError, OSError) as e:  # ConfigError is a ValueError; OSError: port in use
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
