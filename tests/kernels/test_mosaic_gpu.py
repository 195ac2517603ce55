"""Mosaic GPU stages (pallas_kernels/gpu/mosaic.py): Mosaic GPU interpret mode on the CPU against
the definition, and the lowering for CUDA (Mosaic GPU's layout inference runs there, without a
GPU)."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.kernels import WY_PASS, mosaic_calls, stage_calls, wy_pass_calls  # noqa: E402
from host_random import normal  # noqa: E402
from pallas_kernels.gpu import mosaic  # noqa: E402
from pallas_kernels.prism import gpu_block_sizes, kernel_inputs  # noqa: E402
from prism_jax.testing import assert_close  # noqa: E402

C = 64
TRITON_BS = gpu_block_sizes(C, interpret=True)  # the Triton kernels' interpret-mode tiling


def _inputs(seed, B=2, T=2 * C, H=2, K=64, V=128, L=2, starts=(0, 45, 100)):
  rng = np.random.default_rng(seed)
  q = normal(seed, (B, T, H, K), jnp.bfloat16)
  k = normal(seed + 1, (B, T, H, L, K), jnp.bfloat16)
  do = normal(seed + 2, (B, T, H, V), jnp.bfloat16)
  g = jnp.asarray(np.log(rng.uniform(0.7, 1.0, (B, T, H))), jnp.float32)
  segment_ids = np.zeros((B, T), np.int32)
  for s in starts[1:]:
    segment_ids[:, s:] += 1
  G, seq, prev = kernel_inputs(g, jnp.asarray(segment_ids), B, T, C)
  return q, k, G, seq, prev, do


def _definition(q, k, G, seq, do, scale):
  """P^lᵀ dO per chunk from the definition, float32 products of the same bf16 inputs."""
  B, T, H, L, K = k.shape
  f = lambda x: np.asarray(x, np.float32)
  q, k, G, seq, do = f(q), f(k), f(G), f(seq), f(do)
  out = np.zeros((L, B, T, H, do.shape[-1]), np.float32)
  i, j = np.meshgrid(np.arange(C), np.arange(C), indexing="ij")
  for n in range(T // C):
    r = slice(n * C, (n + 1) * C)
    same = seq[:, r, None] == seq[:, None, r]  # [B, C, C]
    keep = (i >= j)[None] & same
    for h in range(H):
      expo = G[:, r, h, None] - G[:, None, r, h]
      decay = np.where(keep, np.exp(np.where(keep, expo, 0.0)), 0.0)
      for l in range(L):
        p = np.einsum("bik,bjk->bij", q[:, r, h], k[:, r, h, l]) * decay * scale
        out[l, :, r, h] = np.einsum("bij,biv->bjv", p, do[:, r, h])
  return out


def test_local_dy_matches_the_definition_in_interpret_mode():
  q, k, G, seq, prev, do = _inputs(3)
  out = mosaic.local_dy(q, k, G, seq, prev, do, scale=0.3, interpret=True)
  ref = _definition(q, k, G, seq, do, 0.3)
  assert len(out) == k.shape[3]
  for l, o in enumerate(out):
    assert o.shape == do.shape and o.dtype == jnp.float32
    # The masked, decayed scores are rounded to bf16 for the second product (as in the
    # Triton kernel): the bf16 tolerance.
    assert_close(f"dY^{l + 1}", ref[l], o, tol=5e-3)


def test_local_dy_lowers_for_cuda():
  # Layout inference and the Mosaic GPU lowering run here; a layout the warpgroup cannot hold
  # (for instance one shared-memory vector read as rows and as columns) or scratch beyond the
  # 227 KB of shared memory of a block fails at this point.
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  q, k, G, seq, prev, do = _inputs(4, B=1, H=2, K=128, V=128, L=4)  # the largest it takes
  fn = jax.jit(lambda *a: mosaic.local_dy(*a, scale=0.1))
  text = fn.trace(q, k, G, seq, prev, do).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("change, message", [
    (dict(K=48), "K = 48"), (dict(V=96), "V = 96"), (dict(dtype=jnp.float32), "dtypes")])
def test_local_dy_names_what_it_cannot_take(change, message):
  K, V, dtype = change.get("K", 64), change.get("V", 64), change.get("dtype", jnp.bfloat16)
  q = jnp.zeros((1, C, 1, K), dtype)
  k = jnp.zeros((1, C, 1, 1, K), dtype)
  do = jnp.zeros((1, C, 1, V), dtype)
  G, seq, prev = kernel_inputs(jnp.zeros((1, C, 1)), None, 1, C, C)
  with pytest.raises(ValueError, match=message):
    mosaic.local_dy(q, k, G, seq, prev, do, scale=1.0, interpret=True)


def _output_inputs(seed, B=2, H=2, K=64, V=128, L=2):
  """Inputs of the output stage: the chunk gates as above, X and the saved states random
  (the stage is linear in them)."""
  q, k, G, seq, prev, _ = _inputs(seed, B=B, H=H, K=K, V=V, L=L)
  T = q.shape[1]
  v = normal(seed + 5, (B, T, H, L, V), jnp.bfloat16)
  beta = jnp.asarray(np.random.default_rng(seed).uniform(0.1, 1.0, (B, T, H, L)), jnp.bfloat16)
  x = normal(seed + 6, (B, T, H, V), jnp.bfloat16)
  h = (0.3 * normal(seed + 7, (B, H, T // C * K, V))).astype(jnp.bfloat16)
  return q, k, v, beta, G, seq, prev, x, h


@pytest.mark.parametrize("L", [1, 2])
def test_output_matches_the_triton_kernel_in_interpret_mode(L):
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  args = _output_inputs(5 + L, L=L)
  out = mosaic.output(*args, scale=0.2, interpret=True)
  bs = TRITON_BS
  ref = gk.output(*args, scale=0.2, bs=bs, precision=cm.BF16, interpret=True)
  assert out.shape == ref.shape and out.dtype == ref.dtype == jnp.bfloat16
  # Both round the same float32 products to bf16 at the end: the bf16 tolerance.
  assert_close("o", np.asarray(ref, np.float32), out, tol=5e-3)


def test_output_lowers_for_cuda():
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  args = _output_inputs(9, B=1, K=128, V=128, L=4)  # the largest it takes
  fn = jax.jit(lambda *a: mosaic.output(*a, scale=0.1))
  assert "mosaic_gpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_benchmark_entry_points_run():
  # `kernels.py --stages` times these beside the Triton kernels on the GPU.
  bs = TRITON_BS
  calls = mosaic_calls(stage_calls(bs, 1, 2 * C, 1, 64, 2, interpret=True), interpret=True)
  assert set(calls) == {name + "_mosaic" for name in mosaic.STAGES}
  l1 = stage_calls(bs, 1, 2 * C, 1, 64, 1, interpret=True)
  assert not wy_pass_calls(stage_calls(bs, 1, 2 * C, 1, 64, 2, interpret=True), True)
  wy = wy_pass_calls(l1, interpret=True, pass_block_v=32)
  assert set(wy) == set(WY_PASS)
  calls.update(wy)
  for name, (fn, args) in calls.items():
    outs = fn(*args)
    if name == "wy_further_grads_mosaic":  # the erase write's slots are written after it
      outs = [x[:, :, :, 1:] for x in outs[:3]] + list(outs[3:])
    for out in jax.tree.leaves(outs):
      assert np.all(np.isfinite(np.asarray(out, np.float32))), name


def _assert_same(names, out, ref):
  """Mosaic against Triton: the same bf16 operands and float32 sums (in another order where the
  WGMMA accumulates differently), so agreement far inside the bf16 tolerance."""
  for name, o, r in zip(names, out, ref, strict=True):
    assert o.shape == r.shape and o.dtype == r.dtype, name
    assert_close(name, np.asarray(r, np.float32), np.asarray(o, np.float32), tol=1e-4)


def _state_inputs(seed, B=1, H=2, K=64, V=128, L=2):
  """Inputs of the pass over chunks: three chunks, packed segments, an initial state; U, Wk and
  the keys small enough that the state stays O(1) over the chunks."""
  _, k, G, seq, prev, _ = _inputs(seed, B=B, T=3 * C, H=H, K=K, V=V, L=L, starts=(0, 70, 150))
  T = k.shape[1]
  rng = np.random.default_rng(seed)
  k = (0.15 * k.astype(jnp.float32)).astype(jnp.bfloat16)
  v = normal(seed + 5, (B, T, H, L, V), jnp.bfloat16)
  beta = jnp.asarray(rng.uniform(0.1, 1.0, (B, T, H, L)), jnp.bfloat16)
  u = normal(seed + 6, (B, T, H, V))
  wk = (0.15 * normal(seed + 7, (B, T, H, K))).astype(jnp.bfloat16)
  h0 = 0.3 * normal(seed + 8, (B, H, K, V))
  return k, v, beta, G, seq, prev, u, wk, h0


@pytest.mark.parametrize("L,block_v", [(1, 64), (2, 64), (2, 32)])
def test_state_forward_matches_the_triton_kernel_in_interpret_mode(L, block_v):
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  args = _state_inputs(11 + L, L=L)
  out = mosaic.state_forward(*args, block_v=block_v, interpret=True)
  bs = TRITON_BS
  ref = gk.state_forward(*args, bs=bs, precision=cm.BF16, interpret=True,
                         store_dtype=jnp.bfloat16)
  _assert_same(("h", "x", "final state"), out, ref)


@pytest.mark.parametrize("block_v", [64, 32])
def test_state_forward_lowers_for_cuda(block_v):
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  args = _state_inputs(15, K=128, V=128, L=2)  # the largest it takes
  fn = jax.jit(lambda *a: mosaic.state_forward(*a, block_v=block_v))
  assert "mosaic_gpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("block_v", [64, 32])
def test_wy_state_forward_matches_apply_then_state_forward(block_v):
  """The pass forming U and Wk itself gives the states, X and final state of apply_inverse then
  state_forward (Triton kernels), and, with residuals, their U and Wk."""
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  k, v, beta, G, seq, prev, _, _, h0 = _state_inputs(41, L=1)
  kw = dict(bs=TRITON_BS, precision=cm.BF16, interpret=True, store_dtype=jnp.bfloat16)
  inv = gk.inverse(k, beta, G, seq, **kw)
  u, wk = gk.apply_inverse(k, v, beta, G, seq, prev, inv, solve=cm.BF16, **kw)
  ref = gk.state_forward(k, v, beta, G, seq, prev, u, wk, h0, **kw)
  args = (k, v, beta, G, seq, prev, inv, h0)
  names = ("h", "x", "final state", "u", "wk")
  out = mosaic.wy_state_forward(*args, residuals=True, block_v=block_v, interpret=True)
  _assert_same(names, out, tuple(ref) + (u, wk))
  alone = mosaic.wy_state_forward(*args, residuals=False, block_v=block_v, interpret=True)
  _assert_same(names[:3], alone, out[:3])


def test_wy_state_forward_lowers_for_cuda_and_takes_one_write():
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  k, v, beta, G, seq, prev, _, _, h0 = _state_inputs(15, K=128, V=128, L=1)
  inv = jnp.zeros(k.shape[:3] + (C,), k.dtype)
  for residuals, block_v in ((True, 64), (True, 32), (False, 64)):
    fn = jax.jit(lambda *a: mosaic.wy_state_forward(*a, residuals=residuals, block_v=block_v))
    lowered = fn.trace(k, v, beta, G, seq, prev, inv, h0).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
  k2, v2, beta2 = (jnp.concatenate([x, x], axis=3) for x in (k, v, beta))
  with pytest.raises(ValueError, match="L = 2"):
    mosaic.wy_state_forward(k2, v2, beta2, G, seq, prev, inv, h0, residuals=True)


@pytest.mark.parametrize("L,dtype", [(1, jnp.bfloat16), (2, jnp.bfloat16), (3, jnp.bfloat16),
                                     (1, jnp.float16)])
def test_custom_vjp_with_the_mosaic_stages_matches_naive(L, dtype, monkeypatch):
  from kernel_checks import check_against_naive, launched_kernels
  from pallas_kernels import pallas_prism
  monkeypatch.setenv("PRISM_MOSAIC_STAGES", ",".join(mosaic.STAGES))
  # Interpret-mode blocks, but no narrowing of the passes over chunks for having few programs
  # (seq_min_programs = 1), so the Mosaic passes run at 32 columns as the Triton ones would.
  monkeypatch.setenv("PRISM_GPU_BLOCKS", "16,4,3,16,4,32,8,2,1,4,16")
  case = (1, 150, 2, 64, 64, L, C, True, True, dtype)  # T padded, segments, S₀
  check_against_naive(case, backend="gpu", interpret=True, seed=21 + L)
  # Every stage that takes L ran on Mosaic GPU (from L = 2 the WY side's writes after the
  # first too), the inverse on Triton.
  q = jnp.zeros((1, C, 1, 64), jnp.bfloat16)
  k, v = jnp.zeros((1, C, 1, L, 64), jnp.bfloat16), jnp.zeros((1, C, 1, L, 64), jnp.bfloat16)
  beta, g = jnp.ones((1, C, 1, L), jnp.bfloat16), jnp.zeros((1, C, 1))
  loss = lambda *a: pallas_prism(*a, chunk_size=C, interpret=True, backend="gpu")[0].astype(
      jnp.float32).sum()
  names = set(launched_kernels(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, k, v, beta,
                                                                              g).jaxpr))
  on_mosaic = {"prism_" + name for name in mosaic.STAGES
               if L <= mosaic.MAX_WRITES.get(name, L) and (L > 1 or name != "wy_further_grads")}
  assert not on_mosaic & names, names
  assert {name + "_mosaic" for name in on_mosaic} | {"prism_inverse"} <= names, names


def test_wy_pass_matches_naive_with_and_without_residuals(monkeypatch):
  """At L = 1 `wy_state_forward` (the pass forming U and Wk itself) replaces apply_inverse and
  the state pass: the training forward, which also stores U and Wk for the backward, and the
  forward alone, which does not, both match the sequential reference, gradients included."""
  from kernel_checks import check_against_naive, forward_and_grad_kernels, random_case
  from pallas_kernels import pallas_prism
  monkeypatch.setenv("PRISM_MOSAIC_STAGES", "all,wy_pass")
  monkeypatch.setenv("PRISM_GPU_BLOCKS", "16,4,3,16,4,32,8,2,1,4,16")  # 32-column passes
  case = (1, 150, 2, 64, 64, 1, C, True, True, jnp.bfloat16)  # T padded, segments, S₀
  check_against_naive(case, backend="gpu", interpret=True, seed=31, forward_alone=True)
  (q, k, v, beta, g, s0), segment_ids, _, _ = random_case(case, 32)
  run = lambda q, k, v, beta, g: pallas_prism(
      q, k, v, beta, g, initial_state=s0, output_final_state=True, segment_ids=segment_ids,
      chunk_size=C, interpret=True, backend="gpu")
  for names in forward_and_grad_kernels(run, (q, k, v, beta, g)):
    assert "prism_wy_state_forward_mosaic" in names, names
    assert not {n for n in names if "apply_inverse" in n or "prism_state_forward" in n}, names


def test_unknown_mosaic_stage_is_named(monkeypatch):
  from pallas_kernels.prism import gpu_block_sizes
  monkeypatch.setenv("PRISM_MOSAIC_STAGES", "output,inverse")
  with pytest.raises(ValueError, match="inverse"):
    gpu_block_sizes(C, interpret=True)
  monkeypatch.setenv("PRISM_MOSAIC_STAGES", "all,narrow")
  bs = gpu_block_sizes(C, interpret=False)
  assert bs.mosaic == mosaic.STAGES and bs.mosaic_narrow
  monkeypatch.setenv("PRISM_MOSAIC_STAGES", "none")
  assert gpu_block_sizes(C, interpret=False).mosaic == ()


@pytest.mark.parametrize("L", [1, 2])
def test_apply_inverse_matches_the_triton_kernel_in_interpret_mode(L):
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  k, v, beta, G, seq, prev, *_ = _state_inputs(31 + L, L=L)
  bs = TRITON_BS
  inv = gk.inverse(k, beta, G, seq, bs=bs, precision=cm.BF16, interpret=True,
                   store_dtype=jnp.bfloat16)
  args = (k, v, beta, G, seq, prev, inv)
  out = mosaic.apply_inverse(*args, interpret=True)
  ref = gk.apply_inverse(*args, bs=bs, precision=cm.BF16, solve=cm.BF16, interpret=True,
                         store_dtype=jnp.bfloat16)
  _assert_same(("U", "Wk"), out, ref)


def test_apply_inverse_lowers_for_cuda_and_names_its_write_limit():
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  k, v, beta, G, seq, prev, *_ = _state_inputs(35, K=128, V=128, L=2)
  inv = jnp.zeros(k.shape[:3] + (C,), jnp.bfloat16)
  fn = jax.jit(lambda *a: mosaic.apply_inverse(*a))
  assert "mosaic_gpu" in fn.trace(k, v, beta, G, seq, prev, inv).lower(
      lowering_platforms=("cuda",)).as_text()
  k3, v3 = (jnp.concatenate([x, x[:, :, :, :1]], axis=3) for x in (k, v))
  with pytest.raises(ValueError, match="L = 3"):
    mosaic.apply_inverse(k3, v3, jnp.concatenate([beta, beta[..., :1]], axis=3), G, seq, prev,
                         inv, interpret=True)


@pytest.mark.parametrize("block_v", [64, 32])
def test_state_backward_matches_the_triton_kernel_in_interpret_mode(block_v):
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  k, _, _, G, seq, prev, local, wk, dhT = _state_inputs(41, L=1)
  B, T, H, _, K = k.shape
  q = (0.2 * normal(42, (B, T, H, K))).astype(jnp.bfloat16)
  do = normal(43, (B, T, H, local.shape[-1]), jnp.bfloat16)
  args = (q, k, G, seq, prev, wk, do, local, dhT)
  out = mosaic.state_backward(*args, scale=0.3, block_v=block_v, interpret=True)
  bs = TRITON_BS
  ref = gk.state_backward(*args, scale=0.3, bs=bs, precision=cm.BF16, interpret=True,
                          store_dtype=jnp.bfloat16)
  _assert_same(("dh", "dX", "dS0"), out, ref)


@pytest.mark.parametrize("block_v", [64, 32])
def test_state_backward_lowers_for_cuda(block_v):
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  k, _, _, G, seq, prev, local, wk, dhT = _state_inputs(45, K=128, V=128, L=2)
  q, do = wk, local.astype(jnp.bfloat16)
  fn = jax.jit(lambda *a: mosaic.state_backward(*a, scale=0.1, block_v=block_v))
  assert "mosaic_gpu" in fn.trace(q, k, G, seq, prev, wk, do, local, dhT).lower(
      lowering_platforms=("cuda",)).as_text()


def test_default_stages_follow_the_measurements():
  """Compiled runs take every stage but the inverse and apply_inverse to Mosaic GPU where it
  takes the shapes (the passes at 32 columns too); with wy_pass, at L = 1 the pass forming U and
  Wk replaces apply_inverse and the state pass, but not where the passes are narrowed; float32
  inputs and L beyond a stage's shared memory stay on Triton."""
  from pallas_kernels.gpu import kernels as gk
  from pallas_kernels.gpu.prism import _on_mosaic, _wy_pass
  bs = gk.BlockSizes()

  def shapes(B, H, dtype=jnp.bfloat16, T=4 * C, D=128, L=1):
    return (jax.ShapeDtypeStruct((B, T, H, D), dtype),
            jax.ShapeDtypeStruct((B, T, H, L, D), dtype), jax.ShapeDtypeStruct((B, T, H, L, D),
                                                                               dtype))

  on = lambda stage, *a, **kw: _on_mosaic(bs, stage, *shapes(*a, **kw))
  wy = lambda *a, **kw: _wy_pass(bs, *shapes(*a, **kw), residuals=True, interpret=False)
  for stage in ("output", "local_dy", "state_forward", "state_backward", "state_grads",
                "wy_grads"):
    assert on(stage, 4, 16), stage
  assert on("wy_further_grads", 4, 16, L=2) and not on("wy_further_grads", 4, 16)  # L ≥ 2
  assert on("state_forward", 1, 16) and on("state_backward", 1, 16)  # narrowed: 32 columns
  assert not on("apply_inverse", 4, 16)
  assert not on("output", 4, 16, dtype=jnp.float32)
  assert not on("state_forward", 4, 16, L=3)  # shared memory holds L ≤ 2
  assert on("wy_grads", 4, 16, L=3) and on("state_grads", 4, 16, L=2)
  assert on("state_grads", 4, 16, L=3) and not on("state_grads", 4, 16, L=4)  # shared memory
  assert wy(4, 16) is not None
  assert wy(1, 16) is None and wy(4, 16, L=2) is None and wy(4, 16, dtype=jnp.float32) is None
  assert _wy_pass(dataclasses.replace(bs, wy_pass=False), *shapes(4, 16), residuals=True,
                  interpret=False) is None
  assert gk.warps(bs, "prism_wy_further_grads") == 8
  bs = dataclasses.replace(bs, mosaic_narrow=False)
  assert not on("state_forward", 1, 16) and not on("state_backward", 1, 16)


