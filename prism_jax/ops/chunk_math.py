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
`pallas_kernels/README.md`).
Column vectors are [C, 1], row vectors [1, C], per-chunk scalars [1, 1].
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
# Three TF32 tensor-core products per float32 product (hi·hi + hi·lo + lo·hi): float32-level
# accuracy at tensor-core speed, for the (I + A)⁻¹ products of compiled GPU kernels.
TF32X3 = lax.DotAlgorithmPreset.TF32_TF32_F32_X3


BF16 = "bf16"  # precision mode: round both operands to bf16, accumulate in float32


def mm(a, b, precision, *, ta=False, tb=False):
  """a @ b (aᵀ if ta, bᵀ if tb) of 2-D arrays with a float32 result.

  precision: a lax.Precision (or None, the default) for float32 operands, or BF16, which
  rounds both operands to bf16 first (tensor-core products; half the on-chip operand memory).
  Operands of one dtype stay in it (bf16 keys against bf16 keys are exact products).
  """
  if precision == BF16:
    a, b, precision = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), None
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
  over chunks needs)."""
  C = G_col.shape[0]
  is_last = _iota((C, 1), 0) == C - 1
  G_last = jnp.sum(jnp.where(is_last, G_col, 0.0), axis=0, keepdims=True)  # [1, 1]
  seq_last = jnp.sum(jnp.where(is_last, seq_col, 0.0), axis=0, keepdims=True)  # [1, 1]
  gamma = jnp.exp(jnp.where(seq_col == prev_col, G_col, -jnp.inf))
  to_end = jnp.exp(jnp.where(seq_col == seq_last, G_last - G_col, -jnp.inf))
  gamma_last = jnp.sum(jnp.where(is_last, gamma, 0.0), axis=0, keepdims=True)
  return gamma, to_end, gamma_last, is_last


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


class Intra(NamedTuple):
  """Per-chunk quantities that do not depend on the incoming state."""
  inv: jax.Array  # (I + A)⁻¹: [C, C]
  a_raw: jax.Array  # strict((K¹K¹ᵀ) ⊙ D), so A = β¹ ⊙ a_raw: [C, C]
  m_raw: tuple  # strict((K¹K^lᵀ) ⊙ D) for l ≥ 2: [C, C] each
  rhs: jax.Array  # W¹ − Σ M^l W^l: [C, V]
  bk: jax.Array  # β¹γ ⊙ K¹: [C, K]
  u: jax.Array  # [C, V]
  wk: jax.Array  # [C, K]


def intra_chunk(k: Sequence, w: Sequence, b1, gates: ChunkGates, precision,
                solve=HIGHEST) -> Intra:
  """U and Wk of one chunk. k: L arrays [C, K]; w: L arrays W^l [C, V]; b1: β¹ [C, 1].
  solve: precision of the (I + A)⁻¹ products (float32-accurate: HIGHEST or TF32X3)."""
  a_raw = _raw_keys(k[0], k[0], gates, precision)
  inv = unit_lower_inverse(b1 * a_raw, solve)
  rhs, m_raw, bk = right_hand_sides(k, w, b1, gates, precision)
  u = mm(inv, rhs, solve)
  wk = mm(inv, bk, solve)
  return Intra(inv, a_raw, m_raw, rhs, bk, u, wk)


def right_hand_sides(k: Sequence, w: Sequence, b1, gates: ChunkGates, precision):
  """What (I + A)⁻¹ is applied to: R = W¹ − Σ_{l≥2} M^l W^l and Bk = β¹γ ⊙ K¹; also the raw
  strict((K¹K^lᵀ) ⊙ D) of l ≥ 2. Returns (R [C, V], raw M tuple, Bk [C, K])."""
  rhs = w[0]
  m_raw = []
  for kl, wl in zip(k[1:], w[1:]):
    m_raw.append(_raw_keys(k[0], kl, gates, precision))
    rhs = rhs - mm(b1 * m_raw[-1], wl, precision)
  return rhs, tuple(m_raw), (b1 * gates.gamma) * k[0]


def _raw_keys(k1, kl, gates: ChunkGates, precision):
  """strict((K¹K^lᵀ) ⊙ D): A and M^l before the β¹ rows."""
  return jnp.where(gates.strict, mm(k1, kl, precision, tb=True) * gates.decay, 0.0)


def intra_from_saved(k: Sequence, inv, u, wk, gates: ChunkGates, precision) -> Intra:
  """`Intra` from the (I + A)⁻¹, U and Wk an earlier forward saved: only the raw products
  K¹K^lᵀ ⊙ D are recomputed (rhs and bk, which the backward does not read, are None)."""
  raw = [_raw_keys(k[0], kl, gates, precision) for kl in k]
  return Intra(inv, raw[0], tuple(raw[1:]), None, None, u, wk)


def next_state(state, x, k: Sequence, w: Sequence, gates: ChunkGates, precision):
  """S' = γ_C S + (K¹ ⊙ e)ᵀ X + Σ_{l≥2} (K^l ⊙ e)ᵀ W^l; state [K, V], x and w [C, V]."""
  new = gates.gamma_last * state
  for kl, yl in zip(k, (x, *w[1:])):
    new = new + mm(kl * gates.to_end, yl, precision, ta=True)
  return new


