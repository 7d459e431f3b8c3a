#!/usr/bin/env bash
# NVFP4 on one H200: kernel bit-exactness + throughput, the w4a16 GEMM, and `longlive bench` of the
# 5B at 720p in bf16 vs NVFP4 weights / KV cache, all in one call (ratios against the bf16 run).
#   bash docs/benchmarks/h200_nvfp4.sh [tests|kernels|bench|all]
set -uo pipefail
out=${OUT:-/tmp/longlive-bench}; mkdir -p "$out"
source "$(dirname "$0")/common.sh"
part=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [[ $part == tests || $part == all ]]; then
  python -m pytest -q -p no:cacheprovider tests/test_gpu_nvfp4.py tests/test_gpu_quant_kv.py \
    tests/test_gpu_quant_linear.py tests/test_nvfp4.py 2>&1 | tail -n 4
fi
if [[ $part == kernels || $part == all ]]; then
  python docs/benchmarks/nvfp4_kernels.py 2>&1 | tee "$out/nvfp4_kernels.txt" | tail -n 30
  python docs/benchmarks/w4a16_gemm.py 2>&1 | tee "$out/w4a16_gemm.txt" | tail -n 12
fi
if [[ $part == bench || $part == all ]]; then
  run bf16 --preset wan2.2-ti2v-5b
  run nvfp4_w_kv --preset wan2.2-ti2v-5b --precision nvfp4 --kv-precision nvfp4
  run nvfp4_w --preset wan2.2-ti2v-5b --precision nvfp4
  run nvfp4_kv --preset wan2.2-ti2v-5b --kv-precision nvfp4
fi
