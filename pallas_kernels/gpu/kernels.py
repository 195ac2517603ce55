"""Pallas (Triton backend) kernels of the chunked PRISM recurrence on GPU.

Arrays keep the caller's layout ([B, T, H, ...]); a BlockSpec with squeezed batch and head axes
gives each program one head's rows. All kernels take T a multiple of the chunk C and K, V
powers of two ≥ 16 (the public wrapper pads). Five stages, as in the chunked Gated DeltaNet:

  prepare       (B·H, N) then (B·H, N, V/BV) parallel: (I + A)⁻¹ of every chunk, then U, Wk
  state_forward (B, H, V/BV): sequential over chunks; state [K, BV] float32 in registers;
                saves the state entering every chunk and the new values X = U − Wk S
  output        (B·H, N, V/BV) parallel: O from Q, the saved state and X
  state_backward(B·H, N, V/BV) parallel: the state-independent part of dX, then
                (B, H, V/BV): reverse pass for the state cotangents (the cotangent of the
                state leaving every chunk is saved; dS₀ is the initial-state gradient)
  grads         (B·H, N, V/BV) parallel: every input cotangent of a chunk from S, dS', dO and
                the chunk's saved (I + A)⁻¹, U and Wk
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from prism_jax.ops import chunk_math as cm


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the GPU kernels. chunk: positions per chunk (C); block_v: value columns per
  program (every kernel splits V); num_warps / num_stages: Triton launch parameters;
  seq_num_warps: warps of the two sequential passes over chunks (on the H200, B4 T4096 H16
  K=V=128: the state cotangent pass 1.76 ms with 8 warps, 2.50 ms with 4)."""
  chunk: int = 64
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2
  seq_num_warps: int = 8

  def __post_init__(self):
    for name in ("chunk", "block_v"):
      n = getattr(self, name)
      if n < 16 or n & (n - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {n}")


def _params(bs: BlockSizes, sequential: bool = False):
  return plgpu.CompilerParams(num_warps=bs.seq_num_warps if sequential else bs.num_warps,
                              num_stages=bs.num_stages)


def _col(x):
  return x.astype(jnp.float32)[:, None]


def _gates(G_ref, seq_ref, prev_ref, sl=slice(None)):
  G = G_ref[sl].astype(jnp.float32)
  seq = seq_ref[sl]
  return cm.chunk_gates(G[:, None], G[None, :], seq[:, None], seq[None, :], prev_ref[sl][:, None])


def _end_gates(G_ref, seq_ref, prev_ref, sl):
  """`_gates` without the C × C decay and masks (None): what the passes over chunks read."""
  col = lambda ref: ref[sl].astype(jnp.float32)[:, None]
  return cm.ChunkGates(None, None, None, *cm.end_gates(col(G_ref), col(seq_ref), col(prev_ref)))


# Kernel bodies.

SUB = 16  # rows of the sub-blocks the prepare kernel solves in (Triton's smallest dot)


def _inverse_kernel(k1_ref, beta1_ref, G_ref, seq_ref, inv_ref, *, precision, solve):
  """(I + A)⁻¹ of one chunk, in SUB × SUB blocks.

  A whole C × C inverse by block doubling spends log₂ C levels of C³ products on blocks that
  are mostly zero; here the diagonal blocks are inverted alone (`cm.unit_lower_inverse` on
  SUB × SUB) and the others follow by block forward substitution,
  X_ij = −X_ii Σ_{j≤m<i} A_im X_mj, every product SUB × SUB × SUB.
  """
  n = G_ref.shape[0] // SUB
  rows = lambda i: pl.ds(i * SUB, SUB)
  f32 = lambda ref, i: ref[rows(i)].astype(jnp.float32)
  G = [f32(G_ref, i) for i in range(n)]
  seq = [f32(seq_ref, i) for i in range(n)]
  below = (jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
           > jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1))
  k = [k1_ref[rows(i), :] for i in range(n)]  # input dtype (exact bf16 products)
  b1 = [f32(beta1_ref, i)[:, None] for i in range(n)]

  def a(i, j):
    """Block (i, j) of A = strict(β¹ K¹K¹ᵀ ⊙ D)."""
    mask = seq[i][:, None] == seq[j][None, :]
    if i == j:
      mask = mask & below
    decay = jnp.exp(jnp.where(mask, G[i][:, None] - G[j][None, :], -jnp.inf))
    return b1[i] * cm.mm(k[i], k[j], precision, tb=True) * decay

  blocks = {(i, j): a(i, j) for i in range(n) for j in range(i + 1)}
  inv = {}
  for i in range(n):
    inv[i, i] = cm.unit_lower_inverse(blocks[i, i], solve)
    for j in range(i - 1, -1, -1):
      acc = sum(cm.mm(blocks[i, m], inv[m, j], solve) for m in range(j, i))
      inv[i, j] = -cm.mm(inv[i, i], acc, solve)
  zero = jnp.zeros((SUB, SUB), jnp.float32)
  for i in range(n):
    for j in range(n):
      inv_ref[rows(i), pl.ds(j * SUB, SUB)] = inv[i, j] if j <= i else zero


