#!/usr/bin/env bash
# The main job end to end on generated i-CLEVR-like scenes (no course files needed), in one run folder:
#   1. render synthetic scenes           -> RUN/data/ (course layout: iclevr/, train.json, test.json, ...)
#   2. train a course-format evaluator   -> RUN/evaluator.pth
#   3. train the cpu-preset DDPM         -> RUN/model/, RUN/metrics.jsonl, RUN/curves.png
#   4. sample the two grids + process    -> RUN/samples/
#   5. score them with 3 seeds           -> RUN/evaluation.json (and the table on screen)
# About 13 minutes on a 2-core laptop CPU: it proves the whole job runs; accuracy needs longer training
# (docs/RESULTS.md). Give the course data instead with DATA=path/to/data.
#
#   bash demo.sh [RUN]          (RUN defaults to runs/demo)
set -euo pipefail
cd "$(dirname "$0")"
RUN=${1:-runs/demo}
DATA=${DATA:-}
SCENES=${SCENES:-2000}
EVALUATOR_EPOCHS=${EVALUATOR_EPOCHS:-3}
DDPM_MINUTES=${DDPM_MINUTES:-6}

mkdir -p "$RUN"
if [ -z "$DATA" ]; then
  DATA=$RUN/data
  [ -f "$DATA/train.json" ] || python synthetic.py --out "$DATA" --scenes "$SCENES"
fi
[ -f "$RUN/evaluator.pth" ] || python evaluator.py train --data-dir "$DATA" --out "$RUN/evaluator.pth" \
  --epochs "$EVALUATOR_EPOCHS"
python train.py --preset cpu --data-dir "$DATA" --out "$RUN" --resume latest --max-minutes "$DDPM_MINUTES" \
  --max-steps 450 --batch-size 32 --lr 1e-3 --evaluator "$RUN/evaluator.pth" --eval-every-minutes 3 \
  --eval-conditions "$DATA/test.json" "$DATA/new_test.json"
python sample.py --model "$RUN/model" --conditions "$DATA/test.json" "$DATA/new_test.json" --sampler ddim \
  --steps 25 --process --out "$RUN/samples"
python evaluate.py --model "$RUN/model" --conditions "$DATA/test.json" "$DATA/new_test.json" --seeds 3 \
  --sampler ddim --steps 25 --evaluator "$RUN/evaluator.pth" --data-dir "$DATA" --json "$RUN/evaluation.json"
echo "grids: $RUN/samples/*/grid.png  process: $RUN/samples/process.png  curves: $RUN/curves.png"