def chunk_output(q, state, x, k: Sequence, w: Sequence, gates: ChunkGates, precision):
  """O = γ ⊙ Q S + Σ_l causal((Q K^lᵀ) ⊙ D) Y^l; q already scaled [C, K]; result [C, V]."""
  o = gates.gamma * mm(q, state, precision)
  for kl, yl in zip(k, (x, *w[1:])):
    p = jnp.where(gates.causal, mm(q, kl, precision, tb=True) * gates.decay, 0.0)
    o = o + mm(p, yl, precision)
  return o


def state_cotangent_step(dstate, q, do, wk, k1, gates: ChunkGates, precision):
  """Cotangent of the incoming state from that of the outgoing one (the backward pass).

  dX = causal((Q K¹ᵀ) ⊙ D)ᵀ dO + (K¹ ⊙ e) dS';  dS = γ_C dS' + (γ ⊙ Q)ᵀ dO − Wkᵀ dX.
  """
  return state_cotangent_from_local(dstate, q, do, wk, k1, local_dx(q, do, k1, gates, precision),
                                    gates.gamma, gates.to_end, gates.gamma_last, precision)


def local_dx(q, do, k1, gates: ChunkGates, precision):
  """The state-independent part of dX, causal((Q K¹ᵀ) ⊙ D)ᵀ dO: [C, V]."""
  p1 = jnp.where(gates.causal, mm(q, k1, precision, tb=True) * gates.decay, 0.0)
  return mm(p1, do, precision, ta=True)


def state_cotangent_from_local(dstate, q, do, wk, k1, local, gamma, to_end, gamma_last,
                               precision):
  """`state_cotangent_step` given local = `local_dx` (computed apart, in parallel)."""
  dx = local + mm(k1 * to_end, dstate, precision)
  return (gamma_last * dstate + mm(gamma * q, do, precision, ta=True)
          - mm(wk, dx, precision, ta=True))


class ChunkGrads(NamedTuple):
  dq: jax.Array  # cotangent of the scaled query Q: [C, K]
  dk: tuple  # L arrays [C, K]
  dv: tuple  # L arrays [C, V] (cotangents of δ^l)
  dbeta: tuple  # L arrays [C, 1]
  dG: jax.Array  # cotangent of the chunk-local cumulative log-decay: [C, 1]


