#!/usr/bin/env bash
# Benchmarks on one GPU, in phases: each argument is a phase, run after the one before; jobs
# joined by '+' inside a phase share the GPU side by side, so only phases of one job time anything.
#   bash benchmarks/device_one.sh throughput "probing+kernel_tests+recsys" kernel_bench
# Jobs: throughput, probing, ablations, recsys, recsys_ablations, kernel_tests, compile_matrix,
# stages, kernel_bench, acceptance, gpu_tests. Each is killed at LIMIT_<job> seconds (default
# 300) and keeps what it already printed. Logs land in $OUT/results.tgz (+ jcache.tgz); carry .whl, .jcache and
# data_cache (MovieLens-100k from scripts/fetch_movielens.sh).
set -o pipefail
source "$(dirname "$0")/device_env.sh"
# A job's extra arguments come from ARGS_<job>; a digit suffix runs a job again under another
# name (throughput2 with ARGS_throughput2), its logs apart.
job() {
  local name=$1 extra=ARGS_$1; extra=${!extra:-}
  local recsys="--data data_cache/ml-100k/u.data --steps 1000 --d-model 64 --seq-len 50"
  case ${name%%[0-9]*} in
    throughput) python3 benchmarks/throughput.py --time-budget 280 $extra \
      --json "$LOG/$name.json" --markdown "$LOG/$name.md" ;;
    probing) python3 benchmarks/probing.py --time-limit 280 $extra \
      --json "$LOG/$name.json" --markdown "$LOG/$name.md" ;;
    ablations) python3 benchmarks/probing.py --ablations --time-limit 280 $extra \
      --json "$LOG/$name.json" --markdown "$LOG/$name.md" ;;
    recsys) python3 benchmarks/recsys.py $recsys $extra --write "$LOG/$name.md" ;;
    recsys_ablations) python3 benchmarks/recsys.py $recsys --ablations $extra \
      --write "$LOG/$name.md" ;;
    kernel_tests) python3 -m pytest -q -p no:cacheprovider -m "not slow" --durations=10 \
      tests/kernels/test_pallas_gpu_compiled.py $extra ;;
    acceptance) python3 -m pytest -q -p no:cacheprovider -k acceptance \
      tests/kernels/test_pallas_gpu_compiled.py ;;
    # The GPU-only paths outside the kernels: cuDNN attention, the parallel pass over chunks and
# the chunked form's fast float32 products on bf16 inputs.
    gpu_tests) python3 -m pytest -q -p no:cacheprovider tests/layers/test_baselines.py \
      tests/ops/test_chunk_parallel.py tests/ops/test_chunk.py $extra \
      -k "attention or parallel or long or choice or bfloat16" ;;
    # Which (dtype, head dim, L) the compiled kernels fit in shared memory: one compile each.
    compile_matrix)
      for d in float32 bfloat16; do for D in 64 128; do for L in 1 2 3 4; do
        python3 -W ignore benchmarks/kernels.py --compile-check "${PRISM_GPU_BLOCKS:-64,4,2}" \
          --dtype $d --dim $D --writes $L > "$LOG/cc_${d}_${D}_$L.txt" 2>&1 &
      done; done; done; wait
      grep -h '^compile' "$LOG"/cc_*.txt; rm -f "$LOG"/cc_*.txt ;;
    stages) python3 -W ignore benchmarks/kernels.py --stages ;;
    kernel_bench) python3 -W ignore benchmarks/kernels.py ${extra:---quick --skip-naive} \
      --json "$LOG/$name.json" ;;
    *) echo "unknown job $name"; return 2 ;;
  esac
}
for phase in "$@"; do
  echo "phase $phase start $(date -u +%T)" >> "$LOG/env.txt"
  for name in ${phase//+/ }; do
    limit=LIMIT_$name
    ( timeout "${!limit:-300}" bash -c "$(declare -f job); job $name" > "$LOG/$name.log" 2>&1
      echo "[$name rc=$?]" >> "$LOG/$name.log" ) &
  done
  wait
done
echo "end $(date -u +%T)" >> "$LOG/env.txt"
tail -n 30 "$LOG"/*.log
tar czf "$OUT/results.tgz" -C "$OUT" logs && rm -rf "$LOG"
tar czf "$OUT/jcache.tgz" .jcache 2>/dev/null
ls -la "$OUT"
