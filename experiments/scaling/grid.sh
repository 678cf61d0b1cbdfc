#!/usr/bin/env bash
# The scaling grid on 2 CPU cores, each stage --jobs 2, cheapest complete cells first: width 32 at 2,000 steps, width 16,
# the 5,000-step continuations of width 32, width 64, and the 12,500-step continuations last (a cell is worth something
# only once both arms of every seed are recorded, and this workplace's run folders do not outlive a 3-hour session).
# Resumable: run it again and every run continues from its last checkpoint, every recorded measurement is skipped.
#   RUNS=/path/to/runs RECORDS=/path/to/records.jsonl bash experiments/scaling/grid.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
RECORDS=${RECORDS:-results/records.jsonl}
P=mini-digits16-scaling
run() { python -m experiments.scaling --scale mini --seeds 0,1,2 --jobs 2 --runs-dir "$RUNS" --records "$RECORDS" \
          --progress-every 300 --presets "$1"; }
run $P-c32-steps2000-baseline,$P-c32-steps2000-conprediff
run $P-c16-steps2000-baseline,$P-c16-steps2000-conprediff
run $P-c32-steps5000-baseline,$P-c32-steps5000-conprediff
run $P-c64-steps2000-baseline,$P-c64-steps2000-conprediff
run $P-c32-steps12500-baseline,$P-c32-steps12500-conprediff
python -m experiments.scaling.report --records "$RECORDS"
