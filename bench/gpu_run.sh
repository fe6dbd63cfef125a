#!/usr/bin/env bash
# The one script to run on a lent GPU machine (see DEVELOPERS.md): installs nothing, trains PRESET for a fixed
# wall-clock budget on the real data while logging evaluator accuracy every EVAL_MINUTES, then samples
# test/new_test with SEEDS seeds and prints the table. Everything small it makes goes under $OUT:
#   metrics.jsonl, curves.png, config.json, evaluation.json, table.txt, environment.txt,
#   model-fp16/ (EMA weights in fp16, safetensors shards of at most 15 MB, loadable by sample.py).
#
#   OUT=/tmp/out PRESET=base MINUTES=8 bash bench/gpu_run.sh            # on the GPU machine
#   OUT=/tmp/out PRESET=tiny MINUTES=0.5 DATA=synthetic bash bench/gpu_run.sh   # CPU rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the results folder}
PRESET=${PRESET:-base}
MINUTES=${MINUTES:-8}
EVAL_MINUTES=${EVAL_MINUTES:-1}
SEEDS=${SEEDS:-5}
BATCH=${BATCH:-128}
LR=${LR:-2e-4}
DATA=${DATA:-../shared/data}
EVALUATOR=${EVALUATOR:-checkpoint.pth}
SAMPLER=${SAMPLER:-ddim}
STEPS=${STEPS:-50}
GUIDANCE=${GUIDANCE:-1.0}
PYTHON=${PYTHON:-python}
RUN=${RUN:-runs/gpu-$PRESET}

mkdir -p "$OUT"
$PYTHON - <<'EOF' | tee "$OUT/environment.txt"
import torch, diffusers, accelerate
print("torch", torch.__version__, "diffusers", diffusers.__version__, "accelerate", accelerate.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF
[ -f "$EVALUATOR" ] || { echo "error: evaluator checkpoint $EVALUATOR not found (carry checkpoint.pth)" >&2; exit 2; }
if [ "$DATA" = synthetic ]; then CONDITIONS="random:32:1 random:32:2"; else CONDITIONS="$DATA/test.json $DATA/new_test.json"; fi

# A long nominal run stopped by --max-minutes: the cosine schedule is sized for STEPS_TOTAL steps.
STEPS_TOTAL=${STEPS_TOTAL:-20000}
$PYTHON train.py --preset "$PRESET" --data-dir "$DATA" --out "$RUN" --batch-size "$BATCH" --lr "$LR" \
  --max-steps "$STEPS_TOTAL" --max-minutes "$MINUTES" --checkpoint-every 2000 --log-every 50 \
  --evaluator "$EVALUATOR" --eval-every-minutes "$EVAL_MINUTES" --eval-conditions $CONDITIONS \
  --eval-sampler "$SAMPLER" --eval-steps "$STEPS" --eval-guidance "$GUIDANCE" --resume latest

$PYTHON evaluate.py --model "$RUN/model" --conditions $CONDITIONS --seeds "$SEEDS" --sampler "$SAMPLER" \
  --steps "$STEPS" --guidance-scale "$GUIDANCE" --evaluator "$EVALUATOR" --data-dir "$DATA" \
  --json "$OUT/evaluation.json" | tee "$OUT/table.txt"

cp "$RUN/metrics.jsonl" "$RUN/curves.png" "$RUN/config.json" "$OUT/"
$PYTHON export.py "$RUN/model" "$OUT/model-fp16" --sampler "$SAMPLER" --steps "$STEPS" --guidance-scale "$GUIDANCE" \
  --max-shard-mb 15
echo "accuracy vs training minutes:" | tee -a "$OUT/table.txt"
$PYTHON - "$RUN/metrics.jsonl" <<'EOF' | tee -a "$OUT/table.txt"
import json, sys
for record in map(json.loads, open(sys.argv[1])):
    scores = {k[4:]: v for k, v in record.items() if k.startswith("acc_")}
    if scores:
        print(f"  {record['train_minutes']:6.2f} min  step {record['step']:6d}  " +
              "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
EOF
