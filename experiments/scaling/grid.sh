#!/usr/bin/env bash
# The scaling grid on 2 CPU cores, cheapest complete cells first: width 32 at 2,000 steps, width 16, the 5,000-step
# continuations of width 32, width 64, and the 12,500-step continuations last. Within a cell, one seed at a time with
# its two arms side by side (--jobs 2, a core each): a seed's pair is the unit a paired gap needs, so an interruption
# loses at most one pair in progress, and a 3-hour session (this workplace's run folders do not outlive one) lands
# whole pairs. Minutes per pair on 2 idle cores, measured: width 16 ~12, width 32 ~25 at 2,000 steps and ~49 at 5,000,
# width 64 ~53 (26 training, 16 of DDPM-250 sampling); 12,500 steps ~78 (retraining its 2,000 -> 5,000 chain first).
# Resumable: run it again and every run continues from its last checkpoint, every recorded measurement is skipped
# (a 5,000- or 12,500-step run whose shorter run's folder is gone retrains it first: continued = trained straight).
#   RUNS=/path/to/runs RECORDS=/path/to/records.jsonl bash experiments/scaling/grid.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
RECORDS=${RECORDS:-results/records.jsonl}
P=mini-digits16-scaling
cell() {
  for seed in 0 1 2; do
    python -m experiments.scaling --scale mini --seeds "$seed" --jobs 2 --runs-dir "$RUNS" --records "$RECORDS" \
      --progress-every 300 --presets "$P-$1-baseline,$P-$1-conprediff"
  done
}
cell c32-steps2000
cell c16-steps2000
cell c32-steps5000
cell c64-steps2000
cell c32-steps12500
python -m experiments.scaling.report --records "$RECORDS"
