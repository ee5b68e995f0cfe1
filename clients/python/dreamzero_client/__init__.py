"""Numpy-only client for the DreamZero policy server: `PolicyClient` and the msgpack-numpy codec.

Depends on numpy, msgpack and websockets only (`pip install ./clients/python`); the server
package dreamzero-jax ships this package as well and encodes its replies with the same codec.
"""
from dreamzero_client.client import (PolicyClient, PolicyClientError, PolicyServerError, PolicyTimeoutError,
                                     ProtocolMismatchError, StaleActionsError)

__all__ = ['PolicyClient', 'PolicyClientError', 'PolicyServerError', 'PolicyTimeoutError',
           'ProtocolMismatchError', 'StaleActionsError']
