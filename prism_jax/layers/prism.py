"""The PRISM mixer (spec §3) and Gated DeltaNet as its L = 1, solver-free special case."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.layers.base import RecurrentMixer
from prism_jax.layers.common import LowRank, dense, l2norm, shard_batch
from prism_jax.ops import prism_recurrence, prism_step
from prism_jax.ops.api import IMPLS


def decay_bias_init(num_heads: int):
  """Bias of the decay logit: α = σ(b) spread over heads from 0.9 to 0.999 (1 − 10^−1..−3),
  so some heads keep short and some long memories from the start."""
  def init(key, shape, dtype=jnp.float32):
    del key
    alpha = 1.0 - jnp.logspace(-1.0, -3.0, num_heads)
    return jnp.log(alpha / (1.0 - alpha)).astype(dtype).reshape(shape)
  return init


class PrismMixer(RecurrentMixer):
  """PRISM token mixer, spec §3 (paper Eq. 9–18, Alg. 1). For x [B, T, D]:

      U    = SiLU(ShortConv(x))                                   anchor ≈ S_{t−1} k_t
      q    = l2norm(W_q U),  v = W_v U,  g = log σ(W_α U + b_α)   [B,T,H,K], [B,T,H,V], [B,T,H]
      k^l  = l2norm(W_k^l U),  p^l = W_p^l U,  β^l = σ(W_β^l U)   l = 1..L
      r¹   = v − u            (u = U viewed per head, or W_u U when H·V ≠ D)
      δ^l  = GELU(p^l ⊙ r^l),  r^{l+1} = r^l − δ^l
      S_t  = α_t (I − β¹ k¹ k¹ᵀ) S_{t−1} + Σ_l β^l k^l δ^lᵀ,  o_t = K^{−1/2} S_tᵀ q_t
      y    = W_o (RMSNorm_head(o) ⊙ SiLU(W_g x))

  Ablations (paper Table 3): `solver_steps=1`; `use_nonlinearity=False` (GELU → identity);
  `use_short_conv=False` (U = SiLU(x), the current token only); `use_gain=False` (p^l = 1).
  `bypass_solver=True` sets δ¹ = v with L = 1, which is Gated DeltaNet. `key_rank` and
  `gain_rank` make the projections of k^{l≥2} and p^l low-rank.

  The sequence form calls `prism_recurrence(impl, chunk_size)`, decoding calls `prism_step`.
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               value_head_dim: int | None = None, solver_steps: int = 2, conv_width: int = 4,
               use_nonlinearity: bool = True, use_short_conv: bool = True,
               use_gain: bool = True, bypass_solver: bool = False,
               key_rank: int | None = None, gain_rank: int | None = None,
               impl: str = "auto", chunk_size: int = 64, norm_eps: float = 1e-6,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(d_model, num_heads, head_dim, value_head_dim=value_head_dim,
                     conv_width=conv_width, use_short_conv=use_short_conv, norm_eps=norm_eps,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if not isinstance(solver_steps, int) or solver_steps < 1:
      raise ValueError(f"PrismMixer: solver_steps must be a positive int, got {solver_steps!r}")
    if bypass_solver and solver_steps != 1:
      raise ValueError(f"PrismMixer: bypass_solver (δ = v) needs solver_steps=1, got "
                       f"{solver_steps}")
    for name, rank in (("key_rank", key_rank), ("gain_rank", gain_rank)):
      if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"PrismMixer: {name} must be None or a positive int, got {rank!r}")
    if impl not in IMPLS:
      raise ValueError(f"PrismMixer: impl must be one of {IMPLS}, got {impl!r}")
    H, K, V, L = num_heads, head_dim, self.value_head_dim, solver_steps
    self.solver_steps, self.bypass_solver = L, bypass_solver
    self.use_nonlinearity, self.use_gain = use_nonlinearity, use_gain and not bypass_solver
    self.impl, self.chunk_size = impl, chunk_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = dense(d_model, H * K, ("embed", "heads"), **kw)
    self.k_proj = dense(d_model, H * K, ("embed", "heads"), **kw)  # k¹: write and erase key
    self.k_rest_proj = (LowRank(d_model, (L - 1) * H * K, key_rank, "heads", **kw)
                        if L > 1 else None)
    self.v_proj = dense(d_model, H * V, ("embed", "heads"), **kw)
    self.beta_proj = dense(d_model, H * L, ("embed", "heads"), **kw)
    self.alpha_proj = dense(d_model, H, ("embed", "heads"), use_bias=True,
                            bias_init=decay_bias_init(H), **kw)
    self.gain_proj = (LowRank(d_model, L * H * V, gain_rank, "heads", **kw)
                      if self.use_gain else None)
    needs_map = not bypass_solver and H * V != d_model
    self.u_proj = dense(d_model, H * V, ("embed", "heads"), **kw) if needs_map else None

  def solve(self, r1: jax.Array, gain: jax.Array | None) -> jax.Array:
    """The unrolled residual solver: δ^l = GELU(p^l ⊙ r^l), r^{l+1} = r^l − δ^l.

    r1 [..., V] initial residual, gain [..., L, V] (None: p^l = 1) → δ [..., L, V].
    """
    act = (lambda z: jax.nn.gelu(z, approximate=False)) if self.use_nonlinearity else (lambda z: z)
    r, deltas = r1, []
    for l in range(self.solver_steps):
      delta = act(r if gain is None else gain[..., l, :] * r)
      deltas.append(delta)
      r = r - delta
    return jnp.stack(deltas, axis=-2)

  def write_terms(self, u: jax.Array) -> tuple[jax.Array, ...]:
    """Everything the recurrence needs, from the anchor U [..., D] (any leading axes):

    q [..., H, K], k [..., H, L, K], δ [..., H, L, V], β [..., H, L], g [..., H] (float32).
    """
    H, K, V, L = self.num_heads, self.head_dim, self.value_head_dim, self.solver_steps
    lead = u.shape[:-1]
    heads = lambda a, *tail: a.reshape(*lead, H, *tail)
    q = l2norm(heads(self.q_proj(u), K))
    keys = [heads(self.k_proj(u), 1, K)]
    if self.k_rest_proj is not None:
      keys.append(self.k_rest_proj(u).reshape(*lead, L - 1, H, K).swapaxes(-2, -3))
    k = l2norm(jnp.concatenate(keys, axis=-2))  # [..., H, L, K]
    beta = jax.nn.sigmoid(heads(self.beta_proj(u).astype(jnp.float32), L))
    g = jax.nn.log_sigmoid(self.alpha_proj(u).astype(jnp.float32))  # [..., H]
    v = heads(self.v_proj(u), V).astype(jnp.float32)
    if self.bypass_solver:
      return q, k, v[..., None, :].astype(u.dtype), beta, g
    anchor = heads(u if self.u_proj is None else self.u_proj(u), V).astype(jnp.float32)
    gain = None
    if self.gain_proj is not None:
      gain = self.gain_proj(u).astype(jnp.float32).reshape(*lead, L, H, V).swapaxes(-2, -3)
    delta = self.solve(v - anchor, gain)  # [..., H, L, V]
    return q, k, delta.astype(u.dtype), beta, g

  def _sequence(self, u, segment_ids, state):
    q, k, delta, beta, g = (shard_batch(x) for x in self.write_terms(u))
    return prism_recurrence(q, k, delta, beta, g, initial_state=state, output_final_state=True,
                            segment_ids=segment_ids, chunk_size=self.chunk_size,
                            impl=self.impl)

  def _step(self, u, state):
    q, k, delta, beta, g = self.write_terms(u)
    return prism_step(q, k, delta, beta, g, state)


class GatedDeltaNet(PrismMixer):
  """Gated DeltaNet in the PRISM framework: the same module with L = 1 and δ = v, i.e.

      S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,  o_t = K^{−1/2} S_tᵀ q_t

  with the same anchor, gates and output path as `PrismMixer` (shared code, not a copy).
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               value_head_dim: int | None = None, conv_width: int = 4,
               use_short_conv: bool = True, impl: str = "auto", chunk_size: int = 64,
               norm_eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    super().__init__(d_model, num_heads, head_dim, value_head_dim=value_head_dim,
                     solver_steps=1, conv_width=conv_width, use_short_conv=use_short_conv,
                     use_gain=False, bypass_solver=True, impl=impl, chunk_size=chunk_size,
                     norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