def _apply_kernel(*refs, L, precision, solve):
  """U = (I + A)⁻¹ R and Wk = (I + A)⁻¹ Bk of one chunk and value block."""
  k_refs, v_refs, beta_refs, (G_ref, seq_ref, prev_ref, inv_ref, u_ref, wk_ref) = (
      cm.split_refs(refs, (L, L, L, 6)))
  gates = _gates(G_ref, seq_ref, prev_ref)
  k = [r[...] for r in k_refs]  # input dtype: K K^lᵀ stays a bf16 product for bf16
  w = [_col(b[...]) * r[...].astype(jnp.float32) for b, r in zip(beta_refs, v_refs)]
  rhs, _, bk = cm.right_hand_sides(k, w, _col(beta_refs[0][...]), gates, precision)
  inv = inv_ref[...]
  u_ref[...] = cm.mm(inv, rhs, solve)
  wk_ref[...] = cm.mm(inv, bk, solve)


def _state_forward_kernel(*refs, L, C, precision):
  (k_refs, v_refs, beta_refs,
   (G_ref, seq_ref, prev_ref, u_ref, wk_ref, h0_ref, h_ref, x_ref, hT_ref)) = cm.split_refs(
       refs, (L, L, L, 9))
  K = k_refs[0].shape[-1]
  N = u_ref.shape[0] // C

  def body(n, state):
    sl = pl.ds(n * C, C)
    gates = _end_gates(G_ref, seq_ref, prev_ref, sl)
    k = [r[sl, :] for r in k_refs]
    w = [_col(b[sl]) * r[sl, :].astype(jnp.float32) for b, r in zip(beta_refs, v_refs)]
    h_ref[pl.ds(n * K, K), :] = state
    x = u_ref[sl, :] - cm.mm(wk_ref[sl, :], state, precision)
    x_ref[sl, :] = x
    return cm.next_state(state, x, k, w, gates, precision)

  hT_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...])


def _output_kernel(*refs, L, scale, precision):
  ((q_ref,), k_refs, v_refs, beta_refs,
   (G_ref, seq_ref, prev_ref, x_ref, h_ref, o_ref)) = cm.split_refs(refs, (1, L, L, L, 6))
  gates = _gates(G_ref, seq_ref, prev_ref)
  q = q_ref[...].astype(jnp.float32) * scale
  k = [r[...] for r in k_refs]  # input dtype: K K^lᵀ and Q K^lᵀ stay bf16 products for bf16
  w = [_col(b[...]) * r[...].astype(jnp.float32) for b, r in zip(beta_refs, v_refs)]
  o = cm.chunk_output(q, h_ref[...], x_ref[...], k, w, gates, precision)
  o_ref[...] = o.astype(o_ref.dtype)


def _local_dx_kernel(q_ref, k1_ref, G_ref, seq_ref, prev_ref, do_ref, out_ref, *, scale,
                     precision):
  gates = _gates(G_ref, seq_ref, prev_ref)
  q = q_ref[...].astype(jnp.float32) * scale
  out_ref[...] = cm.local_dx(q, do_ref[...].astype(jnp.float32),
                             k1_ref[...].astype(jnp.float32), gates, precision)


