#!/usr/bin/env bash
# Issue 11, one command on one H200 (<= TOTAL_SECONDS, default 550 s, start-up included): train the
# shapes-world VAE, then the shapes-world generator, then probe the generator with
# `longlive eval-vbench --suite shapes`. Run from anywhere (the project root goes on PYTHONPATH and
# every step is `python -m longlive_cli ...`):
#   bash docs/benchmarks/train_shapes_gpu.sh "$OUT"
# Outputs under $OUT, ready to ship (copy dit.safetensors and vae.safetensors into
# core/assets/shapes/ and record their sha256 in tests/test_shapes_assets.py):
#   dit.safetensors, vae.safetensors      the trained generator (bf16) and VAE (fp32)
#   eval/steps4.{json,md}                 the probe: 48 prompts, 8 cut lists, 8 switch lists, 4 x 60 s
#   eval/steps16.{json,md}                the 48 prompts again at 16 steps (if time is left)
#   vae/, ar/ (metrics.jsonl, loss.png, eval_psnr.png), summary.txt, *.log
# The generator's items are rendered on the GPU as it trains (data.synthetic_stream: never repeated,
# no video decoding; AR_STREAM=0 writes AR_SAMPLES samples to shapes-data/ with CPU workers instead:
# in the call of 2026-12-06 decoding them bound the generator at ~97 samples/s).
# Each training is calibrated first (CALIBRATION_STEPS measure the step time) and then given as
# many steps as fit its budget: VAE_SECONDS; the generator gets what is left before the deadline
# minus EVAL_RESERVE (at most AR_SECONDS). The AR dataset is written by CPU workers while the VAE
# trains. The evaluations run under `timeout` so the whole command ends by the deadline.
# The generator stops at its budget whatever its speed (`train-ar --max-seconds`), the decoder
# fine-tuning beside it under `timeout`. The AR data writer needs PyAV: prepare the wheels with
#   ../shared/tools/gpu-prep.sh --with-av      and run   source .whl/env.sh && bash ... "$OUT"
# Options (environment): VAE_INIT=FILE starts the VAE from an export (VAE_SECONDS=0 keeps it as it
# is; VAE_LR=X its learning rate, lower when continuing one); DECODER=0 skips the decoder fine-tuning
# (DECODER_LR, DECODER_NOISE: its lr and objective.latent_noise); AR_SET=key=value adds one generator override;
# RESUME_SECONDS=N (a later call on the same machine) gives the generator N more seconds; PROBE=0.
# CPU dry run of every step (a few minutes, nothing learnt): DRY_RUN=1 bash docs/benchmarks/train_shapes_gpu.sh /tmp/dry
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
out=$(mkdir -p "${1:-/tmp/shapes}" && cd "${1:-/tmp/shapes}" && pwd)
started=$(date +%s)

if [ "${DRY_RUN:-0}" = 1 ]; then  # tiny step counts on the CPU: checks the plumbing, not the quality
  : "${DEVICE:=cpu}" "${AR_DTYPE:=float32}" "${VAE_SECONDS:=1}" "${AR_SECONDS:=1}" "${MIN_STEPS:=2}"
  : "${CALIBRATION_STEPS:=7}" "${VAE_BATCH:=1}" "${VAE_CROP:=32}" "${VAE_FRAMES:=5}" "${VAE_WARMUP:=1}"
  : "${VAE_EVAL_CLIPS:=1}" "${VAE_EVAL_FRAMES:=17}" "${VAE_WORKERS:=1}"
  : "${AR_BATCH:=1}" "${AR_SAMPLES:=8}" "${DATA_WORKERS:=2}" "${TOTAL_SECONDS:=1200}" "${EVAL_RESERVE:=60}"
  : "${EVAL_ARGS:=--max-prompts 1 --seconds 1 --dimensions prompts,multishot,interactive}" "${EVAL16:=0}"
fi
DEVICE=${DEVICE:-cuda}
TOTAL_SECONDS=${TOTAL_SECONDS:-550}
VAE_SECONDS=${VAE_SECONDS:-120}
AR_SECONDS=${AR_SECONDS:-240}
EVAL_RESERVE=${EVAL_RESERVE:-130}  # the 4-step probe; the 16-step one only runs if time is left
AR_SAMPLES=${AR_SAMPLES:-1536}
AR_STREAM=${AR_STREAM:-1}
DATA_WORKERS=${DATA_WORKERS:-8}
CALIBRATION_STEPS=${CALIBRATION_STEPS:-15}
EVAL_ARGS=${EVAL_ARGS:-}
export MIN_STEPS=${MIN_STEPS:-50}
deadline=$(( started + TOTAL_SECONDS ))
cli() { python -m longlive_cli "$@"; }
left() { echo $(( deadline - $(date +%s) )); }

