"""The control step's cost per device over a serving mesh, and the step time it predicts at a chip's peak.

`python bench/serve_roofline.py --chip v5e --mesh tensor=8 --topology v5e:2x4 [--quantization fp8]`
compiles the 14B DROID control step ahead of time (inference/serve_aot.py, as `serve --compile_only` does) and
turns its per-device cost (inference/hlo_cost.py: matrix flops, HBM bytes, collective bytes, loops
counted in full) into three lower bounds on the step time at the chip's datasheet peaks: compute,
HBM traffic and interconnect traffic. The step can be no faster than the largest; with no overlap it
takes their sum. For a GPU-like mesh without the GPUs, give fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=2, `--chip h100 --mesh tensor=2`): the flops and
collective bytes are the program's; the HBM bytes follow the CPU compiler's fusion, not a GPU's, so
no HBM bound is given for them. `--from_json FILE` recomputes the bounds of a printed line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamzero_jax import settings as settings_lib  # noqa: E402
from dreamzero_jax.config import load_config  # noqa: E402
from dreamzero_jax.inference import serve_aot  # noqa: E402

# Datasheet peaks per chip: dense bf16 matrix FLOP/s, HBM bytes/s, interconnect bytes/s one way.
# TPU v5e: 197 TFLOP/s, 819 GB/s HBM, ICI 1,600 Gbit/s. H100 SXM: 989 TFLOP/s, 3.35 TB/s HBM3, NVLink 4
# 900 GB/s both ways together. Every flop is put at the bf16 peak: the cost is counted from the HLO,
# where the CPU's compile emulates fp8 GEMMs in fp32 and v5e has no fp8 units, so an fp8 step's
# compute bound is the bf16 one (an H100's fp8 GEMMs could halve the linear layers' share).
CHIPS = {
    'v5e': dict(flops=197e12, hbm=819e9, link=200e9),
    'h100': dict(flops=989e12, hbm=3.35e12, link=450e9),
}


def roofline(report: dict, chip: str) -> dict:
  """Lower bounds (ms) on the step time from report['cost_per_device'] at `chip`'s peaks. A CPU
  compile's HBM bytes follow the CPU's fusion (fp32 emulation, little fusion): no HBM bound from it."""
  peak, cost = CHIPS[chip], report['cost_per_device']
  bounds = dict(compute_ms=cost['flops'] / peak['flops'] * 1e3,
                collective_ms=cost['collective_gib'] * serve_aot.GIB / peak['link'] * 1e3)
  if not report['device'].startswith('cpu'):
    bounds['hbm_ms'] = cost['hbm_gib'] * serve_aot.GIB / peak['hbm'] * 1e3
  return {**{k: round(v, 1) for k, v in bounds.items()}, 'max_ms': round(max(bounds.values()), 1),
          'sum_ms': round(sum(bounds.values()), 1)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', default='configs/dreamzero_14b_droid.py')
  p.add_argument('--chip', choices=sorted(CHIPS), required=True)
  p.add_argument('--mesh', default='', help="serve.mesh, e.g. tensor=8 (default '': one device)")
  p.add_argument('--topology', default='', help='a TPU topology (needs libtpu); default: this host\'s devices')
  p.add_argument('--quantization', default='none', choices=('none', 'fp8'))
  p.add_argument('--from_json', help="a line this script printed: recompute its bounds at --chip's peaks")
  args = p.parse_args()
  if args.from_json:
    with open(args.from_json) as f:
      report = json.load(f)
    print(json.dumps({**report, 'chip': args.chip, 'roofline': roofline(report, args.chip)}))
    return
  cfg = load_config(args.config, [f'model.quantization={args.quantization}', f'serve.mesh={args.mesh!r}'])
  report = serve_aot.compile_only(settings_lib.from_config(cfg), args.topology)
  keep = ('device', 'topology', 'mesh', 'quantization', 'dit_gib_per_device', 'kv_cache_gib_per_device', 'total_gib',
          'argument_gib', 'temp_gib', 'cost_per_device',
          'xla_cost_analysis', 'compile_s')
  print(json.dumps({**{k: report[k] for k in keep}, 'chip': args.chip, 'roofline': roofline(report, args.chip)}))


if __name__ == '__main__':
  main()
