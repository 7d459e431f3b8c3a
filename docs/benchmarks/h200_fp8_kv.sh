#!/usr/bin/env bash
# One H200, one call (issue 12): the DiT with FP8 block linears and the FP8 KV cache read directly
# by FA3's FP8 kernel (`--kv-precision fp8 --attention fp8`), 4 and 2 steps, against our bf16 runs
# in the same call; the GPU tests of the FP8 cache and linears; the prompt-switch latency.
#   ../shared/tools/gpu-prep.sh --with-av fa3-fwd==0.0.3      (here, once; 60 MiB)
#   source .whl/env.sh && bash docs/benchmarks/h200_fp8_kv.sh "$OUT"
# (the av + FA3 wheels fill the 64 MiB that travels: move the committed shapes warm starts,
# docs/models/shapes/*/*.safetensors (16.3 MB), out of the checkout for the call, as for h200_e2e.sh)
set -uo pipefail
out=${1:-/tmp/bench}; mkdir -p "$out"
source "$(dirname "$0")/common.sh"
common=(--preset wan2.2-ti2v-5b --height 704 --width 1280 --window 32 --sink 8 --dtype bfloat16 --frames 96)
# the two results no call has returned yet come first (each under its own timeout)
timeout ${SWITCH_SECONDS:-170} python docs/benchmarks/switch_latency.py --chunks 8 --type-at 3 > "$out/switch.json" 2> "$out/switch.err"
echo "switch latency rc=$?"; cat "$out/switch.json"; tail -n 2 "$out/switch.err"
timeout ${TEST_SECONDS:-170} python -m pytest -q -p no:cacheprovider -rA tests/test_fp8_kv.py tests/test_fp8_gpu.py -m gpu > "$out/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?"; grep -E "passed|failed|error" "$out/gpu_tests.txt" | tail -n 4
run bf16_4 "${common[@]}" --steps 4
run fp8_kvfp8_attn_4 "${common[@]}" --steps 4 --precision fp8 --kv-precision fp8 --attention fp8 --gpu-busy   # the last chunk profiled: CUDA graphs' ceiling
run fp8_kvfp8_attn_2 "${common[@]}" --steps 2 --precision fp8 --kv-precision fp8 --attention fp8 --gpu-busy
run bf16_2 "${common[@]}" --steps 2
run fp8_4 "${common[@]}" --steps 4 --precision fp8   # the same-call split: FP8 linears alone
