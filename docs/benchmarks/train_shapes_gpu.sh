#!/usr/bin/env bash
# Issue 11: train the shapes-world VAE, then the shapes-world generator, on one H200 (<= 8 min),
# then probe the generator (EVAL=1, ~2 more minutes). Run from the repo root on the GPU machine:
#   source .whl/env.sh && bash docs/benchmarks/train_shapes_gpu.sh "$OUT"
# Each training is calibrated first (15 steps measure the step time) and then given as many steps
# as fit in its budget, VAE_SECONDS and AR_SECONDS (the LR schedule / EMA start follow those steps).
# The AR dataset is written by CPU workers while the VAE trains on the GPU.
# Outputs under $OUT: vae.safetensors (+ vae/metrics.jsonl, loss.png, eval_psnr.png),
# generator.safetensors (+ ar/metrics.jsonl, loss.png), shapes-data/ (the AR dataset), eval/
# (probe reports per steps and suite, sample mp4s), summary.txt, *.log.
# A CPU dry run of the whole script (minutes, nothing learnt): DEVICE=cpu AR_DTYPE=float32
# VAE_SECONDS=1 AR_SECONDS=1 MIN_STEPS=2 CALIBRATION_STEPS=7 VAE_BATCH=1 VAE_CROP=32 VAE_FRAMES=5
# AR_BATCH=1 AR_SAMPLES=8 DATA_WORKERS=2 EVAL=0 bash docs/benchmarks/train_shapes_gpu.sh /tmp/dry
set -euo pipefail
out=${1:-/tmp/shapes}
mkdir -p "$out"
VAE_SECONDS=${VAE_SECONDS:-120}
AR_SECONDS=${AR_SECONDS:-200}
AR_SAMPLES=${AR_SAMPLES:-1536}
DATA_WORKERS=${DATA_WORKERS:-8}
DEVICE=${DEVICE:-cuda}
CALIBRATION_STEPS=${CALIBRATION_STEPS:-15}
export MIN_STEPS=${MIN_STEPS:-50}
started=$(date +%s)

# steps_for LOGDIR KEY SECONDS: how many steps of the calibration run's median step time fit.
steps_for() {
  python - "$@" <<'PY'
import json, os, statistics, sys
logdir, key, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
records = [json.loads(line) for line in open(f"{logdir}/metrics.jsonl")]
seconds = statistics.median(r[key] for r in records[5:])  # after the warm-up steps
print(max(int(os.environ["MIN_STEPS"]), int(budget / seconds)))
PY
}

# -- 0. the AR dataset, on CPU workers, in the background ------------------------------------------
# (a file, not stdin: the worker processes are spawned and re-import the main module)
cat > "$out/make_data.py" <<'PY'
import os, sys, time
from core.train.config import load_train_recipe
from core.train.synthetic import make_synthetic_dataset
if __name__ == "__main__":
    root, samples, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    d, seed = load_train_recipe("train_ar_shapes").data, 0  # runtime.seed 0, as train-ar would
    t = time.time()
    make_synthetic_dataset(root + ".tmp", samples=samples, clips_per_sample=d.synthetic_shots,
                           frames=d.synthetic_shot_frames, height=d.height, width=d.width, seed=seed, workers=workers)
    os.replace(root + ".tmp", root)
    print(f"{samples} samples in {time.time() - t:.1f} s")
PY
python "$out/make_data.py" "$out/shapes-data" "$AR_SAMPLES" "$DATA_WORKERS" > "$out/data.log" 2>&1 &
data_pid=$!

# -- 1. the VAE: full 128x128 frames, 17 trained frames after 0-8 warm-up latents, 16 clips per step -
vae=(train-vae train_vae_shapes --set runtime.device="$DEVICE" --set data.crop="${VAE_CROP:-128}"
     --set data.frames="${VAE_FRAMES:-17}" --set data.warmup_latents=8 --set data.batch_size="${VAE_BATCH:-16}")
