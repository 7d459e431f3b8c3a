#!/usr/bin/env bash
# Issue 11: several `distill distill_shapes` runs side by side on one GPU (the shapes networks are
# small: four runs share an H100 at ~0.22-0.30 s per iteration each, docs/models/shapes.md 5k), each
# stopped by --max-seconds with its LoRA exported. Run from the repository root on the device, with
# the wheels of `../shared/tools/gpu-prep.sh --with-av` in .whlav/ (carried):
#   BUDGET=330 bash docs/benchmarks/shapes_distill_gpu.sh "NAME:STEPS[:key=value,...]" ...
#   e.g. "s4:4:dmd.score_timestep_shift=1,adapter.apply_to_critic=false" "s2:2:dmd.score_timestep_shift=1"
# Writes into $OUT: lora_NAME.safetensors per run and logs.tgz (metrics and logs; not the
# checkpoints: 28 MB for a LoRA critic, 71 MB for a full one, over the device's 16 MiB per file
# returned, so a run does not continue across calls). BASE=FILE distils another generator (default:
# the shipped one); MERGE=1 also writes dit_NAME.safetensors (the generator with its LoRA merged,
# for --checkpoint: what a run started from another generator, checkpoints.generator=FILE, gives;
# docs/benchmarks/stack_loras.py makes it one --lora file); BATCH (8); DEVICE=cpu BUDGET=5 runs the
# same steps on a CPU (batch 1, fp32) to check the plumbing.
set -uo pipefail
device=${DEVICE:-cuda}
[ "$device" != cpu ] && source .whlav/env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/shapes-distill}; mkdir -p "$OUT"
runs=/tmp/shapes-distill-runs; rm -rf "$runs"; mkdir -p "$runs"
if [ "$device" = cpu ]; then dtype=float32 batch=1; else dtype=bfloat16 batch=${BATCH:-8}; fi
for spec in "$@"; do
  IFS=: read -r name steps sets <<< "$spec"
  extra=(); IFS=, read -ra pairs <<< "${sets:-}"
  for pair in "${pairs[@]}"; do extra+=(--set "$pair"); done
  python -m longlive_cli distill distill_shapes --logdir "$runs/$name" --no-resume --max-seconds "${BUDGET:-330}" \
    --export-lora "$OUT/lora_$name.safetensors" ${MERGE:+--merge-into "$OUT/dit_$name.safetensors"} \
    --set runtime.device="$device" --set runtime.dtype="$dtype" \
    --set data.batch_size="$batch" --set stream.sampling_steps="$steps" --set train.max_steps=1000000 \
    --set train.checkpoint_every=1000000 --set train.keep_checkpoints=1 \
    ${BASE:+--set checkpoints.base="$BASE"} "${extra[@]}" > "$runs/$name.log" 2>&1 &
done
wait
for spec in "$@"; do name=${spec%%:*}; echo "$name: $(tail -c 300 "$runs/$name.log" | tr '\n' ' ')"; done
tar czf "$OUT/logs.tgz" -C "$runs" --exclude=checkpoints --exclude=tensorboard .