def _grads_inputs(seed, L, K=64, V=128):
  """Inputs of the state-side gradient kernel: the forward's saved X and states, and the
  backward's dS' and dX, small and random; packed segments over three chunks."""
  k, v, beta, G, seq, prev, dx, _, _ = _state_inputs(seed, K=K, V=V, L=L)
  B, T, H = k.shape[:3]
  q = (0.2 * normal(seed + 20, (B, T, H, K))).astype(jnp.bfloat16)
  x = normal(seed + 21, (B, T, H, V), jnp.bfloat16)
  h = (0.3 * normal(seed + 22, (B, H, T // C * K, V))).astype(jnp.bfloat16)
  dh = (0.3 * normal(seed + 23, (B, H, T // C * K, V))).astype(jnp.bfloat16)
  do = normal(seed + 24, (B, T, H, V), jnp.bfloat16)
  return q, k, v, beta, G, seq, prev, x, h, dh, dx, do


@pytest.mark.parametrize("L,K", [(1, 128), (2, 64), (3, 64)])  # L = 3: one slot of dP
def test_state_grads_matches_the_triton_kernel_in_interpret_mode(L, K):
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  args = _grads_inputs(51 + L, L, K=K)
  out = mosaic.state_grads(*args, scale=0.3, interpret=True)
  bs = TRITON_BS
  ref = gk.state_grads(*args, scale=0.3, bs=bs, precision=cm.BF16, interpret=True)
  flat = lambda r: (r[0], *r[1], r[2], r[3])
  names = ("dq", *(f"dk{l}" for l in range(L)), "dX S^T", "dG")
  # dq is rounded to bf16 at the end; the rest are float32 sums of the same bf16 products.
  for name, o, r in zip(names, flat(out), flat(ref), strict=True):
    assert o.shape == r.shape and o.dtype == r.dtype, name
    assert_close(name, np.asarray(r, np.float32), np.asarray(o, np.float32),
                 tol=5e-3 if name == "dq" else 1e-4)


def test_state_grads_lowers_for_cuda():
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  fn = jax.jit(lambda *a: mosaic.state_grads(*a, scale=0.1))
  for L in (2, 3):  # every dP^l in shared memory; one at a time, 223 of the 227 KB
    args = _grads_inputs(55, L, K=128)
    assert "mosaic_gpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  with pytest.raises(ValueError, match="L = 4"):
    mosaic.state_grads(*_grads_inputs(56, 4, K=128), scale=0.1)


def _wy_inputs(seed, K, L):
  """Arguments of the WY kernels: random keys, values, gates, (I + A)⁻¹, U, Wk and the
  cotangents that reach them (dX, dX Sᵀ, dS', the local dY^l and the state side's dK^l)."""
  k, v, beta, G, seq, prev, u, wk, _ = _state_inputs(seed, K=K, V=K, L=L)
  B, T, H = k.shape[:3]
  inv = (0.3 * normal(seed + 1, (B, T, H, C))).astype(jnp.bfloat16)
  dx, dxs = normal(seed + 2, (B, T, H, K)), normal(seed + 3, (B, T, H, K))
  dh = (0.3 * normal(seed + 4, (B, H, T // C * K, K))).astype(jnp.bfloat16)
  local = [dx] + [normal(seed + 5 + l, (B, T, H, K)) for l in range(1, L)]
  dk_state = [normal(seed + 10 + l, (B, T, H, K)) for l in range(L)]
  return (k, v, beta, G, seq, prev, inv, u, wk, dx, dxs, dh, local, dk_state)


@pytest.mark.parametrize("K,L", [(64, 1), (128, 1), (64, 2), (128, 3)])
def test_wy_grads_matches_the_triton_kernel_in_interpret_mode(K, L):
  """The Mosaic WY kernel (the erase write; at L ≥ 2 after `wy_further_grads`, the other
  writes on Triton) against the Triton kernel doing every write."""
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  from benchmarks.kernels import further_args
  args = _wy_inputs(61 + K + L, K, L)
  kw = dict(bs=TRITON_BS, precision=cm.BF16, solve=cm.BF16, interpret=True)
  further = gk.wy_further_grads(*further_args(args), **kw) if L > 1 else None
  out = mosaic.wy_grads(*args, interpret=True, further=further)
  ref = gk.wy_grads(*args, **kw)
  for name, o, r in zip(("dk", "dv", "dbeta", "dG"), out, ref, strict=True):
    assert o.shape == r.shape and o.dtype == r.dtype, name
    # dk, dv and dβ are rounded to bf16 at the end. dG is a float32 sum, but of products whose
    # operands dR and dBk were rounded to bf16 after sums in another order: one element landing
    # on the other side of a rounding boundary moves a whole row of dA, and dG with it (seen:
    # 1.9e-4 at K = 64, every difference from one element of one chunk and head; against a
    # float64 evaluation of the same roundings both kernels are equally close). So the bf16
    # tolerance for all four.
    assert_close(name, np.asarray(r, np.float32), np.asarray(o, np.float32), tol=5e-3)


@pytest.mark.parametrize("K,L", [(64, 2), (128, 3)])
def test_wy_further_grads_matches_the_triton_kernel_in_interpret_mode(K, L):
  """The Mosaic kernel for the WY side's writes after the first against the Triton one: the
  slots of those writes in dk, dv and dβ, the erase write's dK¹ so far, and their terms of dβ¹
  and dG (at L = 3 summed over two programs)."""
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  from benchmarks.kernels import further_args
  seed = int(np.random.default_rng().integers(1 << 16))
  args = further_args(_wy_inputs(seed, K, L))
  out = mosaic.wy_further_grads(*args, interpret=True)
  ref = gk.wy_further_grads(*args, bs=TRITON_BS, precision=cm.BF16, solve=cm.BF16,
                            interpret=True)
  names = ("dk", "dv", "dbeta", "dk1", "dbeta1", "dG")
  for name, o, r in zip(names, out, ref, strict=True):
    assert o.dtype == r.dtype, name
    if name in ("dk", "dv", "dbeta"):  # the first slot is the erase write's, written later
      assert o.shape[3] == L and r.shape[3] >= L, name
      o, r = o[:, :, :, 1:], r[:, :, :, 1:L]
    assert o.shape == r.shape, name
    # The same 16-bit operands and float32 sums in another order: the bf16 tolerance, as for
    # the erase write's kernel above.
    assert_close(name, np.asarray(r, np.float32), np.asarray(o, np.float32), tol=5e-3)


def test_wy_further_grads_lowers_for_cuda_and_refuses_what_it_cannot_take():
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  from benchmarks.kernels import further_args
  args = further_args(_wy_inputs(68, 128, 4))  # the largest L the custom_vjp takes
  fn = jax.jit(lambda *a: mosaic.wy_further_grads(*a[:9], list(a[9]), list(a[10])))
  lowered = fn.trace(*args[:9], tuple(args[9]), tuple(args[10])).lower(
      lowering_platforms=("cuda",))
  assert "prism_wy_further_grads_mosaic" in lowered.as_text()
  with pytest.raises(ValueError, match="only the erase write is left"):
    mosaic.wy_further_grads(*further_args(_wy_inputs(69, 64, 1)))
  k, v, *rest = args
  with pytest.raises(ValueError, match="K = 128 ≠ V = 64"):
    mosaic.wy_further_grads(k, v[..., :64], *rest)


def test_wy_grads_lowers_for_cuda_and_needs_the_further_writes_exactly_at_l2(monkeypatch):
  pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
  from kernel_checks import answer_gpu_queries_as_h200
  answer_gpu_queries_as_h200(monkeypatch)  # the Triton kernels lower too
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  from benchmarks.kernels import further_args
  args = _wy_inputs(66, 128, 2)
  bs = gk.BlockSizes()
  kw = dict(bs=bs, precision=cm.BF16, solve=cm.BF16, interpret=False)
  fn = jax.jit(lambda *a: mosaic.wy_grads(
      *a, further=gk.wy_further_grads(*further_args(a), **kw)))
  text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "prism_wy_further_grads" in text
  with pytest.raises(ValueError, match="L = 2 needs the further writes"):
    mosaic.wy_grads(*args)
  l1 = _wy_inputs(67, 64, 1)
  with pytest.raises(ValueError, match="L = 1 needs the further writes"):
    mosaic.wy_grads(*l1, further=(None,) * 6)
  with pytest.raises(ValueError, match="only the erase write is left"):
    gk.wy_further_grads(*further_args(l1), **kw)


@pytest.mark.parametrize("L", [1, 2])
def test_mosaic_stages_under_vmap_match_each_problem_alone(L, monkeypatch):
  """A leading vmapped axis (layers, ensembles) through every Mosaic stage, values and
  gradients, equals running each problem alone (at L = 2 the WY side's second write too)."""
  from pallas_kernels import pallas_prism
  from prism_jax.testing import random_prism_inputs
  monkeypatch.setenv("PRISM_MOSAIC_STAGES", "all")
  monkeypatch.setenv("PRISM_GPU_BLOCKS", "16,4,3,16,4,32,8,2,1,4,16")
  seed = int(np.random.default_rng().integers(1 << 16))
  *inputs, _ = random_prism_inputs(jax.random.key(seed), 2, C, 1, 64, 64, L)
  inputs = [x.astype(jnp.bfloat16) if x.ndim > 3 else x for x in inputs]  # g stays float32
  do = normal(seed, (2, C, 1, 64))
  loss = lambda q, k, v, beta, g, do: jnp.sum(pallas_prism(
      q, k, v, beta, g, chunk_size=C, interpret=True, backend="gpu")[0].astype(jnp.float32) * do)
  grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
  args = (*inputs, do)
  batched = jax.vmap(grad)(*(x[:, None] for x in args))  # two problems of batch 1
  for i in range(2):
    alone = grad(*(x[i:i + 1] for x in args))
    for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(alone), strict=True):
      np.testing.assert_allclose(np.asarray(got[i], np.float32), np.asarray(want, np.float32),
                                 rtol=1e-5, atol=1e-5)
