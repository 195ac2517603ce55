"""Per-chunk algebra of the chunked PRISM recurrence (spec §4.3), on values inside kernels.

Shared by the GPU (Triton) and TPU (Mosaic) kernel bodies, so it uses only 2-D arrays, masks
built from iota, elementwise ops, keep-dims reductions and 2-D dot_generals. Within a chunk of
C positions, with G the chunk-local cumulative log-decay, D_ij = exp(G_i − G_j) on the causal
same-sequence mask, γ_i = exp(G_i) where position i continues the incoming state (else 0),
e_i = exp(G_C − G_i) where position i lies in the chunk's last sequence (else 0), K^l the write
keys (K¹ also erases), W^l = β^l ⊙ δ^l, Q = scale · q and S the incoming state:

    A    = strict((β¹ K¹K¹ᵀ) ⊙ D),   M^l = strict((β¹ K¹K^lᵀ) ⊙ D)       l ≥ 2
    U    = (I + A)⁻¹ (W¹ − Σ_{l≥2} M^l W^l),   Wk = (I + A)⁻¹ (β¹γ ⊙ K¹)
    X    = U − Wk S
    O    = γ ⊙ Q S + Σ_l causal((Q K^lᵀ) ⊙ D) Y^l          Y¹ = X, Y^l = W^l (l ≥ 2)
    S'   = γ_C S + Σ_l (K^l ⊙ e)ᵀ Y^l

`chunk_grads` is the hand-derived reverse of these formulas (derived in
`pallas_kernels/README.md`): `state_sums`, `write_sums`, `write_grads`, `state_terms` and
`gate_grads` (what contracts over value columns against the state: the GPU's state-side
gradient kernel, one write after another), then `wy_grads` (the cotangents through (I + A)⁻¹:
its WY kernel).
Column vectors are [C, 1], row vectors [1, C], per-chunk scalars [1, 1].
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
# Three TF32 tensor-core products per float32 product (hi·hi + hi·lo + lo·hi): float32-level
# accuracy on tensor cores. No kernel uses it by default any more (on the H200 the inverse was
# faster with HIGHEST, its application with bf16 operands); `benchmarks/kernels.py --solves`
# times it.
TF32X3 = lax.DotAlgorithmPreset.TF32_TF32_F32_X3


BF16 = "bf16"  # precision mode: round both operands to bf16, accumulate in float32
F16 = "f16"  # the same with float16 operands (float16 inputs)


def mm(a, b, precision, *, ta=False, tb=False):
  """a @ b (aᵀ if ta, bᵀ if tb) of 2-D arrays with a float32 result.

  precision: a lax.Precision (or None, the default) for float32 operands, or BF16 / F16, which
  round both operands to bf16 / float16 first (tensor-core products; half the on-chip operand
  memory).
  Operands of one dtype stay in it (bf16 keys against bf16 keys are exact products).
  """
  if precision in (BF16, F16):
    dtype = jnp.bfloat16 if precision == BF16 else jnp.float16
    a, b, precision = a.astype(dtype), b.astype(dtype), None
  elif a.dtype != b.dtype:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def split_refs(refs, counts):
  """Group a kernel's flat ref list into consecutive tuples of the given lengths."""
  out, i = [], 0
  for n in counts:
    out.append(refs[i:i + n])
    i += n
  return out


def matmul_precision(dtype):
  """float32 inputs get full float32 products; bf16 inputs the matrix units' default."""
  return HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _rowsum(x):
  return jnp.sum(x, axis=1, keepdims=True)  # [C, 1]


def row_minus_column_sums(psi):
  """Σ_j Ψ_ij − Σ_j Ψ_ji as a column [C, 1]: the cotangent of G from that of the decay
  D_ij = exp(G_i − G_j) (Ψ = dD ⊙ D). The column sums reach a column vector through the
  diagonal (no transpose of a row vector, which not every kernel backend lowers)."""
  C = psi.shape[0]
  diag = _iota((C, C), 0) == _iota((C, C), 1)
  return _rowsum(psi) - _rowsum(jnp.where(diag, jnp.sum(psi, axis=0, keepdims=True), 0.0))


class ChunkGates(NamedTuple):
  """Decay factors and masks of one chunk (see module docstring)."""
  decay: jax.Array  # D on the causal same-sequence mask, 0 elsewhere: [C, C]
  causal: jax.Array  # j ≤ i in the same sequence: [C, C] bool
  strict: jax.Array  # j < i in the same sequence: [C, C] bool
  gamma: jax.Array  # γ: [C, 1]
  to_end: jax.Array  # e: [C, 1]
  gamma_last: jax.Array  # γ_C: [1, 1]
  is_last: jax.Array  # row C − 1: [C, 1] bool


