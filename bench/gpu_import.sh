#!/usr/bin/env bash
# Back on the CPU box: turn what bench/gpu_run.sh brought back from a GPU machine into a model folder (its manifest
# is checked on loading), add the learned upsampler where the model denoises below its output size, and score it
# with the project's evaluator, 3 seeds, like every other model (docs/RESULTS.md, "A lent GPU"). A model too big to
# come back (`seed`) brought its samples instead (samples.tar): those are scored, on the same yardstick.
#
#   bash bench/gpu_import.sh FILES_AT runs/gpu/model
#   SCORE=0 UPSAMPLER_FROM= bash bench/gpu_import.sh FILES_AT runs/gpu/model      # unpack only
set -euo pipefail
cd "$(dirname "$0")/.."
IN=${1:?give the folder that the files of the GPU run came back to}
MODEL=${2:-runs/gpu/model}
DATA=${DATA:-../shared/data}
EVALUATOR=${EVALUATOR:-../shared/evaluator/checkpoint.pth}
UPSAMPLER_FROM=${UPSAMPLER_FROM-pretrained/iclevr-tokens}  # a learned upsampler depends on the images only
SCORE=${SCORE:-1}
PYTHON=${PYTHON:-python}

unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
if [ -f "$IN/samples.tar" ]; then
  tar -C "$unpacked" -xf "$IN/samples.tar"
  mkdir -p "$(dirname "$MODEL")"
  $PYTHON evaluate.py --samples "$unpacked"/samples/seed-*/* --evaluator "$EVALUATOR" --data-dir "$DATA" \
    --json "$(dirname "$MODEL")/evaluation.json"
  echo "the model was too big to come back: its samples were scored; no model folder"
  exit 0
fi
compgen -G "$IN/model.tar.part-*" > /dev/null || { echo "error: $IN holds neither model.tar.part-* nor samples.tar (was it a bench/gpu_run.sh run?)" >&2; exit 2; }
cat "$IN"/model.tar.part-* > "$unpacked/model.tar"
tar -C "$unpacked" -xf "$unpacked/model.tar"
mkdir -p "$(dirname "$MODEL")"
rm -rf "$MODEL"
mv "$unpacked/export" "$MODEL"
below=$($PYTHON -c "import sys; from model import load_pipeline; u = load_pipeline(sys.argv[1]).unet; print(int(u.denoising_size < u.config.image_size))" "$MODEL")
if [ "$below" = 1 ] && [ -n "$UPSAMPLER_FROM" ]; then
  $PYTHON upsampler.py "$MODEL" --from "$UPSAMPLER_FROM" --data-dir "$DATA"
fi
if [ "$SCORE" != 0 ]; then
  $PYTHON evaluate.py --model "$MODEL" --conditions "$DATA/test.json" "$DATA/new_test.json" random:96:5 --seeds 3 \
    --evaluator "$EVALUATOR" --data-dir "$DATA" --json "$(dirname "$MODEL")/evaluation.json"
fi
echo "model folder: $MODEL"
