#!/usr/bin/env bash
# One H200, one call: `longlive bench` of the 5B at 720p after the seams refactor (bf16 and NVFP4
# weights + KV cache, the issue-9 regression check against docs/BENCHMARKS.md), FP8 block linears
# (alone and with the NVFP4 KV cache), the FP8 GEMM and attention benchmarks, then the GPU tests.
#   source .whl/env.sh && bash docs/benchmarks/h200_seams.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/bench}; mkdir -p "$out"
source "$(dirname "$0")/common.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print(torch.__version__, torch.backends.cudnn.version())"
run bf16 --preset wan2.2-ti2v-5b
run nvfp4_w_kv --preset wan2.2-ti2v-5b --precision nvfp4 --kv-precision nvfp4
run fp8 --preset wan2.2-ti2v-5b --precision fp8
run fp8_kv --preset wan2.2-ti2v-5b --precision fp8 --kv-precision nvfp4
run fp8_2step --preset wan2.2-ti2v-5b --precision fp8 --steps 2
timeout 150 python docs/benchmarks/fp8_gemm.py > "$out/fp8_gemm.json" 2> "$out/fp8_gemm.err"; tail -c 1500 "$out/fp8_gemm.json"
timeout 120 python docs/benchmarks/fp8_attention.py > "$out/fp8_attention.json" 2> "$out/fp8_attention.err"; tail -c 1500 "$out/fp8_attention.json"; tail -n 3 "$out/fp8_attention.err"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu_quant_kv.py tests/test_gpu_quant_linear.py \
  tests/test_fp8_gpu.py tests/test_gpu_nvfp4.py 2>&1 | tail -n 15
