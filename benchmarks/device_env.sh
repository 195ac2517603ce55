# Sourced by the device scripts: environment, carried wheels, and a record of the machine.
# .whl/ (ignored) holds the wheels the GPU image lacks: flash-linear-attention 0.6.0 and fla-core
# 0.6.0 (kernel comparison) and ml_collections (configs of the training code), fetched with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64`.
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
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/tests/kernels:${PYTHONPATH:-}
{ date -u; echo "PRISM_COMMIT=${PRISM_COMMIT:-unset}, .git HEAD $(git log -1 --format=%h 2>/dev/null)"; nvidia-smi --query-gpu=index,name,clocks.sm,memory.total \
  --format=csv; python3 -c "import jax, triton; print(jax.__version__, triton.__version__, jax.devices())"; } \
  >> "$LOG/env.txt" 2>&1