def chunk_gates(G_col, G_row, seq_col, seq_row, prev_col) -> ChunkGates:
  """Masks and decays from the cumulative log-decay G and the packed-sequence index.

  G_col [C, 1] / G_row [1, C]: Σ_{i≤t} g_i within the chunk; seq_col / seq_row: index of the
  packed sequence of each position (float32); prev_col [C, 1]: index of the sequence of the
  state entering the chunk (the same value on every row).
  """
  C = G_col.shape[0]
  rows, cols = _iota((C, C), 0), _iota((C, C), 1)
  same = seq_col == seq_row
  causal = (rows >= cols) & same
  strict = (rows > cols) & same
  # The exponent is masked before exp: exp(−inf) = 0, never exp(+large) · 0.
  decay = jnp.exp(jnp.where(causal, G_col - G_row, -jnp.inf))
  gamma, to_end, gamma_last, is_last = end_gates(G_col, seq_col, prev_col)
  return ChunkGates(decay, causal, strict, gamma, to_end, gamma_last, is_last)


def end_gates(G_col, seq_col, prev_col):
  """γ, e, γ_C and the last-row mask of `chunk_gates`, without its C × C masks (all a pass
  over chunks needs). The chunk runs along axis −2: columns [C, 1] inside a kernel, or whole
  arrays [..., C, H] with seq_col, prev_col [..., C, 1]."""
  C = G_col.shape[-2]
  is_last = _iota((C, 1), 0) == C - 1
  last = lambda x: jnp.sum(jnp.where(is_last, x, 0.0), axis=-2, keepdims=True)  # [..., 1, ·]
  gamma = jnp.exp(jnp.where(seq_col == prev_col, G_col, -jnp.inf))
  to_end = jnp.exp(jnp.where(seq_col == last(seq_col), last(G_col) - G_col, -jnp.inf))
  return gamma, to_end, last(gamma), is_last


def unit_lower_inverse(a, solve=HIGHEST):
  """(I + A)⁻¹ for strictly lower-triangular A [C, C] (C a power of two), in full float32.

  Block doubling: if T_s inverts the diagonal s×s blocks of I + A and E_s holds the entries of A
  that couple the two halves of each 2s×2s diagonal block, then T_2s = T_s − T_s E_s T_s
  exactly (E_s T_s E_s = 0). log₂ C levels of two C×C products, with intermediate entries no
  larger than those of the inverse itself (a Neumann product would form A^(2^m) instead).
  """
  C = a.shape[0]
  rows, cols = _iota((C, C), 0), _iota((C, C), 1)
  inv = (rows == cols).astype(jnp.float32)
  s = 1
  while s < C:
    level = s.bit_length() - 1  # s = 2^level; shifts keep the masks in integer ops any backend has
    couple = (((rows >> (level + 1)) == (cols >> (level + 1)))
              & ((rows >> level) != (cols >> level)))
    e = jnp.where(couple, a, 0.0)
    inv = inv - mm(mm(inv, e, solve), inv, solve)
    s *= 2
  return inv


def unit_lower_inverse_rows(a):
  """(I + A)⁻¹ for strictly lower-triangular A [n, n] by forward substitution, one row at a
  time: X_r = e_r − Σ_{m<r} A_rm X_m. Elementwise float32 only (no products, so IEEE float32 on
  every backend); n − 2 steps of two n × n reductions, for the small diagonal blocks of a
  kernel's inverse."""
  n = a.shape[0]
  rows, cols = _iota((n, n), 0), _iota((n, n), 1)
  strict = -a  # rows 0 and 1 of X − I are already right
  for r in range(2, n):
    row = jnp.sum(jnp.where(rows == r, -a, 0.0), axis=0)  # −A_r·
    row = jnp.where(_iota((n,), 0) < r, row, 0.0)
    row = row + jnp.sum(row[:, None] * strict, axis=0)  # −A_r· − Σ_m A_rm (X − I)_m·
    strict = jnp.where(rows == r, row[None, :], strict)
  return jnp.where(rows == cols, 1.0, strict)


class Intra(NamedTuple):
  """Per-chunk quantities that do not depend on the incoming state."""
  inv: jax.Array  # (I + A)⁻¹: [C, C]
  u: jax.Array  # U = (I + A)⁻¹ (W¹ − Σ M^l W^l): [C, V]
  wk: jax.Array  # Wk = (I + A)⁻¹ (β¹γ ⊙ K¹): [C, K]


