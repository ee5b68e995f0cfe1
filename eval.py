"""`python eval.py ...` = `python -m dreamzero_jax.evaluate ...` (closed-loop, offline and latency evaluation)."""
import sys

from dreamzero_jax.evaluate import main

if __name__ == '__main__':
  sys.exit(main())
