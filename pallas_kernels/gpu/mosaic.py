"""Mosaic GPU versions of GPU stages, each timed against its Triton-backend kernel.

JAX 0.11 deprecates the Pallas Triton backend and recommends Mosaic GPU on Hopper. Which
backend each stage uses is decided by timing both on the H200 (`benchmarks/kernels.py --stages`
lists the Mosaic versions beside the Triton ones): `BlockSizes.mosaic` names the stages whose
Mosaic version was at least as fast (all but apply_inverse, the passes at 32 columns too), and
`PRISM_MOSAIC_STAGES` replaces that list for tuning runs. `wy_state_forward` is the state pass
at L = 1 forming U and Wk itself, in place of apply_inverse (`BlockSizes.wy_pass`).

Eight stages: the two passes over chunks, `state_forward` and `state_backward` (one program per
value block of 64 or 32 columns and batch·head, the next chunk's operands loading while the current
one computes), and, one program per (chunk, batch·head) over the whole value width, `apply_inverse`
(U and Wk), `output` (O = γ ⊙ Q S + Σ_l causal((Q K^lᵀ) ⊙ D) Y^l), `local_dy` (P^lᵀ dO = causal((Q
K^lᵀ) ⊙ D)ᵀ dO of every write), `state_grads` (the state side of the gradients, per key block of 64
too), `wy_grads` (the WY side, K = V only: the erase write; at L ≥ 2 `wy_further_grads`, on Triton
or here, computes the other writes first and it adds their terms) and `wy_further_grads` (one
program per chunk, batch·head and write after the first). `state_grads` takes L ≤ 3 (at L = 3
one write's dP in shared memory at a time). Only the (I + A)⁻¹ kernel has no Mosaic version: its
16 × 16 float32 blocks are below the 64-row WGMMA tile, whose float32 operands are TF32.
Operands travel by TMA into swizzled shared memory and every product runs on the warpgroup
tensor cores (WGMMA); the masked, decayed C × C scores are written back to shared memory in the
16-bit input type for the second product (the rounding the Triton kernels apply too). The C × C
masks come from WGMMA-layout iotas and the gate rows and columns from vectors loaded in the
matching reduced layouts, so nothing is transposed in registers; a vector read both as rows and
as columns is copied twice (layout inference gives each shared-memory buffer one register
layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.kernels import pass_gates

SWIZZLE = 128  # bytes: one 64-element bf16 row per swizzle atom


def _operand_smem(shape, dtype, swizzle=SWIZZLE):
  """Shared memory a WGMMA operand can read: 8-row tiles of one swizzle atom's width. Both
  operands of a product share one swizzle: 128 bytes, or 64 throughout a pass over 32-column
  value blocks."""
  width = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, width)),
                                              plgpu.SwizzleTransform(swizzle)))


def unsupported_reason(q, k, v, chunk) -> str | None:
  """Why the Mosaic GPU stages cannot take these arrays (None if they can); v: the values or
  dO, whatever gives the value width."""
  K, V = q.shape[-1], v.shape[-1]
  if chunk != 64:
    return f"chunk {chunk} (the WGMMA tile is 64 rows)"
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (bf16 or float16, all alike)"
  if K % 64 or V % 64 or K > 128 or V > 128:
    # 256 would need more shared memory than a block has in the state pass and output.
    return f"K = {K}, V = {V} (64 or 128)"
  return None


STAGES = ("apply_inverse", "state_forward", "output", "local_dy", "state_backward",
          "state_grads", "wy_grads", "wy_further_grads")
# Writes whose per-chunk operands fit Hopper's 227 KB of shared memory per block (bf16 at
# K = V = 128: apply_inverse about 180 KB and the double-buffered state pass about 210 KB at
# L = 2; state_grads 223 KB at L = 3, where it keeps one write's dP at a time).
MAX_WRITES = {"apply_inverse": 2, "state_forward": 2, "state_grads": 3}


def stage_reason(stage, q, k, v, chunk) -> str | None:
  """Why `stage` cannot run on Mosaic GPU for these kernel-ready arrays (q [B,T,H,K], k
  [B,T,H,L,K], v [B,T,H,L,V] or dO [B,T,H,V]), None if it can."""
  if stage not in STAGES:
    raise ValueError(f"no Mosaic GPU stage {stage!r}; there are {STAGES}")
  reason = unsupported_reason(q, k, v, chunk)
  if reason is None and k.shape[3] > MAX_WRITES.get(stage, k.shape[3]):
    return f"L = {k.shape[3]} (shared memory holds the operands up to L = {MAX_WRITES[stage]})"
  if reason is None and stage == "wy_further_grads" and k.shape[3] < 2:
    return f"L = {k.shape[3]}: only the erase write is left, no write after it"
  wy_side = stage in ("wy_grads", "wy_further_grads")
  if reason is None and wy_side and q.shape[-1] != v.shape[-1]:
    return f"K = {q.shape[-1]} ≠ V = {v.shape[-1]} (its staging buffers take either)"
  return reason


def _check(name, q, k, v, chunk):
  reason = stage_reason(name, q, k, v, chunk)
  if reason:
    raise ValueError(f"mosaic.{name}: unsupported {reason}")
  if q.shape[1] % chunk:
    raise ValueError(f"mosaic.{name}: T = {q.shape[1]} is not a multiple of the chunk {chunk}")


def _start_copies(copies, bar, first=0):
  """Start every (gmem, smem) copy, each on its own barrier from `first` on."""
  for i, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bar.at[first + i])


def _copy_in(copies, bar):
  """Start every (gmem, smem) copy on its own barrier, then wait for all of them."""
  _start_copies(copies, bar)
  for i in range(len(copies)):
    plgpu.barrier_wait(bar.at[i])


_LAYOUT = plgpu.Layout.WGMMA


def _rows(ref):
  """A [C] shared-memory vector in the layout of one value per row of a WGMMA tile."""
  return plgpu.load(ref, layout=_LAYOUT.reduce(1))


def _cols(ref):
  """A [C] shared-memory vector in the layout of one value per column of a WGMMA tile."""
  return plgpu.load(ref, layout=_LAYOUT.reduce(0))


def _on_rows(vec, width):
  """A [C] row-layout vector broadcast along the columns of a C × width tile."""
  return lax.broadcast_in_dim(vec, (vec.shape[0], width), [0])


def _head_major(x):
  """[B, T, H(, L)] → float32 [B, H(, L), T]: TMA copies need the chunk's positions on the
  contiguous minor axis."""
  return jnp.moveaxis(x.astype(jnp.float32), 1, -1)


def _gate_copies(G_gmem, seq_gmem, b, hd, rows, vec_smem):
  """TMA copies of a chunk's G and sequence index into rows 0–3 of vec_smem, each twice: read
  once as the rows and once as the columns of a C × C tile (`_chunk_decay`)."""
  return [(G_gmem.at[b, hd, rows], vec_smem.at[0]), (G_gmem.at[b, hd, rows], vec_smem.at[1]),
          (seq_gmem.at[b, rows], vec_smem.at[2]), (seq_gmem.at[b, rows], vec_smem.at[3])]


def _chunk_decay(vec_smem, C, query_rows, **kw):
  """`_causal_decay` from the vectors `_gate_copies` loaded."""
  return _causal_decay(_rows(vec_smem.at[0]), _cols(vec_smem.at[1]), _rows(vec_smem.at[2]),
                       _cols(vec_smem.at[3]), C, query_rows, **kw)


def _causal_decay(G_row, G_col, seq_row, seq_col, C, query_rows, strict=False,
                  with_mask=False):
  """D on the causal same-sequence mask (less its diagonal if strict), 0 elsewhere, for a C × C
  tile whose rows are queries (query_rows) or keys (the transposed tile); with_mask: also the
  mask."""
  r = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=_LAYOUT)
  c = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=_LAYOUT)
  on_rows = lambda x: _on_rows(x, C)
  on_cols = lambda x: lax.broadcast_in_dim(x, (C, C), [1])
  later = (r - c) if query_rows else (c - r)
  keep = ((later > 0) if strict else (later >= 0)) & (on_rows(seq_row) == on_cols(seq_col))
  expo = on_rows(G_row) - on_cols(G_col) if query_rows else on_cols(G_col) - on_rows(G_row)
  # The exponent is masked before exp: exp(−inf) = 0, never exp(+large) · 0.
  decay = jnp.exp(jnp.where(keep, expo, -jnp.inf))
  return (decay, keep) if with_mask else decay


def _product(a, b, shape):
  """a @ b on WGMMA (shared-memory operands), float32 result in registers."""
  return _products([(a, b)], shape)


def _products(pairs, shape):
  """Σ a @ b over (a, b) pairs, accumulated on WGMMA, float32 result in registers."""
  def run(acc_ref):
    for a, b in pairs:
      plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _store(x, smem, gmem):
  """Registers → shared memory → global memory (TMA), once the last store has read smem."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  smem[...] = x.astype(smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem, gmem)


