#!/usr/bin/env bash
# Train the EAGLE drafter of the default model on a CUDA GPU inside a time budget, with the target's features
# computed inside every step (features=online: no feature store, no disk). A short calibration run (40 steps on
# 400 conversations) measures the median step time (the run's whole time over its steps counted its setup and
# warm-up: 522 ms a step where the real run took 137 ms on an H200); the real run gets the number of steps that
# fits BUDGET_S (the training loop's own time: loading and tokenizing come on top, ~70 s for 11K conversations), so its
# learning-rate schedule runs to its end instead of being cut by the clock (max_time_s stays as a guard).
#     bash benchmarks/eagle_gpu_train.sh OUT_DIR BUDGET_S [key=value ...]   (extra settings go to both runs)
# Result: OUT_DIR/run/final (the drafter), OUT_DIR/calib.log, OUT_DIR/run.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$1"; budget="$2"; shift 2
py="${PYTHON:-python}"
settings=(--recipe eagle-smollm2-cpu features=online feature_dtype=auto progress=false save_steps=1000000 "$@")
"$py" -m specdec.cli train "${settings[@]}" num_conversations=400 max_steps=40 output_dir="$out/calib" \
    > "$out/calib.log" 2>&1 || { tail -30 "$out/calib.log"; exit 1; }
steps=$("$py" - "$out/calib/final/config.json" "$budget" <<'PY'
import json, sys
extra = json.load(open(sys.argv[1]))["extra"]
per_step = extra.get("median_step_s") or extra["train_time_s"] / extra["train_steps"]  # the median: warm steps
print(max(50, int(float(sys.argv[2]) / per_step)))
print(f"calibration: {per_step * 1000:.0f} ms a step", file=sys.stderr)
PY
)
echo "training $steps steps"
"$py" -m specdec.cli train "${settings[@]}" max_steps="$steps" max_time_s="$(( budget + budget / 4 ))" \
    output_dir="$out/run" 2>&1 | tee "$out/run.log"
