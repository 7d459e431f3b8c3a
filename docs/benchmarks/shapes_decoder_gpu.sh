#!/usr/bin/env bash
# Issue 11: train the shapes VAE's decoder on one GPU for the shipped encoder, which stays frozen (so
# the shipped generator's latents stay bit for bit). Run from the project root:
#   bash docs/benchmarks/shapes_decoder_gpu.sh SECONDS [INIT] [OUT] [--set KEY=VALUE ...]
# Without INIT: a fresh decoder at the preset's widths (train.init_decoder=false), lr 2e-3. With INIT
# (an export of this script): that decoder continued, lr 5e-4. A short calibration run measures the
# step time, then one whole LR schedule of as many steps as fit SECONDS (with a 1.2x margin: the step
# time varies 0.19-0.37 s on an H100, the clips rendered by CPU workers) runs and exports
# OUT/vae.safetensors (default OUT /tmp/o/decoder) with its metrics.jsonl and curves. Arguments after
# OUT go to both runs (e.g. --set objective.latent_noise=0.03); pass INIT and OUT as "" for defaults.
# Section 5n of docs/models/shapes.md: stage 2 ran as `shapes_decoder_gpu.sh 470 STAGE1.safetensors`.
set -euo pipefail
budget=$1; init=${2:-}; out=${3:-/tmp/o/decoder}; shift $(( $# < 3 ? $# : 3 )); run=/tmp/shapes-decoder
mkdir -p "$run" "$out"
if [ -z "$init" ]; then
  from=(--set train.init_from=core/assets/shapes/vae.safetensors --set train.init_decoder=false --set optim.lr=2e-3)
else
  from=(--set train.init_from="$init" --set optim.lr=5e-4 --set optim.warmup_steps=20)
fi
base=(train-vae train_vae_shapes --set runtime.device=cuda "${from[@]}" --set train.train_encoder=false
      --set data.crop=128 --set data.frames=17 --set data.warmup_latents=8 --set data.batch_size=32
      --set data.eval_clips=8 --set data.eval_frames=97 --set data.workers=12 "$@")
started=$(date +%s)
timeout 120 python -m longlive_cli "${base[@]}" --logdir "$run/calibration" --no-resume --max-steps 14 \
  --set train.max_steps=1000 --set train.eval_every=1000 > "$out/calibration.log" 2>&1
seconds=$(python -c "import json, statistics, sys
steps = [json.loads(line) for line in open(sys.argv[1]) if 'seconds' in line]
print(statistics.median(s['seconds'] for s in steps[5:]))" "$run/calibration/metrics.jsonl")
left=$(( budget - ($(date +%s) - started) - 45 ))
steps=$(python -c "print(int($left / ($seconds * 1.2)))")
echo "step $seconds s: $steps steps in $left s" | tee "$out/plan.txt"
timeout $(( left + 60 )) python -m longlive_cli "${base[@]}" --logdir "$run/main" --no-resume \
  --set train.max_steps="$steps" --set train.checkpoint_every="$steps" --set train.eval_every=$(( steps / 6 > 0 ? steps / 6 : 1 )) \
  --set optim.ema_decay=0.998 --set optim.ema_start_step=$(( steps / 2 )) \
  --export "$out/vae.safetensors" > "$out/main.log" 2>&1
cp "$run/main/metrics.jsonl" "$run/main/"*.png "$out/"
tail -n 3 "$out/main.log"
