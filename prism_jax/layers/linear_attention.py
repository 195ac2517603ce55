"""Linear-attention baselines of spec §6 on the shared mixer front and back ends:

    LinearAttention        S_t = S_{t−1} + k_t v_tᵀ
    GatedLinearAttention   S_t = diag(α_t) S_{t−1} + k_t v_tᵀ     (GLA: decay per key dimension)
    MixtureOfMemories      M such GLA memories; each token writes to (and reads from) its top-k

all with o_t = K^{−1/2} S_tᵀ q_t and l2-normalised q, k (which keeps S bounded without a
denominator). The recurrence is `prism_jax.layers.diag_decay`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.layers.base import RecurrentMixer
from prism_jax.layers.common import LowRank, dense, l2norm
from prism_jax.layers.diag_decay import chunk_diag_decay, diag_decay_step

# GLA's decay: log α = log σ(z) / 16 keeps α close to 1 at initialisation (σ(0)^{1/16} ≈ 0.96).
GATE_LOGIT_NORMALIZER = 16.0


class LinearAttention(RecurrentMixer):
  """Linear attention, S_t = S_{t−1} + k_t v_tᵀ (no forgetting); see the module docstring.

  Subclasses change `memories` and override `decay` / `route`.
  """

  memories = 1

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               value_head_dim: int | None = None, conv_width: int = 4,
               use_short_conv: bool = True, chunk_size: int = 16, norm_eps: float = 1e-6,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(d_model, num_heads, head_dim, value_head_dim=value_head_dim,
                     conv_width=conv_width, use_short_conv=use_short_conv, norm_eps=norm_eps,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"{type(self).__name__}: chunk_size must be a positive int, got "
                       f"{chunk_size!r}")
    self.chunk_size = chunk_size
    M, H, K, V = self.memories, num_heads, head_dim, self.value_head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = dense(d_model, H * K, ("embed", "heads"), **kw)
    self.k_proj = dense(d_model, M * H * K, ("embed", "heads"), **kw)
    self.v_proj = dense(d_model, M * H * V, ("embed", "heads"), **kw)

  def state_shape(self, batch_size: int) -> tuple[int, ...]:
    return (batch_size, self.memories * self.num_heads, self.head_dim, self.value_head_dim)

  def decay(self, u: jax.Array) -> jax.Array | None:
    """log α [..., M, H, K] (≤ 0), or None for no decay."""
    return None

  def route(self, u: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """(mixing weights [..., M], routed mask [..., M]) over memories, or None for one memory."""
    return None

  def write_terms(self, u: jax.Array):
    """q, k, g [..., M·H, K] and v [..., M·H, V] (float32) and the routing weights."""
    M, H, K, V = self.memories, self.num_heads, self.head_dim, self.value_head_dim
    lead = u.shape[:-1]
    q = l2norm(self.q_proj(u).reshape(*lead, 1, H, K)).astype(jnp.float32)
    k = l2norm(self.k_proj(u).reshape(*lead, M, H, K)).astype(jnp.float32)
    v = self.v_proj(u).reshape(*lead, M, H, V).astype(jnp.float32)
    g = self.decay(u)
    g = jnp.zeros_like(k) if g is None else g
    weights, routing = None, self.route(u)
    if routing is not None:
      # A memory that is not routed neither decays nor is written at this token.
      weights, routed = routing
      routed = routed[..., None, None]
      g, k = jnp.where(routed, g, 0.0), jnp.where(routed, k, 0.0)
    q = jnp.broadcast_to(q, k.shape)
    flat = lambda a: a.reshape(*lead, M * H, a.shape[-1])
    return flat(q), flat(k), flat(v), flat(g), weights

  def _read(self, o: jax.Array, weights: jax.Array | None) -> jax.Array:
    """o [..., M·H, V] → [..., H, V]: the routing-weighted sum over memories."""
    if weights is None:
      return o
    o = o.reshape(*o.shape[:-2], self.memories, self.num_heads, o.shape[-1])
    return jnp.einsum("...mhv,...m->...hv", o, weights.astype(o.dtype))

  def _sequence(self, u, segment_ids, state):
    q, k, v, g, weights = self.write_terms(u)
    o, final = chunk_diag_decay(q, k, v, g, initial_state=state, segment_ids=segment_ids,
                                chunk_size=self.chunk_size)
    return self._read(o, weights), final

  def _step(self, u, state):
    q, k, v, g, weights = self.write_terms(u)
    o, state = diag_decay_step(q, k, v, g, state, self.head_dim**-0.5)
    return self._read(o, weights), state


class GatedLinearAttention(LinearAttention):
  """GLA: S_t = diag(α_t) S_{t−1} + k_t v_tᵀ with a data-dependent decay per key dimension,
  log α_t = log σ(W₂ W₁ U_t + b) / 16 through a rank-`gate_rank` projection."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, gate_rank: int = 16,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(d_model, num_heads, head_dim, rngs=rngs, **kwargs)
    if not isinstance(gate_rank, int) or gate_rank < 1:
      raise ValueError(f"{type(self).__name__}: gate_rank must be a positive int, got "
                       f"{gate_rank!r}")
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=self.q_proj.param_dtype)
    self.decay_proj = LowRank(d_model, self.memories * num_heads * head_dim, gate_rank,
                              "heads", **kw)
    self.decay_bias = nnx.Param(jnp.zeros((self.memories * num_heads * head_dim,),
                                          self.q_proj.param_dtype),
                                out_sharding=("heads",), eager_sharding=False)

  def decay(self, u):
    z = self.decay_proj(u).astype(jnp.float32) + self.decay_bias[...]
    g = jax.nn.log_sigmoid(z) / GATE_LOGIT_NORMALIZER
    return g.reshape(*u.shape[:-1], self.memories, self.num_heads, self.head_dim)


class MixtureOfMemories(GatedLinearAttention):
  """MoM: `num_memories` independent GLA memories per head. A router picks the top-k memories
  for each token (softmax over the chosen logits); only those decay and get written, and the
  output is the weighted sum of their reads. State [B, M·H, K, V]."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, num_memories: int = 4,
               top_k: int = 2, rngs: nnx.Rngs, **kwargs):
    if not isinstance(num_memories, int) or num_memories < 1:
      raise ValueError(f"MixtureOfMemories: num_memories must be a positive int, got "
                       f"{num_memories!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_memories:
      raise ValueError(f"MixtureOfMemories: top_k must be in [1, num_memories={num_memories}], "
                       f"got {top_k!r}")
    self.memories, self.top_k = num_memories, top_k
    super().__init__(d_model, num_heads, head_dim, rngs=rngs, **kwargs)
    self.router = dense(d_model, num_memories, ("embed", None), rngs=rngs, dtype=self.dtype,
                        param_dtype=self.q_proj.param_dtype)

  def route(self, u):
    logits = self.router(u).astype(jnp.float32)  # [..., M]
    top, idx = jax.lax.top_k(logits, self.top_k)
    chosen = jax.nn.one_hot(idx, self.memories, dtype=jnp.float32)  # [..., k, M]
    weights = jnp.einsum("...j,...jm->...m", jax.nn.softmax(top, axis=-1), chosen)
    return weights, chosen.sum(axis=-2) > 0
