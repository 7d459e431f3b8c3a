#!/usr/bin/env bash
# Issue 13 (run by the multi-GPU measurement issue): sequence-parallel streaming inference of the 5B
# on one machine with N GPUs. Random bf16 weights, 720p (latent 44x80), window 32, sink 8, 4 steps,
# compiled blocks; `longlive bench` re-executes itself under torchrun and rank 0 reports s/block
# (median over the steady chunks, CUDA events) and the layout.
#   1. s/block at sp = 1, 2, 4, 8 (as many as the GPUs allow), bf16 and NVFP4 KV cache;
#   2. guidance 3: both branches on every rank (sp = W) against the branches on two groups
#      (--cfg-parallel, sp = W / 2) on the same W GPUs;
#   3. replicas: W GPUs as W / 2 replicas of sp 2 (summed fps, for batch work);
#   4. the VAE off the DiT's path: --decode device:W beside W/2.. ranks (end-to-end fps), and the
#      split decode timed alone (docs/benchmarks/sp_decode.py) at 1, 2, 4, 8 ranks.
# Run from the repo root on the GPU machine (N = 2, 4 or 8 GPUs):
#   bash docs/benchmarks/sp_inference.sh "$OUT"
# Each `longlive bench` builds and compiles the 5B (a minute or two): to stay under a per-command time
# limit, run the sections separately, e.g. SP_SECTIONS="1" then SP_SECTIONS="2 3" then SP_SECTIONS="4".
# A CPU check that every command of the script runs (tiny model, gloo, 4 processes, no device decode;
# the timings mean nothing):
#   SP_SMOKE=1 OMP_NUM_THREADS=1 bash docs/benchmarks/sp_inference.sh /tmp/sp-smoke
set -uo pipefail
out=${1:-/tmp/bench-sp}
sections=" ${SP_SECTIONS:-1 2 3 4} "
want() { [[ $sections == *" $1 "* ]]; }
mkdir -p "$out"
source "$(dirname "$0")/common.sh"
if [[ ${SP_SMOKE:-0} == 1 ]]; then
  gpus=4; cuda=0
  common=(--preset tiny --height 64 --width 64 --device cpu --dtype float32 --steps 2 --frames 48)
  echo "== smoke run: $gpus CPU processes (gloo)"
else
  gpus=$(python -c "import torch; print(torch.cuda.device_count())"); cuda=1
  common=(--preset wan2.2-ti2v-5b --height 704 --width 1280 --window 32 --sink 8 --dtype bfloat16 --steps 4
          --frames 96)
  echo "== $gpus GPUs: $(python -c 'import torch; print(torch.cuda.get_device_name(0))')"
fi

layout() {  # the parallel fields of a result
  python - "$out/$1.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(0)
print(f"   layout sp {r['sp']} cfg-parallel {r['cfg_parallel']} replicas {r['replicas']}: "
      f"total {r['total_fps'] or r['fps']:.2f} fps, per-rank KV {r['kv_cache_gib']:.2f} GiB")
PY
}

# 1. SP scaling, bf16 and NVFP4 KV cache.
for sp in 1 2 4 8; do
  want 1 && (( sp <= gpus )) || continue
  run "sp${sp}" "${common[@]}" --nproc-per-node "$sp" --sp "$sp"; layout "sp${sp}"
  run "sp${sp}_kvfp4" "${common[@]}" --nproc-per-node "$sp" --sp "$sp" --kv-precision nvfp4; layout "sp${sp}_kvfp4"
done

# 2. Guidance: serial branches against CFG-parallel on the same GPUs.
for world in 2 4 8; do
  want 2 && (( world <= gpus )) || continue
  run "g3_sp${world}" "${common[@]}" --set stream.guidance_scale=3.0 --nproc-per-node "$world" --sp "$world"
  layout "g3_sp${world}"
  run "g3_cfg_sp$((world / 2))" "${common[@]}" --set stream.guidance_scale=3.0 --nproc-per-node "$world" \
    --sp "$((world / 2))" --cfg-parallel
  layout "g3_cfg_sp$((world / 2))"
done

# 3. Replicas of sp 2 (batch throughput).
if want 3 && (( gpus >= 4 )); then
  run "dp$((gpus / 2))_sp2" "${common[@]}" --nproc-per-node "$gpus" --sp 2; layout "dp$((gpus / 2))_sp2"
fi

# 4. Decode: the VAE on a GPU no DiT rank uses (end-to-end fps), and the split decode alone.
half=$((gpus / 2))
if want 4 && (( cuda && half >= 1 && half < gpus )); then
  run "sp${half}_decode_device" "${common[@]}" --nproc-per-node "$half" --sp "$half" --decode "device:$half"
  run "sp${half}_decode_sync" "${common[@]}" --nproc-per-node "$half" --sp "$half" --decode sync
fi
for world in 1 2 4 8; do
  want 4 && (( world <= gpus )) || continue
  echo "== split decode on $world rank(s)"
  torchrun --standalone --nproc-per-node "$world" docs/benchmarks/sp_decode.py \
    --device "$( ((cuda)) && echo cuda || echo cpu)" > "$out/decode_w${world}.json" 2> "$out/decode_w${world}.err" \
    && cat "$out/decode_w${world}.json" || tail -n 3 "$out/decode_w${world}.err"
done
