"""The chunked form of the PRISM recurrence (spec §4.3): the algorithm the kernels implement.

T is split into chunks of C positions. With local cumulative log-decay G_t, γ_t = exp(G_t),
D_tj = exp(G_t − G_j) for j ≤ t in the same packed sequence (0 otherwise), W^l = β^l ⊙ δ^l,
K₁ the erase keys and Q = scale · q, every chunk computes in parallel

    A    = strict_lower(diag(β¹) (K₁ K₁ᵀ) ⊙ D)
    M^l  = strict_lower(diag(β¹) (K₁ K^lᵀ) ⊙ D)                 l ≥ 2
    U    = (I + A)⁻¹ (W¹ − Σ_{l≥2} M^l W^l)                    C × V
    Wk   = (I + A)⁻¹ diag(β¹ γ) K₁                              C × K

and, given the state S₀ entering the chunk, X = U − Wk S₀ ("new values") and

    O    = diag(γ) Q S₀ + lower((Q K₁ᵀ) ⊙ D) X + Σ_{l≥2} lower((Q K^lᵀ) ⊙ D) W^l
    S_C  = γ_C S₀ + (K₁ ⊙ e^{G_C − G})ᵀ X + Σ_{l≥2} (K^l ⊙ e^{G_C − G})ᵀ W^l.

S_C is affine in S₀: S_C = F S₀ + E with F = γ_C I − (K₁ ⊙ e^{G_C−G})ᵀ Wk  [K, K] and
E = (K₁ ⊙ e^{G_C−G})ᵀ U + Σ_{l≥2} (K^l ⊙ e^{G_C−G})ᵀ W^l  [K, V], both per chunk. So the only
sequential work is the pass S_{n+1} = F_n S_n + E_n over chunks (one K×K by K×V product per
chunk); everything else is batched over chunks. Derivation: `prism_jax/ops/README.md`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.ops.utils import chunked_sequence_index, einsum32


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
  """[B, T, H, ...] → [B, H, N, C, ...]."""
  B, T, H = x.shape[:3]
  x = x.reshape(B, T // chunk, chunk, H, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def chunk_prism(q, k, v, beta, g, *, initial_state=None, output_final_state=False,
                segment_ids=None, scale=None, chunk_size=64):
  """Chunked form; arguments as `prism_recurrence`. Any T: the tail is padded internally
  (g = 0, β = 0, δ = 0 on padding, which leaves the state unchanged)."""
  B, T, H, K = q.shape
  L, V = v.shape[-2], v.shape[-1]
  C = chunk_size
  scale = K**-0.5 if scale is None else scale
  out_dtype = q.dtype
  pad = (-T) % C
  N = (T + pad) // C

  seq, seq_before = chunked_sequence_index(segment_ids, B, T, C)  # [B, 1, N, C], [B, 1, N]

  f32 = lambda x: _pad_time(x.astype(jnp.float32), pad)
  q = _chunk_major(f32(q), C) * scale  # [B, H, N, C, K]
  g = _chunk_major(f32(g), C)  # [B, H, N, C]
  # The L write keys/values of a chunk are stacked along the position axis, write-major
  # (row l·C + i is write l of position i), so each product with all keys is one matmul.
  stack = lambda x: jnp.moveaxis(_chunk_major(f32(x), C), 4, 3).reshape(B, H, N, L * C, -1)
  keys = stack(k)  # [B, H, N, L·C, K]
  w = stack(beta[..., None] * v)  # W^l = β^l δ^l: [B, H, N, L·C, V]
  b1 = _chunk_major(f32(beta[..., 0]), C)  # [B, H, N, C]
  k1 = keys[..., :C, :]  # K₁: [B, H, N, C, K]

  G = jnp.cumsum(g, axis=-1)  # [B, H, N, C]
  same_seq = seq[..., :, None] == seq[..., None, :]  # [B, 1, N, C, C]
  causal = jnp.tril(jnp.ones((C, C), dtype=bool))
  # Mask the exponent before exp so no gradient ever meets exp(+large) · 0.
  diff = G[..., :, None] - G[..., None, :]
  decay = jnp.exp(jnp.where(causal & same_seq, diff, -jnp.inf))  # D: [B, H, N, C, C]
  gamma = jnp.exp(jnp.where(seq == seq_before[..., None], G, -jnp.inf))  # [B, H, N, C]
  to_end = jnp.exp(jnp.where(seq == seq[..., -1:], G[..., -1:] - G, -jnp.inf))  # [B, H, N, C]
  gamma_end = gamma[..., -1]  # [B, H, N]
  decay_all = jnp.tile(decay, (1, 1, 1, 1, L))  # D repeated for every write: [B, H, N, C, L·C]
  strict_all = jnp.tile(jnp.tril(jnp.ones((C, C), dtype=bool), -1), (1, L))  # [C, L·C]

  # Intra-chunk work, all chunks at once.
  a_all = jnp.where(strict_all, b1[..., None] * einsum32("bhnik,bhnjk->bhnij", k1, keys)
                    * decay_all, 0.0)  # [A | M² | … | M^L]: [B, H, N, C, L·C]
  inv = _unit_lower_inverse(a_all[..., :C])  # (I + A)⁻¹: [B, H, N, C, C]
  rhs = w[..., :C, :] - einsum32("bhnij,bhnjv->bhniv", a_all[..., C:], w[..., C:, :])
  u = einsum32("bhnij,bhnjv->bhniv", inv, rhs)  # [B, H, N, C, V]
  wk = einsum32("bhnij,bhnjk->bhnik", inv, (b1 * gamma)[..., None] * k1)  # [B, H, N, C, K]
  attn = einsum32("bhnik,bhnjk->bhnij", q, keys) * decay_all  # lower((Q K^lᵀ) ⊙ D): [.., C, L·C]

  k_end = keys * jnp.tile(to_end, (1, 1, 1, L))[..., None]  # K^l ⊙ e^{G_C − G}
  eye = jnp.eye(K, dtype=jnp.float32)
  F = gamma_end[..., None, None] * eye - einsum32("bhnck,bhncj->bhnkj", k_end[..., :C, :], wk)
  E = (einsum32("bhnck,bhncv->bhnkv", k_end[..., :C, :], u)
       + einsum32("bhnck,bhncv->bhnkv", k_end[..., C:, :], w[..., C:, :]))

  state0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))

  def chunk_pass(state, fe):
    F_n, E_n = fe
    return einsum32("bhkj,bhjv->bhkv", F_n, state) + E_n, state

  final, states = jax.lax.scan(chunk_pass, state0,
                               (jnp.moveaxis(F, 2, 0), jnp.moveaxis(E, 2, 0)))
  states = jnp.moveaxis(states, 0, 2)  # state entering each chunk: [B, H, N, K, V]

  x = u - einsum32("bhnck,bhnkv->bhncv", wk, states)  # new values X
  o = (einsum32("bhnck,bhnkv->bhncv", gamma[..., None] * q, states)
       + einsum32("bhnij,bhnjv->bhniv", attn[..., :C], x)
       + einsum32("bhnij,bhnjv->bhniv", attn[..., C:], w[..., C:, :]))
  o = jnp.moveaxis(o.reshape(B, H, N * C, V), 1, 2)[:, :T]  # [B, T, H, V]
  return o.astype(out_dtype), (final if output_final_state else None)
