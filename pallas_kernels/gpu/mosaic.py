"""Mosaic GPU versions of GPU stages, to measure against the Triton-backend kernels.

JAX 0.11 deprecates the Pallas Triton backend and recommends Mosaic GPU on Hopper. Which
backend each stage uses is decided by timing both on the H200 (`benchmarks/kernels.py --stages`
lists the Mosaic versions beside the Triton ones); until a Mosaic version is measured faster,
the custom_vjp keeps the Triton kernels.

`local_dy` is the first stage written this way: P^lᵀ dO = causal((Q K^lᵀ) ⊙ D)ᵀ dO of every
write, one program per (chunk, batch·head), the whole value width at once. Its operands travel
by TMA into swizzled shared memory and both products run on the warpgroup tensor cores (WGMMA):
S = K^l Qᵀ [C, C] from shared memory, then the masked, decayed S in bf16 registers times dO.
The C × C masks come from WGMMA-layout iotas and the log-decay rows and columns from vectors
loaded in the matching reduced layouts, so nothing is transposed in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SWIZZLE = 128  # bytes: one 64-element bf16 row per swizzle atom


def _operand_smem(shape, dtype):
  """Shared memory a WGMMA operand can read: 8-row tiles of one swizzle atom's width."""
  width = SWIZZLE // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, width)),
                                              plgpu.SwizzleTransform(SWIZZLE)))


def unsupported_reason(q, k, do, chunk) -> str | None:
  """Why `local_dy` cannot take these arrays (None if it can)."""
  K, V = q.shape[-1], do.shape[-1]
  if chunk != 64:
    return f"chunk {chunk} (the WGMMA tile is 64 rows)"
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or do.dtype != q.dtype:
    return f"dtypes {q.dtype}, {k.dtype}, {do.dtype} (bf16 or float16, all alike)"
  if K % 64 or V % 64 or K > 256 or V > 256:
    return f"K = {K}, V = {V} (multiples of 64 up to 256)"
  return None


def local_dy(q, k, G, seq, prev, do, *, scale, chunk=64, interpret=False):
  """P^lᵀ dO of every write l, L arrays [B,T,H,V] float32, as `kernels.local_dy`.

  q [B,T,H,K], k [B,T,H,L,K], do [B,T,H,V] (one 16-bit dtype), G [B,T,H] float32 chunk-local
  cumulative log-decay, seq [B,T] float32 packed-sequence index (prev is not read: the
  state-independent part needs no incoming-state gate). T a multiple of the chunk.
  """
  del prev
  B, T, H, L, K = k.shape
  V, C = do.shape[-1], chunk
  reason = unsupported_reason(q, k, do, chunk)
  if reason:
    raise ValueError(f"mosaic.local_dy: unsupported {reason}")
  if T % C:
    raise ValueError(f"mosaic.local_dy: T = {T} is not a multiple of the chunk {C}")
  # TMA copies need a contiguous minor axis: the log-decay goes head-major once, in XLA.
  G_hm = jnp.transpose(G.astype(jnp.float32), (0, 2, 1))  # [B, H, T]
  dtype = q.dtype

  def body(q_gmem, k_gmem, G_gmem, seq_gmem, do_gmem, *rest):
    out_gmem = rest[:L]
    q_smem, k_smem, do_smem, p_smem, vec_smem, out_smem, bar = rest[L:]
    n, bh = lax.axis_index("n"), lax.axis_index("bh")
    b, h = bh // H, bh % H
    rows = pl.ds(n * C, C)
    # G and seq twice each: one copy is read as rows, the other as columns (layout inference
    # gives each shared-memory buffer one register layout).
    copies = [(q_gmem.at[b, rows, h], q_smem), (do_gmem.at[b, rows, h], do_smem)]
    copies += [(G_gmem.at[b, h, rows], vec_smem.at[i]) for i in (0, 1)]
    copies += [(seq_gmem.at[b, rows], vec_smem.at[i]) for i in (2, 3)]
    copies += [(k_gmem.at[b, rows, h, l], k_smem.at[l]) for l in range(L)]
    for i, (src, dst) in enumerate(copies):  # one barrier per copy, all in flight at once
      plgpu.copy_gmem_to_smem(src, dst, bar.at[i])
    for i in range(len(copies)):
      plgpu.barrier_wait(bar.at[i])

    # Row j of S = K^l Qᵀ is key j, column i is query i: P^lᵀ[j, i] keeps i ≥ j in j's sequence.
    layout = plgpu.Layout.WGMMA
    j_idx = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=layout)
    i_idx = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=layout)
    row = lambda ref: lax.broadcast_in_dim(
        plgpu.load(ref, layout=layout.reduce(1)), (C, C), [0])
    col = lambda ref: lax.broadcast_in_dim(
        plgpu.load(ref, layout=layout.reduce(0)), (C, C), [1])
    keep = (i_idx >= j_idx) & (col(vec_smem.at[2]) == row(vec_smem.at[3]))
    # The exponent is masked before exp: exp(−inf) = 0, never exp(+large) · 0.
    decay = jnp.exp(jnp.where(keep, col(vec_smem.at[0]) - row(vec_smem.at[1]), -jnp.inf))

    for l in range(L):
      def scores(acc_ref, l=l):
        plgpu.wgmma(acc_ref, k_smem.at[l], q_smem.transpose((1, 0)))
        return acc_ref[...]
      p_smem[...] = (pl.run_scoped(scores, plgpu.ACC((C, C), jnp.float32)) * decay).astype(dtype)
      plgpu.commit_smem()  # the tensor cores read p through the async proxy

      def times_do(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, do_smem)
        return acc_ref[...]
      dy = pl.run_scoped(times_do, plgpu.ACC((C, V), jnp.float32)) * scale
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last write's store has read it
      out_smem[...] = dy
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_gmem[l].at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)

  out = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((B, T, H, V), jnp.float32)] * L,
      scratch_types=[_operand_smem((C, K), dtype), _operand_smem((L, C, K), dtype),
                     _operand_smem((C, V), dtype), _operand_smem((C, C), dtype),
                     plgpu.SMEM((4, C), jnp.float32), plgpu.SMEM((C, V), jnp.float32),
                     plgpu.Barrier(num_barriers=6 + L)],
      grid=(T // C, B * H), grid_names=("n", "bh"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(q, k, G_hm, seq, do)
  return list(out) if isinstance(out, (list, tuple)) else [out]
