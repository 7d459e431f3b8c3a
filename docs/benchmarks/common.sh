# Shared by the benchmark scripts: `run NAME BENCH-FLAGS...` runs `longlive bench --json`, keeps
# the JSON and stderr under $out, and prints a one-line summary.
run() {
  local name=$1; shift
  echo "== $name: longlive bench $*"
  python -m longlive_cli bench --json "$@" > "$out/$name.json" 2> "$out/$name.err" \
    && python - "$out/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if "seconds_per_chunk" in r:
    print(f"   VAE {r['seconds_per_chunk']:.3f} s per chunk of {r['frames_per_chunk']} frames, first "
          f"{r['first_chunk_seconds']:.3f} s, peak {r['peak_memory_gib']:.2f} GiB")
else:
    line = (f"   s/block {r['seconds_per_block']:.4f} (min {r['seconds_per_block_min']:.4f}, "
            f"max {r['seconds_per_block_max']:.4f}, {r['steady_chunks']} steady), fps {r['fps']:.2f}, "
            f"peak {r['peak_memory_gib'] or float('nan'):.2f} GiB, compiled {r['compiled']}")
    if r.get("gpu_busy_fraction") is not None:
        line += (f"\n   last chunk profiled: GPU busy {100 * r['gpu_busy_fraction']:.1f} % of its span, "
                 f"{r['gpu_idle_ms_per_block']:.1f} ms idle, {r['gpu_kernels_per_block']} kernels")
    if r.get("decode"):
        line += (f"\n   end-to-end ({r['decode']}): {r['e2e_seconds_per_block']:.4f} s/block, "
                 f"{r['e2e_fps']:.2f} fps = {r['e2e_over_dit']:.3f} x DiT; VAE GPU peak {r['vae_peak_memory_gib']}")
    print(line)
PY
  grep -v '━' "$out/$name.err" | tail -n 3 || true
}
