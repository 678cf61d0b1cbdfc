#!/bin/bash
# Step-budget probe: the baseline (seed 0) trained on to 5,000 steps, every checkpoint kept and probed.
cd /work/main && . .venv/bin/activate && export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
run=runs/pilot-long-baseline-s0
[ -d $run ] || { mkdir -p $run && cp -r runs/mini-digits16-baseline-s0/{config.yaml,checkpoints,stats.jsonl} $run/; }
python -m core.train --run-dir $run --set train.steps=5000 --set train.checkpoints_total_limit=10 --allow-config-change
python -m experiments.unconditional.checkpoint_confidence $run --sampler ddim --steps 50 --samples 512 \
    > results/tuning/noclip-probe/steps.jsonl
echo done
