#!/usr/bin/env bash
# One GPU session's prepared checks (bench/RESULTS.md records what each gave, with the date):
#   1. bench/vae_sweep.py: every small-VAE variant trained at once (one process each) on frames
#      exported here (F.npz, default .devdata/qs_frames.npz): held-out PSNR against updates;
#   2. bench/train_step.py: the 14B-width slice (4 layers, DROID sequence) and configs/metaworld.py's
#      policy at its own batch size (the GPU recipe's step);
#   3. bench/policy_latency.py: the 14B DROID control step, DreamZero-Flash (1 Euler step).
# Where the dataset readers and this project's pins are not installed (a lent GPU machine), the wheels
# in .whl are installed to /tmp/site first: made with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl ml-collections==1.1.0 optax==0.2.8 orbax-checkpoint==0.12.8 ftfy wcwidth
# nest_asyncio` (not flax: the machine's 0.12.10 is one that imports under its jax 0.11). The scripts
# import nothing of TFDS or Grain. Logs and tables go to $OUT (default: bench/results/gpu).
#
#   [RUNS="variant@steps ..."] [SKIP_VAE_SWEEP=1] [STEP_TIMEOUT=s] [SKIP_METAWORLD_STEP=1] [LATENCY_TIMEOUT=s] \
#     bash bench/gpu_checks.sh [F.npz] [sweep minutes]
set -uo pipefail
cd "$(dirname "$0")/.."
FRAMES=${1:-.devdata/qs_frames.npz}
MINUTES=${2:-4.5}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ]; then
  rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/device.txt"

if [ -z "${SKIP_VAE_SWEEP:-}" ]; then
echo "== 1. VAE sweep ($MINUTES min per variant, all at once)"
SWEEP=/tmp/vae_sweep
# RUNS: "variant@steps ..." (default: every variant of bench/vae_sweep.py on a 4000-update schedule)
RUNS=${RUNS:-$(python3 -c "import sys; sys.path.insert(0, 'bench'); import vae_sweep; print(' '.join(v + '@4000' for v in vae_sweep.VARIANTS))")}
for run in $RUNS; do
  python3 bench/vae_sweep.py train --frames "$FRAMES" --variant "${run%@*}" --steps "${run#*@}" --eval_every 250 \
    --max_minutes "$MINUTES" --out $SWEEP > "$SWEEP.$run.log" 2>&1 &
done
wait
for run in $RUNS; do tail -n 2 "$SWEEP.$run.log"; done
python3 bench/vae_sweep.py table --out $SWEEP | tee "$OUT/vae_sweep.md"
tar czf "$OUT/vae_sweep_logs.tgz" -C /tmp $(cd /tmp && ls -d vae_sweep.*.log vae_sweep/*/vae_metrics.jsonl vae_sweep/*/result.json 2>/dev/null)
fi

echo "== 2. train step"
{ timeout ${STEP_TIMEOUT:-130} python3 bench/train_step.py --runs 5; \
  [ -n "${SKIP_METAWORLD_STEP:-}" ] || timeout 90 python3 bench/train_step.py --config configs/metaworld.py --batch 16 --runs 10; \
} 2>&1 | tee "$OUT/train_step.log"

echo "== 3. policy latency (14B DROID, Flash)"
[ "${LATENCY_TIMEOUT:-240}" = 0 ] || timeout ${LATENCY_TIMEOUT:-240} python3 bench/policy_latency.py \
  --config.sampler.num_steps=1 --config.sampler.dit_step_mask=1 --config.sampler.kind=euler 2>&1 | tee "$OUT/policy_latency.log"
