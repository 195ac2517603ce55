#!/usr/bin/env bash
# One call on a 4-GPU H200 machine: four single-GPU jobs side by side (one GPU each), then the
# multi-GPU scaling run on all four. Everything lands in $OUT/results.tgz (+ jcache.tgz).
#   bash benchmarks/device_all.sh   (carry: .whl, .jcache, data_cache)
# Phase limits (seconds) come from PHASE_A / PHASE_B; each job is killed at its limit and keeps
# the rows it already printed.
set -o pipefail
source "$(dirname "$0")/device_env.sh"
A=${PHASE_A:-330}
B=${PHASE_B:-240}
on() { local gpu=$1 name=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpu timeout "$A" "$@" > "$LOG/$name.log" 2>&1
    echo "[$name rc=$?]" >> "$LOG/$name.log" ) & }
on 0 throughput python3 benchmarks/throughput.py ${THROUGHPUT_ARGS:---time-budget 290} --json "$LOG/throughput.json" \
  --markdown "$LOG/throughput.md"
on 1 kernel_tests python3 -m pytest -q -p no:cacheprovider tests/kernels/test_pallas_gpu_compiled.py \
  --durations=10
# Recommendation (MovieLens-100k carried in data_cache/): the models, then the ablations.
if [ -f data_cache/ml-100k/u.data ]; then
  on 1 recsys bash -c "python3 benchmarks/recsys.py --data data_cache/ml-100k/u.data \
    ${RECSYS_ARGS:---steps 1000 --d-model 64 --seq-len 50} --write $LOG/recsys.md; \
    python3 benchmarks/recsys.py --data data_cache/ml-100k/u.data --ablations \
    ${RECSYS_ARGS:---steps 1000 --d-model 64 --seq-len 50} --write $LOG/recsys.md"
fi
on 2 probing python3 benchmarks/probing.py ${PROBING_ARGS:---time-limit 290} --json "$LOG/probing.json" \
  --markdown "$LOG/probing.md"
# Which (dtype, head dim, L) the compiled kernels fit in shared memory: one compile per process.
on 3 kernel_bench bash -c "for d in float32 bfloat16; do for D in 64 128; do for L in 1 2 3 4; do \
  python3 -W ignore benchmarks/kernels.py --compile-check \${PRISM_GPU_BLOCKS:-64,4,2} --dtype \$d \
  --dim \$D --writes \$L > $LOG/compile_\${d}_\${D}_\$L.txt 2>&1 & done; done; done; wait; \
  grep -h '^compile' $LOG/compile_*.txt; rm -f $LOG/compile_*.txt; \
  python3 -W ignore benchmarks/kernels.py --stages; \
  python3 -W ignore benchmarks/kernels.py ${KERNEL_ARGS:---quick --skip-naive} --json $LOG/kernels.json"
wait
echo "phase A done $(date -u)" >> "$LOG/env.txt"
timeout "$B" python3 benchmarks/scaling.py ${SCALING_ARGS:---budget-s 220 --preset-min-s 60 --impl chunk} --json "$LOG/scaling.json" \
  --markdown "$LOG/scaling.md" > "$LOG/scaling.log" 2>&1
echo "[scaling rc=$?]" >> "$LOG/scaling.log"
echo "phase B done $(date -u)" >> "$LOG/env.txt"
tail -n 25 "$LOG"/*.log
tar czf "$OUT/results.tgz" -C "$OUT" logs && rm -rf "$LOG"
tar czf "$OUT/jcache.tgz" .jcache 2>/dev/null
ls -la "$OUT"
