. .whl/setup.sh
T0=$(date +%s)
nvidia-cuda-mps-control -d && echo "MPS daemon started"
timeout 60 python3 -c "import torch; print('cuda ok', torch.zeros(1).cuda().item())" || { echo quit | nvidia-cuda-mps-control; echo "MPS off"; }
R=/tmp/g
timeout -s INT 545 python3 -m experiments.unconditional --scale mini-gpu --seeds 0,1,2,3,4 --jobs 10 --runs-dir $R --records $R/records.jsonl 2>&1 | grep -v "it/s\]$"
echo "finished at $(( $(date +%s) - T0 )) s"
mkdir -p $OUT/g; cp $R/records.jsonl $OUT/g/
tar czf $OUT/g/runs.tgz -C $R logs $(cd $R && ls -d results tables mini-gpu-*/stats.jsonl mini-gpu-*/config.yaml mini-gpu-*/grid.png mini-gpu-*/env.json 2>/dev/null)
