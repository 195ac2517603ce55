# Sourced by the device scripts: environment, carried wheels, a record of the machine, the jobs
# (`job`, `run_job`) and the packing of the logs (`finish`).
# .whl/ (ignored) holds the wheels the GPU image lacks: flash-linear-attention 0.6.0 and fla-core
# 0.6.0 (kernel comparison) and ml_collections (configs of the training code), fetched with
# `pip download --no-deps --only-binary=:all: --python-version 3.12
#  --platform manylinux2014_x86_64`.
# The tree that travels to a remote machine can carry a .git that lags behind it: pass
# PRISM_COMMIT=<hash of the tree> so the benchmarks' provenance lines name the right commit.
# JAX's persistent compilation cache lives in .jcache/ (ignored; carry it to reuse the builds of an
# earlier call).
OUT=${OUT:-/tmp/prism_out}
LOG=${LOG:-$OUT/logs}
mkdir -p "$LOG"
export OUT LOG
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# NVLink multicast stays off on shared hosts (JAX uses NCCL for its collectives).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export JAX_COMPILATION_CACHE_DIR=$PWD/.jcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
mkdir -p .jcache && touch /tmp/prism_jcache_start  # finish() returns only entries newer than this
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/tests/kernels:${PYTHONPATH:-}
{ date -u
  echo "PRISM_COMMIT=${PRISM_COMMIT:-unset}, .git HEAD $(git log -1 --format=%h 2>/dev/null)"
  nvidia-smi --query-gpu=index,name,clocks.sm,memory.total --format=csv
  python3 -c "import jax, triton; print(jax.__version__, triton.__version__, jax.devices())"
} >> "$LOG/env.txt" 2>&1

# A job's extra arguments come from ARGS_<job> and extra environment from ENV_<job>
# ("NAME=value ..."); a digit suffix runs a job again under another name (throughput2 with
# ARGS_throughput2), its logs apart, e.g. ENV_kernel_bench2="PRISM_MOSAIC_STAGES=output".
job() {
  local name=$1 extra=ARGS_$1 env=ENV_$1; extra=${!extra:-}
  if [[ -n ${!env:-} ]]; then export ${!env}; fi
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
    # ARGS_kernel_tests: a pytest -k expression choosing among the tests.
    kernel_tests) python3 -m pytest -q -p no:cacheprovider -m "not slow" --durations=10 \
      tests/kernels/test_pallas_gpu_compiled.py ${extra:+-k "$extra"} ;;
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
        python3 -W ignore benchmarks/kernels.py --compile-check "${PRISM_GPU_BLOCKS:-64,4,3}" \
          --dtype $d --dim $D --writes $L > "$LOG/cc_${d}_${D}_$L.txt" 2>&1 &
      done; done; done; wait
      grep -h '^compile' "$LOG"/cc_*.txt; rm -f "$LOG"/cc_*.txt ;;
    stages) python3 -W ignore benchmarks/kernels.py --stages $extra ;;
    # Every Mosaic GPU stage beside its Triton kernel, at B4 T4096 (L = 1, 2) and B1 T16384
    # (L = 1, where the passes run 32-column blocks): what decides each stage's backend.
    mosaic_stages)
      local all=apply_inverse,state_forward,output,local_dy,state_backward,state_grads,wy_grads
      all=$all,wy_further_grads
      local both=$(echo $all | sed 's/\([a-z_]*\)/\1,\1_mosaic/g')
      both=$both,wy_state_forward_mosaic,wy_state_forward_inference_mosaic
      python3 -W ignore benchmarks/kernels.py --stages --writes 1,2 --only $both $extra
      python3 -W ignore benchmarks/kernels.py --stages --shape 2 --writes 1 --only $both $extra ;;
    # Device time of every kernel inside Pallas and fla fwd / fwd+bwd (profiler traces).
    profile) python3 -W ignore benchmarks/kernels.py --profile ${extra:---writes 1,2} ;;
    # Data parallel, FSDP and tensor parallel on every device of the machine.
    scaling) python3 benchmarks/scaling.py --budget-s 220 --preset-min-s 60 --impl chunk $extra \
      --json "$LOG/$name.json" --markdown "$LOG/$name.md" ;;
    kernel_bench) python3 -W ignore benchmarks/kernels.py ${extra:---quick --skip-naive} \
      --json "$LOG/$name.json" ;;
    *) echo "unknown job $name"; return 2 ;;
  esac
}
# run_job NAME: job NAME killed at LIMIT_<NAME> seconds (default 300), its output in
# $LOG/NAME.log with its exit status last.
run_job() {
  local limit=LIMIT_$1
  timeout "${!limit:-300}" bash -c "$(declare -f job); job $1" > "$LOG/$1.log" 2>&1
  echo "[$1 rc=$?]" >> "$LOG/$1.log"
}

# The logs' tails on stdout; the logs as $OUT/results.tgz and the compile-cache entries this
# call added as jcache.tgz (untar it in the repository root to grow the local .jcache; the whole
# cache soon outgrows what a call returns).
finish() {
  echo "end $(date -u +%T)" >> "$LOG/env.txt"
  tail -n 30 "$LOG"/*.log
  tar czf "$OUT/results.tgz" -C "$OUT" logs && rm -rf "$LOG"
  find .jcache -type f -newer /tmp/prism_jcache_start | tar czf "$OUT/jcache.tgz" -T - 2>/dev/null
  ls -la "$OUT"
}
