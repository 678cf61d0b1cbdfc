cd /work/main && . .venv/bin/activate
R=runs/ml; REC=results/tuning/mini-long-ddpm/records.jsonl
T0=$(date +%s)
python -m experiments.unconditional --scale mini-long --presets mini-long-digits16-baseline --seeds 0,1 --jobs 2 --runs-dir $R --records $REC
python -m experiments.unconditional --scale mini-long --presets mini-long-digits16-baseline --seeds 2 --runs-dir $R --records $REC --shared-device
echo "training + DDIM-50 evaluation: $(( $(date +%s) - T0 )) s"
for s in 0 1 2; do
  python -m experiments.unconditional.checkpoint_confidence $R/mini-long-digits16-baseline-s$s --checkpoints 5000 --sampler ddpm --steps 250 --samples 1000
done
echo "total: $(( $(date +%s) - T0 )) s"
