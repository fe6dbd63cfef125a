#!/usr/bin/env bash
# The one command for a lent GPU machine (docs/RESULTS.md, "A lent GPU"). It needs only the checkout and the
# bundle that `python bench/gpu_bundle.py --preset PRESET` made (carry it: it holds the data and the wheels the
# machine lacks); no ../shared, no evaluator (accuracy is measured back on the CPU box, on the usual yardstick).
# It installs the carried wheels, trains PRESET for MINUTES of wall time at a GPU-sized batch, and leaves in $OUT
# at most 8 files of under 16 MiB each, 64 MiB together (what the device tool brings back):
#   model.tar.part-aa, -ab, ...  the exported model folder (fp16 EMA weights, configs, sampling.json, manifest),
#                                a tar split into at most 4 parts of 15 MiB;
#   or samples.tar               where the model is bigger than that (`seed`: 228 MB in fp16): sample.py's folders
#                                for the bundle's conditions/ (held-out draw, test files), seeds 0-2, drawn here
#                                with the model's stored settings, for the evaluator back on the CPU box
#   metrics.jsonl, curves.png    train.py's own (loss, conditioning meter, images/s, GPU memory)
#   summary.txt                  one screen: images/s, images seen, GPU memory, what came back
# Back on the CPU box: bash bench/gpu_import.sh FILES_AT runs/gpu/model
#
#   OUT=/tmp/out bash bench/gpu_run.sh                                            # on the GPU machine
#   OUT=/tmp/out INIT=pretrained/iclevr-tokens COMPOSITES=6000 SEED=3 LR=3e-4 MINUTES=7.5 bash bench/gpu_run.sh
#                                    # fine-tune the shipped model (run r13, the eighth shipped model: docs/RESULTS.md)
#   OUT=/tmp/out PRESET=tiny-tokens MINUTES=0.5 BATCH=8 bash bench/gpu_run.sh     # CPU rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the results folder}
BUNDLE=${BUNDLE:-gpu-bundle}
PRESET=${PRESET:-tokens-wide}     # the shipped model's preset; its bundle is the same as tokens' (32x32)
MODEL_OPTIONS=${MODEL_OPTIONS:-}   # e.g. "--model-option block_out_channels=[96,192,384]"
MINUTES=${MINUTES:-9}
INIT=${INIT:-}                     # a model folder to start from (train.py --init), e.g. pretrained/iclevr-tokens
COMPOSITES=${COMPOSITES:-0}        # train.py --composite-scenes: 4-object scenes pasted from the data's own
SEED=${SEED:-0}
# Batch 256 is 8x the CPU recipe's 32; the learning rate grows with its square root (the usual scaling for Adam):
# 5e-4 x sqrt(8) = 1.4e-3 for the token presets, and the report's 1e-4 x sqrt(8) = 2.8e-4 for its own model,
# `seed`. Constant after warm-up: the run's length is set by the clock, and EMA averages.
BATCH=${BATCH:-256}
if [ "$PRESET" = seed ]; then LR=${LR:-2.8e-4}; else LR=${LR:-1.4e-3}; fi
RETURN_MIB=${RETURN_MIB:-60}      # 4 parts of 15 MiB: 64 MiB come back in all, with metrics, curves, summary
PYTHON=${PYTHON:-python3}
RUN=${RUN:-/tmp/gpu-run}

[ -f "$BUNDLE/data/train.json" ] || { echo "error: $BUNDLE/data/train.json not found: make the bundle with python bench/gpu_bundle.py and carry it" >&2; exit 2; }
if compgen -G "$BUNDLE/wheels/*.whl" > /dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$BUNDLE"/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT"
rm -rf "$RUN"
# whatever happens below, the curves so far come back
trap 'cp "$RUN/metrics.jsonl" "$RUN/curves.png" "$OUT/" 2>/dev/null || true' EXIT

# shellcheck disable=SC2086  # MODEL_OPTIONS is a list of flags
$PYTHON train.py --preset "$PRESET" $MODEL_OPTIONS --data-dir "$BUNDLE/data" --out "$RUN" --batch-size "$BATCH" \
  --lr "$LR" --warmup-steps 200 --lr-schedule constant --ema-decay 0.9995 --prediction-type v_prediction \
  --max-steps 1000000 --max-minutes "$MINUTES" --checkpoint-every 1000000 --meter-every 200 --log-every 50 \
  --resume latest --seed "$SEED" --composite-scenes "$COMPOSITES" ${INIT:+--init "$INIT"}

# the shipped model's sampling settings (its sampling.json)
$PYTHON export.py "$RUN/model" "$RUN/export" --sampler ddim --steps 20 --guidance-scale 3 --precision bf16
tar -C "$RUN" -cf "$RUN/model.tar" export
if [ "$(stat -c %s "$RUN/model.tar")" -le $((RETURN_MIB * 1048576)) ]; then
  split -b 15M "$RUN/model.tar" "$OUT/model.tar.part-"
else
  for seed in 0 1 2; do
    $PYTHON sample.py --model "$RUN/export" --conditions "$BUNDLE"/conditions/*.json --seed "$seed" \
      --out "$RUN/samples/seed-$seed"
  done
  tar -C "$RUN" -cf "$OUT/samples.tar" samples
fi
cp "$RUN/metrics.jsonl" "$RUN/curves.png" "$OUT/"
$PYTHON - "$RUN" "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, statistics, sys
run, out = sys.argv[1:]
records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
losses = [r for r in records if "loss" in r]
config = json.load(open(f"{run}/config.json"))
steps = losses[-1]["step"] if losses else 0
print(f"preset {config['preset']} {config['model_option']}, {config['parameters'] / 1e6:.1f}M parameters, "
      f"precision {config['precision_used']}, batch {config['batch_size']}, lr {config['lr']}")
print(f"steps {steps}, images seen {steps * config['images_per_step']}, "
      f"training minutes {losses[-1]['train_minutes'] if losses else 0:.2f}")
print(f"images/s (median of the logged intervals) {statistics.median(r['images_per_s'] for r in losses) if losses else 0:.0f}")
memory = [r["gpu_memory_gb"] for r in records if "gpu_memory_gb" in r]
print(f"GPU memory, peak allocated: {max(memory):.1f} GB" if memory else "GPU memory: no GPU")
meter = [r for r in records if "meter_share" in r]
if meter:
    print(f"conditioning meter at step {meter[-1]['step']}: share {meter[-1]['meter_share']:.3f}, "
          f"held-out loss {meter[-1]['meter_loss']:.5f}")
if os.path.exists(f"{out}/samples.tar"):
    print(f"the model ({os.path.getsize(f'{run}/model.tar') / 2**20:.0f} MiB) is too big to come back: "
          f"samples.tar holds its images for the bundle's conditions, seeds 0-2")
files = sorted(set(os.listdir(out)) | {"summary.txt"})  # tee has made summary.txt already, empty
sizes = [os.path.getsize(os.path.join(out, f)) for f in files if f != "summary.txt"]
print(f"files in OUT: {len(files)}, largest {max(sizes) / 2**20:.1f} MiB, {sum(sizes) / 2**20:.1f} MiB together")
EOF