def intra_chunk(k: Sequence, w: Sequence, b1, gates: ChunkGates, precision,
                solve=HIGHEST) -> Intra:
  """(I + A)⁻¹, U and Wk of one chunk. k: L arrays [C, K]; w: L arrays W^l [C, V];
  b1: β¹ [C, 1]. solve: precision of the (I + A)⁻¹ products."""
  inv = unit_lower_inverse(b1 * _raw_keys(k[0], k[0], gates, precision), solve)
  rhs, bk = right_hand_sides(k, w, b1, gates, precision)
  return Intra(inv, mm(inv, rhs, solve), mm(inv, bk, solve))


def right_hand_sides(k: Sequence, w: Sequence, b1, gates: ChunkGates, precision):
  """What (I + A)⁻¹ is applied to: R = W¹ − Σ_{l≥2} M^l W^l (M^l = β¹ ⊙ strict(K¹K^lᵀ ⊙ D))
  and Bk = β¹γ ⊙ K¹. Returns (R [C, V], Bk [C, K])."""
  return value_right_hand_side(k, w, b1, gates, precision), key_right_hand_side(k[0], b1, gates)


def value_right_hand_side(k: Sequence, w: Sequence, b1, gates: ChunkGates, precision):
  """R = W¹ − Σ_{l≥2} M^l W^l [C, V] (k[0] is not read when L = 1)."""
  rhs = w[0]
  for kl, wl in zip(k[1:], w[1:]):
    rhs = rhs - mm(b1 * _raw_keys(k[0], kl, gates, precision), wl, precision)
  return rhs


def key_right_hand_side(k1, b1, gates: ChunkGates):
  """Bk = β¹γ ⊙ K¹ [C, K]."""
  return (b1 * gates.gamma) * k1


def _raw_keys(k1, kl, gates: ChunkGates, precision, k_blocks=(slice(None),)):
  """strict((K¹K^lᵀ) ⊙ D): A and M^l before the β¹ rows (the keys read one block of columns,
  k_blocks, at a time)."""
  kk = sum(mm(k1[:, c], kl[:, c], precision, tb=True) for c in k_blocks)
  return jnp.where(gates.strict, kk * gates.decay, 0.0)


def next_state(state, x, k: Sequence, w: Sequence, gates: ChunkGates, precision):
  """S' = γ_C S + (K¹ ⊙ e)ᵀ X + Σ_{l≥2} (K^l ⊙ e)ᵀ W^l; state [K, V], x and w^l [C, V]
  (w[0] is not read: X takes its place)."""
  new = gates.gamma_last * state
  for kl, yl in zip(k, (x, *w[1:])):  # e scales the [C, V] side; keys stay as loaded
    new = new + mm(kl, gates.to_end * yl, precision, ta=True)
  return new


def chunk_output(q, state, x, k: Sequence, w: Sequence, gates: ChunkGates, precision):
  """O = γ ⊙ Q S + Σ_l causal((Q K^lᵀ) ⊙ D) Y^l; q already scaled [C, K]; result [C, V]
  (w[0] is not read: Y¹ = X)."""
  o = gates.gamma * mm(q, state, precision)
  for kl, yl in zip(k, (x, *w[1:])):
    p = jnp.where(gates.causal, mm(q, kl, precision, tb=True) * gates.decay, 0.0)
    o = o + mm(p, yl, precision)
  return o


def state_cotangent_step(dstate, q, do, wk, k1, gates: ChunkGates, precision):
  """Cotangent of the incoming state from that of the outgoing one (the backward pass).

  dX = causal((Q K¹ᵀ) ⊙ D)ᵀ dO + (K¹ ⊙ e) dS';  dS = γ_C dS' + (γ ⊙ Q)ᵀ dO − Wkᵀ dX.
  """
  return state_cotangent_from_local(dstate, q, do, wk, k1, local_dy(q, do, k1, gates, precision),
                                    gates.gamma, gates.to_end, gates.gamma_last, precision)[0]


def local_dy(q, do, kl, gates: ChunkGates, precision):
  """P^lᵀ dO = causal((Q K^lᵀ) ⊙ D)ᵀ dO, the state-independent part of dY^l: [C, V]."""
  p = jnp.where(gates.causal, mm(q, kl, precision, tb=True) * gates.decay, 0.0)
  return mm(p, do, precision, ta=True)


