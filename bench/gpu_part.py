"""One part of bench/gpu.sh: runs its command, then writes <name>.md and <name>.json in the run's folder.

  python bench/gpu_part.py versions OUT                  # OUT/versions.json: device, jax, jaxlib, cuDNN, torch
  python bench/gpu_part.py run OUT NAME TIMEOUT -- CMD   # OUT/NAME.md + OUT/NAME.json as soon as CMD ends

The markdown holds the title line, versions, the command, its exit status and seconds, then the
command's output from its first table or JSON line on. The JSON holds the same, with every
markdown table as a list of {column: cell} rows and every JSON line of the output as a record.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time


def versions() -> dict:
  import jax
  import jaxlib
  out = dict(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
             device=str(jax.devices()[0].device_kind), cudnn='n/a', torch='n/a')
  try:
    from jax._src.lib import cuda_versions
    if cuda_versions is not None:
      out['cudnn'] = str(cuda_versions.cudnn_get_version())
  except (ImportError, AttributeError, RuntimeError):
    pass
  if out['cudnn'] == 'n/a':
    for name in ('nvidia-cudnn-cu13', 'nvidia-cudnn-cu12'):
      try:
        out['cudnn'] = importlib.metadata.version(name)
        break
      except importlib.metadata.PackageNotFoundError:
        continue
  try:
    out['torch'] = importlib.metadata.version('torch')
  except importlib.metadata.PackageNotFoundError:
    pass
  return out


def tables(text: str) -> list[list[dict]]:
  """Every markdown table in text as rows of {header: cell}."""
  found, header, rows = [], None, []
  for line in text.splitlines() + ['']:
    cells = [c.strip() for c in line.strip().strip('|').split('|')] if line.startswith('|') else None
    if cells is None:
      if header is not None:
        found.append(rows)
      header, rows = None, []
    elif header is None:
      header = cells
    elif not all(set(c) <= set('-:') for c in cells):
      rows.append(dict(zip(header, cells)))
  return found


def records(text: str) -> list[dict]:
  out = []
  for line in text.splitlines():
    if line.startswith('{'):
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def run(out_dir: str, name: str, timeout: float, cmd: list[str]) -> int:
  with open(os.path.join(out_dir, 'versions.json')) as f:
    v = json.load(f)
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    rc, stdout, stderr = 124, (e.stdout or b'').decode(errors='replace'), (e.stderr or b'').decode(errors='replace')
  seconds = round(time.perf_counter() - start, 1)
  sys.stdout.write(stdout)
  if rc:
    sys.stderr.write(stderr[-3000:])
  lines = stdout.splitlines()
  first = next((i for i, line in enumerate(lines) if line.startswith(('|', '{'))), len(lines))
  body = '\n'.join(lines[max(0, first - 1):]) or '(no table: see the tail below)'
  status = 'ok' if rc == 0 else ('timed out' if rc == 124 else f'failed (exit {rc})')
  md = (f'## {name}\n\n{v["device"]} ({v["backend"]}), jax {v["jax"]}, jaxlib {v["jaxlib"]}, cuDNN {v["cudnn"]}, '
        f'torch {v["torch"]}; {status} in {seconds} s\n\n`{" ".join(cmd)}`\n\n{body}\n')
  if rc:
    md += '\n```\n' + '\n'.join((stdout + stderr).splitlines()[-20:]) + '\n```\n'
  with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
    f.write(md)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump(dict(part=name, command=cmd, rc=rc, seconds=seconds, versions=v, tables=tables(stdout),
                   records=records(stdout), tail=(stdout + stderr).splitlines()[-20:]), f, indent=1)
  print(f'== {name}: {status} in {seconds} s -> {out_dir}/{name}.md', flush=True)
  return rc


def main(argv: list[str]) -> int:
  if len(argv) == 2 and argv[0] == 'versions':
    with open(os.path.join(argv[1], 'versions.json'), 'w') as f:
      json.dump(versions(), f)
    return 0
  if len(argv) >= 6 and argv[0] == 'run' and argv[4] == '--':
    return run(argv[1], argv[2], float(argv[3]), argv[5:])
  print(__doc__, file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
