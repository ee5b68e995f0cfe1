"""Experiments over the whole pipeline (data, training, closed-loop evaluation), one command each:
`python -m dreamzero_jax.experiments claims --out DIR` reproduces the paper's claims at small scale
(claims.py; docs/claims.md)."""
