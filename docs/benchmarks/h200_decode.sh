#!/usr/bin/env bash
# Issue 3 decode benchmarks: VAE streaming decode per 32-frame chunk at 720p, and end-to-end fps
# of the 5B (random weights, 4 steps) with --decode sync / stream on one GPU, or device:1 with
# DECODE_MODES="device:1" on two. Run from the repo root on the GPU machine:
#   source .whl/env.sh && bash docs/benchmarks/h200_decode.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/bench}
mkdir -p "$out"
source "$(dirname "$0")/common.sh"
common=(--preset wan2.2-ti2v-5b --height 704 --width 1280 --window 32 --sink 8 --dtype bfloat16 --steps 4)
if [ "${VAE:-1}" = 1 ]; then
  run vae_720p "${common[@]}" --vae
fi
for mode in ${DECODE_MODES:-sync stream}; do
  run "e2e_${mode/:/}" "${common[@]}" --frames 96 --decode "$mode"
done