def state_cotangent_from_local(dstate, q, do, wk, k1, local, gamma, to_end, gamma_last,
                               precision):
  """`state_cotangent_step` given local = `local_dy` of K¹ (computed apart, in parallel); returns
  (dS, dX)."""
  dx = local + to_end * mm(k1, dstate, precision)  # e and γ scale the [C, V] sides
  return (gamma_last * dstate + mm(q, gamma * do, precision, ta=True)
          - mm(wk, dx, precision, ta=True)), dx


class ChunkGrads(NamedTuple):
  dq: jax.Array  # cotangent of the scaled query Q: [C, K]
  dk: tuple  # L arrays [C, K]
  dv: tuple  # L arrays [C, V] (cotangents of δ^l)
  dbeta: tuple  # L arrays [C, 1]
  dG: jax.Array  # cotangent of the chunk-local cumulative log-decay: [C, 1]


class StateSums(NamedTuple):
  """Sums over value columns of the state terms of the backward (for one block of key columns
  k₀:k₁ when S, dS' are rows k₀:k₁ of the state); each is a sum of per-value-block terms."""
  dos: jax.Array  # dO Sᵀ: [C, BK]
  dxs: jax.Array  # dX Sᵀ: [C, BK]
  sds: jax.Array  # Σ S ⊙ dS': [1, 1]


class WriteSums(NamedTuple):
  """The same for one write l."""
  doy: jax.Array  # dO Y^lᵀ: [C, C] (the same for every key block)
  yds: jax.Array  # Y^l dS'ᵀ: [C, BK]


def _add(acc, terms):
  return terms if acc is None else jax.tree.map(jnp.add, acc, terms)


def state_sums(dx, state, dstate, do, precision, acc: StateSums | None = None) -> StateSums:
  """`StateSums` of one value block (dx, do [C, BV]; state, dstate [BK, BV]), added to `acc`."""
  sds = jnp.sum(jnp.sum(state * dstate, axis=1, keepdims=True), axis=0, keepdims=True)
  return _add(acc, StateSums(mm(do, state, precision, tb=True),
                             mm(dx, state, precision, tb=True), sds))


def write_sums(y, dstate, do, precision, acc: WriteSums | None = None) -> WriteSums:
  """`WriteSums` of one value block (y: Y^l [C, BV], Y¹ = X), added to `acc`."""
  return _add(acc, WriteSums(mm(do, y, precision, tb=True), mm(y, dstate, precision, tb=True)))


def write_grads(sums: WriteSums, q, kl, gates: ChunkGates, precision):
  """One write's share of the state-side cotangents, for the key columns of `sums` (q, k^l:
  [C, BK]): with dP^l = causal(dO Y^lᵀ),

    dQ  += (dP^l ⊙ D) K^l
    dK^l = (dP^l ⊙ D)ᵀ Q + e ⊙ Y^l dS'ᵀ          (its output/state terms)
    Ψ   += (dP^l ⊙ D) ⊙ (Q K^lᵀ)                  (dP^l ⊙ P^l, the cotangent of D times D)
    de  += rowsum(K^l ⊙ Y^l dS'ᵀ)

  Ψ is formed elementwise in float32 (its key-block parts add up): written through the bf16
  products (dP^l ⊙ D) K^l instead, the difference of its row and column sums lost a factor 2 of
  dg's accuracy to cancellation. Returns (dQ share, dK^l, Ψ share, de share).
  """
  dpd = jnp.where(gates.causal, sums.doy, 0.0) * gates.decay
  return (mm(dpd, kl, precision), mm(dpd, q, precision, ta=True) + gates.to_end * sums.yds,
          dpd * mm(q, kl, precision, tb=True), _rowsum(kl * sums.yds))


def state_terms(sums: StateSums, q, gates: ChunkGates):
  """The state's own terms, for the key columns of `sums`: γ ⊙ dO Sᵀ of dQ and
  γ ⊙ rowsum(Q ⊙ dO Sᵀ) of dG (a partial sum over key blocks)."""
  return gates.gamma * sums.dos, gates.gamma * _rowsum(q * sums.dos)


def gate_grads(psi, de, sds, gates: ChunkGates):
  """The rest of the state side's dG from the writes' summed Ψ and de shares (`write_grads`)
  and Σ S ⊙ dS': rowsum(Ψ) − colsum(Ψ) − e ⊙ de, plus Σ de ⊙ e + γ_C Σ S ⊙ dS' on the last row
  (the G_C terms). A partial sum over key blocks: [C, 1]."""
  last = jnp.sum(de * gates.to_end, axis=0, keepdims=True) + sds * gates.gamma_last
  return (row_minus_column_sums(psi) - de * gates.to_end
          + jnp.where(gates.is_last, last, 0.0))