def _store_vectors(row_parts, col_part, part_smem, col_smem, dst):
  """[C] vectors to global memory by TMA: row_parts (one value per row of a WGMMA tile) through
  part_smem, and col_part (one per column) through a buffer of its own (layout inference gives
  each shared-memory buffer one register layout); dst(i): where vector i goes, col_part last."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  for i, part in enumerate(row_parts):
    part_smem[i] = part
  col_smem[...] = col_part
  plgpu.commit_smem()
  for i in range(len(row_parts)):
    plgpu.copy_smem_to_gmem(part_smem.at[i], dst(i))
  plgpu.copy_smem_to_gmem(col_smem, dst(len(row_parts)))
  plgpu.wait_smem_to_gmem(0)


def _fetch_chunk(copies, bar, slot, per_chunk):
  """Start a pass's `per_chunk` copies of one chunk into `slot`, on that slot's barriers."""
  assert len(copies) == per_chunk, (len(copies), per_chunk)
  _start_copies(copies, bar, slot * per_chunk)


def _prefetch_and_wait(more, fetch_next, bar, slot, per_chunk):
  """A pass over chunks: start loading the next chunk into the other slot (when `more`), then
  wait for this slot's `per_chunk` copies."""
  pl.when(more)(fetch_next)
  for c in range(per_chunk):
    plgpu.barrier_wait(bar.at[slot * per_chunk + c])


def _carry(state, gamma_last, pairs):
  """A pass's [K, BV] float32 carry one chunk on: γ_C ⊙ state + Σ a @ b over (a, b) pairs
  (accumulated on WGMMA); gamma_last: the chunk's γ_C repeated over the K rows, in shared
  memory."""
  K, BV = state.shape
  return state * _on_rows(_rows(gamma_last), BV) + _products(pairs, (K, BV))


def _pass(N, step, f32_smem, first, last, bar):
  """Run `step` over the N chunks with the float32 carry read from `first` and written to
  `last` (global [K, BV] blocks), both by TMA through f32_smem."""
  _copy_in([(first, f32_smem)], bar)
  _store(lax.fori_loop(0, N, step, f32_smem[...]), f32_smem, last)
  plgpu.wait_smem_to_gmem(0)


def _pass_gates(name, G, seq, prev, K, V, C, block_v):
  """Value columns per program and chunk count of a pass over chunks, and its gates head-major
  (TMA needs a contiguous minor axis): γ and e [B, H, T] as in the Triton passes
  (`kernels.pass_gates`), and γ_C of every chunk repeated along the K rows of the state it
  scales [B, H, N, K]."""
  B, T, H = G.shape
  BV, N = min(block_v, V), T // C
  if BV % 32 or V % BV:
    raise ValueError(f"mosaic.{name}: block_v {BV} must be a multiple of 32 dividing V")
  gamma, to_end = pass_gates(G, seq, prev, C)  # [B, T, H] float32
  gamma_last = jnp.transpose(gamma.reshape(B, N, C, H)[:, :, -1], (0, 2, 1))  # [B, H, N]
  return (BV, N, _head_major(gamma), _head_major(to_end),
          jnp.broadcast_to(gamma_last[..., None], (B, H, N, K)))


def _pass_program(H, BV):
  """This program of a pass over chunks (grid ("j", "bh")): its value block j, batch row, head
  and value columns."""
  j, bh = lax.axis_index("j"), lax.axis_index("bh")
  return j, bh // H, bh % H, pl.ds(j * BV, BV)


def _pass_operand(BV, dtype):
  """The operand buffers of a pass over BV-column value blocks: 128-byte swizzle, or 64 bytes
  for 32 columns, on every buffer (the two operands of a WGMMA share one swizzle)."""
  swizzle = min(SWIZZLE, BV * jnp.dtype(dtype).itemsize)
  return lambda shape: _operand_smem(shape, dtype, swizzle)


def _interpret(interpret):
  return plgpu.InterpretGPUParams() if interpret else None


def local_dy(q, k, G, seq, prev, do, *, scale, chunk=64, interpret=False):
  """P^lᵀ dO of every write l, L arrays [B,T,H,V] float32, as `kernels.local_dy`.

  q [B,T,H,K], k [B,T,H,L,K], do [B,T,H,V] (one 16-bit dtype), G [B,T,H] float32 chunk-local
  cumulative log-decay, seq [B,T] float32 packed-sequence index (prev is not read: the
  state-independent part needs no incoming-state gate). T a multiple of the chunk.
  """
  del prev
  _check("local_dy", q, k, do, chunk)
  B, T, H, L, K = k.shape
  V, C, dtype = do.shape[-1], chunk, q.dtype

  def body(q_gmem, k_gmem, G_gmem, seq_gmem, do_gmem, *rest):
    out_gmem = rest[:L]
    q_smem, k_smem, do_smem, p_smem, vec_smem, out_smem, bar = rest[L:]
    n, bh = lax.axis_index("n"), lax.axis_index("bh")
    b, h = bh // H, bh % H
    rows = pl.ds(n * C, C)
    _copy_in([(q_gmem.at[b, rows, h], q_smem), (do_gmem.at[b, rows, h], do_smem)]
             + _gate_copies(G_gmem, seq_gmem, b, h, rows, vec_smem)
             + [(k_gmem.at[b, rows, h, l], k_smem.at[l]) for l in range(L)], bar)
    # Rows of S = K^l Qᵀ are keys, columns queries.
    decay = _chunk_decay(vec_smem, C, query_rows=False)
    for l in range(L):
      p = _product(k_smem.at[l], q_smem.transpose((1, 0)), (C, C)) * decay
      p_smem[...] = p.astype(dtype)
      plgpu.commit_smem()  # the tensor cores read p through the async proxy
      _store(_product(p_smem, do_smem, (C, V)) * scale, out_smem, out_gmem[l].at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)

  out = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((B, T, H, V), jnp.float32)] * L,
      scratch_types=[_operand_smem((C, K), dtype), _operand_smem((L, C, K), dtype),
                     _operand_smem((C, V), dtype), _operand_smem((C, C), dtype),
                     plgpu.SMEM((4, C), jnp.float32), plgpu.SMEM((C, V), jnp.float32),
                     plgpu.Barrier(num_barriers=6 + L)],
      grid=(T // C, B * H), grid_names=("n", "bh"), interpret=_interpret(interpret),
      kernel_name="prism_local_dy_mosaic",
  )(q, k, _head_major(G), seq, do)
  return list(out) if isinstance(out, (list, tuple)) else [out]


