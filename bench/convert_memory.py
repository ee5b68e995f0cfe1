"""Peak host memory of `dreamzero_jax.convert` on a multi-GB checkpoint: it must stay bounded by the
largest tensor, not the model.

`python bench/convert_memory.py --layers 62`: writes a synthetic Wan DiT checkpoint (dim 1024, ffn 4096,
official names and shapes taken from the wan22 reference on the meta device, random bf16 data; 62 layers
= 2.1 GB) as one safetensors file, plus tiny VAE and umT5 .pth files, and converts them for
configs/tiny.py:t2v widened to that DiT with the CLI's entry point in a fresh process. That process
reports its peak RSS (VmHWM, which counts file-backed pages too) and its baseline once the libraries are
imported and JAX is initialised; the difference is what conversion costs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIT = dict(dim=1024, num_heads=8, ffn_dim=4096)


def overrides(layers: int) -> list[str]:
  return [f'model.{k}={v}' for k, v in {**DIT, 'num_layers': layers}.items()]


def _shapes(module) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def reference_shapes(cfg) -> dict[str, dict[str, tuple[int, ...]]]:
  """Official state-dict names and shapes of the DiT, VAE and umT5 for cfg (meta device: no memory)."""
  import torch
  sys.path.insert(0, ROOT)
  from dreamzero_jax.models.weights.wan_reference import import_wan
  m, v, t = cfg.model, cfg.vae, cfg.text_encoder
  with torch.device('meta'):
    dit = import_wan('modules.model').WanModel(
        model_type='t2v', patch_size=tuple(m.patch_size), text_len=m.text_len, in_dim=m.in_channels, dim=m.dim,
        ffn_dim=m.ffn_dim, freq_dim=m.freq_dim, text_dim=m.text_dim, out_dim=m.out_channels,
        num_heads=m.num_heads, num_layers=m.num_layers)
    vae = import_wan('modules.vae2_1').WanVAE_(
        dim=v.base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult), num_res_blocks=v.num_res_blocks,
        temperal_downsample=list(v.temporal_downsample))
    t5 = import_wan('modules.t5').T5Encoder(
        vocab=t.vocab_size, dim=t.dim, dim_attn=t.dim, dim_ffn=t.ffn_dim, num_heads=t.num_heads,
        num_layers=t.num_layers, num_buckets=t.num_buckets, shared_pos=False)
  return {'dit': _shapes(dit), 'vae': _shapes(vae), 't5': _shapes(t5)}


def write_safetensors(path: str, shapes: dict[str, tuple[int, ...]], seed: int) -> int:
  """Random bf16 tensors written one at a time (the header first: every size is known)."""
  header, offset = {}, 0
  for key, shape in shapes.items():
    size = 2 * int(np.prod(shape))
    header[key] = {'dtype': 'BF16', 'shape': list(shape), 'data_offsets': [offset, offset + size]}
    offset += size
  text = json.dumps(header).encode()
  text += b' ' * (-len(text) % 8)
  rng = np.random.default_rng(seed)
  with open(path, 'wb') as f:
    f.write(len(text).to_bytes(8, 'little'))
    f.write(text)
    for shape in shapes.values():
      f.write((0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16).tobytes())
  return os.path.getsize(path)


def write_pth(path: str, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
  import torch
  gen = torch.Generator().manual_seed(seed)
  torch.save({k: 0.1 * torch.randn(s, generator=gen) for k, s in shapes.items()}, path)


_CHILD = textwrap.dedent('''
    import json, sys, time
    import jax
    from dreamzero_jax import convert

    def high_water_mark():  # this process's own peak (ru_maxrss would inherit the parent's across fork)
      with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))

    jax.devices()
    baseline = high_water_mark()
    start = time.perf_counter()
    if convert.main(sys.argv[1:]):
      sys.exit(1)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(baseline_bytes=baseline, peak_bytes=high_water_mark(), seconds=seconds)))
''')


def measure(workdir: str, layers: int) -> dict:
  """Writes the checkpoints under workdir, converts them in a fresh process, returns the numbers."""
  sys.path.insert(0, ROOT)
  from dreamzero_jax.config import load_config
  config = os.path.join(ROOT, 'configs/tiny.py') + ':t2v'
  cfg = load_config(config, overrides(layers))
  shapes = reference_shapes(cfg)
  dit = os.path.join(workdir, 'dit.safetensors')
  size = write_safetensors(dit, shapes['dit'], seed=0)
  largest = 2 * max(int(np.prod(s)) for s in shapes['dit'].values())
  vae_file, t5_file = os.path.join(workdir, 'vae.pth'), os.path.join(workdir, 't5.pth')
  write_pth(vae_file, shapes['vae'], seed=1)
  write_pth(t5_file, shapes['t5'], seed=2)
  out = os.path.join(workdir, 'converted')
  argv = ['--config', config, *[f'--config.{o}' for o in overrides(layers)], '--out', out,
          *[a for source in (dit, vae_file, t5_file) for a in ('--src', source)]]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  res = subprocess.run([sys.executable, '-c', _CHILD, *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                       check=False)
  if res.returncode:
    raise RuntimeError(f'conversion failed:\n{res.stderr[-3000:]}')
  child = json.loads(res.stdout.strip().splitlines()[-1])
  output = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  return dict(layers=layers, checkpoint_bytes=size, tensors=len(shapes['dit']), largest_tensor_bytes=largest,
              output_bytes=output, peak_over_baseline_bytes=child['peak_bytes'] - child['baseline_bytes'],
              **child)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--layers', type=int, default=62, help='DiT layers (62 at dim 1024 = 2.1 GB in bf16)')
  parser.add_argument('--workdir', default=None, help='scratch directory (default: a temporary one, removed)')
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix='convert_memory-')
  try:
    r = measure(workdir, args.layers)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  print(json.dumps(r))
  mb = lambda n: f'{n / 2**20:.0f}'
  print(f'| {datetime.date.today()} | {r["layers"]} | {r["checkpoint_bytes"] / 1e9:.2f} GB, {r["tensors"]} tensors | '
        f'{mb(r["largest_tensor_bytes"])} | {mb(r["baseline_bytes"])} | {mb(r["peak_bytes"])} | '
        f'{mb(r["peak_over_baseline_bytes"])} | {r["seconds"]:.0f} | {r["output_bytes"] / 1e9:.2f} GB |')


if __name__ == '__main__':
  main()