def _dr(inv, dx, c, solve):
  """Columns c of dR = Tᵀ dX. dR (and dBk) are formed again wherever they are needed (once per
  write, twice for dBk): one C × C × 64 product each, cheaper than holding them live in a
  kernel."""
  return mm(inv, dx[:, c], solve, ta=True)


def wy_grads(k: Sequence, v: Sequence, beta: Sequence, inv, u, wk, dx, dxs, dy, dk_state,
             gates: ChunkGates, precision, store, solve=HIGHEST, v_blocks=(slice(None),),
             k_blocks=(slice(None),)):
  """Cotangents through U = (I + A)⁻¹ R and Wk = (I + A)⁻¹ Bk (the WY part) of one chunk.

  With T = (I + A)⁻¹:

    dR = Tᵀ dX,   dBk = −Tᵀ (dX Sᵀ),   dA = −strict(dR Uᵀ + dBk Wkᵀ)
    dW¹ = dR,   dW^l = dY^l − (β¹ ⊙ M^l_raw)ᵀ dR,   dM^l = −strict(dR W^lᵀ)

  then the key, β and G terms of A = β¹ ⊙ strict(K¹K¹ᵀ ⊙ D), M^l and Bk = β¹γ ⊙ K¹ (dG from
  Ψ = β¹ ⊙ (dA ⊙ A_raw + Σ dM^l ⊙ M^l_raw), as in `gate_grads`).

  The erase write here, then the others through `further_write_grads` (dR is recomputed for
  each), and every column block of dk^l and dδ^l goes to `store(name, l, cols, x)` ("dk" or
  "dv") as soon as it is final, so a kernel holds one write's C × C products at a time and no
  finished output (only dK¹'s blocks stay open across writes). k, v (L each), u, wk, dx:
  dX [C, V], dxs: dX Sᵀ [C, K] and dk_state (the state-side dK^l to add to) are arrays or
  Pallas refs, read one column block (v_blocks / k_blocks: slices of the value / key columns)
  at a time; beta: L columns [C, 1]; dy(i, cols): columns `cols` of dY^(i+2). Returns (dbeta
  tuple of [C, 1], dG [C, 1]).
  """
  f32 = lambda x: x.astype(jnp.float32)
  b1 = beta[0]
  dbk_of = lambda c: -mm(inv, dxs[:, c], solve, ta=True)
  # The erase write: dA = −strict(dR Uᵀ + dBk Wkᵀ).
  gram, dbeta1 = 0.0, 0.0
  for c in v_blocks:
    dr = _dr(inv, dx, c, solve)
    gram = gram + mm(dr, u[:, c], precision, tb=True)
    store("dv", 0, c, b1 * dr)
    dbeta1 = dbeta1 + _rowsum(dr * f32(v[0][:, c]))
  sbk = 0.0
  for c in k_blocks:
    dbk = dbk_of(c)
    gram = gram + mm(dbk, wk[:, c], precision, tb=True)
    sbk = sbk + _rowsum(dbk * f32(k[0][:, c]))
  raw = _raw_keys(k[0], k[0], gates, precision, k_blocks)
  da = -jnp.where(gates.strict, gram, 0.0)
  dbeta1 = dbeta1 + _rowsum(da * raw) + gates.gamma * sbk
  psi = b1 * da * raw
  dkd = b1 * da * gates.decay  # dA ⊙ D
  dk1 = []
  for c in k_blocks:
    k1 = f32(k[0][:, c])
    dk1.append(f32(dk_state[0][:, c]) + mm(dkd, k1, precision)
               + mm(dkd, k1, precision, ta=True) + (b1 * gates.gamma) * dbk_of(c))
  dbeta, dbeta1_more, psi_more, dk1 = further_write_grads(
      k, v, beta, inv, dx, dy, dk_state, gates, precision, store, solve, v_blocks, k_blocks,
      dk1)
  for c, x in zip(k_blocks, dk1):
    store("dk", 0, c, x)
  return ((dbeta1 + dbeta1_more,) + dbeta,
          row_minus_column_sums(psi + psi_more) + b1 * sbk * gates.gamma)


