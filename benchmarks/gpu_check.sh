#!/usr/bin/env bash
# One device call: the compiled kernel tests, then the benchmark table. Logs under $OUT.
#   bash benchmarks/gpu_check.sh [quick]   (flash-linear-attention wheels carried in .whl/)
set -o pipefail
OUT=${OUT:-/tmp/prism_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/tests/kernels:${PYTHONPATH:-}
{ date -u; git log -1 --format=%H 2>/dev/null; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem \
  --format=csv; python3 -c "import jax, triton; print(jax.__version__, triton.__version__)"; } \
  2>&1 | tee "$OUT/env.txt"
# TILINGS="64,4,2;32,4,1" first compiles every kernel alone at each tiling (K = V = 128, L = 1
# and 3) and keeps the first that fits; slow (the gradient kernel compiles for minutes).
if [ -n "${TILINGS:-}" ] && [ -z "${PRISM_GPU_BLOCKS:-}" ]; then
  python3 -W ignore benchmarks/kernels.py --compile-check "$TILINGS" 2>&1 | tee "$OUT/compile.log"
  chosen=$(grep '^PRISM_GPU_BLOCKS=' "$OUT/compile.log" | tail -1)
  [ -n "$chosen" ] && export "$chosen"
fi
echo "tiling: ${PRISM_GPU_BLOCKS:-default}" | tee -a "$OUT/env.txt"
python3 -m pytest -x -q -p no:cacheprovider tests/kernels/test_pallas_gpu_compiled.py \
  --durations=5 2>&1 | tee "$OUT/tests.log"
python3 -W ignore benchmarks/kernels.py ${1:+--quick} --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log"
