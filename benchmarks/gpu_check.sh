#!/usr/bin/env bash
# One device call: the compiled kernel tests beside the kernel benchmark, logs under $OUT.
#   bash benchmarks/gpu_check.sh [quick]   (flash-linear-attention wheels carried in .whl/)
# JAX's persistent compilation cache lives in .jcache/ (ignored; carry it to reuse the Triton
# builds of an earlier call) and comes back as $OUT/jcache.tgz.
set -o pipefail
OUT=${OUT:-/tmp/prism_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=$PWD/.jcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/tests/kernels:${PYTHONPATH:-}
{ date -u; git log -1 --format=%H 2>/dev/null; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem \
  --format=csv; python3 -c "import jax, triton; print(jax.__version__, triton.__version__)"; } \
  2>&1 | tee "$OUT/env.txt"
echo "tiling: ${PRISM_GPU_BLOCKS:-default}" | tee -a "$OUT/env.txt"
# The tests mostly compile (CPU-bound); they run beside the benchmark, whose timings are
# therefore exploratory in this mode: TESTS_FIRST=1 runs them before it instead.
tests() {
  timeout "${TEST_LIMIT:-420}" python3 -m pytest -x -q -p no:cacheprovider -m "not slow" \
    tests/kernels/test_pallas_gpu_compiled.py --durations=8 > "$OUT/tests.log" 2>&1
  echo "tests rc=$?" >> "$OUT/tests.log"
}
if [ -n "${TESTS_FIRST:-}" ]; then tests; else tests & fi
timeout "${BENCH_LIMIT:-420}" python3 -W ignore benchmarks/kernels.py ${1:+--quick} --skip-naive \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
wait
cat "$OUT/tests.log"
if [ -n "${ACCEPTANCE:-}" ]; then
  timeout "${ACCEPTANCE}" python3 -m pytest -x -q -p no:cacheprovider -k acceptance \
    tests/kernels/test_pallas_gpu_compiled.py 2>&1 | tee "$OUT/acceptance.log"
fi
tar czf "$OUT/jcache.tgz" .jcache 2>/dev/null; ls -la "$OUT"
