#!/usr/bin/env bash
# The scaling grid's cell that a 3-hour session of 2 CPU cores cannot finish, on one GPU in one device call of at most
# 10 minutes: width 64 (64, 128, 128 channels, 4.17 M parameters) at 2,000 steps, both arms, seeds 0-2, the six runs
# at once under CUDA MPS (as results/mini-gpu/ ran its ten), each sampled with DDPM-250 (primary) and DDIM-50.
# On 2 idle CPU cores this cell is about 2.7 hours (53 min per seed's pair, measured); on the GPU it is not
# measured yet: the mini-gpu rows (6.07 M parameters, 32x32, batch 128, ten runs at once) trained at 4.7 it/s per
# baseline run on an H100, and this cell's step is about 8x less work (16x16, batch 64).
#
# The cell is trained and measured on the GPU alone (both arms, every seed), so its paired gaps compare models of one
# device; the other cells are the CPU's. Records carry their device, and the report names it per cell.
#
#   OUT=/path/to/out bash experiments/scaling/gpu_call.sh          # on the device machine, from the repository root
#   OUT=/tmp/s TINY=1 bash experiments/scaling/gpu_call.sh         # the same call at smoke scale on a CPU (~2 min)
#
# Then here:  python -m eval.records merge $OUT/records.jsonl    # appends what results/ lacks, refuses other models
#             cp -r $OUT/results/curves/scaling $OUT/results/grids/scaling results/<curves|grids>/ (the new files)
#             python -m experiments.scaling.report
# The device image lacks diffusers, datasets, dill, multiprocess (/work/.library/device/KINDS.md): carry them as
# wheels in .whl/ with results/mini-gpu/device-setup.sh as .whl/setup.sh; this script sources it when present.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/scaling-gpu}
R=${RUNS:-/tmp/scaling-gpu}
LIMIT=${LIMIT:-540}
mkdir -p "$OUT" "$R"
[ -f .whl/setup.sh ] && . .whl/setup.sh
export PYTHONUNBUFFERED=1
T0=$(date +%s)
P=mini-digits16-scaling-c64-steps2000
if [ "${TINY:-0}" = 1 ]; then
  SCALE=smoke JOBS=2
else
  SCALE=mini JOBS=6
  nvidia-cuda-mps-control -d && echo "MPS daemon started"
  timeout 60 python3 -c "import torch; print('cuda ok', torch.zeros(1).cuda().item())" \
    || { echo quit | nvidia-cuda-mps-control; echo "MPS off"; }
fi
{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; git rev-parse HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
# SIGINT at the limit: each worker checkpoints and stops; the same command resumes (and skips what is recorded).
timeout -s INT "$LIMIT" python3 -m experiments.scaling --scale "$SCALE" --seeds 0,1,2 --jobs "$JOBS" --runs-dir "$R" \
  --records "$R/records.jsonl" --progress-every 30 --presets "$P-baseline,$P-conprediff" 2>&1 | grep -v "it/s\]$"
rc=${PIPESTATUS[0]}
echo "finished (exit $rc) at $(( $(date +%s) - T0 )) s"
cp "$R/records.jsonl" "$OUT/" 2>/dev/null
cp -r "$R/logs" "$OUT/" 2>/dev/null
[ -d "$R/results" ] && cp -r "$R/results" "$OUT/"
for f in "$R"/*/mini-digits16-scaling-*/env.json "$R"/mini-digits16-scaling-*/env.json; do
  [ -f "$f" ] && { d=$(basename "$(dirname "$f")"); mkdir -p "$OUT/env/$d"; cp "$f" "$OUT/env/$d/"; }
done
ls -R "$OUT" | head -40
exit "$rc"
