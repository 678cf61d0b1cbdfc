#!/bin/bash
# Follow-up: ancestral DDPM with fewer steps (strided timesteps), same checkpoint and samples as sampler.sh.
cd /work/main && . .venv/bin/activate && export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
python -m experiments.unconditional.checkpoint_confidence runs/mini-digits16-baseline-s0 --checkpoints 2000 \
    --sampler ddpm --steps 250 --samples 512 >> results/tuning/noclip-probe/sampler.jsonl
echo done