def _state_backward_kernel(q_ref, k1_ref, G_ref, seq_ref, prev_ref, wk_ref, do_ref, local_ref,
                           dhT_ref, dh_ref, dh0_ref, *, C, scale, precision):
  K = k1_ref.shape[-1]
  N = wk_ref.shape[0] // C

  def body(i, dstate):
    n = N - 1 - i
    sl = pl.ds(n * C, C)
    gates = _end_gates(G_ref, seq_ref, prev_ref, sl)
    dh_ref[pl.ds(n * K, K), :] = dstate
    q = q_ref[sl, :].astype(jnp.float32) * scale
    return cm.state_cotangent_from_local(
        dstate, q, do_ref[sl, :].astype(jnp.float32), wk_ref[sl, :],
        k1_ref[sl, :].astype(jnp.float32), local_ref[sl, :], gates.gamma, gates.to_end,
        gates.gamma_last, precision)

  dh0_ref[...] = jax.lax.fori_loop(0, N, body, dhT_ref[...])


def _grads_kernel(*refs, L, scale, precision, solve):
  ((q_ref,), k_refs, v_refs, beta_refs,
   (G_ref, seq_ref, prev_ref, inv_ref, u_ref, wk_ref, h_ref, dh_ref, do_ref, dq_ref),
   dk_refs, dv_refs, dbeta_refs, (dG_ref,)) = cm.split_refs(refs, (1, L, L, L, 10, L, L, L, 1))
  gates = _gates(G_ref, seq_ref, prev_ref)
  q = q_ref[...].astype(jnp.float32) * scale
  k = [r[...] for r in k_refs]  # input dtype: K K^lᵀ and Q K^lᵀ stay bf16 products for bf16
  v = [r[...].astype(jnp.float32) for r in v_refs]
  beta = [_col(r[...]) for r in beta_refs]
  g = cm.chunk_grads(q, k, v, beta, h_ref[...], dh_ref[...], do_ref[...].astype(jnp.float32),
                     gates, precision, solve, saved=(inv_ref[...], u_ref[...], wk_ref[...]))
  dq_ref[...] = g.dq * scale
  for r, x in zip(dk_refs, g.dk):
    r[...] = x
  for r, x in zip(dv_refs, g.dv):
    r[...] = x
  for r, x in zip(dbeta_refs, g.dbeta):
    r[...] = x.reshape(-1)
  dG_ref[...] = g.dG.reshape(-1)


# pallas_calls. Shapes: q [B,T,H,K], k [B,T,H,L,K], v [B,T,H,L,V], beta [B,T,H,L],
# G [B,T,H] float32, seq / prev [B,T] float32, states [B,H,K,V] float32. The chunk-parallel
# kernels run on the grid (B·H, N, V/BV) (Triton grids have at most three axes).

