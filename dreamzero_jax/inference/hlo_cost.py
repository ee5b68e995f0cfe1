"""One device's cost of a compiled SPMD program, read from its optimized HLO, loops counted in full.

XLA's `compiled.cost_analysis()` counts a while loop's body once, whatever its trip count, so for
the control step (a scan over 40 layers inside the sampler, query-block loops inside attention) it
reports a fraction of the work. This walks the HLO text instead and multiplies each loop body by its
trip count (XLA's `known_trip_count`, or the one integer constant its condition compares with), and a
conditional by the share of executions the caller says take its costliest branch (the sampler's
DiT steps: `lax.cond` picks at run time, so the program alone cannot say):

  flops             2 x multiply-adds of every dot and convolution (the matrix units' work;
                    elementwise ops are not counted)
  hbm_bytes         bytes read and written by each unfused instruction and fusion (a fusion's
                    internals stay on chip); a dynamic-slice reads, and a dynamic-update-slice writes,
                    only its slice, as a scan's layer weights and a KV-cache write do
  collective_bytes  bytes out of every all-reduce, all-gather, reduce-scatter, all-to-all and
                    collective-permute (what crosses the chip interconnect, by output size)

An estimate for a roofline (inference/serve_aot.py): the figures an unfused, uncached program would
move, by the compiler's own schedule of this mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 'f8e4m3': 1, 's16': 2, 'u16': 2, 'f16': 2,
          'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_NO_TRAFFIC = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'call', 'conditional',
               'after-all', 'partition-id', 'replica-id', 'iota'}
_HEADER = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')


@dataclasses.dataclass
class Cost:
  flops: float = 0.0
  hbm_bytes: float = 0.0
  collective_bytes: float = 0.0
  unknown_trip_counts: int = 0

  def add(self, other: 'Cost', times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.hbm_bytes += times * other.hbm_bytes
    self.collective_bytes += times * other.collective_bytes
    self.unknown_trip_counts += other.unknown_trip_counts


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  inside: str       # the text between the parentheses (a constant's value, a parameter's index)
  attributes: str


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(',') if d)) for dt, dims in _ARRAY.findall(shape) if dt in _BYTES]


def _bytes(shape: str) -> int:
  return sum(_BYTES[dt] * math.prod(dims) for dt, dims in _arrays(shape))


def _dims(shape: str) -> tuple[int, ...]:
  arrays = _arrays(shape)
  return arrays[0][1] if arrays else ()


def _split_operands(rest: str) -> tuple[str, str]:
  """'%a, %b), attr=...' -> ('%a, %b', 'attr=...'): the operand list ends at its closing paren."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ''