# steps_for LOGDIR KEY SECONDS: how many steps of the calibration run's median step time fit.
steps_for() {
  python - "$@" <<'PY'
import json, os, statistics, sys
logdir, key, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
records = [json.loads(line) for line in open(f"{logdir}/metrics.jsonl")]
seconds = statistics.median(r[key] for r in (records[5:] or records))  # after the warm-up steps
print(max(int(os.environ["MIN_STEPS"]), int(budget / seconds)))
PY
}

# decoder SECONDS INIT: fine-tune the VAE's decoder (encoder frozen, so the generator's latents stay
# bit for bit) in the background beside the generator, from INIT into $out/vae-decoder.safetensors.
# The GPU has room for both; the VAE's clips are rendered by its own CPU process.
decoder() {
  [ "${DECODER:-1}" = 1 ] || return 0
  local steps
  steps=$(steps_for "$out/vae-calibration" seconds "$(( $1 * 4 / 5 ))")  # it shares the CPUs with the generator
  echo "VAE decoder: $steps steps from $2"
  timeout --kill-after=5 "$(( $1 + 30 ))" python -m longlive_cli "${vae_base[@]}" --logdir "$out/vae-decoder" --no-resume --export "$out/vae-decoder.safetensors" \
    --set train.init_from="$2" --set train.train_encoder=false --set optim.warmup_steps=20 --set optim.lr="${DECODER_LR:-5e-4}" \
    --set train.max_steps="$steps" --set train.checkpoint_every="$steps" \
    --set train.eval_every=$(( steps / 4 > 0 ? steps / 4 : 1 )) \
    --set optim.ema_decay=0.995 --set optim.ema_start_step=$(( steps / 2 )) \
    ${DECODER_NOISE:+--set objective.latent_noise="$DECODER_NOISE"} > "$out/vae-decoder.log" 2>&1 &
  decoder_pid=$!
}
decoder_pid=
vae_base=(train-vae train_vae_shapes --set runtime.device="$DEVICE" --set data.crop="${VAE_CROP:-128}"
          --set data.frames="${VAE_FRAMES:-17}" --set data.warmup_latents="${VAE_WARMUP:-8}"
          --set data.batch_size="${VAE_BATCH:-16}" --set data.eval_clips="${VAE_EVAL_CLIPS:-8}"
          --set data.eval_frames="${VAE_EVAL_FRAMES:-97}" --set data.workers="${VAE_WORKERS:-6}")
# the generator: 8 samples per step (AR_BATCH), bf16, on the dataset written in step 0
ar=(train-ar train_ar_shapes --set runtime.device="$DEVICE" --set runtime.dtype="${AR_DTYPE:-bfloat16}"
    --set data.vae_path="$out/vae.safetensors" --set data.num_workers="$DATA_WORKERS"
    --set data.batch_size="${AR_BATCH:-8}" --set data.synthetic=false --set data.path="$out/shapes-data"
    --set data.synthetic_stream="$( [ "$AR_STREAM" = 1 ] && echo true || echo false )"
    ${AR_SET:+--set $AR_SET})
last_step() { python -c "import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1])['step'])" "$1"; }

# -- resume: a second call on the same machine gives the generator RESUME_SECONDS more ------------
if [ -n "${RESUME_SECONDS:-}" ]; then
  done_steps=$(last_step "$out/ar/metrics.jsonl")
  more=$(steps_for "$out/ar" step_seconds "$RESUME_SECONDS")
  ema_start=$(cat "$out/ar-ema-start")
  echo "AR: resuming at step $done_steps for $more more (EMA from $ema_start)"
  [ -f "$out/vae-decoder.safetensors" ] && cp "$out/vae-decoder.safetensors" "$out/vae-decoder-1.safetensors" \
    && mv "$out/vae-decoder" "$out/vae-decoder-1" && decoder "$RESUME_SECONDS" "$out/vae-decoder-1.safetensors"
  t0=$(date +%s)
  cli "${ar[@]}" --logdir "$out/ar" --resume --export "$out/dit.safetensors" --max-seconds "$RESUME_SECONDS" \
    --set train.max_steps=$(( done_steps + more * 4 )) --set train.checkpoint_every=$(( done_steps + more * 4 )) \
    --set optim.ema_start_step="$ema_start" > "$out/ar-resume.log" 2>&1
  echo "AR: steps $done_steps -> $(last_step "$out/ar/metrics.jsonl") in $(( $(date +%s) - t0 )) s" \
    | tee -a "$out/summary.txt"
  tail -n 1 "$out/ar-resume.log"
  [ -n "$decoder_pid" ] && { wait "$decoder_pid"; tail -n 1 "$out/vae-decoder.log"; }
  exit 0
