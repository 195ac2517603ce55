"""One step of the PRISM recurrence (decoding).

    S_t = α_t (I − β¹_t k¹_t k¹_tᵀ) S_{t−1} + Σ_l k^l_t (β^l_t δ^l_t)ᵀ,   α_t = exp(g_t)
    o_t = scale · S_tᵀ q_t
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax.ops.utils import einsum32


def step_f32(q, k, v, beta, g, state, scale):
  """The update on float32 arrays without validation; shapes as in `prism_step`."""
  k1 = k[:, :, 0]  # [B, H, K]: the erase key
  b1 = beta[:, :, 0]  # [B, H]
  k1_state = einsum32("bhk,bhkv->bhv", k1, state)  # k¹ᵀ S_{t−1}
  erased = state - (b1[..., None] * k1)[..., :, None] * k1_state[..., None, :]
  writes = einsum32("bhlk,bhlv->bhkv", k, beta[..., None] * v)
  new_state = jnp.exp(g)[..., None, None] * erased + writes
  o = scale * einsum32("bhk,bhkv->bhv", q, new_state)
  return o, new_state


def prism_step(q, k, v, beta, g, state, *, scale: float | None = None):
  """Advance the recurrence by one token.

  Args:
    q: [B, H, K] query.
    k: [B, H, L, K] write keys; k[:, :, 0] is also the erase key.
    v: [B, H, L, V] write values δ.
    beta: [B, H, L] write gates in [0, 1]; beta[..., 0] is also the erase strength.
    g: [B, H] log-decay ≤ 0.
    state: [B, H, K, V] previous state.
    scale: query scale, default K**-0.5.

  Returns:
    (o [B, H, V] in q's dtype, new_state [B, H, K, V] float32).
  """
  from prism_jax.ops.api import check_step_inputs  # local: api imports this module

  check_step_inputs(q, k, v, beta, g, state)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  f32 = lambda x: x.astype(jnp.float32)
  o, new_state = step_f32(f32(q), f32(k), f32(v), f32(beta), f32(g), f32(state), scale)
  return o.astype(q.dtype), new_state
