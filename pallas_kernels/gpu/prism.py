"""The GPU kernels under one `jax.custom_vjp`: forward (inverse → apply → state pass → output)
and the hand-written backward (state cotangent pass → per-chunk gradients), recomputing from
the states saved at every chunk boundary (memory linear in T); each stage on its Triton kernel
or its Mosaic GPU version (`BlockSizes.mosaic`)."""

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
  o, hT, _ = _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret, residuals=False)
  return o, hT


def _on_mosaic(bs, stage, q, k, v):
  """Whether `stage` runs on its Mosaic GPU version (named in bs.mosaic, and it takes these
  arrays, v: the values or dO; otherwise the Triton kernel runs)."""
  if stage not in bs.mosaic:
    return False
  if stage in PASSES and (_pass_block_v(bs, q, v) % 32
                          or (_narrowed(bs, q, v) and not bs.mosaic_narrow)):
    return False
  return mosaic.stage_reason(stage, q, k, v, bs.chunk) is None


def _narrowed(bs, q, v):
  """Whether `seq_tiling` halved the passes' value blocks (too few programs to fill the GPU)."""
  return _pass_block_v(bs, q, v) < min(bs.seq_block_v, v.shape[-1])


PASSES = ("state_forward", "state_backward")


def _pass_block_v(bs, q, v):
  """Value columns per program of the passes over chunks, on either backend (`seq_tiling`)."""
  return kernels.seq_tiling(bs, q.shape[0], q.shape[2], v.shape[-1])[0]


def _stage(stage, bs, q, k, v, interpret, triton_kw):
  """The function that runs `stage` on these arrays (v: the values or dO): its Mosaic GPU
  version where `_on_mosaic` says so, else its Triton kernel with the keywords triton_kw."""
  if not _on_mosaic(bs, stage, q, k, v):
    return functools.partial(getattr(kernels, stage), **triton_kw)
  kw = dict(chunk=bs.chunk, interpret=interpret)
  if stage in PASSES:
    kw["block_v"] = _pass_block_v(bs, q, v)
  return functools.partial(getattr(mosaic, stage), **kw)


def _wy_pass(bs, q, k, v, residuals, interpret):
  """`mosaic.wy_state_forward` (the pass that forms U and Wk itself), called on (k, v, beta, G,
  seq, prev, inv, h0), where it replaces apply_inverse then state_forward: bs.wy_pass, L = 1
  and the state pass on Mosaic GPU at full-width value blocks (narrowed, each of the extra
  programs would form Wk again: on the H200 at B1 T16384 L = 1 it took 0.70 ms against 0.43
  for the two kernels); else None."""
  if not (bs.wy_pass and k.shape[3] == 1 and _on_mosaic(bs, "state_forward", q, k, v)
          and not _narrowed(bs, q, v)):
    return None
  return functools.partial(mosaic.wy_state_forward, residuals=residuals, chunk=bs.chunk,
                           block_v=_pass_block_v(bs, q, v), interpret=interpret)


def _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret, residuals=True):
  """o, the final state and (with residuals) what the backward reads; without residuals U and
  Wk are None where the forward did not need them stored."""
  kw = dict(bs=bs.fitted(q.dtype, k.shape[3]), precision=operand_precision(q.dtype),
            interpret=interpret)
  store = store_dtype(q.dtype)
  stage = lambda name, **extra: _stage(name, bs, q, k, v, interpret, {**kw, **extra})
  inv = kernels.inverse(k, beta, G, seq, solve=cm.HIGHEST, store_dtype=store, **kw)
  wy_pass = _wy_pass(bs, q, k, v, residuals, interpret)
  if wy_pass:
    h, x, hT, *uw = wy_pass(k, v, beta, G, seq, prev, inv, h0)
    u, wk = uw or (None, None)
  else:
    u, wk = stage("apply_inverse", solve=kw["precision"], store_dtype=store)(
        k, v, beta, G, seq, prev, inv)
    h, x, hT = stage("state_forward", store_dtype=store)(k, v, beta, G, seq, prev, u, wk, h0)
  o = stage("output")(q, k, v, beta, G, seq, prev, x, h, scale=scale)
  return o, hT, (q, k, v, beta, G, seq, prev, inv, u, wk, x, h)


def _fwd(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret):
  o, hT, res = _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret)
  return (o, hT), res


def _bwd(scale, bs, interpret, res, cotangents):
  q, k, v, beta, G, seq, prev, inv, u, wk, x, h = res
  do, dhT = cotangents
  kw = dict(bs=bs.fitted(q.dtype, k.shape[3]), precision=operand_precision(q.dtype),
            interpret=interpret)
  stage = lambda name, **extra: _stage(name, bs, q, k, do, interpret, {**kw, **extra})
  local = stage("local_dy")(q, k, G, seq, prev, do, scale=scale)
  dh, dx, dh0 = stage("state_backward", store_dtype=store_dtype(q.dtype))(
      q, k, G, seq, prev, wk, do, local[0], dhT.astype(jnp.float32), scale=scale)
  # The state side, then the WY side (which adds its terms of dK to the state side's).
  dq, dk_state, dxs, dG_state = stage("state_grads")(q, k, v, beta, G, seq, prev, x, h, dh, dx,
                                                     do, scale=scale)
  wy_args = (k, v, beta, G, seq, prev, inv, u, wk, dx, dxs, dh, local, dk_state)
  if k.shape[3] > 1 and _on_mosaic(bs, "wy_grads", q, k, do):
    # The writes l ≥ 2 first (on Mosaic GPU where bs.mosaic names wy_further_grads), then the
    # erase write on Mosaic GPU, which adds to their terms of dK¹, dβ¹ and dG.
    further = stage("wy_further_grads", solve=kw["precision"])(
        k, v, beta, G, seq, prev, inv, dx, dh, local, dk_state)
    dk, dv, dbeta, dG = mosaic.wy_grads(*wy_args, further=further, chunk=bs.chunk,
                                        interpret=interpret)
  else:
    dk, dv, dbeta, dG = stage("wy_grads", solve=kw["precision"])(*wy_args)
  dG = dG + dG_state
  return (dq, dk, dv, dbeta, dG,
          jnp.zeros_like(seq), jnp.zeros_like(prev), dh0)


chunked_prism.defvjp(_fwd, _bwd)
