#!/usr/bin/env bash
# Issue 2 engine benchmark on one H200: 5B random weights, 720p (latent 44x80), window 32,
# sink 8, bf16; compiled blocks (the default on a GPU) against eager in the same call.
# Run from the repo root on the GPU machine (see docs/BENCHMARKS.md):
#   source .whl/env.sh && bash docs/benchmarks/h200_engine.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/bench}
mkdir -p "$out"
run() {  # name, then bench flags
  local name=$1; shift
  echo "== $name: longlive bench $*"
  python -m longlive_cli bench --json "$@" > "$out/$name.json" 2> "$out/$name.err" \
    && python - "$out/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   s/block {r['seconds_per_block']:.4f} (mean {r['seconds_per_block_mean']:.4f}, "
      f"min {r['seconds_per_block_min']:.4f}, max {r['seconds_per_block_max']:.4f}, "
      f"{r['steady_chunks']} steady chunks), fps {r['fps']:.2f}, peak {r['peak_memory_gib']:.2f} GiB, "
      f"first chunk {r['first_chunk_seconds']:.2f} s, compiled {r['compiled']}")
PY
  grep -v '━' "$out/$name.err" | tail -n 3 || true
}
common=(--preset wan2.2-ti2v-5b --height 704 --width 1280 --window 32 --sink 8 --dtype bfloat16)
run s4_compiled "${common[@]}" --steps 4 --frames 128
run s2_compiled "${common[@]}" --steps 2 --frames 128
run s4_eager "${common[@]}" --steps 4 --frames 96 --no-compile
run s2_eager "${common[@]}" --steps 2 --frames 96 --no-compile
