#!/usr/bin/env bash
# Issue 11: train the shapes-world VAE, then the shapes-world generator, on one H200 (<= 8 min).
# Run from the repo root on the GPU machine:
#   source .whl/env.sh && bash docs/benchmarks/train_shapes_gpu.sh "$OUT"
# Each training is calibrated first (a short run measures the step time) and then given as many
# steps as fit in its budget, VAE_SECONDS and AR_SECONDS (the LR schedules follow those steps).
# Outputs under $OUT: vae.safetensors (+ vae/metrics.jsonl, loss.png, eval_psnr.png),
# generator.safetensors (+ ar/metrics.jsonl, loss.png), shapes-data/ (the AR dataset),
# summary.txt (steps, seconds, final losses, held-out PSNR).
set -euo pipefail
out=${1:-/tmp/shapes}
mkdir -p "$out"
VAE_SECONDS=${VAE_SECONDS:-120}
AR_SECONDS=${AR_SECONDS:-210}
started=$(date +%s)

# steps_for LOGDIR KEY SECONDS: how many steps of the calibration run's median step time fit.
steps_for() {
  python - "$@" <<'PY'
import json, statistics, sys
logdir, key, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
records = [json.loads(line) for line in open(f"{logdir}/metrics.jsonl")]
seconds = statistics.median(r[key] for r in records[5:])  # after the warm-up steps
print(max(50, int(budget / seconds)))
PY
}

# -- 1. the VAE: full 128x128 frames, 17 frames (5 latents), 16 clips per step ----------------------
vae=(train-vae train_vae_shapes --set runtime.device=cuda --set data.crop=128 --set data.frames=17
     --set data.batch_size=16)
python -m longlive_cli "${vae[@]}" --logdir "$out/vae-calibration" --no-resume --max-steps 15 \
  --set train.eval_every=1000 > "$out/vae-calibration.log" 2>&1
vae_steps=$(steps_for "$out/vae-calibration" seconds "$VAE_SECONDS")
echo "VAE: $vae_steps steps"
t0=$(date +%s)
python -m longlive_cli "${vae[@]}" --logdir "$out/vae" --no-resume --export "$out/vae.safetensors" \
  --set train.max_steps="$vae_steps" --set train.checkpoint_every="$vae_steps" \
  --set train.eval_every=$(( vae_steps / 8 > 0 ? vae_steps / 8 : 1 )) \
  --set optim.ema_start_step=$(( vae_steps / 2 )) 2>&1 | grep -v '━' | tee "$out/vae.log"
vae_seconds=$(( $(date +%s) - t0 ))

# -- 2. the generator: 2048 three-shot samples (written once), 8 samples per step, bf16 -------------
ar=(train-ar train_ar_shapes --set runtime.device=cuda --set runtime.dtype=bfloat16
    --set data.vae_path="$out/vae.safetensors" --set data.num_workers=8 --set data.batch_size=8)
python -m longlive_cli "${ar[@]}" --logdir "$out/ar-calibration" --no-resume --max-steps 15 \
  --set data.synthetic_samples=2048 > "$out/ar-calibration.log" 2>&1
mv "$out/ar-calibration/synthetic-data" "$out/shapes-data"
ar_steps=$(steps_for "$out/ar-calibration" step_seconds "$AR_SECONDS")
echo "AR: $ar_steps steps"
t0=$(date +%s)
python -m longlive_cli "${ar[@]}" --logdir "$out/ar" --no-resume --export "$out/generator.safetensors" \
  --set data.synthetic=false --set data.path="$out/shapes-data" \
  --set train.max_steps="$ar_steps" --set train.checkpoint_every="$ar_steps" \
  --set optim.ema_start_step=$(( ar_steps / 2 )) 2>&1 | grep -v '━' | tee "$out/ar.log"
ar_seconds=$(( $(date +%s) - t0 ))

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
print(f"total {total} s including calibration and start-up")
PY
