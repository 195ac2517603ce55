"""Shared memory the compiled GPU kernels ask for, estimated on a machine without a GPU.

Each kernel's pallas_call is lowered for CUDA on the CPU (the GPU query answered with an
H200's compute capability 9.0), its Triton module captured, and Triton's own passes for sm_90
run up to LLVM IR, whose metadata holds the shared memory per block. Needs the Triton wheel the
GPU image has (3.6.0), which pip can install into a folder of its own:

    pip install --no-deps --target /tmp/triton-site triton==3.6.0
    PYTHONPATH=/tmp/triton-site python benchmarks/shared_memory.py bfloat16 128 3

Compared with what the H200 reported, the estimate errs high: float32 K = V = 64, L = 4
gradient kernel 262 144 here, 245 760 there; bf16 K = V = 128, L = 3 state_forward 246 272
here, and it compiled there (limit 232 448). Use it to choose which shapes to try on the device,
not instead of trying them (`kernels.py --compile-check`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def capture_triton_modules():
  """Make CUDA lowering work without a GPU and collect (kernel name, Triton IR) pairs."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  captured = []
  cc90 = types.SimpleNamespace(compute_capability="9.0")
  registration.gpu_info_lib = types.SimpleNamespace(get_gpu_info=lambda: cc90)
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def lower_and_keep(jaxpr, grid_mapping, platform, cc, mlir_ctx=None):
    result = lower(jaxpr, grid_mapping, platform, cc, mlir_ctx=mlir_ctx)
    captured.append((jaxpr.debug_info.func_name,
                     result.module.operation.get_asm(enable_debug_info=False)))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = lower_and_keep
  return captured


def shared_bytes(ttir: str, num_warps: int, num_stages: int) -> int:
  """Shared memory per block of a Triton module compiled for sm_90 (up to LLVM IR)."""
  from triton.backends.compiler import GPUTarget, Language
  from triton.backends.nvidia.compiler import CUDABackend
  from triton._C.libtriton import ir
  backend = CUDABackend(GPUTarget("cuda", 90, 32))
  options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  with tempfile.NamedTemporaryFile("w", suffix=".ttir") as f:
    f.write(ttir)
    f.flush()
    module = ir.parse_mlir_module(f.name, context)
  module.context = context
  stages, metadata = {}, {}
  backend.add_stages(stages, options, Language.TRITON)
  for name in ("ttir", "ttgir", "llir"):
    module = stages[name](module, metadata)
  return metadata["shared"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("dtype", help="input dtype, e.g. bfloat16")
  parser.add_argument("dim", type=int, help="K = V (padded)")
  parser.add_argument("writes", type=int, help="L")
  parser.add_argument("--only", default=None, help="kernels to lower, e.g. wy_grads,inverse")
  a = parser.parse_args()
  captured = capture_triton_modules()
  from benchmarks.kernels import stage_calls
  from pallas_kernels.gpu.kernels import BlockSizes, warps
  bs = BlockSizes(chunk=64)
  for stage, (fn, args) in stage_calls(bs, 1, 256, 2, a.dim, a.writes,
                                       dtype=jnp.dtype(a.dtype)).items():
    if a.only and stage not in a.only.split(","):
      continue
    captured.clear()
    fn.trace(*args).lower(lowering_platforms=("cuda",))
    for name, ttir in captured:
      n = warps(bs, name)
      print(f"{a.dtype} K=V={a.dim} L={a.writes} {stage}/{name} (warps {n}): "
            f"{shared_bytes(ttir, n, bs.num_stages)} bytes", flush=True)


if __name__ == "__main__":
  main()
