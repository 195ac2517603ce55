"""Shared memory (and, with --registers, registers and spills) of the compiled GPU kernels,
estimated on a machine without a GPU.

Each kernel's pallas_call is lowered for CUDA on the CPU (the GPU query answered with an
H200's compute capability 9.0), its Triton module captured, and Triton's own passes for sm_90
run up to LLVM IR, whose metadata holds the shared memory per block. Needs the Triton wheel the
GPU image has (3.6.0), which pip can install into a folder of its own:

    pip install --no-deps --target /tmp/triton-site triton==3.6.0
    PYTHONPATH=/tmp/triton-site python benchmarks/shared_memory.py bfloat16 128 3 --registers

--registers runs the PTX through the ptxas the Triton wheel ships: registers per thread and
spill bytes. The split of the gradient kernel was chosen this way (one kernel: 255 registers and
4.4 KB of spills per thread at bf16 K = V = 128, L = 1; the state-side and WY kernels that
replaced it: a few hundred bytes and ~1 KB), then timed on the device.

Compared with what the H200 reported, the estimate errs high: float32 K = V = 64, L = 4
gradient kernel 262 144 here, 245 760 there; bf16 K = V = 128, L = 3 state_forward 246 272
here, and it compiled there (limit 232 448). Use it to choose which shapes to try on the device,
not instead of trying them (`kernels.py --compile-check`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
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


def compile_sm90(ttir: str, num_warps: int, num_stages: int, registers: bool = False) -> dict:
  """Shared memory per block of a Triton module compiled for sm_90 (Triton's passes up to LLVM
  IR) and, with registers=True, what ptxas (shipped in the Triton wheel) reports for its PTX:
  registers per thread and spill bytes."""
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
  for name in ("ttir", "ttgir", "llir") + (("ptx",) if registers else ()):
    module = stages[name](module, metadata)
  out = {"shared": metadata["shared"]}
  if registers:
    out.update(_ptxas_report(module))
  return out


def _ptxas_report(ptx: str) -> dict:
  import triton
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "k.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.o")],
                         capture_output=True, text=True, check=True)
  text = log.stdout + log.stderr
  number = lambda pattern: int(re.search(pattern, text).group(1))
  return {"registers": number(r"Used (\d+) registers"),
          "spill_stores": number(r"(\d+) bytes spill stores"),
          "spill_loads": number(r"(\d+) bytes spill loads")}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("dtype", help="input dtype, e.g. bfloat16")
  parser.add_argument("dim", type=int, help="K = V (padded)")
  parser.add_argument("writes", type=int, help="L")
  parser.add_argument("--only", default=None, help="kernels to lower, e.g. wy_grads,inverse")
  parser.add_argument("--registers", action="store_true",
                      help="also registers per thread and spill bytes (ptxas -v on the PTX)")
  parser.add_argument("--tiling", default=None,
                      help="BlockSizes.parse format, e.g. 64,4,2,64,8 (default: the kernels')")
  a = parser.parse_args()
  captured = capture_triton_modules()
  from benchmarks.kernels import stage_calls
  from pallas_kernels.gpu.kernels import BlockSizes, warps
  bs = BlockSizes.parse(a.tiling) if a.tiling else BlockSizes(chunk=64)
  for stage, (fn, args) in stage_calls(bs, 1, 256, 2, a.dim, a.writes,
                                       dtype=jnp.dtype(a.dtype)).items():
    if a.only and stage not in a.only.split(","):
      continue
    captured.clear()
    fn.trace(*args).lower(lowering_platforms=("cuda",))
    for name, ttir in captured:
      n = warps(bs, name)
      res = compile_sm90(ttir, n, bs.num_stages, a.registers)
      extra = ("" if not a.registers else f", {res['registers']} registers, spills "
               f"{res['spill_stores']} B stored / {res['spill_loads']} B loaded per thread")
      print(f"{a.dtype} K=V={a.dim} L={a.writes} {name} (warps {n}): {res['shared']} bytes"
            f"{extra}", flush=True)


if __name__ == "__main__":
  main()