fi

# -- 0. the AR dataset, on CPU workers, in the background ------------------------------------------
# (a file, not stdin: the worker processes are spawned and re-import the main module)
cat > "$out/make_data.py" <<'PY'
import os, shutil, sys, time
from core.train.config import load_train_recipe
from core.train.synthetic import make_synthetic_dataset
if __name__ == "__main__":
    root, samples, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    d, seed = load_train_recipe("train_ar_shapes").data, 0  # runtime.seed 0, as train-ar would
    t = time.time()
    shutil.rmtree(root + ".tmp", ignore_errors=True)
    make_synthetic_dataset(root + ".tmp", samples=samples, clips_per_sample=d.synthetic_shots,
                           frames=d.synthetic_shot_frames, height=d.height, width=d.width, seed=seed, workers=workers)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(root + ".tmp", root)
    print(f"{samples} samples in {time.time() - t:.1f} s")
PY
data_pid=
if [ "$AR_STREAM" = 0 ]; then
  python "$out/make_data.py" "$out/shapes-data" "$AR_SAMPLES" "$DATA_WORKERS" > "$out/data.log" 2>&1 &
  data_pid=$!
else
  echo "AR data: rendered on the device as the generator trains (data.synthetic_stream)" > "$out/data.log"
fi

# -- 1. the VAE: full 128x128 frames, 17 trained frames after 0-8 warm-up latents, 16 clips per step -
vae=("${vae_base[@]}" ${VAE_INIT:+--set train.init_from="$VAE_INIT"} ${VAE_LR:+--set optim.lr="$VAE_LR"})
keep_vae=0; [ "$VAE_SECONDS" = 0 ] && [ -n "${VAE_INIT:-}" ] && keep_vae=1
if [ "$keep_vae" = 0 ] || [ "${DECODER:-1}" = 1 ]; then  # the step time of the VAE stage or of the decoder tuning
  cli "${vae[@]}" --logdir "$out/vae-calibration" --no-resume --max-steps "$CALIBRATION_STEPS" \
    --set train.eval_every=1000 > "$out/vae-calibration.log" 2>&1
fi
if [ "$keep_vae" = 1 ]; then  # keep VAE_INIT as it is (its decoder is tuned below unless DECODER=0)
  cp "$VAE_INIT" "$out/vae.safetensors"; vae_steps=0; vae_seconds=0; mkdir -p "$out/vae"
  if [ -f "$out/vae-calibration/metrics.jsonl" ]; then cp "$out/vae-calibration/metrics.jsonl" "$out/vae/metrics.jsonl"
  else : > "$out/vae/metrics.jsonl"; fi
  echo "VAE: $VAE_INIT as it is"
else
  vae_steps=$(steps_for "$out/vae-calibration" seconds "$VAE_SECONDS")
  echo "VAE: $vae_steps steps"
  t0=$(date +%s)
  cli "${vae[@]}" --logdir "$out/vae" --no-resume --export "$out/vae.safetensors" \
    --set train.max_steps="$vae_steps" --set train.checkpoint_every="$vae_steps" \
    --set train.eval_every=$(( vae_steps / 8 > 0 ? vae_steps / 8 : 1 )) \
    --set optim.ema_decay=0.995 --set optim.ema_start_step=$(( vae_steps * 3 / 4 )) > "$out/vae.log" 2>&1
  vae_seconds=$(( $(date +%s) - t0 ))
  tail -n 1 "$out/vae.log"
fi

# -- 2. the generator: what is left before the deadline less the probe ----------------------------
[ -z "$data_pid" ] || wait "$data_pid"
cat "$out/data.log"
# the decoder first, so the generator's calibration measures its step beside it
decoder_budget=$(( $(left) - EVAL_RESERVE - 30 ))
decoder "$(( decoder_budget < AR_SECONDS ? decoder_budget : AR_SECONDS ))" "$out/vae.safetensors"
cli "${ar[@]}" --logdir "$out/ar-calibration" --no-resume --max-steps "$CALIBRATION_STEPS" \
  > "$out/ar-calibration.log" 2>&1