def output(q, k, v, beta, G, seq, prev, x, h, *, scale, chunk=64, interpret=False):
  """O [B,T,H,V] in q's dtype, as `kernels.output`: q [B,T,H,K], k [B,T,H,L,K], v
  [B,T,H,L,V], beta [B,T,H,L] (one 16-bit dtype), G [B,T,H] float32, seq / prev [B,T]
  float32, x [B,T,H,V] and h [B,H,N·K,V] in that dtype (what the state pass saved)."""
  _check("output", q, k, x, chunk)
  B, T, H, L, K = k.shape
  V, C, dtype = v.shape[-1], chunk, q.dtype
  if x.dtype != dtype or h.dtype != dtype:
    raise ValueError(f"mosaic.output: x {x.dtype} and h {h.dtype} must be {dtype}")

  def body(q_gmem, k_gmem, v_gmem, beta_gmem, G_gmem, seq_gmem, prev_gmem, x_gmem, h_gmem,
           o_gmem, q_smem, k_smem, y_smem, h_smem, p_smem, vec_smem, beta_smem, o_smem, bar):
    n, bh = lax.axis_index("n"), lax.axis_index("bh")
    b, hd = bh // H, bh % H
    rows = pl.ds(n * C, C)
    _copy_in([(q_gmem.at[b, rows, hd], q_smem), (x_gmem.at[b, rows, hd], y_smem.at[0]),
              (h_gmem.at[b, hd, pl.ds(n * K, K)], h_smem)]
             + _gate_copies(G_gmem, seq_gmem, b, hd, rows, vec_smem)
             + [(prev_gmem.at[b, rows], vec_smem.at[4])]
             + [(k_gmem.at[b, rows, hd, l], k_smem.at[l]) for l in range(L)]
             + [(v_gmem.at[b, rows, hd, l], y_smem.at[l]) for l in range(1, L)]
             + [(beta_gmem.at[b, hd, l, rows], beta_smem.at[l]) for l in range(1, L)], bar)
    G_row, seq_row = _rows(vec_smem.at[0]), _rows(vec_smem.at[2])
    decay = _causal_decay(G_row, _cols(vec_smem.at[1]), seq_row, _cols(vec_smem.at[3]), C,
                          query_rows=True)
    # γ_i: the incoming state's decay at i, 0 after a sequence start inside the chunk.
    gamma = jnp.exp(jnp.where(seq_row == _rows(vec_smem.at[4]), G_row, -jnp.inf))
    for l in range(1, L):  # Y^l = β^l ⊙ V^l, rounded to the operand type in place
      y = y_smem[l].astype(jnp.float32) * _on_rows(_rows(beta_smem.at[l]), V)
      y_smem[l] = y.astype(dtype)
    o = _product(q_smem, h_smem, (C, V)) * _on_rows(gamma, V)
    for l in range(L):
      p = _product(q_smem, k_smem.at[l].transpose((1, 0)), (C, C)) * decay
      p_smem[...] = p.astype(dtype)
      plgpu.commit_smem()  # the tensor cores read p and Y^l through the async proxy
      o = o + _product(p_smem, y_smem.at[l], (C, V))
    _store(o * scale, o_smem, o_gmem.at[b, rows, hd])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((B, T, H, V), dtype),
      scratch_types=[_operand_smem((C, K), dtype), _operand_smem((L, C, K), dtype),
                     _operand_smem((L, C, V), dtype), _operand_smem((K, V), dtype),
                     _operand_smem((C, C), dtype), plgpu.SMEM((5, C), jnp.float32),
                     plgpu.SMEM((L, C), jnp.float32), _operand_smem((C, V), dtype),
                     plgpu.Barrier(num_barriers=6 + 3 * L)],
      grid=(T // C, B * H), grid_names=("n", "bh"), interpret=_interpret(interpret),
      kernel_name="prism_output_mosaic",
  )(q, k, v, _head_major(beta), _head_major(G), seq, prev, x, h)


def state_forward(k, v, beta, G, seq, prev, u, wk, h0, *, block_v=64, chunk=64,
                  interpret=False):
  """The pass over chunks, as `kernels.state_forward`: states entering each chunk h
  [B,H,N·K,V] and X [B,T,H,V] in the input dtype, final state [B,H,K,V] float32. k
  [B,T,H,L,K], v [B,T,H,L,V], beta [B,T,H,L], wk [B,T,H,K] (one 16-bit dtype), u [B,T,H,V]
  float32, h0 [B,H,K,V] float32.

  One program per (value block, batch·head) walks the chunks with the state [K, BV] float32 in
  registers (the WGMMA accumulator layout). Each chunk's operands arrive by TMA one chunk ahead,
  into the other of two shared-memory slots. Per chunk: the state goes to shared memory in bf16
  (the operand of Wk S, and by TMA the saved h); X = U − Wk S; then
  S ← γ_C S + Σ_l K^lᵀ (e ⊙ Y^l), the sum over writes accumulated on WGMMA. Shared memory at
  bf16 K = 128, BV = 64: about 160 KB at L = 1 and 210 KB at L = 2 (the two slots hold the
  keys, U and Wk of two chunks); L = 3 does not fit the 227 KB of a block.
  """
  _check("state_forward", wk, k, v, chunk)
  B, T, H, L, K = k.shape
  V, C, dtype = v.shape[-1], chunk, k.dtype
  BV, N, _, to_end, gamma_rows = _pass_gates("state_forward", G, seq, prev, K, V, C, block_v)
  operand = _pass_operand(BV, dtype)
  per_chunk = 2 + 3 * L  # TMA copies per chunk: k^l, v^l and β^l (l ≥ 2), U, Wk, e, γ_C

  def body(k_gmem, v_gmem, beta_gmem, e_gmem, gl_gmem, u_gmem, wk_gmem, h0_gmem,
           h_gmem, x_gmem, hT_gmem,
           k_smem, y_smem, beta_smem, u_smem, wk_smem, e_smem, gl_smem, s_smem, ey_smem,
           x_smem, f32_smem, bar, bar0):
    j, b, hd, cols = _pass_program(H, BV)

    def fetch(n, slot):
      rows = pl.ds(n * C, C)
      copies = [(u_gmem.at[b, rows, hd, cols], u_smem.at[slot]),
                (wk_gmem.at[b, rows, hd], wk_smem.at[slot]),
                (e_gmem.at[b, hd, rows], e_smem.at[slot]),
                (gl_gmem.at[b, hd, n], gl_smem.at[slot])]
      copies += [(k_gmem.at[b, rows, hd, l], k_smem.at[slot, l]) for l in range(L)]
      copies += [(v_gmem.at[b, rows, hd, l, cols], y_smem.at[slot, l - 1]) for l in range(1, L)]
      copies += [(beta_gmem.at[b, hd, l, rows], beta_smem.at[slot, l - 1]) for l in range(1, L)]
      _fetch_chunk(copies, bar, slot, per_chunk)

    def step(n, state):
      slot = lax.rem(n, 2)

      _prefetch_and_wait(n + 1 < N, lambda: fetch(n + 1, 1 - slot), bar, slot, per_chunk)
      rows = pl.ds(n * C, C)
      # The state entering the chunk, as the operand of Wk S and the saved h.
      _store(state, s_smem, h_gmem.at[b, hd, pl.ds(n * K, K), cols])
      x = u_smem[slot] - _product(wk_smem.at[slot], s_smem, (C, BV))
      x_smem[...] = x.astype(dtype)
      e = _on_rows(_rows(e_smem.at[slot]), BV)
      ey_smem[0] = (e * x).astype(dtype)
      for l in range(1, L):  # Y^l = β^l ⊙ V^l
        beta_l = _on_rows(_rows(beta_smem.at[slot, l - 1]), BV)
        ey_smem[l] = (e * beta_l * y_smem[slot, l - 1].astype(jnp.float32)).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(x_smem, x_gmem.at[b, rows, hd, cols])
      return _carry(state, gl_smem.at[slot],
                    [(k_smem.at[slot, l].transpose((1, 0)), ey_smem.at[l]) for l in range(L)])

    fetch(0, 0)
    _pass(N, step, f32_smem, h0_gmem.at[b, hd, :, cols], hT_gmem.at[b, hd, :, cols], bar0)

  return plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((B, H, N * K, V), dtype),
                jax.ShapeDtypeStruct((B, T, H, V), dtype),
                jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      scratch_types=[operand((2, L, C, K)), operand((2, max(L - 1, 1), C, BV)),
                     plgpu.SMEM((2, max(L - 1, 1), C), jnp.float32),
                     plgpu.SMEM((2, C, BV), jnp.float32),
                     operand((2, C, K)), plgpu.SMEM((2, C), jnp.float32),
                     plgpu.SMEM((2, K), jnp.float32), operand((K, BV)),
                     operand((L, C, BV)), operand((C, BV)),
                     plgpu.SMEM((K, BV), jnp.float32),
                     plgpu.Barrier(num_barriers=2 * per_chunk), plgpu.Barrier(num_barriers=1)],
      grid=(V // BV, B * H), grid_names=("j", "bh"), interpret=_interpret(interpret),
      kernel_name="prism_state_forward_mosaic",
  )(k, v, _head_major(beta), to_end, gamma_rows, u, wk, h0)


