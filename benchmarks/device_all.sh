#!/usr/bin/env bash
# One call on a 4-GPU H200 machine: single-GPU jobs side by side (one GPU each, the jobs of a GPU
# one after another), then the multi-GPU scaling run on all four. Jobs, ARGS_<job> and
# LIMIT_<job> as in device_env.sh; the limits below keep each phase near 330 s and 240 s.
# Everything lands in $OUT/results.tgz (+ jcache.tgz).
#   bash benchmarks/device_all.sh   (carry: .whl, .jcache, data_cache)
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export LIMIT_throughput=${LIMIT_throughput:-320} LIMIT_probing=${LIMIT_probing:-320} \
  LIMIT_kernel_tests=${LIMIT_kernel_tests:-150} LIMIT_recsys=${LIMIT_recsys:-85} \
  LIMIT_recsys_ablations=${LIMIT_recsys_ablations:-85} \
  LIMIT_compile_matrix=${LIMIT_compile_matrix:-100} LIMIT_stages=${LIMIT_stages:-60} \
  LIMIT_kernel_bench=${LIMIT_kernel_bench:-170} LIMIT_scaling=${LIMIT_scaling:-240}
on() { local gpu=$1; shift
  ( export CUDA_VISIBLE_DEVICES=$gpu; for name in "$@"; do run_job "$name"; done ) & }
echo "phase A start $(date -u +%T)" >> "$LOG/env.txt"
on 0 throughput
on 1 kernel_tests recsys recsys_ablations
on 2 probing
on 3 compile_matrix stages kernel_bench
wait
echo "phase B start $(date -u +%T)" >> "$LOG/env.txt"
run_job scaling
finish
