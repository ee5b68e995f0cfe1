"""Numpy arrays inside msgpack, laid out as openpi clients expect.

An array travels as the map {b'__ndarray__': True, b'data': raw bytes, b'dtype': dtype.str,
b'shape': shape}; a numpy scalar as {b'__npgeneric__': True, b'data': value, b'dtype': dtype.str}.
Keeping openpi's layout lets openpi / RoboArena robot clients talk to our server unchanged.
Imports only numpy and msgpack: robot computers run this file without JAX, and the server
(dreamzero_jax/serving/server.py) encodes and decodes with this same module.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_NDARRAY = b'__ndarray__'
_NPGENERIC = b'__npgeneric__'
# Object and structured arrays have no portable byte layout.
_UNPACKABLE_KINDS = ('O', 'V')


def _check_dtype(dtype: np.dtype) -> np.dtype:
  if dtype.kind in _UNPACKABLE_KINDS:
    raise TypeError(f'numpy dtype {dtype} cannot travel in msgpack-numpy')
  return dtype


def _encode(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    _check_dtype(obj.dtype)
    return {_NDARRAY: True, b'data': np.ascontiguousarray(obj).tobytes(),
            b'dtype': obj.dtype.str, b'shape': list(obj.shape)}
  if isinstance(obj, np.generic):
    _check_dtype(obj.dtype)
    return {_NPGENERIC: True, b'data': obj.item(), b'dtype': obj.dtype.str}
  raise TypeError(f'cannot pack {type(obj).__name__} into msgpack')


class MalformedArray:
  """What `unpack(..., lenient=True)` leaves where an array map does not decode, so that the reader
  can name the field holding it."""

  def __init__(self, reason: str):
    self.reason = reason

  def __repr__(self) -> str:
    return f'MalformedArray({self.reason!r})'


def _describe(e: Exception) -> str:
  if isinstance(e, KeyError):
    return f'no {e.args[0].decode(errors="replace") if isinstance(e.args[0], bytes) else e.args[0]}'
  return str(e)[:120]


def _decode_array(obj: dict) -> Any:
  if _NDARRAY in obj:
    dtype = _check_dtype(np.dtype(obj[b'dtype']))
    shape = obj[b'shape']
    if not isinstance(shape, (list, tuple)):
      raise TypeError(f'shape {shape!r:.40} is not a list')
    # Read-only view of the message bytes: no copy for multi-megabyte images.
    return np.ndarray(buffer=obj[b'data'], dtype=dtype, shape=tuple(shape))
  if _NPGENERIC in obj:
    return _check_dtype(np.dtype(obj[b'dtype'])).type(obj[b'data'])
  return obj


_DECODE_ERRORS = (KeyError, TypeError, ValueError, OverflowError, MemoryError)


def _decode(obj: dict) -> Any:
  try:
    return _decode_array(obj)
  except _DECODE_ERRORS as e:
    raise ValueError(f'malformed msgpack-numpy array: {_describe(e)}') from e


def _decode_lenient(obj: dict) -> Any:
  try:
    return _decode_array(obj)
  except _DECODE_ERRORS as e:
    return MalformedArray(_describe(e))


def pack(obj: Any) -> bytes:
  """Serialises nested dicts / lists / scalars / numpy arrays."""
  return msgpack.packb(obj, default=_encode)


def unpack(data: bytes, lenient: bool = False) -> Any:
  """Inverse of `pack`; arrays come back read-only. A malformed array map raises ValueError, or
  under `lenient` becomes a MalformedArray in its place."""
  return msgpack.unpackb(data, object_hook=_decode_lenient if lenient else _decode)
