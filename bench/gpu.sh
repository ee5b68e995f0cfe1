#!/usr/bin/env bash
# Everything a GPU run must measure, in one command (about 10 minutes on one H100, compiles included),
# most important first, so that a run cut short has already written the figures that matter:
#   a. kernels_check   python -m dreamzero_jax.kernels.check: every Pallas kernel against its reference
#   b. dit_forward     bench/kernels_gpu.py --dit: the 14B DiT cached forward at the DROID inference
#                      shape, bf16 and fp8, B=1 and 2, beside bench/torch_dit_peer.py (eager and
#                      torch.compile) in the same run, with the ratio
#   c. control_step    bench/policy_latency.py --ticks 12: the 14B DROID control step, quality (16-step
#                      UniPC, DiT on 8 steps, CFG 5) and Flash (1 Euler step), bf16 and fp8: p50/p99
#                      over 12 ticks after 2 warm-up ticks, device memory in use and peak
#   d. train_step      bench/train_step.py: the 14B-width slice (4 layers, DROID sequence, its real mask)
#   e. kernels_table   bench/kernels_gpu.py: each kernel vs XLA vs the unfused path
#   f. metaworld_step  bench/train_step.py --config configs/metaworld.py --batch 16: the GPU recipe's step
#   g. vae_sweep       (only with --vae_sweep F.npz) bench/vae_sweep.py: every small-VAE variant at once
# Each part writes NAME.md (its table) and NAME.json (tables parsed, JSON lines, versions, seconds)
# under bench/results/gpu/<device>-<date>/ as soon as it ends (bench/gpu_part.py); summary.md lists
# each part's status and time. A part past its timeout (PART_TIMEOUT_<NAME>=s) is stopped and recorded.
#
# A bare GPU machine lacks this project's pins: the wheels in $WHEELS (default .whl) are installed to
# /tmp/site first. Make them on a machine with network with `bash bench/gpu.sh --wheels`.
#
#   bash bench/gpu.sh [--smoke] [--vae_sweep F.npz [minutes]]
#   --smoke: the same parts on the CPU with tiny configs (tests/test_gpu_smoke.py runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
if [ "${1:-}" = --wheels ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" ml-collections==1.1.0 optax==0.2.8 orbax-checkpoint==0.12.8 ftfy wcwidth nest_asyncio
  exit $?
fi
SMOKE=0 VAE_FRAMES= VAE_MINUTES=4.5
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; shift ;;
    --vae_sweep) VAE_FRAMES=$2; shift 2; case "${1:-}" in [0-9]*) VAE_MINUTES=$1; shift ;; esac ;;
    *) echo "bench/gpu.sh: unknown argument $1 (known: --smoke, --vae_sweep F.npz [minutes], --wheels)" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
elif [ -d "$WHEELS" ]; then
  rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
T0=$(date +%s)
DEVICE=$(python3 -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '-'))") || exit 1
OUT=${OUT_DIR:-bench/results/gpu/$DEVICE-$(date -u +%F)$([ "$SMOKE" = 1 ] && echo -smoke)}
mkdir -p "$OUT"
python3 bench/gpu_part.py versions "$OUT" || exit 1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  > "$OUT/nvidia_smi.txt"
echo "| part | status | seconds |" > "$OUT/summary.md"
echo "|---|---|---|" >> "$OUT/summary.md"
FAILED=0

part() {  # part NAME DEFAULT_TIMEOUT CMD...
  local name=$1 limit=$2 var="PART_TIMEOUT_${1^^}"
  shift 2
  python3 bench/gpu_part.py run "$OUT" "$name" "${!var:-$limit}" -- "$@"
  local rc=$?
  [ $rc = 0 ] || FAILED=$((FAILED + 1))
  python3 -c "import json; r = json.load(open('$OUT/$name.json')); \
print(f\"| {r['part']} | {'ok' if r['rc'] == 0 else 'exit %d' % r['rc']} | {r['seconds']} |\")" >> "$OUT/summary.md"
}

LATENCY="bench/policy_latency.py --ticks 12"
FLASH="--config.sampler.num_steps=1 --config.sampler.dit_step_mask=1 --config.sampler.kind=euler"
if [ "$SMOKE" = 1 ]; then
  part kernels_check 300 python3 -m dreamzero_jax.kernels.check --interpret
  part dit_forward 300 python3 bench/kernels_gpu.py --dit --interpret --repeats 1
  part control_step 300 python3 $LATENCY --config configs/tiny.py --config.model.quantization=fp8 $FLASH
  part train_step 300 python3 bench/train_step.py --runs 1
  part kernels_table 300 python3 bench/kernels_gpu.py --interpret --repeats 1
  part metaworld_step 300 python3 bench/train_step.py --config configs/metaworld.py --layers 1 --batch 16 --runs 1
else
  part kernels_check 120 python3 -m dreamzero_jax.kernels.check
  part dit_forward 200 python3 bench/kernels_gpu.py --dit --repeats 10
  part control_step_bf16 150 python3 $LATENCY --config.model.quantization=none
  part control_step_fp8 150 python3 $LATENCY --config.model.quantization=fp8
  part control_step_flash_bf16 100 python3 $LATENCY --config.model.quantization=none $FLASH
  part control_step_flash_fp8 100 python3 $LATENCY --config.model.quantization=fp8 $FLASH
  part train_step 130 python3 bench/train_step.py --runs 5
  part kernels_table 90 python3 bench/kernels_gpu.py
  part metaworld_step 90 python3 bench/train_step.py --config configs/metaworld.py --batch 16 --runs 10
  if [ -n "$VAE_FRAMES" ]; then
    RUNS=${RUNS:-$(python3 -c "import sys; sys.path.insert(0, 'bench'); import vae_sweep; \
print(' '.join(v + '@4000' for v in vae_sweep.VARIANTS))")}
    SWEEP=/tmp/vae_sweep
    for run in $RUNS; do
      python3 bench/vae_sweep.py train --frames "$VAE_FRAMES" --variant "${run%@*}" --steps "${run#*@}" \
        --eval_every 250 --max_minutes "$VAE_MINUTES" --out $SWEEP > "$SWEEP.$run.log" 2>&1 &
    done
    wait
    part vae_sweep 60 python3 bench/vae_sweep.py table --out $SWEEP
  fi
fi
echo "total $(( $(date +%s) - T0 )) s, $FAILED part(s) failed" >> "$OUT/summary.md"
cat "$OUT/summary.md"
[ $FAILED = 0 ]
