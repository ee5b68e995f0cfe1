"""Serving: the websocket policy server and the robots' wire formats (docs/inference.md).

protocol.py  what the server needs from a model (PolicyBackend) and the request checks
server.py    the websocket server: sessions, decode pool, the single model thread
adapters.py  a Policy behind the protocol for each robot's wire format (DROID, Meta-World, ...)
loading.py   a checkpoint (train.py workdir or converted release) -> Policy / server backend

`python -m dreamzero_jax.serve` (dreamzero_jax/serve.py) is the entry point.
"""
