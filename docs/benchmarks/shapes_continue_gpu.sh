#!/usr/bin/env bash
# Issue 11: one GPU call that continues the shapes generator from a DiT export (docs/models/shapes.md
# section 5h), the VAE kept as it is. Run from the repository root on the device, with the wheels of
# `../shared/tools/gpu-prep.sh --with-av` in .whlav/ (carried):
#   INIT=gpu_in/dit.safetensors PROFILE=1 bash docs/benchmarks/shapes_continue_gpu.sh   (carry .whlav and gpu_in)
# INIT: the DiT to continue (default: the committed warm start); RECYCLE=true turns error recycling
# on; DEADLINE: seconds from the start by which the training is done (default 565); WARMUP: lr warm-up
# steps (default 50: each call starts a fresh optimizer; 0 = the calls of model card 5h/5i);
# LATENT_FRAMES: latent frames per training clip (default 32 = 4 chunks, the whole
# inference window, so the last window slot's positions are trained too); SINK_GAP: data.synthetic_sink_gap
# (default 0: the share of items whose history jumps ahead of the sink chunk, as in a rolling window);
# SHOT_FRAMES: frames per shot of the rendered items (default 128), or a list such as [64,128] drawn
# per item (data.synthetic_shot_frames_choices: short shots put two cuts into one window).
# DECODER=1 also tunes the VAE's decoder beside the generator (encoder frozen: the generator's latents
# stay), DECODER_NOISE its objective.latent_noise (default the recipe's 0.1), DECODER_LR (5e-4);
# it writes vae-decoder.safetensors and its metrics into logs.tgz.
# PROFILE=1 first runs the step profile eagerly and compiled (recipe defaults, 13 steps each) and
# trains compiled only if that pays within this call; PROFILE=0 trains compiled (COMPILE=never: eager).
# Writes into $OUT (<= 8 files come back): dit.safetensors, logs.tgz (metrics, loss curve,
# logs), train.log, and with PROFILE=1 profile_{never,always}.txt and compile_choice.txt.
set -uo pipefail
INIT=${INIT:-$PWD/core/assets/shapes/dit.safetensors}
# an ignored folder (gpu_in/) reaches the device only when carried: stop before any work without it
[ -f "$INIT" ] || { echo "INIT $INIT: no such file (carry its folder to the device, or give a committed DiT)"; exit 2; }
source .whlav/env.sh
export TOTAL_SECONDS=450 VAE_SECONDS=0 DECODER=${DECODER:-0} PROBE=0 AR_BATCH=64 AR_SECONDS=600 EVAL_RESERVE=10 CALIBRATION_STEPS=10
export VAE_INIT=$PWD/core/assets/shapes/vae.safetensors
export AR_SET="train.init=$(realpath "$INIT") --set optim.lr=5e-4 --set data.caption_dropout=0.1 --set error_recycling.enabled=${RECYCLE:-false} $(case "${SHOT_FRAMES:-128}" in \[*) echo "--set data.synthetic_shot_frames_choices=$SHOT_FRAMES";; *) echo "--set data.synthetic_shot_frames=${SHOT_FRAMES:-128}";; esac) --set optim.warmup_steps=${WARMUP:-50} --set data.latent_frames=${LATENT_FRAMES:-32} --set data.synthetic_sink_gap=${SINK_GAP:-0}"
if [ "${PROFILE:-0}" = 1 ]; then
  for c in never always; do
    timeout 90 python docs/benchmarks/train_step_profile.py --at 12 --steps 2 -- train_ar_shapes --logdir /tmp/prof-$c \
      --max-steps 13 --set runtime.device=cuda --set runtime.dtype=bfloat16 --set data.synthetic=false \
      --set data.synthetic_stream=true --set data.batch_size=64 --set data.vae_path="$VAE_INIT" \
      --set runtime.compile=$c > "$OUT/profile_$c.txt" 2>&1
  done
  # compiled only if (400 s - 2 x compile time) / compiled step > 400 s / eager step: the compile
  # is paid twice (the calibration run and the training); medians of the unprofiled steps 6-11
  python - > "$OUT/compile_choice.txt" <<'PY' && AR_SET="$AR_SET --set runtime.compile=always"
import json, statistics, sys
def load(c):
    try:
        return [json.loads(line) for line in open(f"/tmp/prof-{c}/metrics.jsonl")]
    except OSError:
        return []
n, a = load("never"), load("always")
if len(n) < 11 or len(a) < 11:
    print("profile incomplete: eager")
    sys.exit(1)
med = lambda r: statistics.median(x["step_seconds"] for x in r if 6 <= x["step"] <= 11)
t_n, t_a = med(n), med(a)
compile_s = sum(x["step_seconds"] for x in a[:5]) - sum(x["step_seconds"] for x in n[:5])
steps_n, steps_a = 400 / t_n, (400 - 2 * compile_s) / t_a
print(f"eager {t_n:.4f} s/step, compiled {t_a:.4f} s/step, compile {compile_s:.1f} s: steps in 400 s {steps_n:.0f} vs {steps_a:.0f}")
sys.exit(0 if steps_a > steps_n else 1)
PY
  echo "AR_SET=$AR_SET" >> "$OUT/compile_choice.txt"
else
  AR_SET="$AR_SET --set runtime.compile=${COMPILE:-always}"
fi
export TOTAL_SECONDS=$(( ${DEADLINE:-565} - SECONDS ))
timeout $(( TOTAL_SECONDS + 15 )) bash docs/benchmarks/train_shapes_gpu.sh "$PWD/build/shapes" > "$OUT/train.log" 2>&1
cp build/shapes/dit.safetensors "$OUT/"
[ -f build/shapes/vae-decoder.safetensors ] && cp build/shapes/vae-decoder.safetensors "$OUT/"
tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude=checkpoints -C build/shapes . $( [ "${PROFILE:-0}" = 1 ] && echo /tmp/prof-never/metrics.jsonl /tmp/prof-always/metrics.jsonl )
