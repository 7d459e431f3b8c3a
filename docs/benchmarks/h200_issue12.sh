#!/usr/bin/env bash
# One H200, one call (issue 12): the compiled 720p decoder with its ring rotations frozen (the
# default since 2026-12-08) and gathered per step (-gathertaps; one 32-frame chunk: s / chunk,
# peak), how a 3x3x3 step conv's time per frame changes with frames per step (vae_conv_frames.py),
# `longlive bench` end to end
# (`--decode stream`, H.264 written) with FP8 block linears, FP8 KV and FA3 FP8 attention at 2 and
# 4 steps, then the GPU tests of the VAE.
#   ../shared/tools/gpu-prep.sh --with-av fa3-fwd==0.0.3      (here, once; the wheels over 64 MiB with the
#   tree: move docs/models and core/assets/shapes/*.safetensors out for the call, or carry them packed)
#   source .whl/env.sh && bash docs/benchmarks/h200_issue12.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/bench}; mkdir -p "$out"
source "$(dirname "$0")/common.sh"
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 240 python docs/benchmarks/vae_decode.py --variants new-compiled-cl-gathertaps,new-compiled-cl --chunks 4 \
  > "$out/vae.json" 2> "$out/vae.err"
grep '^{' "$out/vae.json" | python -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if 'profile' not in k})"
tail -n 2 "$out/vae.err"
timeout 60 python docs/benchmarks/vae_conv_frames.py
B="--preset wan2.2-ti2v-5b --height 704 --width 1280 --window 32 --sink 8 --dtype bfloat16 --frames 96 --decode stream
   --precision fp8 --kv-precision fp8 --attention fp8"
# shellcheck disable=SC2086
run e2e_2step $B --steps 2
# shellcheck disable=SC2086
run e2e_4step $B --steps 4
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_gpu_vae.py -m gpu 2>&1 | tail -n 4
