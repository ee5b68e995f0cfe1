"""Train DreamZero: `python train.py --config configs/NAME.py --workdir DIR [--config.x=v]`.

Resumes from the newest checkpoint in DIR (parameters, optimiser, step, RNG, data iterator, norm
stats), refusing one written under an incompatible config. `--compile_only --topology v5p:4x4x8`
compiles the sharded train step for a TPU slice without one and prints its per-device memory.
"""
from __future__ import annotations

import argparse
import json
import sys



def parse(argv):
  from dreamzero_jax.config import split_config_args
  overrides, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog='python train.py', description=__doc__)
  p.add_argument('--config', required=True, help='configs/NAME.py[:ARG]')
  p.add_argument('--workdir', help='checkpoints and logs; resumed if it holds a checkpoint')
  p.add_argument('--compile_only', action='store_true', help='compile the train step for --topology and exit')
  p.add_argument('--topology', default='', help='TPU topology for --compile_only, e.g. v5p:4x4x8')
  p.add_argument('--stop_at_step', type=int, help='end this run at this step (checkpointed; rerun to resume)')
  p.add_argument('--multihost', action='store_true',
                 help='one process per host: jax.distributed.initialize (TPU pods and SLURM are detected; '
                      'elsewhere give --coordinator, --num_processes and --process_id)')
  p.add_argument('--coordinator', help='host:port of process 0 (with --multihost)')
  p.add_argument('--num_processes', type=int, help='processes in the job (with --multihost)')
  p.add_argument('--process_id', type=int, help="this process's index (with --multihost)")
  p.add_argument('--max_minutes', type=float,
                 help='end this run after this many wall-clock minutes (checkpointed; rerun to resume)')
  args = p.parse_args(rest)
  if not args.compile_only and not args.workdir:
    p.error('--workdir is required (unless --compile_only)')
  if not args.multihost and any(x is not None for x in (args.coordinator, args.num_processes, args.process_id)):
    p.error('--coordinator, --num_processes and --process_id need --multihost')
  return args, overrides


def initialize_multihost(coordinator=None, num_processes=None, process_id=None) -> None:
  """jax.distributed.initialize before anything touches a device; each process then feeds its
  slice of the global batch (pipeline.make_dataset shards by jax.process_index())."""
  import os

  import jax
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU-only clusters and tests
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args, overrides = parse(argv)
  from dreamzero_jax.config import ConfigError, load_config
  try:
    cfg = load_config(args.config, overrides)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.compile_only:
    from dreamzero_jax.training import train_aot
    print(json.dumps(train_aot.compile_only(cfg, args.topology)))
    return 0
  if args.multihost:
    initialize_multihost(args.coordinator, args.num_processes, args.process_id)
  from dreamzero_jax.training import loop
  try:
    return loop.train(cfg, args.workdir, stop_at=args.stop_at_step, max_minutes=args.max_minutes)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
