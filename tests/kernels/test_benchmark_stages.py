"""benchmarks/kernels.py's per-kernel entry points (`--stages`, `--compile-check` and the offline
estimate of benchmarks/shared_memory.py all go through `stage_calls`), in interpret mode: they
cover every kernel the custom_vjp launches, in its order, and each one runs."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.kernels import CHUNK, stage_calls  # noqa: E402
from kernel_checks import answer_gpu_queries_as_h200, launched_kernels  # noqa: E402
from pallas_kernels import pallas_prism  # noqa: E402
from pallas_kernels.gpu.kernels import BlockSizes  # noqa: E402
from prism_jax.testing import random_prism_inputs  # noqa: E402


def test_stage_calls_cover_every_kernel_in_order():
  q, k, v, beta, g, _ = random_prism_inputs(jax.random.key(0), 1, 2 * CHUNK, 1, 32, 32, 2)
  loss = lambda *a: pallas_prism(*a, chunk_size=CHUNK, interpret=True, backend="gpu")[0].sum()
  launched = launched_kernels(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(
      q, k, v, beta, g).jaxpr)
  bs = BlockSizes(chunk=CHUNK, block_v=16, block_k=16, seq_block_v=32, chunk_block_v=16)
  calls = stage_calls(bs, 1, 2 * CHUNK, 2, 32, 2, interpret=True)
  # At these widths every stage runs on Triton, whose WY kernel does every write
  # (wy_further_grads runs only before the Mosaic one).
  assert ["prism_" + name for name in calls if name != "wy_further_grads"] == launched
  for name, (fn, args) in calls.items():
    outs = fn(*args)
    if name == "wy_further_grads":  # the first slots of dk, dv, dβ are the Mosaic kernel's
      outs = [x[:, :, :, 1:] for x in outs[:3]] + list(outs[3:])
    for out in jax.tree.leaves(outs):
      assert np.all(np.isfinite(np.asarray(out, np.float32))), name
      assert out.dtype in (jnp.float32, jnp.bfloat16), (name, out.dtype)


@pytest.mark.parametrize("dtype,L,diag,inverse_block_k", [
    (jnp.bfloat16, 1, "rows", 0), (jnp.bfloat16, 3, "doubling", 32), (jnp.float32, 2, "rows", 0)])
def test_every_triton_kernel_lowers_for_the_h200(dtype, L, diag, inverse_block_k, monkeypatch):
  """Each Triton-backend kernel lowers to Triton IR for an H200 on this CPU (the lowering only
  needs the GPU's description): a primitive the Triton lowering lacks fails here, not on the
  device."""
  answer_gpu_queries_as_h200(monkeypatch)
  bs = BlockSizes(chunk=CHUNK, inverse_diag=diag, inverse_block_k=inverse_block_k)
  for name, (fn, args) in stage_calls(bs, 1, 2 * CHUNK, 2, 128, L, dtype=dtype).items():
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "prism_" + name in text, name


def test_programs_compiled_side_by_side_match_the_jitted_ones():
  """The table's programs compiled before timing (`compile_programs`, several threads) compute
  what the jitted functions do, and a program that cannot be built comes back as its error."""
  from benchmarks.kernels import compile_programs, forward_fn, fwd_bwd_fn, make_inputs
  jobs = {}
  for L in (1, 2):
    args, do = make_inputs(1, CHUNK + 7, 2, 32, L, seed=L)
    jobs[(L, "chunk")] = ("chunk", args, do, True)
    jobs[(L, "naive")] = ("naive", args, do, False)
  jobs["bad"] = ("no such impl", *jobs[(1, "chunk")][1:])
  built = compile_programs(jobs, workers=3)
  assert isinstance(built["bad"], Exception) and "no such impl" in str(built["bad"])
  for key, (impl, args, do, backward) in jobs.items():
    if key == "bad":
      continue
    fwd, both = built[key]
    np.testing.assert_array_equal(np.asarray(fwd(*args), np.float32),
                                  np.asarray(jax.jit(forward_fn(impl))(*args), np.float32))
    if backward:
      got, want = both(args, do), jax.jit(fwd_bwd_fn(impl))(args, do)
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    else:
      assert both is None
