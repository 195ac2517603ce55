#!/usr/bin/env bash
# Benchmarks in phases: each argument is a phase, run after the one before; jobs joined by '+'
# inside a phase run side by side, sharing the GPU, so only phases of one job time anything.
# JOB@N pins a job to GPU N of a several-GPU machine (CUDA_VISIBLE_DEVICES), so jobs side by side
# there need not share one.
#   bash benchmarks/device_one.sh throughput "probing+kernel_tests+recsys" kernel_bench
#   bash benchmarks/device_one.sh scaling "gpu_tests@0+kernel_tests@1"     (two GPUs)
# Jobs (device_env.sh): throughput, probing, ablations, recsys, recsys_ablations, kernel_tests,
# compile_matrix, stages, mosaic_stages, profile, kernel_bench, acceptance, gpu_tests, scaling.
# Each is killed at LIMIT_<job> seconds (default 300) and keeps what it already printed;
# ARGS_<job> adds arguments. Logs land in $OUT/results.tgz (+ jcache.tgz); carry .whl, .jcache
# and data_cache (MovieLens-100k from scripts/fetch_movielens.sh).
set -o pipefail
source "$(dirname "$0")/device_env.sh"
for phase in "$@"; do
  echo "phase $phase start $(date -u +%T)" >> "$LOG/env.txt"
  for name in ${phase//+/ }; do
    if [[ $name == *@* ]]; then
      ( export CUDA_VISIBLE_DEVICES=${name#*@}; run_job "${name%@*}" ) &
    else
      run_job "$name" &
    fi
  done
  wait
done
finish