def wy_state_forward(k, v, beta, G, seq, prev, inv, h0, *, residuals, block_v=64, chunk=64,
                     interpret=False):
  """The pass over chunks at L = 1 forming U and Wk itself, in place of `apply_inverse` followed
  by `state_forward`: h [B,H,N·K,V], X [B,T,H,V] and the final state as `state_forward` gives
  them, and with residuals also U [B,T,H,V] float32 and Wk [B,T,H,K] (what the backward
  reads). k [B,T,H,1,K], v [B,T,H,1,V], beta [B,T,H,1] and the rows of every chunk's
  (I + A)⁻¹ [B,T,H,C] in one 16-bit dtype; h0 [B,H,K,V] float32.

  Per chunk, before the state is needed: Bk = β¹γ ⊙ K¹ and R = β¹ ⊙ V¹ go to shared memory in
  the input type, Wk = (I + A)⁻¹ Bk (rounded to it, as `apply_inverse` stores it) and
  U = (I + A)⁻¹ R (float32, in registers), so X = U − Wk S is the same sum as through the two
  kernels. What this saves is the round trip of U and Wk through global memory (at bf16
  K = V = 128, 6 bytes per position and value column) and a launch; what it costs is Wk formed
  once per value block instead of once per chunk.
  """
  B, T, H, L, K = k.shape
  _check("state_forward", jax.ShapeDtypeStruct((B, T, H, K), k.dtype), k, v, chunk)
  if L != 1:
    raise ValueError(f"mosaic.wy_state_forward: L = {L} (it forms U for one write only)")
  V, C, dtype = v.shape[-1], chunk, k.dtype
  BV, N, gamma, to_end, gamma_rows = _pass_gates("wy_state_forward", G, seq, prev, K, V, C,
                                                 block_v)
  operand = _pass_operand(BV, dtype)
  per_chunk = 7  # TMA copies per chunk: (I + A)⁻¹, K¹, V¹, β¹, γ, e, γ_C

  def body(k_gmem, v_gmem, beta_gmem, gamma_gmem, e_gmem, gl_gmem, inv_gmem, h0_gmem, *rest):
    outs, rest = (rest[:5], rest[5:]) if residuals else (rest[:3] + (None, None), rest[3:])
    h_gmem, x_gmem, hT_gmem, u_gmem, wk_gmem = outs
    (inv_smem, k_smem, v_smem, vec_smem, e_smem, gl_smem, bk_smem, r_smem, wk_smem, s_smem,
     ey_smem, x_smem, u_out, f32_smem, bar, bar0) = rest
    j, b, hd, cols = _pass_program(H, BV)

    def fetch(n, slot):
      rows = pl.ds(n * C, C)
      copies = [(inv_gmem.at[b, rows, hd], inv_smem.at[slot]),
                (k_gmem.at[b, rows, hd, 0], k_smem.at[slot]),
                (v_gmem.at[b, rows, hd, 0, cols], v_smem.at[slot]),
                (beta_gmem.at[b, hd, 0, rows], vec_smem.at[slot, 0]),
                (gamma_gmem.at[b, hd, rows], vec_smem.at[slot, 1]),
                (e_gmem.at[b, hd, rows], e_smem.at[slot]),
                (gl_gmem.at[b, hd, n], gl_smem.at[slot])]
      _fetch_chunk(copies, bar, slot, per_chunk)

    def step(n, state):
      slot = lax.rem(n, 2)
      _prefetch_and_wait(n + 1 < N, lambda: fetch(n + 1, 1 - slot), bar, slot, per_chunk)
      rows = pl.ds(n * C, C)
      b1 = _rows(vec_smem.at[slot, 0])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's Wk store has read
      bk_smem[...] = (_on_rows(b1 * _rows(vec_smem.at[slot, 1]), K)
                      * k_smem[slot].astype(jnp.float32)).astype(dtype)
      r_smem[...] = (_on_rows(b1, BV) * v_smem[slot].astype(jnp.float32)).astype(dtype)
      plgpu.commit_smem()  # the tensor cores read Bk and R through the async proxy
      wk_smem[...] = _product(inv_smem.at[slot], bk_smem, (C, K)).astype(dtype)
      u = _product(inv_smem.at[slot], r_smem, (C, BV))
      if residuals:
        u_out[...] = u
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(u_out, u_gmem.at[b, rows, hd, cols])

        @pl.when(j == 0)  # Wk does not depend on the value block
        def _():
          plgpu.copy_smem_to_gmem(wk_smem, wk_gmem.at[b, rows, hd])
      # The state entering the chunk, as the operand of Wk S and the saved h (this store's
      # fence also publishes Wk to the tensor cores).
      _store(state, s_smem, h_gmem.at[b, hd, pl.ds(n * K, K), cols])
      x = u - _product(wk_smem, s_smem, (C, BV))
      x_smem[...] = x.astype(dtype)
      ey_smem[...] = (_on_rows(_rows(e_smem.at[slot]), BV) * x).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(x_smem, x_gmem.at[b, rows, hd, cols])
      return _carry(state, gl_smem.at[slot], [(k_smem.at[slot].transpose((1, 0)), ey_smem)])

    fetch(0, 0)
    _pass(N, step, f32_smem, h0_gmem.at[b, hd, :, cols], hT_gmem.at[b, hd, :, cols], bar0)

  out_type = [jax.ShapeDtypeStruct((B, H, N * K, V), dtype),
              jax.ShapeDtypeStruct((B, T, H, V), dtype),
              jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
  if residuals:
    out_type += [jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, T, H, K), dtype)]
  return plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=[operand((2, C, C)), operand((2, C, K)), operand((2, C, BV)),
                     plgpu.SMEM((2, 2, C), jnp.float32), plgpu.SMEM((2, C), jnp.float32),
                     plgpu.SMEM((2, K), jnp.float32), operand((C, K)), operand((C, BV)),
                     operand((C, K)), operand((K, BV)), operand((C, BV)), operand((C, BV)),
                     plgpu.SMEM((C, BV), jnp.float32), plgpu.SMEM((K, BV), jnp.float32),
                     plgpu.Barrier(num_barriers=2 * per_chunk), plgpu.Barrier(num_barriers=1)],
      grid=(V // BV, B * H), grid_names=("j", "bh"), interpret=_interpret(interpret),
      kernel_name="prism_wy_state_forward_mosaic",
  )(k, v, _head_major(beta), gamma, to_end, gamma_rows, inv, h0)


def apply_inverse(k, v, beta, G, seq, prev, inv, *, chunk=64, interpret=False):
  """U [B,T,H,V] float32 and Wk [B,T,H,K] in the input dtype, as `kernels.apply_inverse`: k
  [B,T,H,L,K], v [B,T,H,L,V], beta [B,T,H,L] and the rows of every chunk's (I + A)⁻¹
  [B,T,H,C] (one 16-bit dtype), G [B,T,H] float32, seq / prev [B,T] float32.

  One program per (chunk, batch·head): Wk = (I + A)⁻¹ (β¹γ ⊙ K¹) and U = (I + A)⁻¹ R with
  R = β¹ ⊙ V¹ − Σ_{l≥2} M^l (β^l ⊙ V^l), M^l = β¹ ⊙ strict(K¹K^lᵀ ⊙ D); every product on WGMMA
  with 16-bit operands written to shared memory, as the Triton kernel rounds them.
  """
  _check("apply_inverse", inv, k, v, chunk)
  B, T, H, L, K = k.shape
  V, C, dtype = v.shape[-1], chunk, k.dtype
  extra = max(L - 1, 1)

  def body(k_gmem, v_gmem, beta_gmem, G_gmem, seq_gmem, prev_gmem, inv_gmem, u_gmem, wk_gmem,
           k_smem, v_smem, inv_smem, beta_smem, vec_smem, bk_smem, r_smem, m_smem, w_smem,
           u_out, wk_out, bar):
    n, bh = lax.axis_index("n"), lax.axis_index("bh")
    b, hd = bh // H, bh % H
    rows = pl.ds(n * C, C)
    _copy_in([(inv_gmem.at[b, rows, hd], inv_smem)]
             + _gate_copies(G_gmem, seq_gmem, b, hd, rows, vec_smem)
             + [(prev_gmem.at[b, rows], vec_smem.at[4])]
             + [(k_gmem.at[b, rows, hd, l], k_smem.at[l]) for l in range(L)]
             + [(v_gmem.at[b, rows, hd, l], v_smem.at[l]) for l in range(L)]
             + [(beta_gmem.at[b, hd, l, rows], beta_smem.at[l]) for l in range(L)], bar)
    G_row, seq_row = _rows(vec_smem.at[0]), _rows(vec_smem.at[2])
    b1 = _rows(beta_smem.at[0])
    gamma = jnp.exp(jnp.where(seq_row == _rows(vec_smem.at[4]), G_row, -jnp.inf))
    bk_smem[...] = (_on_rows(b1 * gamma, K) * k_smem[0].astype(jnp.float32)).astype(dtype)
    r = _on_rows(b1, V) * v_smem[0].astype(jnp.float32)
    if L > 1:
      decay = _causal_decay(G_row, _cols(vec_smem.at[1]), seq_row, _cols(vec_smem.at[3]), C,
                            query_rows=True, strict=True)
      for l in range(1, L):
        m = _product(k_smem.at[0], k_smem.at[l].transpose((1, 0)), (C, C)) * decay
        m_smem[...] = (_on_rows(b1, C) * m).astype(dtype)
        w_smem[...] = (_on_rows(_rows(beta_smem.at[l]), V)
                       * v_smem[l].astype(jnp.float32)).astype(dtype)
        plgpu.commit_smem()
        r = r - _product(m_smem, w_smem, (C, V))
    r_smem[...] = r.astype(dtype)
    plgpu.commit_smem()  # the tensor cores read Bk and R through the async proxy
    _store(_product(inv_smem, bk_smem, (C, K)), wk_out, wk_gmem.at[b, rows, hd])
    _store(_product(inv_smem, r_smem, (C, V)), u_out, u_gmem.at[b, rows, hd])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                jax.ShapeDtypeStruct((B, T, H, K), dtype)],
      scratch_types=[_operand_smem((L, C, K), dtype), _operand_smem((L, C, V), dtype),
                     _operand_smem((C, C), dtype), plgpu.SMEM((L, C), jnp.float32),
                     plgpu.SMEM((5, C), jnp.float32), _operand_smem((C, K), dtype),
                     _operand_smem((C, V), dtype), _operand_smem((C, C), dtype),
                     _operand_smem((C, V), dtype), plgpu.SMEM((C, V), jnp.float32),
                     _operand_smem((C, K), dtype), plgpu.Barrier(num_barriers=6 + 3 * L)],
      grid=(T // C, B * H), grid_names=("n", "bh"), interpret=_interpret(interpret),
      kernel_name="prism_apply_inverse_mosaic",
  )(k, v, _head_major(beta), _head_major(G), seq, prev, inv)


