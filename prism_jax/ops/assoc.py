"""PRISM as an associative scan over affine maps S ↦ A_t S + B_t (spec §4.2).

    A_t = α_t (I − β¹_t k¹_t k¹_tᵀ)      [K, K]
    B_t = Σ_l β^l_t k^l_t δ^l_tᵀ          [K, V]
    (A₁, B₁) ∘ (A₂, B₂) = (A₂A₁, A₂B₁ + B₂)

O(T K² V) work and O(log T) depth: a parallel reference, not the fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax.ops.utils import einsum32, segment_starts


def assoc_prism(q, k, v, beta, g, *, initial_state=None, output_final_state=False,
                segment_ids=None, scale=None):
  """Associative-scan form; arguments as `prism_recurrence`."""
  B, T, H, K = q.shape
  scale = K**-0.5 if scale is None else scale
  out_dtype = q.dtype
  q, k, v, beta, g = (x.astype(jnp.float32) for x in (q, k, v, beta, g))
  k1, b1 = k[:, :, :, 0], beta[:, :, :, 0]  # [B, T, H, K], [B, T, H]
  eye = jnp.eye(K, dtype=jnp.float32)
  # A segment start maps any previous state to zero: A_t = 0 there.
  alpha = jnp.where(segment_starts(segment_ids, B, T)[:, :, None], 0.0, jnp.exp(g))
  A = alpha[..., None, None] * (eye - b1[..., None, None] * k1[..., :, None] * k1[..., None, :])
  Bw = einsum32("bthlk,bthlv->bthkv", k, beta[..., None] * v)

  def combine(first, second):
    a1, b1_ = first
    a2, b2 = second
    return (einsum32("...ij,...jk->...ik", a2, a1),
            einsum32("...ij,...jv->...iv", a2, b1_) + b2)

  A_cum, B_cum = jax.lax.associative_scan(combine, (A, Bw), axis=1)
  S = B_cum  # [B, T, H, K, V]
  if initial_state is not None:
    S = S + einsum32("bthij,bhjv->bthiv", A_cum, initial_state.astype(jnp.float32))
  o = scale * einsum32("bthk,bthkv->bthv", q, S)
  final = S[:, -1] if output_final_state else None
  return o.astype(out_dtype), final
