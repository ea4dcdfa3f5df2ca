#!/usr/bin/env bash
# The demo world's three models from scratch on a 2-core CPU: data, detector, base model, grounding adapter.
#
#   bash gligen/demo/recipe.sh OUT        (from a checkout, in the environment gligen is installed in)
#
# Every stage resumes from its checkpoints: rerun the same command after an interruption.
# The stages run one after another, each on both cores (two threads, or the adapter's two processes):
# on 2 cores a third busy thread slows a 2-thread job several times over (the UNet went from 0.32 to
# 1.3 s a step beside the detector), so nothing runs beside anything.
#
# Stage logs and wall times go to OUT/logs/ (times.tsv: stage, start, end, minutes).
set -euo pipefail
OUT=${1:?usage: recipe.sh OUT}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."  # the checkout: its gligen, train.py and examples/ (the adapter's validation layouts)
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2

timed() {  # timed NAME COMMAND...: run, log to OUT/logs/NAME.log, append the wall time to times.tsv
  local name=$1 start
  shift
  start=$(date +%s)
  "$@" >> "$OUT/logs/$name.log" 2>&1
  awk -v name="$name" -v start="$start" -v end="$(date +%s)" \
    'BEGIN { printf "%s\t%d\t%d\t%.1f\n", name, start, end, (end - start) / 60 }' >> "$OUT/logs/times.tsv"
}

timed data $PY -m gligen.cli data shapes --n 30000 --size 64 --seed 0 --out "$OUT/data/shapes64"
timed heldout $PY -m gligen.cli data shapes --n 200 --size 64 --seed 1 --format layouts --out "$OUT/data/heldout"

timed detector $PY -m gligen.demo.train_detector --out "$OUT/detector" --resume --shapes-size 64 --image-size 128 \
  --batch-size 16 --workers 1 --n-train 8000 --n-eval 200 --steps 2000 --save-every 250

timed base $PY -m gligen.demo.train_base --data "$OUT/data/shapes64" --out "$OUT/base" --resume \
  --batch-size 32 --vae-steps 3200 --vae-crop 32 --vae-lr 1e-3 --steps 7000 --decoder-steps 600 --lr 5e-4 \
  --warmup 300 --workers 1 --device cpu --log-every 50 --checkpoint-every 250

OMP_NUM_THREADS=1 timed adapter $PY -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no train.py --config configs/demo_shapes.yaml \
  model.base="$OUT/base/model" data.shards="$OUT/data/shapes64" output_dir="$OUT/adapter" \
  cache_dir="$OUT/adapter/cache" batch_size=16 max_steps=7000 validation.every=1000
echo "recipe: done; times in $OUT/logs/times.tsv"