def state_backward(q, k, G, seq, prev, wk, do, local1, dhT, *, scale, block_v=64, chunk=64,
                   interpret=False):
  """The reverse pass over chunks, as `kernels.state_backward`: the cotangents of the states
  leaving each chunk dh [B,H,N·K,V] in the input dtype, dX [B,T,H,V] float32 and dS₀
  [B,H,K,V] float32. q [B,T,H,K], k [B,T,H,L,K] (K¹ is read), wk [B,T,H,K], do [B,T,H,V] (one
  16-bit dtype), local1 = P¹ᵀ dO [B,T,H,V] float32, dhT [B,H,K,V] float32.

  The mirror of `state_forward`: per chunk, last to first, dS' goes to shared memory in bf16
  (the saved dh and the operand of K¹ dS'); dX = P¹ᵀ dO + e ⊙ (K¹ dS'); then dS = γ_C dS' +
  Qᵀ (scale γ ⊙ dO) − Wkᵀ dX, both products accumulated on WGMMA.
  """
  _check("state_backward", q, k, do, chunk)
  B, T, H, L, K = k.shape
  V, C, dtype = do.shape[-1], chunk, q.dtype
  BV, N, gamma, to_end, gamma_rows = _pass_gates("state_backward", G, seq, prev, K, V, C,
                                                 block_v)
  scaled_gamma = gamma * scale
  operand = _pass_operand(BV, dtype)
  per_chunk = 8  # TMA copies per chunk: q, K¹, Wk, dO, P¹ᵀ dO, scale γ, e, γ_C

  def body(q_gmem, k_gmem, wk_gmem, do_gmem, local_gmem, g_gmem, e_gmem, gl_gmem, dhT_gmem,
           dh_gmem, dx_gmem, dh0_gmem,
           q_smem, k_smem, wk_smem, do_smem, local_smem, g_smem, e_smem, gl_smem, ds_smem,
           gdo_smem, ndx_smem, f32_smem, bar, bar0):
    # dX goes out through the first C rows of the buffer that holds dS at both ends (232 KB
    # with a buffer of its own at K = V = 128, over the 227 KB of a block).
    dx_out = f32_smem.at[pl.ds(0, C)]
    j, b, hd, cols = _pass_program(H, BV)

    def fetch(n, slot):
      rows = pl.ds(n * C, C)
      copies = [(q_gmem.at[b, rows, hd], q_smem.at[slot]),
                (k_gmem.at[b, rows, hd, 0], k_smem.at[slot]),
                (wk_gmem.at[b, rows, hd], wk_smem.at[slot]),
                (do_gmem.at[b, rows, hd, cols], do_smem.at[slot]),
                (local_gmem.at[b, rows, hd, cols], local_smem.at[slot]),
                (g_gmem.at[b, hd, rows], g_smem.at[slot]),
                (e_gmem.at[b, hd, rows], e_smem.at[slot]),
                (gl_gmem.at[b, hd, n], gl_smem.at[slot])]
      _fetch_chunk(copies, bar, slot, per_chunk)

    def step(i, dstate):
      n, slot = N - 1 - i, lax.rem(i, 2)

      _prefetch_and_wait(i + 1 < N, lambda: fetch(n - 1, 1 - slot), bar, slot, per_chunk)
      rows = pl.ds(n * C, C)
      # dS' as the saved dh and the operand of K¹ dS'.
      _store(dstate, ds_smem, dh_gmem.at[b, hd, pl.ds(n * K, K), cols])
      e = _on_rows(_rows(e_smem.at[slot]), BV)
      dx = local_smem[slot] + e * _product(k_smem.at[slot], ds_smem, (C, BV))
      dx_out[...] = dx
      ndx_smem[...] = (-dx).astype(dtype)
      g = _on_rows(_rows(g_smem.at[slot]), BV)
      gdo_smem[...] = (g * do_smem[slot].astype(jnp.float32)).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dx_out, dx_gmem.at[b, rows, hd, cols])
      return _carry(dstate, gl_smem.at[slot], [(q_smem.at[slot].transpose((1, 0)), gdo_smem),
                                               (wk_smem.at[slot].transpose((1, 0)), ndx_smem)])

    fetch(N - 1, 0)
    _pass(N, step, f32_smem, dhT_gmem.at[b, hd, :, cols], dh0_gmem.at[b, hd, :, cols], bar0)

  return plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((B, H, N * K, V), dtype),
                jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      scratch_types=[operand((2, C, K)), operand((2, C, K)), operand((2, C, K)),
                     operand((2, C, BV)),
                     plgpu.SMEM((2, C, BV), jnp.float32), plgpu.SMEM((2, C), jnp.float32),
                     plgpu.SMEM((2, C), jnp.float32), plgpu.SMEM((2, K), jnp.float32),
                     operand((K, BV)), operand((C, BV)), operand((C, BV)),
                     plgpu.SMEM((K, BV), jnp.float32),  # K ≥ C
                     plgpu.Barrier(num_barriers=2 * per_chunk), plgpu.Barrier(num_barriers=1)],
      grid=(V // BV, B * H), grid_names=("j", "bh"), interpret=_interpret(interpret),
      kernel_name="prism_state_backward_mosaic",
  )(q, k, wk, do, local1, scaled_gamma, to_end, gamma_rows, dhT)


