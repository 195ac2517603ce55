"""The chunked form of the PRISM recurrence (spec §4.3): the algorithm the kernels implement.

T is split into chunks of C positions. With local cumulative log-decay G_t, γ_t = exp(G_t),
D_tj = exp(G_t − G_j) for j ≤ t in the same packed sequence (0 otherwise), e_t = exp(G_C − G_t),
W^l = β^l ⊙ δ^l, K₁ the erase keys and Q = scale · q, every chunk computes in parallel

    A    = strict_lower(diag(β¹) (K₁ K₁ᵀ) ⊙ D)
    M^l  = strict_lower(diag(β¹) (K₁ K^lᵀ) ⊙ D)                 l ≥ 2
    U    = (I + A)⁻¹ (W¹ − Σ_{l≥2} M^l W^l)                    C × V
    Wk   = (I + A)⁻¹ diag(β¹ γ) K₁                              C × K

and, given the state S₀ entering the chunk, X = U − Wk S₀ ("new values") and

    O    = diag(γ) Q S₀ + lower((Q K₁ᵀ) ⊙ D) X + Σ_{l≥2} lower((Q K^lᵀ) ⊙ D) W^l
    S_C  = γ_C S₀ + (K₁ ⊙ e)ᵀ X + Σ_{l≥2} (K^l ⊙ e)ᵀ W^l.

Only the pass over chunks (X and S_C from S₀: two C×K by K×V sized products per chunk) is
sequential, or a parallel prefix over the chunks' affine maps on accelerators (below). The
gradient is hand-written (`jax.custom_vjp` on `_chunk_core`): a reverse pass over chunks carries
the state cotangent, everything else is batched over chunks, and the states saved at chunk
boundaries keep memory linear in T. On CPU the sequence goes through all of this one segment of
SEGMENT_TOKENS positions at a time (`_segmented`), which keeps the intermediates small.
Float32 inputs get every product at full float32 precision; bf16/fp16 inputs get the backend's
default float32 matmul (TF32 tensor cores on GPU, bf16 passes on TPU, exact on CPU) for every
product but the inverse (I + A)⁻¹ itself, which is always full float32; state and accumulators
are float32 either way. Padding, the cumulative sum of g and the segment masks stay outside the
custom rule, in plain JAX, and are differentiated by autodiff (inside each segment's backward
on CPU).
Derivation: `prism_jax/ops/README.md`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.ops.utils import chunked_sequence_index, einsum32

HIGHEST, DEFAULT = jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT


def _doubling_inverse(a: jax.Array) -> jax.Array:
  """(I + A)⁻¹ for strictly lower-triangular A [..., c, c] (c a power of two) by block doubling.

  If T_s inverts the s×s diagonal blocks of I + A and E_s holds the entries of A that couple
  the two halves of each 2s×2s diagonal block, then T_2s = T_s − T_s E_s T_s exactly. Every
  intermediate is a block of the true inverse, so nothing grows the way the powers A^{2^m} of
  the Neumann product (I − A)(I + A²)… do when keys repeat.
  """
  c = a.shape[-1]
  idx = np.arange(c)
  inverse = jnp.broadcast_to(jnp.eye(c, dtype=a.dtype), a.shape)
  size = 1
  while size < c:
    block = idx // (2 * size)
    lower_half = (idx // size) % 2 == 1
    couple = ((block[:, None] == block[None, :]) & lower_half[:, None] & ~lower_half[None, :])
    e = jnp.where(couple, a, 0.0)
    inverse = inverse - einsum32("...ij,...jk,...kl->...il", inverse, e, inverse)
    size *= 2
  return inverse


def _unit_lower_inverse(a: jax.Array, block: int = 16) -> jax.Array:
  """(I + A)⁻¹ for strictly lower-triangular A [..., C, C], in full float32.

  The diagonal blocks (block × block) are inverted by `_doubling_inverse`, then block rows are
  merged by forward substitution: X_ij = −X_ii Σ_{j≤m<i} A_im X_mj, about C³/3 multiply-adds.
  """
  C = a.shape[-1]
  if C <= block:
    return _doubling_inverse(a)
  n = C // block
  blocks = jnp.stack([a[..., i * block:(i + 1) * block, i * block:(i + 1) * block]
                      for i in range(n)], axis=-3)
  diag = _doubling_inverse(blocks)  # [..., n, block, block]
  inverse = diag[..., 0, :, :]
  for i in range(1, n):
    rows = slice(i * block, (i + 1) * block)
    off = -einsum32("...ij,...jk->...ik", diag[..., i, :, :],
                    einsum32("...ij,...jk->...ik", a[..., rows, :i * block], inverse))
    top = jnp.concatenate([inverse, jnp.zeros((*inverse.shape[:-1], block), a.dtype)], axis=-1)
    bottom = jnp.concatenate([off, diag[..., i, :, :]], axis=-1)
    inverse = jnp.concatenate([top, bottom], axis=-2)
  return inverse


def _pad_time(x: jax.Array, pad: int) -> jax.Array:
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths)


def _chunk_major(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, H, ...] → [N, B, H, C, ...]."""
  B, T, H = x.shape[:3]
  x = x.reshape(B, T // chunk, chunk, H, *x.shape[3:])
  return jnp.moveaxis(x, (1, 3), (0, 2))


def _strict(x: jax.Array) -> jax.Array:
  """Zero the diagonal of every C×C block of x [..., C, L·C]: A and M^l are strictly lower
  triangular (D is already zero above the diagonal). A constant mask in a select, so XLA fuses
  it into the producer instead of materialising a broadcast factor."""
  C, LC = x.shape[-2:]
  return jnp.where(np.tile(~np.eye(C, dtype=bool), (1, LC // C)), x, 0.0)


def _tile_writes(x: jax.Array, L: int) -> jax.Array:
  """Repeat the last axis L times, matching keys stacked write-major along positions."""
  return jnp.tile(x, (1,) * (x.ndim - 1) + (L,))


# The pass over chunks is a chain of affine maps of the state, S ↦ M_n S + c_n. On CPU it runs
# as a sequential scan (fewest FLOPs). On GPU/TPU a long scan is bound by the latency of its
# tiny per-chunk steps rather than by work, so from PARALLEL_MIN_CHUNKS chunks per sequence on
# the maps are composed by a parallel prefix (`jax.lax.associative_scan`, depth log₂ N) at the
# price of one K×K×K product per composition.
PARALLEL_MIN_CHUNKS = 64


def use_parallel_pass(num_chunks: int) -> bool:
  """The static choice between the sequential and the parallel pass over chunks."""
  return jax.default_backend() != "cpu" and num_chunks >= PARALLEL_MIN_CHUNKS


def _transition(gamma_end, left, right, mm):
  """γ_C I − leftᵀ right [N, B, H, K, K]: a chunk's map of the state (left = K₁ ⊙ e,
  right = Wk) or, transposed, of its cotangent (left = Wk, right = K₁ ⊙ e)."""
  eye = jnp.eye(left.shape[-1], dtype=jnp.float32)
  return gamma_end[..., None, None] * eye - mm("...ck,...cj->...kj", left, right)


def _affine_prefix(m: jax.Array, c: jax.Array, x0: jax.Array, mm=einsum32) -> jax.Array:
  """x_{n+1} = m_n x_n + c_n for n = 0..N−1 in parallel: returns [x_1, …, x_N].

  m [N, ..., K, K], c [N, ..., K, V], x0 [..., K, V]; `mm` is the einsum of the products.
  """
  def compose(first, then):
    (m1, c1), (m2, c2) = first, then
    return (mm("...ij,...jk->...ik", m2, m1),
            mm("...ij,...jv->...iv", m2, c1) + c2)

  m_all, c_all = jax.lax.associative_scan(compose, (m, c))
  return mm("...ij,...jv->...iv", m_all, x0) + c_all


def _state_pass(h0, uw, k1e, e_rest, gamma_end, parallel=False, mm=einsum32):
  """S_{n+1} = γ_C S_n + (K₁ ⊙ e)ᵀ X_n + E_n with X_n = U_n − Wk_n S_n, over chunks n.

  h0 [B, H, K, V]; uw = [U | Wk] [N, B, H, C, V + K]; k1e [N, B, H, C, K]; e_rest
  [N, B, H, K, V] (the l ≥ 2 writes, or None when L = 1); gamma_end [N, B, H].
  Returns (states entering each chunk [N, B, H, K, V], X [N, B, H, C, V], final state).
  With `parallel`, S_{n+1} = (γ_C I − (K₁ ⊙ e)ᵀ Wk) S_n + ((K₁ ⊙ e)ᵀ U + E) by a prefix scan.
  """
  V = h0.shape[-1]
  if parallel:
    u, wk = uw[..., :V], uw[..., V:]
    m = _transition(gamma_end, k1e, wk, mm)
    c = mm("...ck,...cv->...kv", k1e, u) + (0.0 if e_rest is None else e_rest)
    after = _affine_prefix(m, c, h0, mm)  # states leaving each chunk
    states = jnp.concatenate([h0[None], after[:-1]], axis=0)
    return states, u - mm("...ck,...kv->...cv", wk, states), after[-1]

  def step(state, xs):
    uw_n, k1e_n, g_n = xs[:3]
    x = uw_n[..., :V] - mm("...ck,...kv->...cv", uw_n[..., V:], state)  # [B, H, C, V]
    new = g_n[..., None, None] * state + mm("...ck,...cv->...kv", k1e_n, x)
    if e_rest is not None:
      new = new + xs[3]
    return new, (state, x)

  xs = (uw, k1e, gamma_end) + (() if e_rest is None else (e_rest,))
  final, (states, x) = jax.lax.scan(step, h0, xs)
  return states, x, final


def _state_cotangent_pass(d_final, pdo1, k1e, uw, gamma_end, gqdo, parallel=False,
                          mm=einsum32):
  """The reverse of `_state_pass`: with dS the cotangent of the state leaving chunk n,

      dX_n = P₁ᵀ dO_n + (K₁ ⊙ e) dS,   dS_n = γ_C dS + (γ ⊙ Q)ᵀ dO_n − Wkᵀ dX_n.

  pdo1 = P₁ᵀ dO [N, B, H, C, V] and gqdo = (γ ⊙ Q)ᵀ dO [N, B, H, K, V] do not depend on the
  state and come in precomputed; uw = [U | Wk]. Returns (dS leaving each chunk [N, B, H, K, V],
  dX (total) [N, B, H, C, V], cotangent of the initial state [B, H, K, V]).
  With `parallel`, dS_n = Mᵀ dS + (γ ⊙ Q)ᵀ dO_n − Wkᵀ P₁ᵀ dO_n (M of `_state_pass`), composed
  from the last chunk back by a prefix scan.
  """
  V = d_final.shape[-1]
  if parallel:
    wk = uw[..., V:]
    m_t = _transition(gamma_end, wk, k1e, mm)
    c = gqdo - mm("...ck,...cv->...kv", wk, pdo1)
    entering = _affine_prefix(m_t[::-1], c[::-1], d_final, mm)[::-1]  # dS entering each chunk
    d_out = jnp.concatenate([entering[1:], d_final[None]], axis=0)
    return d_out, pdo1 + mm("...ck,...kv->...cv", k1e, d_out), entering[0]

  def step(d_state, xs):
    pdo_n, k1e_n, uw_n, g_n, gqdo_n = xs
    wk_n = uw_n[..., V:]
    dx = pdo_n + mm("...ck,...kv->...cv", k1e_n, d_state)  # [B, H, C, V]
    d_in = (g_n[..., None, None] * d_state + gqdo_n
            - mm("...ck,...cv->...kv", wk_n, dx))
    return d_in, (d_state, dx)

  d_h0, (d_out, dx) = jax.lax.scan(step, d_final, (pdo1, k1e, uw, gamma_end, gqdo),
                                     reverse=True)
  return d_out, dx, d_h0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_core(opts, q, keys, w, b1, decay, gamma, to_end, gamma_end, h0):
  """The chunk algebra on chunk-major float32 arrays (module docstring), hand-differentiated.

  q [N, B, H, C, K] scaled; keys [N, B, H, L·C, K] and w [N, B, H, L·C, V] stacked write-major
  (row l·C + i is write l of position i); b1 = β¹ [N, B, H, C]; decay = D [N, B, H, C, C]
  (zero outside the causal same-sequence mask); gamma, to_end = γ, e [N, B, H, C];
  gamma_end = γ_C [N, B, H]; h0 [B, H, K, V]. opts = (parallel, precision), static: the pass
  over chunks and the precision of every product but the inverse (`_unit_lower_inverse`).
  Returns (O [N, B, H, C, V], final state [B, H, K, V]).
  """
  return _core_fwd(opts, q, keys, w, b1, decay, gamma, to_end, gamma_end, h0)[0]


class CoreResiduals(NamedTuple):
  """What `_core_fwd` keeps for `_core_bwd` (chunk-major arrays)."""
  q: jax.Array
  keys: jax.Array
  w: jax.Array
  b1: jax.Array
  decay: jax.Array
  gamma: jax.Array
  to_end: jax.Array
  gamma_end: jax.Array
  qk_kk: jax.Array  # [Q Kᵀ ; K₁ Kᵀ]
  inv: jax.Array  # (I + A)⁻¹
  uw: jax.Array  # [U | Wk]
  states: jax.Array  # the state entering every chunk
  x: jax.Array


def _core_fwd(opts, q, keys, w, b1, decay, gamma, to_end, gamma_end, h0, states=None):
  """Forward of `_chunk_core` and its residuals. With `states` (the state entering every chunk,
  saved by an earlier forward) the pass over chunks is skipped: X comes from one batched product
  and the final state is not computed (None)."""
  parallel, precision = opts
  mm = functools.partial(einsum32, precision=precision)
  C, V = q.shape[-2], w.shape[-1]
  L = keys.shape[-2] // C
  k1 = keys[..., :C, :]  # K₁: [N, B, H, C, K]
  decay_all = _tile_writes(decay, L)  # D for every write: [N, B, H, C, L·C]
  # Q and K₁ against all keys in one product: [Q Kᵀ ; K₁ Kᵀ], [N, B, H, 2C, L·C].
  qk_kk = mm("...ik,...jk->...ij", jnp.concatenate([q, k1], axis=-2), keys)
  kk = qk_kk[..., C:, :]
  inv = _unit_lower_inverse(_strict(b1[..., None] * kk[..., :C] * decay))  # (I + A)⁻¹
  rhs = w[..., :C, :]
  if L > 1:
    m = _strict(b1[..., None] * kk[..., C:] * decay_all[..., C:])  # [M² | … | M^L]
    rhs = rhs - mm("...ij,...jv->...iv", m, w[..., C:, :])
  bk = (b1 * gamma)[..., None] * k1  # diag(β¹γ) K₁
  uw = mm("...ij,...jd->...id", inv, jnp.concatenate([rhs, bk], axis=-1))  # [U | Wk]
  ke = keys * _tile_writes(to_end, L)[..., None]  # K^l ⊙ e: [N, B, H, L·C, K]
  e_rest = (mm("...ck,...cv->...kv", ke[..., C:, :], w[..., C:, :]) if L > 1 else None)
  if states is None:
    states, x, final = _state_pass(h0, uw, ke[..., :C, :], e_rest, gamma_end, parallel, mm)
  else:
    x, final = uw[..., :V] - mm("...ck,...kv->...cv", uw[..., V:], states), None
  y = jnp.concatenate([x, w[..., C:, :]], axis=-2)  # Y: [X ; W² ; … ; W^L], [N, B, H, L·C, V]
  p = qk_kk[..., :C, :] * decay_all  # lower((Q K^lᵀ) ⊙ D): [N, B, H, C, L·C]
  # O = [γ ⊙ Q | P] [S₀ ; Y] as one product.
  o = mm("...ij,...jv->...iv", jnp.concatenate([gamma[..., None] * q, p], axis=-1),
               jnp.concatenate([states, y], axis=-2))
  return (o, final), CoreResiduals(q, keys, w, b1, decay, gamma, to_end, gamma_end, qk_kk, inv,
                                    uw, states, x)


def _core_bwd(opts, res, cotangents):
  parallel, precision = opts
  mm = functools.partial(einsum32, precision=precision)
  q, keys, w, b1, decay, gamma, to_end, gamma_end, qk_kk, inv, uw, states, x = res
  do, d_final = cotangents
  C, K, V = q.shape[-2], q.shape[-1], w.shape[-1]
  L = keys.shape[-2] // C
  k1 = keys[..., :C, :]
  decay_all = _tile_writes(decay, L)
  qk, kk = qk_kk[..., :C, :], qk_kk[..., C:, :]
  p = qk * decay_all
  gq = gamma[..., None] * q  # [N, B, H, C, K]
  ke = keys * _tile_writes(to_end, L)[..., None]
  y = jnp.concatenate([x, w[..., C:, :]], axis=-2)

  # O = [γ ⊙ Q | P] [S₀ ; Y]: dO [S₀ ; Y]ᵀ and [γ ⊙ Q | P]ᵀ dO, one product each.
  do_sy = mm("...iv,...jv->...ij", do, jnp.concatenate([states, y], axis=-2))
  dgq, dp = do_sy[..., :K], do_sy[..., K:]  # [N, B, H, C, K], [N, B, H, C, L·C]
  gqp_do = mm("...ij,...iv->...jv", jnp.concatenate([gq, p], axis=-1), do)
  gq_do, p_do = gqp_do[..., :K, :], gqp_do[..., K:, :]  # [.., K, V], [.., L·C, V]

  d_out, dx, d_h0 = _state_cotangent_pass(d_final, p_do[..., :C, :], ke[..., :C, :], uw,
                                          gamma_end, gq_do, parallel, mm)
  # S_C = γ_C S₀ + Σ_l (K^l ⊙ e)ᵀ Y^l.
  d_ke = mm("...cv,...kv->...ck", y, d_out)  # d(K ⊙ e): [N, B, H, L·C, K]
  d_gamma_end = jnp.sum(states * d_out, axis=(-2, -1))  # [N, B, H]

  # X = U − Wk S₀, [U | Wk] = (I + A)⁻¹ [R | Bk]: d[R | Bk] = (I + A)⁻ᵀ [dX | −dX S₀ᵀ],
  # dA = −strict(d[R | Bk] [U | Wk]ᵀ).
  d_wk = -mm("...cv,...kv->...ck", dx, states)
  d_rb = mm("...ji,...jd->...id", inv, jnp.concatenate([dx, d_wk], axis=-1))
  d_rhs, d_bk = d_rb[..., :V], d_rb[..., V:]
  d_a = -mm("...id,...jd->...ij", d_rb, uw)  # [N, B, H, C, C]
  dw = d_rhs
  if L > 1:
    # R = W¹ − Σ_{l≥2} M^l W^l; W^l (l ≥ 2) also enters Y and the state.
    d_m = -mm("...iv,...jv->...ij", d_rhs, w[..., C:, :])
    d_a = jnp.concatenate([d_a, d_m], axis=-1)  # [N, B, H, C, L·C]
    a_rest = _strict(b1[..., None] * kk[..., C:] * decay_all[..., C:])
    dw_rest = (p_do[..., C:, :] + mm("...ck,...kv->...cv", ke[..., C:, :], d_out)
               - mm("...ij,...iv->...jv", a_rest, d_rhs))
    dw = jnp.concatenate([dw, dw_rest], axis=-2)

  # [A | M] = strict(β¹ ⊙ (K₁ Kᵀ) ⊙ D) and P = (Q Kᵀ) ⊙ D.
  d_kk = _strict(d_a * b1[..., None] * decay_all)  # [N, B, H, C, L·C]
  d_qk = dp * decay_all
  d_decay_all = dp * qk + _strict(d_a * b1[..., None] * kk)
  d_qkk = jnp.concatenate([d_qk, d_kk], axis=-2)  # [N, B, H, 2C, L·C]
  dq_dk1 = mm("...ij,...jk->...ik", d_qkk, keys)  # [N, B, H, 2C, K]
  d_keys = (mm("...ij,...ik->...jk", d_qkk, jnp.concatenate([q, k1], axis=-2))
            + _tile_writes(to_end, L)[..., None] * d_ke)
  # Bk = diag(β¹γ) K₁.
  s_bk = jnp.sum(d_bk * k1, axis=-1)  # [N, B, H, C]
  d_k1 = dq_dk1[..., C:, :] + (b1 * gamma)[..., None] * d_bk
  d_keys = d_keys.at[..., :C, :].add(d_k1)
  dq = gamma[..., None] * dgq + dq_dk1[..., :C, :]
  db1 = jnp.sum(_strict(d_a * kk * decay_all), axis=-1) + gamma * s_bk
  d_gamma = jnp.sum(q * dgq, axis=-1) + b1 * s_bk
  d_to_end = jnp.sum(jnp.sum(keys * d_ke, axis=-1).reshape(*keys.shape[:3], L, C), axis=-2)
  d_decay = jnp.sum(d_decay_all.reshape(*d_decay_all.shape[:-1], L, C), axis=-2)
  return dq, d_keys, dw, db1, d_decay, d_gamma, d_to_end, d_gamma_end, d_h0


_chunk_core.defvjp(_core_fwd, _core_bwd)


# On CPU the cost of the chunked form is mostly memory: every buffer XLA:CPU allocates per call
# is fresh and faults its pages in, so whole-sequence intermediates cost more than their
# products. There the sequence is processed in segments of SEGMENT_TOKENS positions, one after
# the other, so a segment's intermediates reuse the same memory; the forward keeps only the
# state entering every chunk, from which the backward recomputes the rest of a segment.
SEGMENT_TOKENS = 512


def _prepare(q, k, v, beta, g, seq, seq_before, scale, C):
  """Chunk-major float32 inputs of `_chunk_core` from (padded) [B, T, H, ...] arrays.

  seq [B, 1, N, C] / seq_before [B, 1, N]: packed-sequence index (`chunked_sequence_index`).
  Returns (q, keys, w, b1, decay, gamma, to_end, gamma_end), shapes as in `_chunk_core`.
  """
  B, T, H, _ = q.shape
  L = v.shape[-2]
  N = T // C
  seq, seq_before = jnp.moveaxis(seq, 2, 0), jnp.moveaxis(seq_before, 2, 0)  # [N, B, 1, ...]
  f32 = lambda x: x.astype(jnp.float32)
  q = _chunk_major(f32(q), C) * scale  # [N, B, H, C, K]
  g = _chunk_major(f32(g), C)  # [N, B, H, C]
  # The L write keys/values of a chunk are stacked along the position axis, write-major
  # (row l·C + i is write l of position i), so each product with all keys is one matmul.
  stack = lambda x: jnp.moveaxis(_chunk_major(f32(x), C), 4, 3).reshape(N, B, H, L * C, -1)
  keys = stack(k)  # [N, B, H, L·C, K]
  # W^l = β^l δ^l in float32 (a bf16 product would also sum dβ over V in bf16).
  w = stack(f32(beta)[..., None] * f32(v))  # [N, B, H, L·C, V]
  b1 = _chunk_major(f32(beta[..., 0]), C)  # [N, B, H, C]

  G = jnp.cumsum(g, axis=-1)  # [N, B, H, C]
  same_seq = seq[..., :, None] == seq[..., None, :]  # [N, B, 1, C, C]
  causal = jnp.tril(jnp.ones((C, C), dtype=bool))
  # Mask the exponent before exp so no gradient ever meets exp(+large) · 0.
  diff = G[..., :, None] - G[..., None, :]
  decay = jnp.exp(jnp.where(causal & same_seq, diff, -jnp.inf))  # D: [N, B, H, C, C]
  gamma = jnp.exp(jnp.where(seq == seq_before[..., None], G, -jnp.inf))  # [N, B, H, C]
  to_end = jnp.exp(jnp.where(seq == seq[..., -1:], G[..., -1:] - G, -jnp.inf))  # [N, B, H, C]
  return q, keys, w, b1, decay, gamma, to_end, gamma[..., -1]


def _time_major(o):
  """[N, B, H, C, V] → [B, N·C, H, V]."""
  N, B, H, C, V = o.shape
  return jnp.moveaxis(o, (0, 3), (1, 2)).reshape(B, N * C, H, V)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _segmented(static, q, k, v, beta, g, scale, seq, seq_before, h0):
  """The chunked form one segment of positions at a time (see SEGMENT_TOKENS).

  static = (chunk, segment, precision); arrays as `_prepare` takes them, T a multiple of the
  segment; scale a float32 scalar array (it may be traced, and gets its cotangent).
  Returns (O [B, T, H, V] float32, final state [B, H, K, V]).
  """
  return _segmented_fwd(static, q, k, v, beta, g, scale, seq, seq_before, h0)[0]


def _segment(static, i, raws, seq, seq_before):
  """Segment i: the [B, S, ...] slices of the raw inputs and the function that `_prepare`s
  such slices and the scale (the segment's sequence indices closed over)."""
  C, S, _ = static
  take = lambda x, axis, n: jax.lax.dynamic_slice_in_dim(x, i * n, n, axis=axis)
  seq_i, before_i = take(seq, 2, S // C), take(seq_before, 2, S // C)
  prepare = lambda q, k, v, beta, g, scale: _prepare(q, k, v, beta, g, seq_i, before_i, scale, C)
  return tuple(take(x, 1, S) for x in raws), prepare


def _segmented_fwd(static, q, k, v, beta, g, scale, seq, seq_before, h0):
  C, S, precision = static
  B, T, H, _ = q.shape
  count = T // S
  opts = (False, precision)

  def body(i, carry):
    o, starts, state = carry
    raw, prepare = _segment(static, i, (q, k, v, beta, g), seq, seq_before)
    (o_i, new_state), res = _core_fwd(opts, *prepare(*raw, scale), state)
    o = jax.lax.dynamic_update_slice_in_dim(o, _time_major(o_i), i * S, axis=1)
    starts = jax.lax.dynamic_update_slice_in_dim(starts, res.states, i * (S // C), axis=0)
    return o, starts, new_state

  o = jnp.zeros((B, T, H, v.shape[-1]), jnp.float32)
  starts = jnp.zeros((T // C, *h0.shape), jnp.float32)  # the state entering every chunk
  o, starts, final = jax.lax.fori_loop(0, count, body, (o, starts, h0))
  return (o, final), (q, k, v, beta, g, scale, seq, seq_before, starts)


def _segmented_bwd(static, res, cotangents):
  C, S, precision = static
  q, k, v, beta, g, scale, seq, seq_before, starts = res
  do, d_final = cotangents
  count = q.shape[1] // S
  opts = (False, precision)
  raws = (q, k, v, beta, g)

  def body(j, carry):
    grads, d_scale, d_state = carry
    i = count - 1 - j
    raw, prepare = _segment(static, i, raws, seq, seq_before)
    core, prepare_vjp = jax.vjp(prepare, *raw, scale)
    states = jax.lax.dynamic_slice_in_dim(starts, i * (S // C), S // C, axis=0)
    _, res_i = _core_fwd(opts, *core, None, states=states)
    do_i = _chunk_major(jax.lax.dynamic_slice_in_dim(do, i * S, S, axis=1), C)
    *d_core, d_state = _core_bwd(opts, res_i, (do_i, d_state))
    *d_raw, d_scale_i = prepare_vjp(tuple(d_core))
    grads = tuple(jax.lax.dynamic_update_slice_in_dim(acc, d, i * S, axis=1)
                  for acc, d in zip(grads, d_raw))
    return grads, d_scale + d_scale_i, d_state

  grads = tuple(jnp.zeros_like(x) for x in raws)
  grads, d_scale, d_h0 = jax.lax.fori_loop(0, count, body,
                                           (grads, jnp.zeros_like(scale), d_final))
  return (*grads, d_scale, jnp.zeros_like(seq), jnp.zeros_like(seq_before), d_h0)


_segmented.defvjp(_segmented_fwd, _segmented_bwd)


def chunk_prism(q, k, v, beta, g, *, initial_state=None, output_final_state=False,
                segment_ids=None, scale=None, chunk_size=64, state_pass="auto",
                segment_tokens=None):
  """Chunked form; arguments as `prism_recurrence`. Any T: the tail is padded internally
  (g = 0, β = 0, δ = 0 on padding, which leaves the state unchanged). `state_pass`: "scan"
  (sequential over chunks), "parallel" (prefix scan) or "auto" (`use_parallel_pass`).
  `segment_tokens`: with the sequential pass, the positions processed at a time (a multiple of
  chunk_size; default SEGMENT_TOKENS on CPU, the whole sequence elsewhere)."""
  if state_pass not in ("auto", "scan", "parallel"):
    raise ValueError(f"state_pass must be 'auto', 'scan' or 'parallel', got {state_pass!r}")
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  if segment_tokens is not None and (segment_tokens <= 0 or segment_tokens % C):
    raise ValueError(f"segment_tokens must be a positive multiple of chunk_size {C}, got "
                     f"{segment_tokens}")
  scale = K**-0.5 if scale is None else scale
  out_dtype = q.dtype
  Tc = T + (-T) % C  # padded to whole chunks
  parallel = use_parallel_pass(Tc // C) if state_pass == "auto" else state_pass == "parallel"
  if segment_tokens is None:
    segment_tokens = SEGMENT_TOKENS if jax.default_backend() == "cpu" else Tc
  segment = Tc if parallel else min(segment_tokens, Tc)
  pad = (-T) % segment
  Tp = T + pad

  if segment_ids is not None and pad:  # padding continues the last sequence
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), mode="edge")
  # float32 so the sequence indices travel through the custom rule as ordinary arrays.
  seq, seq_before = (x.astype(jnp.float32)
                     for x in chunked_sequence_index(segment_ids, B, Tp, C))  # [B, 1, N, …]
  raw = tuple(_pad_time(x, pad) for x in (q, k, v, beta, g))
  state0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))
  precision = HIGHEST if out_dtype == jnp.float32 else DEFAULT
  if segment < Tp:
    o, final = _segmented((C, segment, precision), *raw, jnp.asarray(scale, jnp.float32), seq,
                          seq_before, state0)
  else:
    core = _prepare(*raw, seq, seq_before, scale, C)
    o, final = _chunk_core((parallel, precision), *core, state0)
    o = _time_major(o)
  return o[:, :T].astype(out_dtype), (final if output_final_state else None)
