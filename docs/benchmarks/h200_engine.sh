#!/usr/bin/env bash
# Issue 2 engine benchmark on one H200: 5B random weights, 720p (latent 44x80), window 32,
# sink 8, bf16; compiled blocks (the default on a GPU) against eager in the same call.
# Run from the repo root on the GPU machine (see docs/BENCHMARKS.md):
#   source .whl/env.sh && bash docs/benchmarks/h200_engine.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/bench}
mkdir -p "$out"
source "$(dirname "$0")/common.sh"
common=(--preset wan2.2-ti2v-5b --height 704 --width 1280 --window 32 --sink 8 --dtype bfloat16)
run s4_compiled "${common[@]}" --steps 4 --frames 128
run s2_compiled "${common[@]}" --steps 2 --frames 128
run s4_eager "${common[@]}" --steps 4 --frames 96 --no-compile
run s2_eager "${common[@]}" --steps 2 --frames 96 --no-compile