def state_grads(q, k, v, beta, G, seq, prev, x, h, dh, dx, do, *, scale, chunk=64,
                interpret=False):
  """The state side of the gradients, as `kernels.state_grads`: dq [B,T,H,K] in q's dtype, the
  output/state terms of dK^l (L × [B,T,H,K] float32), dX Sᵀ [B,T,H,K] float32 and that part of
  dG [B,T,H] float32. q [B,T,H,K], k [B,T,H,L,K], v [B,T,H,L,V], beta [B,T,H,L], x [B,T,H,V],
  h and dh [B,H,N·K,V], do [B,T,H,V] (one 16-bit dtype); dx [B,T,H,V] float32; G [B,T,H]
  float32, seq / prev [B,T] float32.

  One program per (key block of 64, chunk, batch·head), the whole value width at once. With
  Y¹ = X, Y^l = β^l ⊙ V^l and dP^l = causal(dO Y^lᵀ) ⊙ D, all on WGMMA:
  dQ = Σ_l dP^l K^l + γ ⊙ dO Sᵀ, dK^l = dP^lᵀ Q + e ⊙ Y^l dS'ᵀ, dX Sᵀ, and the pieces of dG
  as vectors — the row and column sums of Ψ = Σ_l dP^l ⊙ (Q K^lᵀ), de = Σ_l rowsum(K^l ⊙
  Y^l dS'ᵀ), γ ⊙ rowsum(Q ⊙ dO Sᵀ) and the row sums of S ⊙ dS' — which XLA sums over key
  blocks and combines (`cm.gate_grads`), so no vector changes register layout in the kernel.
  Up to L = 2 every dP^l stays in shared memory and dQ's products are one accumulation; at
  L = 3 (whose L slots would need 239 KB) one slot holds the write at hand and its term of dQ
  is added in registers before the next write overwrites it.
  """
  _check("state_grads", q, k, do, chunk)
  B, T, H, L, K = k.shape
  V, C, dtype, N = do.shape[-1], chunk, q.dtype, T // chunk
  BK, f32 = C, jnp.float32  # key blocks of 64 (= C)
  DP_SLOTS = L if L <= 2 else 1  # dP^l kept in shared memory at once
  gamma, to_end = (_head_major(x) for x in pass_gates(G, seq, prev, C))  # [B, H, T]
  PARTS = 5  # rowsum Ψ, de, γ ⊙ rowsum(Q ⊙ dO Sᵀ), rowsum(S ⊙ dS'), colsum Ψ

  def body(q_gmem, k_gmem, v_gmem, beta_gmem, x_gmem, dx_gmem, G_gmem, seq_gmem, gamma_gmem,
           e_gmem, h_gmem, dh_gmem, do_gmem, dq_gmem, *rest):
    dk_gmem, (dxs_gmem, parts_gmem) = rest[:L], rest[L:L + 2]
    (q_smem, qs_smem, k_smem, y_smem, do_smem, dxf_smem, dxb_smem, h_smem, dh_smem, dp_smem,
     vec_smem, beta_smem, out_smem, dq_smem, part_smem, col_smem, bar) = rest[L + 2:]
    kb, n, bh = lax.axis_index("kb"), lax.axis_index("n"), lax.axis_index("bh")
    b, hd = bh // H, bh % H
    rows, keys = pl.ds(n * C, C), pl.ds(kb * BK, BK)
    state_rows = pl.ds(n * K + kb * BK, BK)
    _copy_in([(q_gmem.at[b, rows, hd, keys], q_smem), (x_gmem.at[b, rows, hd], y_smem.at[0]),
              (dx_gmem.at[b, rows, hd], dxf_smem), (do_gmem.at[b, rows, hd], do_smem),
              (h_gmem.at[b, hd, state_rows], h_smem), (dh_gmem.at[b, hd, state_rows], dh_smem),
              (gamma_gmem.at[b, hd, rows], vec_smem.at[4]),
              (e_gmem.at[b, hd, rows], vec_smem.at[5])]
             + _gate_copies(G_gmem, seq_gmem, b, hd, rows, vec_smem)
             + [(k_gmem.at[b, rows, hd, l, keys], k_smem.at[l]) for l in range(L)]
             + [(v_gmem.at[b, rows, hd, l], y_smem.at[l]) for l in range(1, L)]
             + [(beta_gmem.at[b, hd, l, rows], beta_smem.at[l]) for l in range(1, L)], bar)
    decay = _chunk_decay(vec_smem, C, query_rows=True)
    # The product operands: scale ⊙ Q, dX and Y^l = β^l ⊙ V^l rounded to the input type.
    qs = q_smem[...].astype(f32) * scale
    qs_smem[...] = qs.astype(dtype)
    dxb_smem[...] = dxf_smem[...].astype(dtype)
    for l in range(1, L):
      y = y_smem[l].astype(f32) * _on_rows(_rows(beta_smem.at[l]), V)
      y_smem[l] = y.astype(dtype)
    plgpu.commit_smem()  # the tensor cores read them through the async proxy
    s_t = h_smem.transpose((1, 0))
    dos = _product(do_smem, s_t, (C, BK))
    _store(_product(dxb_smem, s_t, (C, BK)), out_smem, dxs_gmem.at[b, rows, hd, keys])
    psi = de = dq_writes = None
    for l in range(L):
      dp_l = dp_smem.at[l % DP_SLOTS]
      # Reading a product's result waits for every WGMMA in flight, so the slot's last reader
      # is done before it is overwritten.
      dp = _product(do_smem, y_smem.at[l].transpose((1, 0)), (C, C)) * decay
      dp_l[...] = dp.astype(dtype)
      plgpu.commit_smem()
      yds = _product(y_smem.at[l], dh_smem.transpose((1, 0)), (C, BK))
      psi_l = dp * _product(qs_smem, k_smem.at[l].transpose((1, 0)), (C, C))
      de_l = jnp.sum(k_smem[l].astype(f32) * yds, axis=1)
      psi, de = (psi_l, de_l) if l == 0 else (psi + psi_l, de + de_l)
      dk = (_product(dp_l.transpose((1, 0)), qs_smem, (C, BK))
            + _on_rows(_rows(vec_smem.at[5]), BK) * yds)
      _store(dk, out_smem, dk_gmem[l].at[b, rows, hd, keys])
      if DP_SLOTS < L:
        dq_l = _product(dp_l, k_smem.at[l], (C, BK))
        dq_writes = dq_l if l == 0 else dq_writes + dq_l
    gamma_rows = _rows(vec_smem.at[4])
    if DP_SLOTS == L:
      dq_writes = _products([(dp_smem.at[l], k_smem.at[l]) for l in range(L)], (C, BK))
    dq = dq_writes + _on_rows(gamma_rows, BK) * dos
    _store(dq * scale, dq_smem, dq_gmem.at[b, rows, hd, keys])
    sds = jnp.sum(h_smem[...].astype(f32) * dh_smem[...].astype(f32), axis=1)
    # One value per row of a WGMMA tile, and colsum Ψ (one per column) in a buffer of its own.
    row_parts = (jnp.sum(psi, axis=1), de, gamma_rows * jnp.sum(qs * dos, axis=1), sds)
    _store_vectors(row_parts, jnp.sum(psi, axis=0), part_smem, col_smem,
                   lambda i: parts_gmem.at[kb, i, b, hd, rows])

  KB = K // BK
  out = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((B, T, H, K), dtype)]
      + [jax.ShapeDtypeStruct((B, T, H, K), f32)] * (L + 1)
      + [jax.ShapeDtypeStruct((KB, PARTS, B, H, T), f32)],
      scratch_types=[_operand_smem((C, BK), dtype), _operand_smem((C, BK), dtype),
                     _operand_smem((L, C, BK), dtype), _operand_smem((L, C, V), dtype),
                     _operand_smem((C, V), dtype), plgpu.SMEM((C, V), f32),
                     _operand_smem((C, V), dtype), _operand_smem((BK, V), dtype),
                     _operand_smem((BK, V), dtype), _operand_smem((DP_SLOTS, C, C), dtype),
                     plgpu.SMEM((6, C), f32), plgpu.SMEM((L, C), f32),
                     plgpu.SMEM((C, BK), f32), _operand_smem((C, BK), dtype),
                     plgpu.SMEM((PARTS - 1, C), f32), plgpu.SMEM((C,), f32),
                     plgpu.Barrier(num_barriers=10 + 3 * L)],
      grid=(KB, N, B * H), grid_names=("kb", "n", "bh"), interpret=_interpret(interpret),
      kernel_name="prism_state_grads_mosaic",
  )(q, k, v, _head_major(beta), x, dx, _head_major(G), seq, gamma, to_end, h, dh, do)
  dq, dk, dxs, parts = out[0], list(out[1:L + 1]), out[L + 1], out[L + 2]
  psi_rows, de, q_dos, sds, psi_cols = jnp.sum(parts, axis=0)  # each [B, H, T]
  # cm.gate_grads on whole arrays: the G_C terms go to each chunk's last row.
  per_chunk = lambda a: a.reshape(B, H, N, C)
  gamma_last = per_chunk(gamma)[..., -1:]
  last = (jnp.sum(per_chunk(de * to_end), axis=-1, keepdims=True)
          + gamma_last * jnp.sum(per_chunk(sds), axis=-1, keepdims=True))
  is_last = jnp.arange(C) == C - 1
  dG = psi_rows - psi_cols - de * to_end + q_dos
  dG = (per_chunk(dG) + jnp.where(is_last, last, 0.0)).reshape(B, H, T)
  return dq, dk, dxs, jnp.transpose(dG, (0, 2, 1))



