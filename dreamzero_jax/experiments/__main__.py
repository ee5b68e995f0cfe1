"""`python -m dreamzero_jax.experiments NAME [flags]`: NAME is `claims` (the paper's claims at small
scale, claims.py; `claims --help` lists its flags)."""
from __future__ import annotations

import sys

from dreamzero_jax.experiments import claims

EXPERIMENTS = {'claims': claims.main}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in EXPERIMENTS:
    print(f'usage: python -m dreamzero_jax.experiments {{{",".join(EXPERIMENTS)}}} [flags]', file=sys.stderr)
    return 2
  return EXPERIMENTS[argv[0]](argv[1:])


if __name__ == '__main__':
  sys.exit(main())
