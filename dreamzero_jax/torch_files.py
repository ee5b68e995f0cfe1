"""Reading PyTorch checkpoints tensor by tensor without torch: safetensors, torch zip (.pth/.pt/.bin)
and Hugging Face shard indexes (*.index.json).

Opening a file reads only its table of contents (the safetensors JSON header, or the torch pickle with
its storages left on disk), so names and shapes are known before any data is read. Each tensor is then
read with one positioned read into a fresh buffer: peak host memory is the largest tensor, where a
long-lived mmap would keep every touched page of the file in the resident set.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Iterator

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_TORCH_STORAGES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'Float8_e4m3fnStorage': ml_dtypes.float8_e4m3fn,
    'Float8_e5m2Storage': ml_dtypes.float8_e5m2, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class CheckpointFormatError(ValueError):
  """A file that is not a checkpoint this module can read."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """Where one tensor's elements lie in a file (little-endian), read on demand."""
  file: str
  offset: int                          # byte offset of element 0
  dtype: np.dtype
  shape: tuple[int, ...]
  strides: tuple[int, ...] | None = None   # in elements; None = C-contiguous

  def read(self) -> np.ndarray:
    dtype = np.dtype(self.dtype)
    if self.strides is None or any(n == 0 for n in self.shape):
      extent = int(np.prod(self.shape))
    else:
      extent = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides))
    flat = np.empty((extent,), dtype)
    with open(self.file, 'rb') as f:
      f.seek(self.offset)
      got = f.readinto(memoryview(flat.view(np.uint8)))
    if got != flat.nbytes:
      raise CheckpointFormatError(f'{self.file}: truncated tensor data at byte {self.offset}')
    if self.strides is None or _is_contiguous(self.shape, self.strides):
      return flat[:int(np.prod(self.shape))].reshape(self.shape)
    view = np.lib.stride_tricks.as_strided(flat, self.shape, [s * dtype.itemsize for s in self.strides])
    return np.ascontiguousarray(view)


def _is_contiguous(shape, strides) -> bool:
  expected = 1
  for n, s in zip(reversed(shape), reversed(strides)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


def _safetensors(path: str) -> dict[str, TensorRef]:
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointFormatError(f'{path}: not a safetensors file (shorter than its header)')
    (size,) = struct.unpack('<Q', head)
    if size > os.path.getsize(path) - 8:
      raise CheckpointFormatError(f'{path}: not a safetensors file (header size {size})')
    header = json.loads(f.read(size))
  refs = {}
  for key, entry in header.items():
    if key == '__metadata__':
      continue
    if entry['dtype'] not in _SAFETENSORS_DTYPES:
      raise CheckpointFormatError(f'{path}: tensor {key} has unsupported dtype {entry["dtype"]}')
    start, _ = entry['data_offsets']
    refs[key] = TensorRef(path, 8 + size + start, np.dtype(_SAFETENSORS_DTYPES[entry['dtype']]),
                          tuple(entry['shape']))
  return dict(sorted(refs.items(), key=lambda kv: kv[1].offset))  # file order: sequential reads


@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: np.dtype


class _StorageType:
  """Stands for torch.<X>Storage in the pickle: only its element type matters."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _TorchUnpickler(pickle.Unpickler):
  """Rebuilds a torch.save pickle into TensorRefs; refuses every global outside the tensor-rebuild set,
  so loading a checkpoint cannot run code."""

  def __init__(self, data: bytes, path: str, offsets: dict[str, int]):
    super().__init__(io.BytesIO(data))
    self.path, self.offsets = path, offsets

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return self._rebuild_tensor
    if module == 'torch._utils' and name in ('_rebuild_parameter', '_rebuild_parameter_with_state'):
      return lambda data, *_: data
    if module == 'torch' and name in _TORCH_STORAGES:
      return _StorageType(_TORCH_STORAGES[name])
    raise CheckpointFormatError(f'{self.path}: refusing to load {module}.{name} (not a plain tensor)')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage' and isinstance(pid[1], _StorageType)):
      raise CheckpointFormatError(f'{self.path}: unsupported storage reference {pid!r}')
    return _Storage(str(pid[2]), pid[1].dtype)

  def _rebuild_tensor(self, storage: _Storage, offset, size, stride, *_):
    if storage.key not in self.offsets:
      raise CheckpointFormatError(f'{self.path}: storage {storage.key} missing from the archive')
    return TensorRef(self.path, self.offsets[storage.key] + offset * storage.dtype.itemsize, storage.dtype,
                     tuple(size), tuple(stride))


def _flatten(tree, prefix: str = '') -> Iterator[tuple[str, TensorRef]]:
  """Nested dicts of tensors -> dotted keys (non-tensor entries such as step counters are skipped)."""
  if isinstance(tree, TensorRef):
    yield prefix, tree
  elif isinstance(tree, dict):
    for key, value in tree.items():
      yield from _flatten(value, f'{prefix}.{key}' if prefix else str(key))


def _torch_zip(path: str) -> dict[str, TensorRef]:
  with zipfile.ZipFile(path) as archive:
    infos = archive.infolist()
    pkl = [i for i in infos if i.filename.endswith('/data.pkl') or i.filename == 'data.pkl']
    if len(pkl) != 1:
      raise CheckpointFormatError(f'{path}: a zip file but not a torch.save checkpoint (no data.pkl)')
    root = pkl[0].filename[:-len('data.pkl')]
    byteorder = root + 'byteorder'
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b'little':
      raise CheckpointFormatError(f'{path}: big-endian checkpoints are not supported')
    data = archive.read(pkl[0])
  offsets = {}
  with open(path, 'rb') as f:
    for info in infos:
      if not info.filename.startswith(root + 'data/'):
        continue
      if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointFormatError(f'{path}: {info.filename} is compressed (torch.save never does this)')
      f.seek(info.header_offset)
      local = f.read(30)
      name_len, extra_len = struct.unpack('<HH', local[26:30])
      offsets[info.filename[len(root + 'data/'):]] = info.header_offset + 30 + name_len + extra_len
  return dict(_flatten(_TorchUnpickler(data, path, offsets).load()))


def _index(path: str) -> dict[str, TensorRef]:
  with open(path) as f:
    weight_map = json.load(f).get('weight_map')
  if not isinstance(weight_map, dict):
    raise CheckpointFormatError(f'{path}: a shard index needs a "weight_map"')
  refs = {}
  for shard in dict.fromkeys(weight_map.values()):
    refs.update(tensor_refs(os.path.join(os.path.dirname(path), shard)))
  return refs


def tensor_refs(path: str) -> dict[str, TensorRef]:
  """Name -> TensorRef for every tensor of a checkpoint file, in file order; reads no tensor data."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  if path.endswith('.json'):
    return _index(path)
  if path.endswith('.safetensors'):
    return _safetensors(path)
  if zipfile.is_zipfile(path):
    return _torch_zip(path)
  raise CheckpointFormatError(f'{path}: neither safetensors nor a torch zip checkpoint (legacy torch.save '
                              'files from torch < 1.6 must be re-saved)')


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for every tensor of a checkpoint, reading one tensor at a time."""
  for key, ref in tensor_refs(path).items():
    yield key, ref.read()