def chunk_grads(q, k: Sequence, v: Sequence, beta: Sequence, state, dstate, do,
                gates: ChunkGates, precision, solve=HIGHEST, saved=None) -> ChunkGrads:
  """Cotangents of one chunk's inputs given its incoming state S, the cotangent dS' of its
  outgoing state and dO, by reversing the forward formulas (recomputing U, Wk and X, or with
  `saved` = ((I + A)⁻¹, U, Wk) of the forward only X).

  q [C, K] scaled; k, v, beta: L arrays [C, K], [C, V], [C, 1]; state, dstate [K, V];
  do [C, V].
  """
  L = len(k)
  w = [b * vl for b, vl in zip(beta, v)]
  b1 = beta[0]
  intra = (intra_chunk(k, w, b1, gates, precision, solve) if saved is None
           else intra_from_saved(k, *saved, gates, precision))
  x = intra.u - mm(intra.wk, state, precision)
  ys = (x, *w[1:])

  # Output and outgoing-state terms: O = γ ⊙ QS + Σ P^l Y^l, S' = γ_C S + Σ (K^l ⊙ e)ᵀ Y^l.
  dys, dk, psi = [], [], 0.0
  dq = gates.gamma * mm(do, state, precision, tb=True)
  dgamma = _rowsum(do * mm(q, state, precision))  # [C, 1]
  de = jnp.zeros_like(gates.to_end)
  for kl, yl in zip(k, ys):
    qk = mm(q, kl, precision, tb=True)
    p = jnp.where(gates.causal, qk * gates.decay, 0.0)
    dp = jnp.where(gates.causal, mm(do, yl, precision, tb=True), 0.0)
    dpd = dp * gates.decay
    psi = psi + dp * p
    dq = dq + mm(dpd, kl, precision)
    ke = kl * gates.to_end
    dys.append(mm(p, do, precision, ta=True) + mm(ke, dstate, precision))
    yds = mm(yl, dstate, precision, tb=True)  # Y^l dS'ᵀ: [C, K]
    dk.append(mm(dpd, q, precision, ta=True) + gates.to_end * yds)
    de = de + _rowsum(kl * yds)
  dgamma_last = jnp.sum(jnp.sum(state * dstate, axis=1, keepdims=True), axis=0, keepdims=True)

  # X = U − Wk S with U = T rhs, Wk = T bk, T = (I + A)⁻¹: dA = −strict(dR Uᵀ + dBk Wkᵀ).
  dx = dys[0]
  dr = mm(intra.inv, dx, solve, ta=True)
  dbk = -mm(intra.inv, mm(dx, state, precision, tb=True), solve, ta=True)
  da = -jnp.where(gates.strict, mm(dr, intra.u, precision, tb=True)
                  + mm(dbk, intra.wk, precision, tb=True), 0.0)
  dw = [dr] + [dys[i] for i in range(1, L)]
  dbeta1 = _rowsum(da * intra.a_raw)
  psi = psi + b1 * da * intra.a_raw
  dkk = b1 * da * gates.decay
  dk[0] = dk[0] + mm(dkk, k[0], precision) + mm(dkk, k[0], precision, ta=True)
  # rhs = W¹ − Σ_{l≥2} (β¹ ⊙ m_raw^l) W^l.
  for i in range(1, L):
    m_raw = intra.m_raw[i - 1]
    dm = -jnp.where(gates.strict, mm(dr, w[i], precision, tb=True), 0.0)
    dw[i] = dw[i] - mm(b1 * m_raw, dr, precision, ta=True)
    dbeta1 = dbeta1 + _rowsum(dm * m_raw)
    psi = psi + b1 * dm * m_raw
    dkm = b1 * dm * gates.decay
    dk[0] = dk[0] + mm(dkm, k[i], precision)
    dk[i] = dk[i] + mm(dkm, k[0], precision, ta=True)
  # bk = (β¹γ) ⊙ K¹.
  dk[0] = dk[0] + (b1 * gates.gamma) * dbk
  sbk = _rowsum(dbk * k[0])
  dbeta1 = dbeta1 + gates.gamma * sbk
  dgamma = dgamma + b1 * sbk

  dv = tuple(b * dwl for b, dwl in zip(beta, dw))
  dbeta = [_rowsum(dwl * vl) for dwl, vl in zip(dw, v)]
  dbeta[0] = dbeta[0] + dbeta1

  # Back to G: D_ij = e^{G_i − G_j}, γ_i = e^{G_i}, e_i = e^{G_C − G_i}, γ_C = γ at row C − 1.
  C = psi.shape[0]
  # Column sums as a column vector through the diagonal (no transpose of a row vector).
  diag = _iota((C, C), 0) == _iota((C, C), 1)
  colsum = _rowsum(jnp.where(diag, jnp.sum(psi, axis=0, keepdims=True), 0.0))
  dG = _rowsum(psi) - colsum
  dG = dG + dgamma * gates.gamma - de * gates.to_end
  dG_last = jnp.sum(de * gates.to_end, axis=0, keepdims=True) + dgamma_last * gates.gamma_last
  dG = dG + jnp.where(gates.is_last, dG_last, 0.0)
  return ChunkGrads(dq, tuple(dk), dv, tuple(dbeta), dG)