def _chunk_specs(L, C, K, BV, H):
  """BlockSpecs of one chunk and one value block for q, the L keys, values and gates, G, seq,
  rows of width K and of width BV, and the [K, BV] block of the state entering the chunk."""
  at = lambda f: (lambda bh, n, j: f(bh // H, bh % H, n, j))
  return dict(
      q=pl.BlockSpec((None, C, None, K), at(lambda b, h, n, j: (b, n, h, 0))),
      k=[pl.BlockSpec((None, C, None, None, K), at(lambda b, h, n, j, l=l: (b, n, h, l, 0)))
         for l in range(L)],
      v=[pl.BlockSpec((None, C, None, None, BV), at(lambda b, h, n, j, l=l: (b, n, h, l, j)))
         for l in range(L)],
      beta=[pl.BlockSpec((None, C, None, None), at(lambda b, h, n, j, l=l: (b, n, h, l)))
            for l in range(L)],
      G=pl.BlockSpec((None, C, None), at(lambda b, h, n, j: (b, n, h))),
      seq=pl.BlockSpec((None, C), at(lambda b, h, n, j: (b, n))),
      rows_k=pl.BlockSpec((None, C, None, K), at(lambda b, h, n, j: (b, n, h, 0))),
      rows_v=pl.BlockSpec((None, C, None, BV), at(lambda b, h, n, j: (b, n, h, j))),
      rows_c=pl.BlockSpec((None, C, None, C), at(lambda b, h, n, j: (b, n, h, 0))),
      h=pl.BlockSpec((None, None, K, BV), at(lambda b, h, n, j: (b, h, n, j))),
      # Per-value-block partial sums, reduced over the leading axis outside the kernel.
      part_k=pl.BlockSpec((None, None, C, None, K), at(lambda b, h, n, j: (j, b, n, h, 0))),
      part_g=pl.BlockSpec((None, None, C, None), at(lambda b, h, n, j: (j, b, n, h))),
  )


def _block_v(bs: BlockSizes, V: int) -> int:
  return min(bs.block_v, V)


def prepare(k, v, beta, G, seq, prev, *, bs: BlockSizes, precision, interpret,
            solve=cm.HIGHEST):
  """U [B,T,H,V], Wk [B,T,H,K] and the rows of every chunk's (I + A)⁻¹ [B,T,H,C] (float32):
  the inverse once per chunk (grid (B·H, N)), then its products per value block (every value
  block writes the same Wk). solve: precision of the (I + A)⁻¹ products."""
  B, T, H, L, K = k.shape
  V, C = v.shape[-1], bs.chunk
  BV = _block_v(bs, V)
  at = lambda f: (lambda bh, n: f(bh // H, bh % H, n))
  inv = pl.pallas_call(
      functools.partial(_inverse_kernel, precision=precision, solve=solve),
      grid=(B * H, T // C),
      in_specs=[pl.BlockSpec((None, C, None, None, K), at(lambda b, h, n: (b, n, h, 0, 0))),
                pl.BlockSpec((None, C, None, None), at(lambda b, h, n: (b, n, h, 0))),
                pl.BlockSpec((None, C, None), at(lambda b, h, n: (b, n, h))),
                pl.BlockSpec((None, C), at(lambda b, h, n: (b, n)))],
      out_specs=pl.BlockSpec((None, C, None, C), at(lambda b, h, n: (b, n, h, 0))),
      out_shape=jax.ShapeDtypeStruct((B, T, H, C), jnp.float32),
      compiler_params=_params(bs), interpret=interpret, name="prism_inverse",
  )(k, beta, G, seq)
  s = _chunk_specs(L, C, K, BV, H)
  u, wk = pl.pallas_call(
      functools.partial(_apply_kernel, L=L, precision=precision, solve=solve),
      grid=(B * H, T // C, V // BV),
      in_specs=[*s["k"], *s["v"], *s["beta"], s["G"], s["seq"], s["seq"], s["rows_c"]],
      out_specs=[s["rows_v"], s["rows_k"]],
      out_shape=[jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, T, H, K), jnp.float32)],
      compiler_params=_params(bs), interpret=interpret, name="prism_apply_inverse",
  )(*([k] * L), *([v] * L), *([beta] * L), G, seq, prev, inv)
  return u, wk, inv


def _seq_specs(L, T, K, BV):
  """Whole-sequence BlockSpecs for the sequential passes (grid (B, H, V/BV))."""
  ks = [pl.BlockSpec((None, T, None, None, K), lambda b, h, j, l=l: (b, 0, h, l, 0))
        for l in range(L)]
  vs = [pl.BlockSpec((None, T, None, None, BV), lambda b, h, j, l=l: (b, 0, h, l, j))
        for l in range(L)]
  betas = [pl.BlockSpec((None, T, None, None), lambda b, h, j, l=l: (b, 0, h, l))
           for l in range(L)]
  G = pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h))
  seq = pl.BlockSpec((None, T), lambda b, h, j: (b, 0))
  rows_k = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
  rows_v = pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))
  return ks, vs, betas, G, seq, rows_k, rows_v