def parse(text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """HLO module text -> ({computation: instructions}, the entry computation's name)."""
  computations, entry, current = {}, '', None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(' '):
      current = computations.setdefault(header.group(1), [])
      entry = header.group(1) if line.startswith('ENTRY') else entry
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, shape, opcode, rest = match.groups()
      inside, attributes = _split_operands(rest)
      current.append(_Instruction(name, shape, opcode, re.findall(r'%([\w.\-]+)', inside), inside, attributes))
  return computations, entry


def _called(attributes: str, key: str) -> list[str]:
  found = re.search(key + r'=\{?([%\w.\-, ]+)\}?', attributes)
  return re.findall(r'%([\w.\-]+)', found.group(1)) if found else []


class _Walker:

  def __init__(self, text: str, taken: float):
    self.computations, self.entry = parse(text)
    self.taken = taken
    self.shapes = {i.name: i.shape for body in self.computations.values() for i in body}

  def trip_count(self, instruction: _Instruction) -> int | None:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instruction.attributes)
    if known:
      return int(known.group(1))
    # The condition compares the induction variable with one integer constant (a scan's length).
    constants = {int(i.inside) for name in _called(instruction.attributes, 'condition')
                 for comp in [name, *self._fusions_of(name)] for i in self.computations.get(comp, [])
                 if i.opcode == 'constant' and re.match(r'[su]\d+\[\]', i.shape) and i.inside.lstrip('-').isdigit()}
    return constants.pop() if len(constants) == 1 else None

  def _fusions_of(self, name: str) -> list[str]:
    return [c for i in self.computations.get(name, []) for c in _called(i.attributes, 'calls')]

  @functools.cache
  def _reads(self, comp: str) -> dict[int, float | None]:
    """Bytes each parameter of fused computation `comp` is read by: its slices when only
    dynamic-slices (or an in-place dynamic-update-slice, or a nested fusion that slices) use it,
    None when something reads it whole."""
    body = self.computations.get(comp, [])
    params = {i.name: int(i.inside) for i in body if i.opcode == 'parameter'}
    out: dict[int, float | None] = {}
    for i in body:
      for position, operand in enumerate(i.operands):
        if operand not in params:
          continue
        if i.opcode == 'dynamic-slice' and position == 0:
          read = _bytes(i.shape)
        elif i.opcode == 'dynamic-update-slice' and position == 0:
          read = _bytes(self.shapes.get(i.operands[1], ''))
        elif i.opcode == 'fusion':
          read = self._reads(_called(i.attributes, 'calls')[0]).get(position, 0.0)
        else:
          read = None
        index = params[operand]
        out[index] = None if read is None or (index in out and out[index] is None) else out.get(index, 0.0) + read
    return out

  def _operand_bytes(self, instruction: _Instruction) -> float:
    """Bytes an unfused instruction or a fusion reads: whole operands, but only the slices of those a
    (fused) dynamic-slice reads or a dynamic-update-slice updates in place."""
    if instruction.opcode == 'dynamic-slice':
      return _bytes(instruction.shape)
    if instruction.opcode == 'dynamic-update-slice':
      return 2 * _bytes(self.shapes.get(instruction.operands[1], ''))
    fused = _called(instruction.attributes, 'calls') if instruction.opcode == 'fusion' else []
    reads = self._reads(fused[0]) if fused else {}
    total = 0.0
    for index, operand in enumerate(instruction.operands):
      whole = _bytes(self.shapes.get(operand, ''))
      read = reads.get(index) if fused else None
      total += whole if read is None else min(whole, read)
    return total

  def _output_bytes(self, instruction: _Instruction) -> float:
    fused = _called(instruction.attributes, 'calls') if instruction.opcode == 'fusion' else []
    root = self.computations.get(fused[0], [])[-1:] if fused else []
    if instruction.opcode == 'dynamic-update-slice':
      return 0.0   # counted with its operands: the update, read and written in place
    if instruction.opcode.endswith('-start'):
      return self._operand_bytes(instruction)   # its output tuple also holds the operand
    if root and root[0].opcode == 'dynamic-update-slice':
      return _bytes(self.shapes.get(root[0].operands[1], ''))
    return _bytes(instruction.shape)

  @functools.cache
  def cost(self, name: str, fused: bool = False) -> Cost:
    out = Cost()
    for i in self.computations.get(name, []):
      if i.opcode == 'dot':
        lhs = _dims(self.shapes.get(i.operands[0], ''))
        contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', i.attributes)
        k = math.prod(lhs[int(d)] for d in contracting.group(1).split(',') if d) if contracting else 1
        out.flops += 2.0 * math.prod(_dims(i.shape)) * k
      elif i.opcode == 'convolution':
        rhs = _dims(self.shapes.get(i.operands[1], ''))
        labels = re.search(r'dim_labels=\w+_(\w+)->', i.attributes)
        o = rhs[labels.group(1).index('o')] if labels and 'o' in labels.group(1) else 1
        # A window dim with lhs dilation d meets a real input on 1 of every d taps: the TPU compiler
        # writes a batched matmul as a convolution whose batch dims are such windows.
        dilate = re.search(r'lhs_dilate=([\dx]+)', i.attributes)
        dilation = math.prod(int(d) for d in dilate.group(1).split('x')) if dilate else 1
        out.flops += 2.0 * math.prod(_dims(i.shape)) * math.prod(rhs) / max(o, 1) / dilation
      elif any(i.opcode in (c, f'{c}-start') for c in _COLLECTIVES):
        out.collective_bytes += max((_BYTES[dt] * math.prod(d) for dt, d in _arrays(i.shape)), default=0)
      if i.opcode == 'while':
        trips = self.trip_count(i)
        body = Cost()
        for comp in _called(i.attributes, 'body') + _called(i.attributes, 'condition'):
          body.add(self.cost(comp))
        out.add(body, trips if trips is not None else 1)
        out.unknown_trip_counts += trips is None
      elif i.opcode == 'conditional':
        branches = sorted((self.cost(c) for key in ('branch_computations', 'true_computation', 'false_computation')
                           for c in _called(i.attributes, key)), key=lambda c: c.flops)
        if branches:
          out.add(branches[-1], self.taken)
          out.add(branches[0], 1.0 - self.taken)
      elif i.opcode == 'call':
        for comp in _called(i.attributes, 'to_apply'):
          out.add(self.cost(comp, fused))
      elif i.opcode == 'fusion':
        for comp in _called(i.attributes, 'calls'):
          out.add(self.cost(comp, fused=True))
      if not fused and i.opcode not in _NO_TRAFFIC and not i.opcode.endswith('-done'):
        out.hbm_bytes += self._operand_bytes(i) + self._output_bytes(i)
    return out


def program_cost(hlo_text: str, taken: float = 1.0) -> Cost:
  """One device's Cost of a compiled program (`compiled.as_text()`). A conditional counts its
  costliest branch `taken` of the times and its cheapest the rest (1.0: an upper bound)."""
  walker = _Walker(hlo_text, taken)
  return walker.cost(walker.entry)