def further_write_grads(k: Sequence, v: Sequence, beta: Sequence, inv, dx, dy, dk_state,
                        gates: ChunkGates, precision, store, solve, v_blocks, k_blocks, dk1):
  """The writes l ≥ 2 of `wy_grads`: dM^l = −strict(dR W^lᵀ), with dk^l and dδ^l (their
  blocks to `store`), dβ^l, and their terms of the erase write's cotangents, which are sums
  over l and need nothing of it: (β¹ ⊙ dM^l ⊙ D) K^l added to dk1 (a list of [C, block]
  float32 accumulators, one per key block), rowsum(dM^l ⊙ M^l_raw) of dβ¹ and β¹ ⊙ dM^l ⊙
  M^l_raw of Ψ. Returns (dβ^l tuple, dβ¹ terms [C, 1], Ψ terms [C, C], dk1); with L = 1
  there is nothing to do and the terms are 0."""
  f32 = lambda x: x.astype(jnp.float32)
  b1 = beta[0]
  dbeta, dbeta1, psi = [], 0.0, 0.0
  for i in range(1, len(k)):
    raw = _raw_keys(k[0], k[i], gates, precision, k_blocks)
    rw, dbeta_i = 0.0, 0.0
    for c in v_blocks:
      dr, vl = _dr(inv, dx, c, solve), f32(v[i][:, c])
      rw = rw + mm(dr, beta[i] * vl, precision, tb=True)
      dw = dy(i - 1, c) - mm(b1 * raw, dr, precision, ta=True)
      store("dv", i, c, beta[i] * dw)
      dbeta_i = dbeta_i + _rowsum(dw * vl)
    dbeta.append(dbeta_i)
    dm = -jnp.where(gates.strict, rw, 0.0)
    dbeta1 = dbeta1 + _rowsum(dm * raw)
    psi = psi + b1 * dm * raw
    dkd = b1 * dm * gates.decay  # dM^l ⊙ D
    for j, c in enumerate(k_blocks):
      dk1[j] = dk1[j] + mm(dkd, k[i][:, c], precision)
      store("dk", i, c, f32(dk_state[i][:, c]) + mm(dkd, f32(k[0][:, c]), precision, ta=True))
  return tuple(dbeta), dbeta1, psi, dk1


def chunk_grads(q, k: Sequence, v: Sequence, beta: Sequence, state, dstate, do,
                gates: ChunkGates, precision, solve=HIGHEST, saved=None) -> ChunkGrads:
  """Cotangents of one chunk's inputs given its incoming state S, the cotangent dS' of its
  outgoing state and dO, by reversing the forward formulas (recomputing U, Wk and X, or with
  `saved` = ((I + A)⁻¹, U, Wk) of the forward only X): `state_sums` and each write's
  `write_sums` over the whole chunk, `write_grads`, `state_terms`, `gate_grads`, then
  `wy_grads`.

  q [C, K] scaled; k, v, beta: L arrays [C, K], [C, V], [C, 1]; state, dstate [K, V];
  do [C, V].
  """
  w = [b * vl for b, vl in zip(beta, v)]
  intra = (intra_chunk(k, w, beta[0], gates, precision, solve) if saved is None
           else Intra(*saved))
  x = intra.u - mm(intra.wk, state, precision)
  ys = (x, *w[1:])
  dys = [local_dy(q, do, kl, gates, precision) + mm(kl * gates.to_end, dstate, precision)
         for kl in k]
  sums = state_sums(dys[0], state, dstate, do, precision)
  dq_w, dk_state, psi, de = 0.0, [], 0.0, 0.0
  for y, kl in zip(ys, k):
    dq_l, dk_l, psi_l, de_l = write_grads(write_sums(y, dstate, do, precision), q, kl, gates,
                                          precision)
    dq_w, psi, de = dq_w + dq_l, psi + psi_l, de + de_l
    dk_state.append(dk_l)
  dq, dG_state = state_terms(sums, q, gates)
  dq, dG_state = dq + dq_w, dG_state + gate_grads(psi, de, sums.sds, gates)
  out = {}
  store = lambda name, l, cols, x: out.__setitem__((name, l), x)  # whole rows: one block each
  dbeta, dG = wy_grads(k, v, beta, intra.inv, intra.u, intra.wk, dys[0], sums.dxs,
                       lambda i, c: dys[i + 1][:, c], dk_state, gates, precision, store, solve)
  dk, dv = (tuple(out[name, l] for l in range(len(k))) for name in ("dk", "dv"))
  return ChunkGrads(dq, dk, dv, dbeta, dG_state + dG)