def state_forward(k, v, beta, G, seq, prev, u, wk, h0, *, bs: BlockSizes, precision, interpret):
  """States entering each chunk h [B,H,N·K,V], new values X [B,T,H,V], final state [B,H,K,V]."""
  B, T, H, L, K = k.shape
  V, C = v.shape[-1], bs.chunk
  BV = min(bs.block_v, V)
  ks, vs, betas, G_spec, seq_spec, rows_k, rows_v = _seq_specs(L, T, K, BV)
  state_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
  h_spec = pl.BlockSpec((None, None, T // C * K, BV), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
      functools.partial(_state_forward_kernel, L=L, C=C, precision=precision),
      grid=(B, H, V // BV),
      in_specs=[*ks, *vs, *betas, G_spec, seq_spec, seq_spec, rows_v, rows_k, state_spec],
      out_specs=[h_spec, rows_v, state_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, T // C * K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      compiler_params=_params(bs, sequential=True), interpret=interpret,
      name="prism_state_forward",
  )(*([k] * L), *([v] * L), *([beta] * L), G, seq, prev, u, wk, h0)


def output(q, k, v, beta, G, seq, prev, x, h, *, scale, bs: BlockSizes, precision, interpret):
  """O [B,T,H,V] in q's dtype."""
  B, T, H, L, K = k.shape
  V, C = v.shape[-1], bs.chunk
  BV = _block_v(bs, V)
  s = _chunk_specs(L, C, K, BV, H)
  return pl.pallas_call(
      functools.partial(_output_kernel, L=L, scale=scale, precision=precision),
      grid=(B * H, T // C, V // BV),
      in_specs=[s["q"], *s["k"], *s["v"], *s["beta"], s["G"], s["seq"], s["seq"], s["rows_v"],
                s["h"]],
      out_specs=s["rows_v"],
      out_shape=jax.ShapeDtypeStruct((B, T, H, V), q.dtype),
      compiler_params=_params(bs), interpret=interpret, name="prism_output",
  )(q, *([k] * L), *([v] * L), *([beta] * L), G, seq, prev, x, h)


def state_backward(q, k, G, seq, prev, wk, do, dhT, *, scale, bs: BlockSizes, precision,
                   interpret):
  """Cotangents of the states leaving each chunk dh [B,H,N·K,V] and of the initial state.
  The state-independent part of dX is computed first, in parallel over chunks."""
  B, T, H, L, K = k.shape
  V, C = do.shape[-1], bs.chunk
  BV = min(bs.block_v, V)
  s = _chunk_specs(L, C, K, BV, H)
  local = pl.pallas_call(
      functools.partial(_local_dx_kernel, scale=scale, precision=precision),
      grid=(B * H, T // C, V // BV),
      in_specs=[s["q"], s["k"][0], s["G"], s["seq"], s["seq"], s["rows_v"]],
      out_specs=s["rows_v"],
      out_shape=jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
      compiler_params=_params(bs), interpret=interpret, name="prism_local_dx",
  )(q, k, G, seq, prev, do)
  ks, _, _, G_spec, seq_spec, rows_k, rows_v = _seq_specs(1, T, K, BV)
  state_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
  h_spec = pl.BlockSpec((None, None, T // C * K, BV), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
      functools.partial(_state_backward_kernel, C=C, scale=scale, precision=precision),
      grid=(B, H, V // BV),
      in_specs=[rows_k, ks[0], G_spec, seq_spec, seq_spec, rows_k, rows_v, rows_v, state_spec],
      out_specs=[h_spec, state_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, T // C * K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      compiler_params=_params(bs, sequential=True), interpret=interpret,
      name="prism_state_backward",
  )(q, k, G, seq, prev, wk, do, local, dhT)


def grads(q, k, v, beta, G, seq, prev, inv, u, wk, h, dh, do, *, scale, bs: BlockSizes,
          precision, interpret, solve=cm.HIGHEST):
  """Float32 cotangents: dq [B,T,H,K], L × dk, L × dv [B,T,H,V], L × dβ, dG [B,T,H].
  inv, u, wk: what `prepare` returned in the forward.

  Every cotangent on the key or gate side is a sum over value columns, so each value block
  writes its partial sum and they are added here; dv is per column."""
  B, T, H, L, K = k.shape
  V, C = v.shape[-1], bs.chunk
  BV = _block_v(bs, V)
  nV = V // BV
  s = _chunk_specs(L, C, K, BV, H)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out = pl.pallas_call(
      functools.partial(_grads_kernel, L=L, scale=scale, precision=precision, solve=solve),
      grid=(B * H, T // C, nV),
      in_specs=[s["q"], *s["k"], *s["v"], *s["beta"], s["G"], s["seq"], s["seq"], s["rows_c"],
                s["rows_v"], s["rows_k"], s["h"], s["h"], s["rows_v"]],
      out_specs=[s["part_k"]] * (1 + L) + [s["rows_v"]] * L + [s["part_g"]] * (L + 1),
      out_shape=[f32(nV, B, T, H, K)] * (1 + L) + [f32(B, T, H, V)] * L
      + [f32(nV, B, T, H)] * (L + 1),
      compiler_params=_params(bs), interpret=interpret, name="prism_grads",
  )(q, *([k] * L), *([v] * L), *([beta] * L), G, seq, prev, inv, u, wk, h, dh, do)
  dq, dk, dv, dbeta, dG = _unpack(out, L)
  total = lambda parts: parts.sum(axis=0)
  return (total(dq), [total(x) for x in dk], list(dv), [total(x) for x in dbeta], total(dG))


def _unpack(out, L):
  return out[0], out[1:1 + L], out[1 + L:1 + 2 * L], out[1 + 2 * L:1 + 3 * L], out[-1]