# start-up, checkpoint and export of the real run (~20 s) come out of the generator's share; the
# calibrated step count only places the EMA start: --max-seconds is the hard stop
ar_budget=$(( $(left) - EVAL_RESERVE - 20 ))
ar_budget=$(( ar_budget < AR_SECONDS ? ar_budget : AR_SECONDS ))
ar_budget=$(( ar_budget > 1 ? ar_budget : 1 ))
ar_steps=$(steps_for "$out/ar-calibration" step_seconds "$ar_budget")
echo "AR: ~$ar_steps steps (budget $ar_budget s)"
echo $(( ar_steps / 2 )) > "$out/ar-ema-start"  # a resumed run keeps it
t0=$(date +%s)
cli "${ar[@]}" --logdir "$out/ar" --no-resume --export "$out/dit.safetensors" --max-seconds "$ar_budget" \
  --set train.max_steps=$(( ar_steps * 4 )) --set train.checkpoint_every=$(( ar_steps * 4 )) \
  --set optim.ema_start_step=$(( ar_steps / 2 )) > "$out/ar.log" 2>&1
ar_steps=$(last_step "$out/ar/metrics.jsonl")
ar_seconds=$(( $(date +%s) - t0 ))
tail -n 1 "$out/ar.log"
[ -n "$decoder_pid" ] && { wait "$decoder_pid"; tail -n 1 "$out/vae-decoder.log"; }

python - "$out" "$vae_steps" "$vae_seconds" "$ar_steps" "$ar_seconds" "$(( $(date +%s) - started ))" <<'PY' \
  | tee "$out/summary.txt"
import json, sys
out, vae_steps, vae_s, ar_steps, ar_s, total = sys.argv[1:]
vae = [json.loads(line) for line in open(f"{out}/vae/metrics.jsonl")]
ar = [json.loads(line) for line in open(f"{out}/ar/metrics.jsonl")]
evals = [r for r in vae if "eval_psnr" in r]
mean = lambda rs, k: sum(r[k] for r in rs) / len(rs) if rs else float("nan")
print(f"VAE: {vae_steps} steps in {vae_s} s, loss {mean(vae[:20], 'loss'):.5f} -> {mean(vae[-20:], 'loss'):.5f}, "
      f"held-out PSNR " + ", ".join(f"{r['eval_psnr']:.2f}@{r['step']}" for r in evals)
      + (f" dB, latent std {evals[-1]['latent_std_mean']:.3f}, |mean| {evals[-1]['latent_mean_abs']:.3f}" if evals else ""))
print(f"AR: {ar_steps} steps in {ar_s} s, loss (mean of 50) {mean(ar[:50], 'loss'):.4f} -> {mean(ar[-50:], 'loss'):.4f}")
print(f"training done after {total} s including calibration, data and start-up")
PY

# -- 3. the probe: the trained files through the shapes preset (--model-dir $out) ------------------
# (never compiled: the 60-s videos pass the 5B's break-even chunk count, a 5M model never wins it back)
[ "${PROBE:-1}" = 1 ] || { echo "total $(( $(date +%s) - started )) s (probe skipped: PROBE=0)"; exit 0; }
mkdir -p "$out/eval"
probe() {  # probe NAME SECONDS_ALLOWED ARGS...: one eval-vbench run, cut off at its time
  local name=$1 allowed=$2
  shift 2
  if [ "$allowed" -lt 20 ]; then echo "eval $name: skipped (${allowed} s left)" | tee -a "$out/summary.txt"; return; fi
  local t0
  t0=$(date +%s)
  # shellcheck disable=SC2086  # EVAL_ARGS is a list of options
  timeout --kill-after=10 "$allowed" python -m longlive_cli eval-vbench --suite shapes --preset shapes --model-dir "$out" \
    --device "$DEVICE" --set runtime.compile=never --out "$out/eval/$name.json" \
    --videos-dir "$out/eval/${name}_videos" $EVAL_ARGS "$@" \
    > "$out/eval/$name.log" 2>&1 && status=done || status="stopped (exit $?)"
  echo "eval $name: $status after $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
  [ -f "$out/eval/$name.md" ] && cat "$out/eval/$name.md"
  return 0
}
probe steps4 "$(( $(left) - 15 ))" --steps 4
if [ "${EVAL16:-1}" = 1 ]; then
  probe steps16 "$(( $(left) - 15 ))" --steps 16 --dimensions prompts
fi
echo "total $(( $(date +%s) - started )) s" | tee -a "$out/summary.txt"
ls -la "$out"/dit.safetensors "$out"/vae.safetensors