def wy_grads(k, v, beta, G, seq, prev, inv, u, wk, dx, dxs, dh, local, dk_state, *, chunk=64,
             interpret=False, further=None):
  """The WY side of the gradients at K = V, as `kernels.wy_grads`: dK [B,T,H,L,K] (k's dtype,
  the state side's dk_state added), dV [B,T,H,L,V] (v's dtype), dβ [B,T,H,L] (β's dtype) and
  the rest of dG [B,T,H] float32. k [B,T,H,L,K], v [B,T,H,L,V], beta [B,T,H,L], inv
  [B,T,H,C], wk [B,T,H,K] (one 16-bit dtype); u, dx [B,T,H,V], dxs and dk_state[0] [B,T,H,K]
  float32 (dh, local and the other writes' dk_state are read by `kernels.wy_further_grads`).

  This kernel does the erase write. At L ≥ 2 the other writes come first, from
  `kernels.wy_further_grads` (passed as `further`, its outputs): their terms of dK¹, dβ¹ and dG
  join the erase write's here, and its outputs fill the first slots of the further writes'
  arrays (in place).

  One program per (chunk, batch·head), whole key and value widths. With T = (I + A)⁻¹ and every
  product on WGMMA with 16-bit operands (the roundings of the Triton kernel): dR = Tᵀ dX,
  dBk = −Tᵀ (dX Sᵀ), dA = −strict(dR Uᵀ + dBk Wkᵀ); then dV = β ⊙ dR,
  dK = dk_state + (β ⊙ dA ⊙ D) K + (β ⊙ dA ⊙ D)ᵀ K + βγ ⊙ dBk, dβ, and the row and column sums
  of Ψ = β ⊙ dA ⊙ A_raw, which XLA turns into dG (as in `state_grads`). U, dX, dX Sᵀ and
  dk_state arrive in float32 through two staging buffers, the second pair loading while dR and
  dR Uᵀ compute.
  """
  del dh, local
  _check("wy_grads", k[:, :, :, 0], k, v, chunk)
  B, T, H, L, K = k.shape
  if (L > 1) != (further is not None):
    raise ValueError(f"mosaic.wy_grads: L = {L} needs the further writes' outputs exactly when "
                     f"L ≥ 2 (got {'none' if further is None else 'them'})")
  if further is not None:
    dk_slots, dv_slots, dbeta_slots, dk1, dbeta1_more, dG_more = further
    dk_state = (dk1,)
  V, C, dtype, N, f32 = v.shape[-1], chunk, k.dtype, T // chunk, jnp.float32
  gamma, _ = pass_gates(G, seq, prev, C)  # [B, T, H]

  def body(k_gmem, v_gmem, beta_gmem, G_gmem, seq_gmem, gamma_gmem, inv_gmem, u_gmem, wk_gmem,
           dx_gmem, dxs_gmem, dks_gmem, dk_gmem, dv_gmem, parts_gmem,
           k_smem, v_smem, inv_smem, wk_smem, stage_smem, u_smem, dx_smem, dr_smem, dbk_smem,
           dkd_smem, vec_smem, part_smem, col_smem, bar, bar2):
    n, bh = lax.axis_index("n"), lax.axis_index("bh")
    b, hd = bh // H, bh % H
    rows = pl.ds(n * C, C)
    _copy_in([(k_gmem.at[b, rows, hd, 0], k_smem), (v_gmem.at[b, rows, hd, 0], v_smem),
              (inv_gmem.at[b, rows, hd], inv_smem), (wk_gmem.at[b, rows, hd], wk_smem),
              (u_gmem.at[b, rows, hd], stage_smem.at[0]),
              (dx_gmem.at[b, rows, hd], stage_smem.at[1]),
              (beta_gmem.at[b, hd, 0, rows], vec_smem.at[4]),
              (gamma_gmem.at[b, hd, rows], vec_smem.at[5])]
             + _gate_copies(G_gmem, seq_gmem, b, hd, rows, vec_smem), bar)
    u_smem[...] = stage_smem[0].astype(dtype)
    dx_smem[...] = stage_smem[1].astype(dtype)
    plgpu.commit_smem()  # a warpgroup barrier too: the staging buffers can be refilled
    _start_copies([(dxs_gmem.at[b, rows, hd], stage_smem.at[0]),
                   (dks_gmem.at[b, rows, hd], stage_smem.at[1])], bar2)
    b1, gamma_rows = _rows(vec_smem.at[4]), _rows(vec_smem.at[5])
    decay, strict = _chunk_decay(vec_smem, C, query_rows=True, strict=True, with_mask=True)
    inv_t = inv_smem.transpose((1, 0))
    dr = _product(inv_t, dx_smem, (C, V))  # dR = Tᵀ dX
    dr_smem[...] = dr.astype(dtype)
    plgpu.commit_smem()
    gram = _product(dr_smem, u_smem.transpose((1, 0)), (C, C))  # dR Uᵀ
    _store(_on_rows(b1, V) * dr, u_smem, dv_gmem.at[b, rows, hd])
    dbeta = jnp.sum(dr * v_smem[...].astype(f32), axis=1)
    plgpu.barrier_wait(bar2.at[0])
    dx_smem[...] = stage_smem[0].astype(dtype)  # dX Sᵀ, in the buffer dX has left
    plgpu.commit_smem()
    dbk = -_product(inv_t, dx_smem, (C, K))  # dBk = −Tᵀ (dX Sᵀ)
    dbk_smem[...] = dbk.astype(dtype)
    plgpu.commit_smem()
    gram = gram + _product(dbk_smem, wk_smem.transpose((1, 0)), (C, C))
    sbk = jnp.sum(dbk * k_smem[...].astype(f32), axis=1)
    raw = _product(k_smem, k_smem.transpose((1, 0)), (C, C)) * decay  # strict(K Kᵀ ⊙ D)
    da = jnp.where(strict, -gram, 0.0)
    dbeta = dbeta + jnp.sum(da * raw, axis=1) + gamma_rows * sbk
    psi = _on_rows(b1, C) * da * raw
    dkd_smem[...] = (_on_rows(b1, C) * da * decay).astype(dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(bar2.at[1])
    dk = (stage_smem[1] + _on_rows(b1 * gamma_rows, K) * dbk
          + _products([(dkd_smem, k_smem), (dkd_smem.transpose((1, 0)), k_smem)], (C, K)))
    _store(dk, dbk_smem, dk_gmem.at[b, rows, hd])
    _store_vectors((dbeta, jnp.sum(psi, axis=1) + b1 * sbk * gamma_rows), jnp.sum(psi, axis=0),
                   part_smem, col_smem, lambda i: parts_gmem.at[i, b, hd, rows])

  dk, dv, parts = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((B, T, H, K), dtype),
                jax.ShapeDtypeStruct((B, T, H, V), v.dtype),
                jax.ShapeDtypeStruct((3, B, H, T), f32)],
      scratch_types=[_operand_smem((C, K), dtype), _operand_smem((C, V), dtype),
                     _operand_smem((C, C), dtype), _operand_smem((C, K), dtype),
                     plgpu.SMEM((2, C, K), f32), _operand_smem((C, V), dtype),
                     _operand_smem((C, V), dtype), _operand_smem((C, V), dtype),
                     _operand_smem((C, K), dtype), _operand_smem((C, C), dtype),
                     plgpu.SMEM((6, C), f32), plgpu.SMEM((2, C), f32), plgpu.SMEM((C,), f32),
                     plgpu.Barrier(num_barriers=12), plgpu.Barrier(num_barriers=2)],
      grid=(N, B * H), grid_names=("n", "bh"), interpret=_interpret(interpret),
      kernel_name="prism_wy_grads_mosaic",
  )(k, v, _head_major(beta), _head_major(G), seq, _head_major(gamma), inv, u, wk, dx, dxs,
    dk_state[0])
  to_bth = lambda a: jnp.transpose(a, (0, 2, 1))
  dbeta, dG = to_bth(parts[0]), to_bth(parts[1] - parts[2])
  if further is None:
    return dk[:, :, :, None], dv[:, :, :, None], dbeta.astype(beta.dtype)[..., None], dG
  dbeta = (dbeta + dbeta1_more).astype(beta.dtype)
  fill = lambda slots, x: slots.at[:, :, :, 0].set(x)[:, :, :, :L]
  return (fill(dk_slots, dk), fill(dv_slots, dv), fill(dbeta_slots, dbeta),
          dG + dG_more)


