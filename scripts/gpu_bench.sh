#!/usr/bin/env bash
# Every throughput measurement of docs/PERFORMANCE.md in one command, for a session that has a GPU:
#   synthetic CelebA-layout faces -> 64 px shards -> `facegan bench train` for each optimisation
#   (with its agreement check against the eager fp32 step; fp16 and --cuda-graphs on CUDA only)
#   -> a real `facegan train` run on the device cache -> tests/gpu.
# Results land in $OUT (the device tool's folder; default gpu-bench-out/): bench.jsonl (one JSON
# line per configuration), bench.log, train-metrics.jsonl, gpu-tests.log, summary.txt.
#
#   PART=all|bench|train|tests   what to run (default all; each part makes the data it needs)
#   N=20000 SIZE=64 STEPS=100 ROUNDS=3 WARMUP=10 BATCH=128 BIG_BATCH=512 PRESET=tutorial
#   TRAIN_STEPS=3000 WORKERS=8 COMPILE=1 EXTRA="--g-width 8 --d-width 8" (CPU smoke tests only)
#
# Wheels: the GPU machine lacks webdataset (needed by `facegan shard`). Here, `make gpu-wheels`
# puts it in .whl/; carry ".whl" and this script installs it into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PART=${PART:-all}
N=${N:-20000}
SIZE=${SIZE:-64}
STEPS=${STEPS:-100}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-10}
BATCH=${BATCH:-128}
BIG_BATCH=${BIG_BATCH:-512}
PRESET=${PRESET:-tutorial}
TRAIN_STEPS=${TRAIN_STEPS:-3000}
WORKERS=${WORKERS:-8}
COMPILE=${COMPILE:-1}
EXTRA=${EXTRA:-}
OUT=${OUT:-gpu-bench-out}
WORK=${WORK:-/tmp/facegan-gpu-bench}
mkdir -p "$OUT" "$WORK"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

if ! "$PY" -c "import webdataset" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
facegan() { "$PY" -m facegan_dist "$@"; }
failed=0
say() { echo "$*" | tee -a "$OUT/summary.txt"; }

say "# facegan gpu_bench $(date -u +%FT%TZ) on $(hostname)"
"$PY" - <<'EOF' | tee -a "$OUT/summary.txt"
import torch, accelerate, sys
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"# python {sys.version.split()[0]}, torch {torch.__version__}, accelerate "
      f"{accelerate.__version__}, device: {name}")
EOF

SHARDS="$WORK/shards$SIZE"
make_data() {
  [ -f "$SHARDS/manifest.json" ] && return 0
  facegan synth --out "$WORK/celeba" --count "$N" --seed 0 --layout kaggle &&
    facegan shard "$WORK/celeba" --out "$SHARDS" --size "$SIZE" --split all \
      --shard-size 5000 --no-progress
}

bench() {  # one configuration: its JSON line to bench.jsonl, everything to bench.log
  local name=$1
  shift
  say "## $name: facegan bench train --preset $PRESET --resolution $SIZE $* $EXTRA"
  if facegan bench train --preset "$PRESET" --resolution "$SIZE" --steps "$STEPS" \
    --rounds "$ROUNDS" --warmup "$WARMUP" "$@" $EXTRA >"$WORK/one.log" 2>&1; then
    grep -v '^{' "$WORK/one.log" | tee -a "$OUT/summary.txt"
    tail -n 1 "$WORK/one.log" | "$PY" -c \
      "import json,sys; r=json.loads(sys.stdin.read()); r['name']='$name'; print(json.dumps(r))" \
      >>"$OUT/bench.jsonl"
  else
    failed=1
    say "FAILED: $(grep -m1 -E '^error:|Error' "$WORK/one.log" || tail -n 1 "$WORK/one.log")"
  fi
  cat "$WORK/one.log" >>"$OUT/bench.log"
}

if [ "$PART" = all ] || [ "$PART" = bench ]; then
  make_data || { say "FAILED: could not make the data"; exit 1; }
  C=()
  [ "$COMPILE" = 1 ] && C=(--compile)
  bench eager-fp32 --batch "$BATCH" --precision no --no-channels-last --no-tf32 --no-fused-adam
  bench fast-fp32 --batch "$BATCH" --precision no
  bench bf16 --batch "$BATCH" --precision bf16
  if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    bench fp16 --batch "$BATCH" --precision fp16
    bench bf16-cuda-graphs --batch "$BATCH" --precision bf16 --cuda-graphs
    bench bf16-cuda-graphs-big --batch "$BIG_BATCH" --precision bf16 --cuda-graphs
  else
    say "## fp16, cuda-graphs: skipped (no CUDA device)"
  fi
  bench bf16-compile --batch "$BATCH" --precision bf16 "${C[@]}"
  bench bf16-compile-big --batch "$BIG_BATCH" --precision bf16 "${C[@]}"
  bench stream --batch "$BATCH" --precision bf16 "${C[@]}" --data "$SHARDS" \
    --num-workers "$WORKERS"
  bench device-cache --batch "$BATCH" --precision bf16 "${C[@]}" --data "$SHARDS" \
    --data-cache device
fi

if [ "$PART" = all ] || [ "$PART" = train ]; then
  make_data || { say "FAILED: could not make the data"; exit 1; }
  C=()
  [ "$COMPILE" = 1 ] && C=(--compile)
  rm -rf "$WORK/run"
  say "## train: facegan train --preset $PRESET --batch $BATCH --precision bf16 ${C[*]} --data-cache device --max-steps $TRAIN_STEPS $EXTRA"
  if facegan train --data "$SHARDS" --out "$WORK/run" --preset "$PRESET" --batch "$BATCH" \
    --precision bf16 "${C[@]}" --data-cache device --max-steps "$TRAIN_STEPS" \
    --log-every $((TRAIN_STEPS / 6 > 0 ? TRAIN_STEPS / 6 : 1)) --sample-every "$TRAIN_STEPS" \
    --ckpt-every "$TRAIN_STEPS" --wandb-mode disabled $EXTRA >"$WORK/train.log" 2>&1; then
    cp "$WORK/run/metrics.jsonl" "$OUT/train-metrics.jsonl"
    "$PY" - "$WORK/run/metrics.jsonl" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"images_per_s"' in x]
steady = rows[1:] or rows  # the first interval holds compilation and warm-up
ips = sorted(r["images_per_s"] for r in steady)[len(steady) // 2]
print(f"train: median {ips:,.0f} images/s over {len(steady)} log intervals "
      f"(first excluded) -> 400 epochs of CelebA (81.0 M images) in {81_039_600 / ips / 60:.1f} min")
EOF
  else
    failed=1
    say "FAILED: train ($(grep -m1 '^error:' "$WORK/train.log" || tail -n 1 "$WORK/train.log"))"
  fi
  cp "$WORK/train.log" "$OUT/train.log"
fi

if [ "$PART" = all ] || [ "$PART" = tests ]; then
  say "## tests/gpu"
  if "$PY" -m pytest -q -p no:cacheprovider tests/gpu >"$OUT/gpu-tests.log" 2>&1; then
    say "tests/gpu: $(tail -n 1 "$OUT/gpu-tests.log")"
  else
    failed=1
    say "FAILED: tests/gpu: $(tail -n 1 "$OUT/gpu-tests.log")"
  fi
fi
exit $failed
