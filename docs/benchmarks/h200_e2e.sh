#!/usr/bin/env bash
# One H200, one call (issue 12, end to end): the VAE decode paths (the official per-latent loop vs
# the cell decoder, eager and compiled; the 2-D forms -taps / -stack were measured on 2026-12-06 and do not
# pay, VAE_VARIANTS=... runs them), then
# written frames per second with the VAE on the same GPU (decode + H.264 write) at 2 and 4 steps
# with FP8 linears + the FP8 KV cache read by FA3, and NVFP4 weights + KV (the whole-pipeline
# memory).
#   ../shared/tools/gpu-prep.sh --with-av fa3-fwd==0.0.3      (here, once; 60 MiB)
#   source .whl/env.sh && bash docs/benchmarks/h200_e2e.sh "$OUT"
# What travels is capped at 64 MiB: the av + FA3 wheels (~63 MB) leave no room for the committed
# shapes warm starts (docs/models/shapes/*/*.safetensors, 16.3 MB), which this call does not
# use: move them out of the checkout for the call (mv, not git rm) and back afterwards.
set -uo pipefail
out=${1:-/tmp/bench}; mkdir -p "$out"
source "$(dirname "$0")/common.sh"
timeout ${VAE_TIMEOUT:-300} python docs/benchmarks/vae_decode.py --variants ${VAE_VARIANTS:-old,new,new-compiled} > "$out/vae.json" 2> "$out/vae.err"
grep '^{' "$out/vae.json" | python -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if 'profile' not in k})"
tail -n 2 "$out/vae.err"
common=(--preset wan2.2-ti2v-5b --height 704 --width 1280 --window 32 --sink 8 --dtype bfloat16 --frames 96 --decode stream)
run e2e_fp8kv_2 "${common[@]}" --steps 2 --precision fp8 --kv-precision fp8 --attention fp8
run e2e_fp8kv_4 "${common[@]}" --steps 4 --precision fp8 --kv-precision fp8 --attention fp8
run e2e_nvfp4_2 "${common[@]}" --steps 2 --precision nvfp4 --kv-precision nvfp4
