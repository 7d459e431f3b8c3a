#!/usr/bin/env bash
# One H200, one call (issue 12, end to end): written frames per second with the VAE on the same
# GPU (decode + H.264 write) at 2 and 4 steps, FP8 and NVFP4 weights + KV, and the interactive
# prompt-switch latency on the 5B (random weights; umt5-xxl random of the real shape).
#   ../shared/tools/gpu-prep.sh nvidia-cudnn-frontend==1.23.0 fa3-fwd==0.0.3      (here, once)
#   source .whl/env.sh && bash docs/benchmarks/h200_e2e.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/bench}; mkdir -p "$out"
source "$(dirname "$0")/common.sh"
common=(--preset wan2.2-ti2v-5b --height 704 --width 1280 --window 32 --sink 8 --dtype bfloat16 --frames 160)
run e2e_bf16_4 "${common[@]}" --steps 4 --decode stream
run e2e_fp8_2 "${common[@]}" --steps 2 --precision fp8 --attention fp8 --decode stream
run e2e_fp8_4 "${common[@]}" --steps 4 --precision fp8 --attention fp8 --decode stream
run e2e_nvfp4_2 "${common[@]}" --steps 2 --precision nvfp4 --kv-precision nvfp4 --decode stream
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_gpu_interactive.py 2>&1 | tail -n 3
timeout 200 python docs/benchmarks/switch_latency.py --chunks 8 --type-at 3 > "$out/switch.json" 2> "$out/switch.err"
cat "$out/switch.json"; tail -n 2 "$out/switch.err"
