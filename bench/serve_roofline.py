"""The control step's cost per device over a serving mesh, and the step time it predicts at a chip's peak.

`python bench/serve_roofline.py --chip v5e --mesh tensor=8 --topology v5e:2x4 [--quantization fp8]`
compiles the 14B DROID control step ahead of time (inference/aot.py, as `serve --compile_only` does) and
turns its per-device cost (inference/hlo_cost.py: matrix flops, HBM bytes, collective bytes, loops
counted in full) into three lower bounds on the step time at the chip's datasheet peaks: compute,
HBM traffic and interconnect traffic. The step can be no faster than the largest; with no overlap it
takes their sum. For a GPU-like mesh without the GPUs, give fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=2, `--chip h100 --mesh tensor=2`): the flops and
collective bytes are the program's; the HBM bytes follow the CPU compiler's fusion, not a GPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamzero_jax.config import load_config  # noqa: E402
from dreamzero_jax.inference import aot  # noqa: E402

# Datasheet peaks per chip: dense matrix FLOP/s (bf16; fp8 where the chip has fp8 units), HBM bytes/s,
# interconnect bytes/s one way. TPU v5e: 197 TFLOP/s bf16 (no fp8 units: fp8 weights are upcast),
# 819 GB/s HBM, ICI 1,600 Gbit/s. H100 SXM: 989 TFLOP/s bf16, 1,979 fp8, 3.35 TB/s HBM3, NVLink 4
# 900 GB/s both ways together.
CHIPS = {
    'v5e': dict(flops={'none': 197e12, 'fp8': 197e12}, hbm=819e9, link=200e9),
    'h100': dict(flops={'none': 989e12, 'fp8': 1979e12}, hbm=3.35e12, link=450e9),
}


def roofline(report: dict, chip: str) -> dict:
  """Lower bounds (ms) on the step time from report['cost_per_device'] at `chip`'s peaks."""
  peak, cost = CHIPS[chip], report['cost_per_device']
  bounds = dict(compute_ms=cost['flops'] / peak['flops'][report['quantization']] * 1e3,
                hbm_ms=cost['hbm_gib'] * aot.GIB / peak['hbm'] * 1e3,
                collective_ms=cost['collective_gib'] * aot.GIB / peak['link'] * 1e3)
  return {**{k: round(v, 1) for k, v in bounds.items()}, 'max_ms': round(max(bounds.values()), 1),
          'sum_ms': round(sum(bounds.values()), 1)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', default='configs/dreamzero_14b_droid.py')
  p.add_argument('--chip', choices=sorted(CHIPS), required=True)
  p.add_argument('--mesh', required=True, help="serve.mesh, e.g. tensor=8")
  p.add_argument('--topology', default='', help='a TPU topology (needs libtpu); default: this host\'s devices')
  p.add_argument('--quantization', default='none', choices=('none', 'fp8'))
  args = p.parse_args()
  cfg = load_config(args.config, [f'model.quantization={args.quantization}', f'serve.mesh={args.mesh!r}'])
  report = aot.compile_only(cfg, args.topology)
  keep = ('device', 'topology', 'mesh', 'quantization', 'dit_gib_per_device', 'kv_cache_gib_per_device', 'total_gib',
          'argument_gib', 'temp_gib', 'cost_per_device',
          'xla_cost_analysis', 'compile_s')
  print(json.dumps({**{k: report[k] for k in keep}, 'chip': args.chip, 'roofline': roofline(report, args.chip)}))


if __name__ == '__main__':
  main()
