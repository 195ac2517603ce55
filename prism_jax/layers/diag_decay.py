"""Linear attention with a diagonal (per key dimension) decay, the recurrence of GLA-type
baselines (spec §6):

    S_t = diag(exp(g_t)) S_{t−1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

with g_t ≤ 0 per key dimension (g = 0 is plain linear attention). Shapes: q, k, g [B, T, H, K],
v [B, T, H, V], state [B, H, K, V] float32. Three forms that agree: `naive_diag_decay`
(lax.scan, the reference), `chunk_diag_decay` (chunked, the sequence form) and
`diag_decay_step` (one decode token). Packed sequences (segment_ids [B, T]) restart from zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax.ops.utils import chunked_sequence_index, einsum32, segment_starts


def diag_decay_step(q, k, v, g, state, scale):
  """One token: q, k, g [B, H, K], v [B, H, V], state [B, H, K, V] → (o [B, H, V], state)."""
  f32 = lambda a: a.astype(jnp.float32)
  state = jnp.exp(f32(g))[..., None] * state + f32(k)[..., :, None] * f32(v)[..., None, :]
  return scale * einsum32("bhk,bhkv->bhv", f32(q), state), state


def _initial(initial_state, B, H, K, V):
  return (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))


def naive_diag_decay(q, k, v, g, *, initial_state=None, segment_ids=None, scale=None):
  """Sequential reference; returns (o [B, T, H, V] in q's dtype, final state)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = K**-0.5 if scale is None else scale
  starts = segment_starts(segment_ids, B, T)

  def body(state, xs):
    q_t, k_t, v_t, g_t, start_t = xs
    state = jnp.where(start_t[:, None, None, None], 0.0, state)
    o_t, state = diag_decay_step(q_t, k_t, v_t, g_t, state, scale)
    return state, o_t

  tm = lambda a: jnp.moveaxis(a, 1, 0)
  final, o = jax.lax.scan(body, _initial(initial_state, B, H, K, V),
                          (tm(q), tm(k), tm(v), tm(g), tm(starts)))
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), final


def chunk_diag_decay(q, k, v, g, *, initial_state=None, segment_ids=None, scale=None,
                     chunk_size=16):
  """Chunked form. Inside a chunk with cumulative log-decay G_t = Σ_{i≤t} g_i (per key dim)
  and incoming state S₀:

      O_t = (q_t ⊙ e^{G_t})ᵀ S₀ + Σ_{j≤t} (Σ_κ q_tκ k_jκ e^{G_tκ − G_jκ}) v_j
      S_C = diag(e^{G_C}) S₀ + Σ_j (k_j ⊙ e^{G_C − G_j}) v_jᵀ

  Every exponent is ≤ 0 after masking (masked before exp), so nothing overflows. The pairwise
  decay tensor is [C, C, K] per chunk, hence the small default chunk.
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  scale = K**-0.5 if scale is None else scale
  out_dtype = q.dtype
  pad = (-T) % C
  N = (T + pad) // C
  seq, seq_before = chunked_sequence_index(segment_ids, B, T, C)  # [B, 1, N, C], [B, 1, N]

  def chunks(a):  # [B, T, H, X] → [B, H, N, C, X], zero padded (g = 0 keeps the state)
    a = jnp.pad(a.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return jnp.moveaxis(a.reshape(B, N, C, H, a.shape[-1]), 3, 1)

  q, k, v, g = chunks(q) * scale, chunks(k), chunks(v), chunks(g)
  G = jnp.cumsum(g, axis=3)  # [B, H, N, C, K]
  causal = jnp.tril(jnp.ones((C, C), dtype=bool))
  visible = causal & (seq[..., :, None] == seq[..., None, :])  # [B, 1, N, C, C]
  diff = G[..., :, None, :] - G[..., None, :, :]  # [B, H, N, C, C, K]
  decay = jnp.exp(jnp.where(visible[..., None], diff, -jnp.inf))
  scores = jnp.einsum("bhntk,bhnjk,bhntjk->bhntj", q, k, decay,
                      precision=jax.lax.Precision.HIGHEST)
  same_as_start = (seq == seq_before[..., None])[..., None]  # [B, 1, N, C, 1]
  gamma = jnp.exp(jnp.where(same_as_start, G, -jnp.inf))  # decay from the chunk start
  same_as_end = (seq == seq[..., -1:])[..., None]
  to_end = jnp.exp(jnp.where(same_as_end, G[..., -1:, :] - G, -jnp.inf))  # [B, H, N, C, K]
  F = gamma[..., -1, :]  # [B, H, N, K]: zero rows when a new sequence began inside the chunk
  E = einsum32("bhnck,bhncv->bhnkv", k * to_end, v)  # [B, H, N, K, V]

  def chunk_pass(state, fe):
    F_n, E_n = fe
    return F_n[..., None] * state + E_n, state

  final, states = jax.lax.scan(chunk_pass, _initial(initial_state, B, H, K, V),
                               (jnp.moveaxis(F, 2, 0), jnp.moveaxis(E, 2, 0)))
  states = jnp.moveaxis(states, 0, 2)  # state entering each chunk: [B, H, N, K, V]
  o = (einsum32("bhnck,bhnkv->bhncv", q * gamma, states)
       + einsum32("bhntj,bhnjv->bhntv", scores, v))
  o = jnp.moveaxis(o.reshape(B, H, N * C, V), 1, 2)[:, :T]  # [B, T, H, V]
  return o.astype(out_dtype), final
