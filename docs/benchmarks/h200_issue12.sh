#!/usr/bin/env bash
# One H200, one call (issue 12): the VAE decode paths (old per-latent loop vs the cell decoder,
# eager / memory-capped / channels-last / compiled), `longlive bench` with FP8 block linears and
# FA3 FP8 self-attention (4 and 2 steps), then the GPU tests of the VAE and FP8 paths.
#   ../shared/tools/gpu-prep.sh nvidia-cudnn-frontend==1.23.0 fa3-fwd==0.0.3      (here, once)
#   source .whl/env.sh && bash docs/benchmarks/h200_issue12.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/bench}; mkdir -p "$out"
source "$(dirname "$0")/common.sh"
timeout 240 python docs/benchmarks/vae_decode.py --variants old,new,new-512M-cl,new-compiled > "$out/vae.json" 2> "$out/vae.err"
grep '^{' "$out/vae.json" | python -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if 'profile' not in k})"
tail -n 2 "$out/vae.err"
run fp8_attn --preset wan2.2-ti2v-5b --precision fp8 --attention fp8
run fp8_attn_2step --preset wan2.2-ti2v-5b --precision fp8 --attention fp8 --steps 2
timeout 90 python docs/benchmarks/fp8_attention.py > "$out/fp8_attention.json" 2> "$out/fp8_attention.err"; grep -E "fa3|cudnn" "$out/fp8_attention.err" | tail -n 6
timeout 140 python -m pytest -q -p no:cacheprovider tests/test_gpu_vae.py tests/test_fp8_gpu.py 2>&1 | tail -n 6
