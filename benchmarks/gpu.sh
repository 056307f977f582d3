#!/usr/bin/env bash
# The GPU checks of issues 16 and 27 on one GPU, at most 12 minutes (the sum of the step timeouts;
# about 7 on an H200):
#   bash benchmarks/carry_deps.sh                 # once, where Hydra is installed
#   OUT=/some/dir bash benchmarks/gpu.sh          # on the GPU machine, from the repo root
# 1. python -m benchmarks.training, resnet50 224 px batch 256 bf16: bare loop / Lightning / train.py
# 2. python train.py with the GPU defaults (auto: bf16, cuDNN autotuning, workers, pinned memory)
# 3. python -m benchmarks.training, mobilenet_v3_large + fpn (trainer=gpu: 64 px, batch 256)
# 4. python train.py compile=true (resnet18): the compile warm-up
# 5. python train.py data=imagefolder, resnet50 224 px, on a generated folder of ImageNet-like
#    JPEGs (benchmarks.loader's photographs, hard-linked to FOLDER_FILES files): one epoch with
#    the JPEGs decoded in the workers, one with data.decode=device (nvJPEG); compare their
#    train img/s with step 1's bare loop
# Each step runs under its own timeout and the script goes on when one fails. $OUT (default
# ./gpu_out) gets at most 8 files: summary.txt (read this), logs.txt (each step's last lines)
# and each benchmark's table (.md) and plot (.png). Knobs (environment), for trying it on CPU:
# PYTHON, R50, MBV3 (bench overrides), BENCH_FLAGS, TRAIN_ARGS, COMPILE_ARGS, FOLDER_FILES,
# FOLDER_PHOTOS (distinct photographs per class, 8 classes), FOLDER_ARGS, EXTRA (appended to
# every train.py and bench command), T_BENCH_R50, T_TRAIN, T_BENCH_MBV3, T_COMPILE, T_JPEGS
# (seconds).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
PYTHON=${PYTHON:-python3}
R50=${R50:-backbone=resnet50 data.image_size=224 trainer=gpu}
MBV3=${MBV3:-backbone=mobilenetv3 head=fpn trainer=gpu}
BENCH_FLAGS=${BENCH_FLAGS:---rounds 2 --warmup 3 --steps 12}
TRAIN_ARGS=${TRAIN_ARGS:-trainer.max_epochs=2}
COMPILE_ARGS=${COMPILE_ARGS:-compile=true trainer.max_epochs=1}
FOLDER_FILES=${FOLDER_FILES:-20000}
FOLDER_PHOTOS=${FOLDER_PHOTOS:-32}
FOLDER_ARGS=${FOLDER_ARGS:-backbone=resnet50 data.image_size=224 trainer=gpu trainer.max_epochs=1 pictures=false test_after_fit=false}
EXTRA=${EXTRA:-}
export PYTHONPATH=".:.carry${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
summary=$OUT/summary.txt
logs=$OUT/logs.txt
: >"$summary"
: >"$logs"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

say() { echo "$*" | tee -a "$summary"; }

# step NAME SECONDS COMMAND...: run under a timeout; rc, time and the last lines go to the logs
step() {
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name: $*" >>"$logs"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$scratch/$name.log" 2>&1
  rc=$?
  tail -n 40 "$scratch/$name.log" | cut -c1-300 >>"$logs"
  local note=""
  [[ $rc -eq 124 || $rc -eq 137 ]] && note=" (timed out after $limit s)"
  say "-- $name: exit $rc in $(($(date +%s) - start)) s$note"
  return 0
}

# the lines of a step's log worth reading in the summary
results() { grep -E "$2" "$scratch/$1.log" | grep -v "^Epoch" | cut -c1-300 | tee -a "$summary"; }

say "# issue 16 GPU checks, $(date -u +%FT%TZ)"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    echo "nvidia-smi: none"
  echo "cpus: $(nproc); /dev/shm: $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $4 " free of " $2}')"
  "$PYTHON" -c "import sys, torch, lightning, hydra, omegaconf; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported(), 'lightning', lightning.__version__, 'hydra', hydra.__version__)" 2>&1 | tail -1
} | tee -a "$summary"
# shellcheck disable=SC2086 # the knobs are lists of words
{
  step bench_resnet50 "${T_BENCH_R50:-160}" "$PYTHON" -m benchmarks.training --out "$OUT" \
    --name bench_resnet50 --setup "resnet50: $R50 $EXTRA" $BENCH_FLAGS
  results bench_resnet50 "^\| (setup|resnet50)|^- (cuda|cpu)|medians of the rounds"
  step train_defaults "${T_TRAIN:-80}" "$PYTHON" train.py $TRAIN_ARGS $EXTRA
  results train_defaults "best val|fit:|error"
  step bench_mobilenetv3_fpn "${T_BENCH_MBV3:-90}" "$PYTHON" -m benchmarks.training --out "$OUT" \
    --name bench_mobilenetv3_fpn --setup "mobilenetv3 + fpn: $MBV3 $EXTRA" $BENCH_FLAGS
  results bench_mobilenetv3_fpn "^\| (setup|mobilenetv3)|medians of the rounds"
  step train_compile "${T_COMPILE:-120}" "$PYTHON" train.py $COMPILE_ARGS $EXTRA
  results train_compile "best val|fit:|compile warm-up|error"
  step make_jpegs 60 "$PYTHON" -c "import sys; from pathlib import Path; \
from benchmarks.loader import make_folder, make_tree; \
make_tree(Path(sys.argv[1], 'tree'), make_folder(Path(sys.argv[1], 'photos'), 8, int(sys.argv[3])), int(sys.argv[2]))" \
    "$scratch/jpegs" "$FOLDER_FILES" "$FOLDER_PHOTOS"
  for decode in worker device; do
    step "jpegs_decode_$decode" "${T_JPEGS:-120}" "$PYTHON" train.py data=imagefolder \
      data.root="$scratch/jpegs/tree" data.decode=$decode $FOLDER_ARGS $EXTRA
    results "jpegs_decode_$decode" "fit:|error"
  done
}
say "files: $(cd "$OUT" && ls | tr '\n' ' ')"