def wy_further_grads(k, v, beta, G, seq, prev, inv, dx, dh, local, dk_state, *, chunk=64,
                     interpret=False):
  """The writes l ≥ 2 of the WY side at K = V, as `kernels.wy_further_grads`, before `wy_grads`
  does the erase write: dk [B,T,H,L,K] (k's dtype) and dv [B,T,H,L,V] (v's dtype) with every
  slot but the first written, dβ [B,T,H,L] (β's dtype, the first slot 0), the erase write's
  dK¹ so far [B,T,H,K] float32 (dk_state[0] plus these writes' terms), and these writes' terms
  of dβ¹ and dG [B,T,H] float32. Arguments as `kernels.wy_further_grads`: k, v, beta, inv
  [B,T,H,C] and dh [B,H,N·K,V] in one 16-bit dtype; dx, local and dk_state float32.

  One program per (chunk, batch·head, write l ≥ 2), whole key and value widths, every product
  on WGMMA with 16-bit operands (the roundings of the Triton kernel): dR = Tᵀ dX, M_raw =
  strict(K¹ K^lᵀ ⊙ D), dM = −strict(dR W^lᵀ) with W^l = β^l ⊙ V^l, dW^l = dY^l − (β¹ ⊙
  M_raw)ᵀ dR with dY^l = P^lᵀ dO + e ⊙ K^l dS'; then dV^l = β^l ⊙ dW^l, dβ^l = rowsum(dW^l ⊙
  V^l), dK^l = dk_state^l + (β¹ ⊙ dM ⊙ D)ᵀ K¹, the term (β¹ ⊙ dM ⊙ D) K^l of dK¹, and the
  row sums of dM ⊙ M_raw (dβ¹) and of Ψ = β¹ ⊙ dM ⊙ M_raw, with its column sums (dG). Each
  write's dK¹ terms and vectors go to a slot of their own, which XLA sums over the writes (at
  L = 2 there is one). dX, dY^l's local part and the two dk_state rows arrive in float32
  through two staging buffers, refilled while the products run.
  """
  _check("wy_further_grads", k[:, :, :, 0], k, v, chunk)
  B, T, H, L, K = k.shape
  V, C, dtype, N, f32 = v.shape[-1], chunk, k.dtype, T // chunk, jnp.float32
  _, to_end = pass_gates(G, seq, prev, C)  # [B, T, H]

  def body(k_gmem, v_gmem, beta_gmem, G_gmem, seq_gmem, e_gmem, inv_gmem, dx_gmem, dh_gmem,
           local_gmem, dk1_in_gmem, dks_gmem, dk_gmem, dv_gmem, dk1_gmem, parts_gmem,
           k1_smem, kl_smem, vl_smem, inv_smem, dh_smem, dx_smem, dr_smem, braw_smem, dkd_smem,
           stage_smem, vec_smem, part_smem, col_smem, bar, bar2):
    n, bh, w = lax.axis_index("n"), lax.axis_index("bh"), lax.axis_index("w")
    b, hd, l = bh // H, bh % H, w + 1
    rows = pl.ds(n * C, C)
    _copy_in([(k_gmem.at[b, rows, hd, 0], k1_smem), (k_gmem.at[b, rows, hd, l], kl_smem),
              (v_gmem.at[b, rows, hd, l], vl_smem), (inv_gmem.at[b, rows, hd], inv_smem),
              (dh_gmem.at[b, hd, pl.ds(n * K, K)], dh_smem),
              (dx_gmem.at[b, rows, hd], stage_smem.at[0]),
              (local_gmem.at[w, b, rows, hd], stage_smem.at[1]),
              (beta_gmem.at[b, hd, 0, rows], vec_smem.at[4]),
              (beta_gmem.at[b, hd, l, rows], vec_smem.at[5]),
              (e_gmem.at[b, hd, rows], vec_smem.at[6])]
             + _gate_copies(G_gmem, seq_gmem, b, hd, rows, vec_smem), bar)
    dx_smem[...] = stage_smem[0].astype(dtype)
    plgpu.commit_smem()  # a warpgroup barrier too: the first staging buffer can be refilled
    _start_copies([(dks_gmem.at[w, b, rows, hd], stage_smem.at[0])], bar2)
    b1, bl, e = (_rows(vec_smem.at[i]) for i in (4, 5, 6))
    decay, strict = _chunk_decay(vec_smem, C, query_rows=True, strict=True, with_mask=True)
    dr = _product(inv_smem.transpose((1, 0)), dx_smem, (C, V))  # dR = Tᵀ dX
    dr_smem[...] = dr.astype(dtype)
    raw = _product(k1_smem, kl_smem.transpose((1, 0)), (C, C)) * decay  # M_raw
    braw_smem[...] = (_on_rows(b1, C) * raw).astype(dtype)
    dx_smem[...] = (_on_rows(bl, V) * vl_smem[...].astype(f32)).astype(dtype)  # W^l; dX is read
    plgpu.commit_smem()
    dm = jnp.where(strict, -_product(dr_smem, dx_smem.transpose((1, 0)), (C, C)), 0.0)
    dbeta1 = jnp.sum(dm * raw, axis=1)
    psi = _on_rows(b1, C) * dm * raw
    psi_rows, psi_cols = jnp.sum(psi, axis=1), jnp.sum(psi, axis=0)
    dkd_smem[...] = (_on_rows(b1, C) * dm * decay).astype(dtype)
    plgpu.commit_smem()
    dw = (stage_smem[1] + _on_rows(e, V) * _product(kl_smem, dh_smem, (C, V))
          - _product(braw_smem.transpose((1, 0)), dr_smem, (C, V)))
    plgpu.commit_smem()  # every thread has read the second staging buffer
    _start_copies([(dk1_in_gmem.at[b, rows, hd], stage_smem.at[1])], bar2, first=1)
    dbeta = jnp.sum(dw * vl_smem[...].astype(f32), axis=1)
    _store(_on_rows(bl, V) * dw, dx_smem, dv_gmem.at[b, rows, hd, l])
    plgpu.barrier_wait(bar2.at[0])
    dk = stage_smem[0] + _product(dkd_smem.transpose((1, 0)), k1_smem, (C, K))
    _store(dk, dr_smem, dk_gmem.at[b, rows, hd, l])
    plgpu.barrier_wait(bar2.at[1])
    # dk_state[0] enters the sum over writes once, in the first write's slot.
    first = (w == 0).astype(f32)
    dk1 = first * stage_smem[1] + _product(dkd_smem, kl_smem, (C, K))
    _store(dk1, stage_smem.at[0], dk1_gmem.at[w, b, rows, hd])
    _store_vectors((dbeta, dbeta1, psi_rows), psi_cols, part_smem, col_smem,
                   lambda i: parts_gmem.at[w, i, b, hd, rows])

  more = lambda xs: jnp.stack(xs)  # the writes l ≥ 2 on a leading axis (L = 2: no copy)
  dk, dv, dk1, parts = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((B, T, H, L, K), dtype),
                jax.ShapeDtypeStruct((B, T, H, L, V), v.dtype),
                jax.ShapeDtypeStruct((L - 1, B, T, H, K), f32),
                jax.ShapeDtypeStruct((L - 1, 4, B, H, T), f32)],
      scratch_types=[_operand_smem((C, K), dtype), _operand_smem((C, K), dtype),
                     _operand_smem((C, V), dtype), _operand_smem((C, C), dtype),
                     _operand_smem((K, V), dtype), _operand_smem((C, V), dtype),
                     _operand_smem((C, V), dtype), _operand_smem((C, C), dtype),
                     _operand_smem((C, C), dtype), plgpu.SMEM((2, C, K), f32),
                     plgpu.SMEM((7, C), f32), plgpu.SMEM((3, C), f32), plgpu.SMEM((C,), f32),
                     plgpu.Barrier(num_barriers=14), plgpu.Barrier(num_barriers=2)],
      grid=(N, B * H, L - 1), grid_names=("n", "bh", "w"), interpret=_interpret(interpret),
      kernel_name="prism_wy_further_grads_mosaic",
  )(k, v, _head_major(beta), _head_major(G), seq, _head_major(to_end), inv, dx, dh,
    more(local[1:]), dk_state[0], more(dk_state[1:]))
  to_bth = lambda a: jnp.swapaxes(a, -1, -2)  # [..., H, T] → [..., T, H]
  parts = jnp.moveaxis(parts, 1, 0)  # [4, L − 1, B, H, T]
  dbeta = jnp.concatenate([jnp.zeros((B, T, H, 1), f32),
                           jnp.moveaxis(to_bth(parts[0]), 0, -1)], axis=-1)
  dG = jnp.sum(parts[2] - parts[3], axis=0)
  return (dk, dv, dbeta.astype(beta.dtype), jnp.sum(dk1, axis=0),
          to_bth(jnp.sum(parts[1], axis=0)), to_bth(dG))
