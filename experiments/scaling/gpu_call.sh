#!/usr/bin/env bash
# The scaling grid at the mini-gpu setting (experiments.scaling.GPU_GRID: 32x32 digits, batch 128, 2 layers per
# block) on one GPU, in device calls of at most 10 minutes: by default its two cheapest cells, widths 32 and 64
# (1.52 M and 6.07 M parameters) at 1,500 steps, both arms, seeds 0-2, the twelve runs at once under CUDA MPS (as
# results/mini-gpu/ ran its ten), each sampled with DDPM-250 (primary) and DDIM-50. CELLS picks others, e.g.
# CELLS="c128-steps1500" (24.3 M parameters, about 4x a width-64 step) or "c64-steps3750" (continues c64-steps1500).
# Not measured yet: the mini-gpu rows (width 64, ten runs at once) trained at 4.7 it/s per baseline run on an H100,
# so the default cells' training is about 5 minutes; DDPM-250 sampling of 1,000 32x32 images per run is not timed.
# At LIMIT seconds every run checkpoints and stops; calling again on the warm machine resumes (recorded
# measurements are skipped), so a grid longer than one call is a few calls.
#
# The grid is trained and measured on the GPU alone (both arms, every seed), so its paired gaps compare models of one
# device; the CPU grid (16x16, tables/scaling.md) is the CPU's. Its table is tables/scaling-mini-gpu.md.
#
#   OUT=/path/to/out bash experiments/scaling/gpu_call.sh          # on the device machine, from the repository root
#   OUT=/tmp/s TINY=1 bash experiments/scaling/gpu_call.sh         # the same call at smoke scale on a CPU (~2 min)
#
# Then here:  python -m eval.records merge $OUT/records.jsonl    # appends what results/ lacks, refuses other models
#             cp -r $OUT/results/curves/scaling $OUT/results/grids/scaling results/<curves|grids>/ (the new files)
#             python -m experiments.scaling.report                # tables/scaling-mini-gpu.md, figures/scaling-mini-gpu.png
# The device image lacks diffusers, datasets, dill, multiprocess (/work/.library/device/KINDS.md): carry them as
# wheels in .whl/ with results/mini-gpu/device-setup.sh as .whl/setup.sh; this script sources it when present.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/scaling-gpu}
# the smoke call keeps its own runs folder and records: a later real call must not skip what smoke recorded
if [ "${TINY:-0}" = 1 ]; then R=${RUNS:-/tmp/scaling-gpu-smoke}; else R=${RUNS:-/tmp/scaling-gpu}; fi
LIMIT=${LIMIT:-540}
mkdir -p "$OUT" "$R"
[ -f .whl/setup.sh ] && . .whl/setup.sh
export PYTHONUNBUFFERED=1
T0=$(date +%s)
P=mini-gpu-digits32-scaling
CELLS=${CELLS:-c32-steps1500 c64-steps1500}
PRESETS=$(for c in $CELLS; do printf '%s-%s-baseline,%s-%s-conprediff,' "$P" "$c" "$P" "$c"; done)
if [ "${TINY:-0}" = 1 ]; then
  SCALE=smoke JOBS=2
else
  SCALE=mini-gpu JOBS=$(( 6 * $(echo $CELLS | wc -w) ))
  nvidia-cuda-mps-control -d && echo "MPS daemon started"
  timeout 60 python3 -c "import torch; print('cuda ok', torch.zeros(1).cuda().item())" \
    || { echo quit | nvidia-cuda-mps-control; echo "MPS off"; }
fi
{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; git rev-parse HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
# SIGINT at the limit: each worker checkpoints and stops; the same command resumes (and skips what is recorded).
timeout -s INT "$LIMIT" python3 -m experiments.scaling --scale "$SCALE" --seeds 0,1,2 --jobs "$JOBS" --runs-dir "$R" \
  --records "$R/records.jsonl" --progress-every 30 --presets "${PRESETS%,}" 2>&1 | grep -v "it/s\]$"
rc=${PIPESTATUS[0]}
echo "finished (exit $rc) at $(( $(date +%s) - T0 )) s"
cp "$R/records.jsonl" "$OUT/" 2>/dev/null
cp -r "$R/logs" "$OUT/" 2>/dev/null
[ -d "$R/results" ] && cp -r "$R/results" "$OUT/"
for f in "$R"/*/$P-*/env.json "$R"/$P-*/env.json; do
  [ -f "$f" ] && { d=$(basename "$(dirname "$f")"); mkdir -p "$OUT/env/$d"; cp "$f" "$OUT/env/$d/"; }
done
ls -R "$OUT" | head -40
exit "$rc"
