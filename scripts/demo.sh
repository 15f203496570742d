#!/usr/bin/env bash
# `make demo`: the whole product on the built-in synthetic CelebA, on CPU, in a few minutes:
#   synth (Kaggle archive.zip layout) -> shard (32 px) -> verify + preview -> train -> sample.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-demo}
COUNT=${DEMO_COUNT:-2000}
STEPS=${DEMO_STEPS:-}
export WANDB_MODE=${WANDB_MODE:-offline}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 2)}
facegan() { "$PY" -m facegan_dist "$@"; }

echo "== 1/5 synth: $COUNT cartoon faces in the Kaggle CelebA layout (archive.zip)"
facegan synth --out "$DEMO_DIR/celeba" --count "$COUNT" --seed 0 --layout kaggle --zip

echo "== 2/5 shard: crop + resize to 32 px once, WebDataset tars + manifest.json"
facegan shard "$DEMO_DIR/celeba/archive.zip" --out "$DEMO_DIR/shards32" --size 32 --shard-size 500

echo "== 3/5 verify: re-hash and re-count every shard"
facegan verify "$DEMO_DIR/shards32"
facegan preview "$DEMO_DIR/shards32" --out "$DEMO_DIR/shards32-contact-sheet.png"

echo "== 4/5 train: DCGAN, the default preset (quality) at demo size: widths 32, batch 64 (W&B offline)"
facegan train --data "$DEMO_DIR/shards32" --out "$DEMO_DIR/run" --preset quality --resume auto \
  --g-width 32 --d-width 32 --batch 64 --num-workers 1 --max-steps "${STEPS:-3000}"

echo "== 5/5 sample: a grid of seeds 0-63 and two interpolation strips from the EMA generator"
facegan sample "$DEMO_DIR/run" --out "$DEMO_DIR/samples" --grid 8x8 --interpolate 0-1,2-3 --steps 8

echo "== results"
last_grid=$(ls "$DEMO_DIR"/run/samples/fixed-*.png | tail -n 1)
wandb_run=$(ls -d "$DEMO_DIR"/run/wandb/offline-run-* 2>/dev/null | tail -n 1 || true)
echo "contact sheet of the shards: $DEMO_DIR/shards32-contact-sheet.png"
echo "last fixed-noise grid:       $last_grid"
echo "sample grid (seeds 0-63):    $DEMO_DIR/samples/grid.png"
echo "run folder:                  $DEMO_DIR/run  (metrics.jsonl, samples/, checkpoints/, export/)"
if [ -n "$wandb_run" ]; then
  echo "offline W&B run:             $wandb_run   (upload: wandb sync $wandb_run)"
fi
