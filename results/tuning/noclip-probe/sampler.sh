#!/bin/bash
# Sampler probe: does the sampler, not the model, keep the baseline below 0.80 confident_digits?
cd /work/main && . .venv/bin/activate && export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
out=results/tuning/noclip-probe/sampler.jsonl
for spec in "ddim 50" "ddim 100" "ddim 250" "ddpm 1000"; do
  set -- $spec
  python -m experiments.unconditional.checkpoint_confidence runs/mini-digits16-baseline-s0 --checkpoints 2000 \
      --sampler $1 --steps $2 --samples 512 >> $out
done
echo done
