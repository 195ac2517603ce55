"""The GPU kernels under one `jax.custom_vjp`: forward (prepare → state pass → output) and the
hand-written backward (state cotangent pass → per-chunk gradients), recomputing from the states
saved at every chunk boundary (memory linear in T)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prism_jax.ops import chunk_math as cm
from pallas_kernels.gpu import kernels, mosaic
from pallas_kernels.gpu.kernels import BlockSizes


def operand_precision(dtype):
  """Every product but those inside the (I + A)⁻¹ kernel (which are float32, HIGHEST, as the
  spec asks of the solve): with bf16 inputs both operands are rounded to bf16 and accumulated
  in float32 — the tensor cores' full rate and half the on-chip operand memory of TF32 —
  including the inverse where U, Wk and their cotangents apply it (as flash-linear-attention
  does); float16 inputs the same in float16 (relative errors about 4e-4 in interpret mode,
  against 3e-3 with bf16 operands; a state entry above 65504 would overflow it); float32
  inputs get float32 products. On the H200 (B4 T4096 H16 K=V=128, L = 1) the inverse took 0.48
  ms with float32 products against 0.83 with three TF32 products, and applying it 0.35 ms with
  bf16 operands against 0.59 with TF32×3 (the WY gradient kernel 0.89 against 1.14); in
  interpret-mode tests the bf16 application added 0.2–0.5e-3 to relative errors of about 3e-3
  (benchmarks/RESULTS.md)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return cm.F16 if dtype == jnp.float16 else cm.BF16


def store_dtype(dtype):
  """Dtype of the saved arrays that later kernels read only as product operands (the states
  entering each chunk and their cotangents, X, Wk): the 16-bit type `operand_precision` rounds
  them to anyway, else float32. The state itself stays float32 on chip."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.float32
  return jnp.float16 if dtype == jnp.float16 else jnp.bfloat16


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def chunked_prism(q, k, v, beta, G, seq, prev, h0, scale, bs: BlockSizes, interpret: bool):
  """Chunked recurrence on kernel-ready arrays: T a multiple of bs.chunk, K and V powers of two.

  q [B,T,H,K]; k [B,T,H,L,K]; v [B,T,H,L,V]; beta [B,T,H,L] (one dtype); G [B,T,H] float32
  chunk-local cumulative log-decay; seq, prev [B,T] float32 packed-sequence index of each
  position and of the state entering its chunk; h0 [B,H,K,V] float32.
  Returns (o [B,T,H,V] in q's dtype, final state [B,H,K,V] float32).
  """
  o, hT, _ = _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret)
  return o, hT


def _on_mosaic(bs, stage, q, k, v, do=None):
  """Whether `stage` runs on its Mosaic GPU version (named in bs.mosaic, and it takes these
  arrays; otherwise the Triton kernel runs)."""
  if stage not in bs.mosaic:
    return False
  if stage in PASSES:
    block_v = _pass_block_v(bs, q, v)
    narrow = block_v < min(bs.seq_block_v, v.shape[-1])
    if block_v % 32 or (narrow and not bs.mosaic_narrow):  # narrow: not yet timed
      return False
  return mosaic.stage_reason(stage, q, k, v if do is None else do, bs.chunk) is None


PASSES = ("state_forward", "state_backward")


def _pass_block_v(bs, q, v):
  """Value columns per program of the passes over chunks, on either backend (`seq_tiling`)."""
  return kernels.seq_tiling(bs, q.shape[0], q.shape[2], v.shape[-1])[0]


def _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret):
  kw = dict(bs=bs.fitted(q.dtype, k.shape[3]), precision=operand_precision(q.dtype),
            interpret=interpret)
  store = store_dtype(q.dtype)
  if _on_mosaic(bs, "apply_inverse", q, k, v):
    inv = kernels.inverse(k, beta, G, seq, solve=cm.HIGHEST, store_dtype=store, **kw)
    u, wk = mosaic.apply_inverse(k, v, beta, G, seq, prev, inv, chunk=bs.chunk,
                                 interpret=interpret)
  else:
    u, wk, inv = kernels.prepare(k, v, beta, G, seq, prev, store_dtype=store, **kw)
  if _on_mosaic(bs, "state_forward", q, k, v):
    h, x, hT = mosaic.state_forward(k, v, beta, G, seq, prev, u, wk, h0, chunk=bs.chunk,
                                    block_v=_pass_block_v(bs, q, v), interpret=interpret)
  else:
    h, x, hT = kernels.state_forward(k, v, beta, G, seq, prev, u, wk, h0, store_dtype=store,
                                     **kw)
  if _on_mosaic(bs, "output", q, k, v):
    o = mosaic.output(q, k, v, beta, G, seq, prev, x, h, scale=scale, chunk=bs.chunk,
                      interpret=interpret)
  else:
    o = kernels.output(q, k, v, beta, G, seq, prev, x, h, scale=scale, **kw)
  return o, hT, (q, k, v, beta, G, seq, prev, inv, u, wk, x, h)


def _fwd(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret):
  o, hT, res = _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret)
  return (o, hT), res


def _bwd(scale, bs, interpret, res, cotangents):
  q, k, v, beta, G, seq, prev, inv, u, wk, x, h = res
  do, dhT = cotangents
  kw = dict(scale=scale, bs=bs.fitted(q.dtype, k.shape[3]), precision=operand_precision(q.dtype),
            interpret=interpret)
  if _on_mosaic(bs, "local_dy", q, k, v, do):
    local = mosaic.local_dy(q, k, G, seq, prev, do, scale=scale, chunk=bs.chunk,
                            interpret=interpret)
  else:
    local = kernels.local_dy(q, k, G, seq, prev, do, **kw)
  if _on_mosaic(bs, "state_backward", q, k, v, do):
    dh, dx, dh0 = mosaic.state_backward(q, k, G, seq, prev, wk, do, local[0],
                                        dhT.astype(jnp.float32), scale=scale, chunk=bs.chunk,
                                        block_v=_pass_block_v(bs, q, do), interpret=interpret)
  else:
    dh, dx, dh0 = kernels.state_backward(q, k, G, seq, prev, wk, do, local[0],
                                         dhT.astype(jnp.float32),
                                         store_dtype=store_dtype(q.dtype), **kw)
  # The state side, then the WY side (which adds its terms of dK to the state side's).
  grads_kw = {name: value for name, value in kw.items() if name != "scale"}
  if _on_mosaic(bs, "state_grads", q, k, v, do):
    state_grads = functools.partial(mosaic.state_grads, chunk=bs.chunk, interpret=interpret)
  else:
    state_grads = functools.partial(kernels.state_grads, **grads_kw)
  dq, dk_state, dxs, dG_state = state_grads(q, k, v, beta, G, seq, prev, x, h, dh, dx, do,
                                            scale=scale)
  wy_args = (k, v, beta, G, seq, prev, inv, u, wk, dx, dxs, dh, local, dk_state)
  if _on_mosaic(bs, "wy_grads", q, k, v, do):
    dk, dv, dbeta, dG = mosaic.wy_grads(*wy_args, chunk=bs.chunk, interpret=interpret)
  else:
    dk, dv, dbeta, dG = kernels.wy_grads(*wy_args, solve=grads_kw["precision"], **grads_kw)
  dG = dG + dG_state
  return (dq, dk, dv, dbeta, dG,
          jnp.zeros_like(seq), jnp.zeros_like(prev), dh0)


chunked_prism.defvjp(_fwd, _bwd)
