#!/usr/bin/env bash
# The GPU measurements of issues 19 and 30 in one go, about 3-6 minutes on one H200 (at most 12: every step has a
# timeout), in the order of what is least measured:
#   1. issue 30, old against new in one process, variants alternated (benchmarks/context_ab.py): exact W2 with the
#      torch subset DP vs the fused Triton kernel (with their agreement), the decoder's noise draw before vs now
#      (bitwise agreement), the context term forward + backward (old, new, new with the split weight gradient), a
#      whole LDM-4 training step (baseline, old, new), and torch.profiler's top kernels of the context term;
#   2. the context decoder's matrix products one by one, forward and backward (benchmarks/decoder_bmm.py);
#   3. a training step at the LDM-4 CelebA-HQ config (64x64x3 latents, batch 48), baseline vs ConPreDiff, bf16,
#      and the same at the text-to-image config (32x32x4 latents + 77x768 text states, batch 32 of the global 256),
#      with torch.profiler tables of one step of each variant (where the context term's time goes);
#   4. exact W2 at K = 8, 16, 24, 32, 48 (the ring pattern at strides 1-4, and 6), D = 3, N = 196,608 sets:
#      SciPy's loop vs the batched shortest augmenting path (w2_exact "jv"), the subset DP (K = 8) and
#      torch-linear-assignment if installed.
# Outputs go under $OUT (default benchmarks/gpu/): env.txt, context_ab.md, context_profile.md, decoder_bmm.md,
# paper_scale_bf16.{md,json}, profile_bf16.md, w2_exact.md, and each step's log.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine
#   bash benchmarks/gpu_session.sh --only-new # steps 1 and 2 only (issue 30), about 2-4 minutes
#   bash benchmarks/gpu_session.sh --tiny     # the same steps, tiny, on a CPU in about a minute (tests/test_benchmarks.py;
#                                             # the fused kernel through Triton's interpreter)
#
# The device image has torch, triton, scipy, accelerate, transformers but not diffusers, datasets, dill or
# multiprocess (/work/.library/device/KINDS.md). Carry them as wheels in .whl/ (Python 3.12, manylinux), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0 \
#     torch-linear-assignment==0.1.0
# and this script installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

TINY=0 ONLY_NEW=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    --only-new) ONLY_NEW=1 ;;
    *) echo "unknown argument $arg (allowed: --tiny, --only-new)"; exit 2 ;;
  esac
done
if [ "$TINY" = 1 ]; then
  DEVICE=cpu LIMIT_W2=120 LIMIT_STEP=180 LIMIT_AB=240 LIMIT_BMM=60
  W2=(--n 256 --k 24,48 --d 3 --repeats 1 --loop-n 64 --threads 1)
  STEP=(--tiny --steps 1 --warmup 0 --threads 1)
  AB=(--dry-run --threads 1 --profile-rows 8) AB_ENV=(env TRITON_INTERPRET=1)
  BMM=(--sizes small --repeats 1 --warmup 0 --threads 1)
else
  DEVICE=cuda LIMIT_W2=150 LIMIT_STEP=270 LIMIT_AB=300 LIMIT_BMM=90
  W2=(--n 196608 --k 8,16,24,32,48 --d 3 --repeats 3 --loop-n 16384 --warm)
  STEP=(--steps 8 --warmup 3 --batch 'paper-celebahq256-*=48,paper-coco256-*=32')
  AB=(--repeats 8 --warmup 2) AB_ENV=()
  BMM=(--sizes ldm4 --dtype bf16 --repeats 10 --warmup 3)
fi

failed=0
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, stop it after SECONDS, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then echo "!! $name failed (rc $rc)"; failed=1; fi
}

{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
run context_ab "$LIMIT_AB" "${AB_ENV[@]}" "$PY" benchmarks/context_ab.py --device "$DEVICE" --precision bf16 "${AB[@]}" \
  --markdown "$OUT/context_ab.md" --profile "$OUT/context_profile.md"
run decoder_bmm "$LIMIT_BMM" "$PY" benchmarks/decoder_bmm.py --device "$DEVICE" "${BMM[@]}" --markdown "$OUT/decoder_bmm.md"
if [ "$ONLY_NEW" = 1 ]; then echo "outputs in $OUT:"; ls -l "$OUT"; exit $failed; fi
run paper_scale_bf16 "$LIMIT_STEP" "$PY" benchmarks/paper_scale.py --device "$DEVICE" --precision bf16 "${STEP[@]}" \
  --presets 'paper-celebahq256-ldm4-baseline,paper-celebahq256-conprediff,paper-coco256-*' \
  --markdown "$OUT/paper_scale_bf16.md" --json "$OUT/paper_scale_bf16.json" --profile "$OUT/profile_bf16.md"
run w2_exact "$LIMIT_W2" "$PY" benchmarks/w2_solvers.py --exact --device "$DEVICE" "${W2[@]}"
grep '^|' "$OUT/w2_exact.log" > "$OUT/w2_exact.md" 2>/dev/null
echo "outputs in $OUT:"; ls -l "$OUT"
exit $failed
