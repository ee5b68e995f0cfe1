"""bench/gpu.sh --smoke: the GPU command's every part, end to end on the CPU with tiny configs.

The whole run takes ~105 s on the 2-core box (six processes, each compiling its tiny model), so it
is marked slow; the default suite keeps the quicker smoke runs of its parts (tests/test_kernels.py's
DiT and kernel tables, tests/test_train_step.py's Meta-World step).
"""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ('kernels_check', 'dit_forward', 'control_step', 'train_step', 'kernels_table', 'metaworld_step')


@pytest.mark.slow
def test_gpu_script_smoke_run_writes_every_parts_table(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'} | dict(OUT_DIR=str(tmp_path))
  out = subprocess.run(['bash', 'bench/gpu.sh', '--smoke'], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=env)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  parts = {name: json.loads((tmp_path / f'{name}.json').read_text()) for name in PARTS}
  assert all(p['rc'] == 0 and p['versions']['jax'] and (tmp_path / f'{n}.md').exists() for n, p in parts.items())
  assert [r['ok'] for r in parts['kernels_check']['records']] == [True] * 6  # 3 kernels x {fp32, bf16}
  forward = parts['dit_forward']['tables'][0]
  jax_rows = [r for r in forward if r['forward'].startswith('jax DiT forward')]
  torch_rows = [r for r in forward if r['forward'] == 'torch eager']
  assert len(jax_rows) == 4 and len(torch_rows) == 2  # {fp32, e4m3} x B in {1, 2}; the peer at B in {1, 2}
  assert all(r['vs torch'].endswith('x') and float(r['vs torch'][:-1]) > 0 for r in jax_rows)
  assert sum('fp8_matmul:interpret' in r['kernels'] for r in jax_rows) == 2
  (step,) = parts['control_step']['tables'][0]
  assert step['quantization'] == 'fp8' and int(step['ticks']) >= 10 and float(step['p99 ms']) >= float(step['p50 ms'])
  assert len([r for r in parts['kernels_table']['tables'][0] if r['impl'] == 'interpret']) == 6
  assert parts['metaworld_step']['tail'][-1].startswith('runs_ms=')  # configs/metaworld.py at its batch of 16
  assert 'total' in (tmp_path / 'summary.md').read_text()