python -m longlive_cli "${vae[@]}" --logdir "$out/vae-calibration" --no-resume --max-steps "$CALIBRATION_STEPS" \
  --set train.eval_every=1000 > "$out/vae-calibration.log" 2>&1
vae_steps=$(steps_for "$out/vae-calibration" seconds "$VAE_SECONDS")
echo "VAE: $vae_steps steps"
t0=$(date +%s)
python -m longlive_cli "${vae[@]}" --logdir "$out/vae" --no-resume --export "$out/vae.safetensors" \
  --set train.max_steps="$vae_steps" --set train.checkpoint_every="$vae_steps" \
  --set train.eval_every=$(( vae_steps / 8 > 0 ? vae_steps / 8 : 1 )) \
  --set optim.ema_decay=0.995 --set optim.ema_start_step=$(( vae_steps * 3 / 4 )) > "$out/vae.log" 2>&1
vae_seconds=$(( $(date +%s) - t0 ))
tail -n 1 "$out/vae.log"

# -- 2. the generator: 8 samples per step, bf16 --------------------------------------------------
wait "$data_pid"
cat "$out/data.log"
ar=(train-ar train_ar_shapes --set runtime.device="$DEVICE" --set runtime.dtype="${AR_DTYPE:-bfloat16}"
    --set data.vae_path="$out/vae.safetensors" --set data.num_workers="$DATA_WORKERS"
    --set data.batch_size="${AR_BATCH:-8}" --set data.synthetic=false --set data.path="$out/shapes-data")
python -m longlive_cli "${ar[@]}" --logdir "$out/ar-calibration" --no-resume --max-steps "$CALIBRATION_STEPS" \
  > "$out/ar-calibration.log" 2>&1
ar_steps=$(steps_for "$out/ar-calibration" step_seconds "$AR_SECONDS")
echo "AR: $ar_steps steps"
t0=$(date +%s)
python -m longlive_cli "${ar[@]}" --logdir "$out/ar" --no-resume --export "$out/generator.safetensors" \
  --set train.max_steps="$ar_steps" --set train.checkpoint_every="$ar_steps" \
  --set optim.ema_start_step=$(( ar_steps / 2 )) > "$out/ar.log" 2>&1
ar_seconds=$(( $(date +%s) - t0 ))
tail -n 1 "$out/ar.log"

python - "$out" "$vae_steps" "$vae_seconds" "$ar_steps" "$ar_seconds" "$(( $(date +%s) - started ))" <<'PY' \
  | tee "$out/summary.txt"
import json, sys
out, vae_steps, vae_s, ar_steps, ar_s, total = sys.argv[1:]
vae = [json.loads(line) for line in open(f"{out}/vae/metrics.jsonl")]
ar = [json.loads(line) for line in open(f"{out}/ar/metrics.jsonl")]
evals = [r for r in vae if "eval_psnr" in r]
mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
print(f"VAE: {vae_steps} steps in {vae_s} s, loss {mean(vae[:20], 'loss'):.5f} -> {mean(vae[-20:], 'loss'):.5f}, "
      f"held-out PSNR " + ", ".join(f"{r['eval_psnr']:.2f}@{r['step']}" for r in evals)
      + f" dB, latent std {evals[-1]['latent_std_mean']:.3f}, |mean| {evals[-1]['latent_mean_abs']:.3f}")
print(f"AR: {ar_steps} steps in {ar_s} s, loss (mean of 50) {mean(ar[:50], 'loss'):.4f} -> {mean(ar[-50:], 'loss'):.4f}")
print(f"training total {total} s including calibration, data and start-up")
PY

# -- 3. the probe on the trained generator (AR model at 4 and 16 steps) ----------------------------
if [ "${EVAL:-1}" = 1 ]; then
  t0=$(date +%s)
  python docs/benchmarks/shapes_eval.py --generator "$out/generator.safetensors" --vae "$out/vae.safetensors" \
    --out "$out/eval" --steps "${EVAL_STEPS:-4,16}" --device "$DEVICE" --workers "$DATA_WORKERS" > "$out/eval.log" 2>&1
  echo "eval: $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
  cat "$out/eval.log"
fi
