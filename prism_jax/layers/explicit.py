"""The explicit non-linear solver baseline (spec §6, paper Eq. 6; TTT-like).

Each token takes L gradient steps on ½‖σ(Sᵀk_t) − v_t‖² from the previous state, with σ = tanh:

    Z⁰ = S_{t−1}
    Z^l = Z^{l−1} + η_t k_t (σ′(Z^{l−1}ᵀ k_t) ⊙ (v_t − σ(Z^{l−1}ᵀ k_t)))ᵀ      l = 1..L
    S_t = α_t S_{t−1} + (Z^L − S_{t−1})
    o_t = K^{−1/2} S_tᵀ q_t

With L = 1 this is exactly S_t = α_t S_{t−1} + η_t k_t (σ′(S_{t−1}ᵀk_t) ⊙ (v_t − σ(S_{t−1}ᵀk_t)))ᵀ.
The update depends on the state, so there is no parallel form: the sequence is a `lax.scan`
over tokens whose body is the decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.layers.base import RecurrentMixer
from prism_jax.layers.common import dense, l2norm
from prism_jax.layers.prism import decay_bias_init
from prism_jax.ops.utils import einsum32, segment_starts


def explicit_solver_step(q, k, v, eta, g, state, *, steps: int, scale: float):
  """One token. q, k [B, H, K], v [B, H, V], eta, g [B, H], state [B, H, K, V] (float32)
  → (o [B, H, V], new state)."""
  z = state
  for _ in range(steps):
    pred = jnp.tanh(einsum32("bhk,bhkv->bhv", k, z))  # σ(Zᵀk)
    grad = (1.0 - pred * pred) * (v - pred)  # σ′ ⊙ residual: [B, H, V]
    z = z + eta[..., None, None] * k[..., :, None] * grad[..., None, :]
  new_state = jnp.exp(g)[..., None, None] * state + (z - state)
  return scale * einsum32("bhk,bhkv->bhv", q, new_state), new_state


def explicit_solver_scan(q, k, v, eta, g, *, steps: int, initial_state=None, segment_ids=None,
                         scale=None):
  """The solver over a sequence: q, k [B, T, H, K], v [B, T, H, V], eta, g [B, T, H];
  returns (o [B, T, H, V] float32, final state [B, H, K, V]). Packed sequences restart at zero."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = K**-0.5 if scale is None else scale
  state = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  starts = segment_starts(segment_ids, B, T)

  def body(state, xs):
    *terms, start = xs
    state = jnp.where(start[:, None, None, None], 0.0, state)
    o, state = explicit_solver_step(*terms, state, steps=steps, scale=scale)
    return state, o

  tm = lambda a: jnp.moveaxis(a.astype(jnp.float32), 1, 0)
  final, o = jax.lax.scan(body, state, (tm(q), tm(k), tm(v), tm(eta), tm(g),
                                        jnp.moveaxis(starts, 1, 0)))
  return jnp.moveaxis(o, 0, 1), final


class ExplicitSolver(RecurrentMixer):
  """The explicit solver as a token mixer: q, k = l2norm(W U), v = W_v U, η = σ(W_η U),
  g = log σ(W_α U + b_α) from the shared anchor U; `solver_steps` = L inner steps per token."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               value_head_dim: int | None = None, solver_steps: int = 2, conv_width: int = 4,
               use_short_conv: bool = True, norm_eps: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(d_model, num_heads, head_dim, value_head_dim=value_head_dim,
                     conv_width=conv_width, use_short_conv=use_short_conv, norm_eps=norm_eps,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if not isinstance(solver_steps, int) or solver_steps < 1:
      raise ValueError(f"ExplicitSolver: solver_steps must be a positive int, got "
                       f"{solver_steps!r}")
    self.solver_steps = solver_steps
    H, K, V = num_heads, head_dim, self.value_head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = dense(d_model, H * K, ("embed", "heads"), **kw)
    self.k_proj = dense(d_model, H * K, ("embed", "heads"), **kw)
    self.v_proj = dense(d_model, H * V, ("embed", "heads"), **kw)
    self.eta_proj = dense(d_model, H, ("embed", "heads"), **kw)
    self.alpha_proj = dense(d_model, H, ("embed", "heads"), use_bias=True,
                            bias_init=decay_bias_init(H), **kw)

  def write_terms(self, u: jax.Array):
    """q, k [..., H, K], v [..., H, V], η, g [..., H], all float32, from U [..., D]."""
    lead, H = u.shape[:-1], self.num_heads
    f32 = lambda a: a.astype(jnp.float32)
    q = f32(l2norm(self.q_proj(u).reshape(*lead, H, self.head_dim)))
    k = f32(l2norm(self.k_proj(u).reshape(*lead, H, self.head_dim)))
    v = f32(self.v_proj(u).reshape(*lead, H, self.value_head_dim))
    eta = jax.nn.sigmoid(f32(self.eta_proj(u)))
    g = jax.nn.log_sigmoid(f32(self.alpha_proj(u)))
    return q, k, v, eta, g

  def _sequence(self, u, segment_ids, state):
    return explicit_solver_scan(*self.write_terms(u), steps=self.solver_steps,
                                initial_state=state, segment_ids=segment_ids)

  def _step(self, u, state):
    return explicit_solver_step(*self.write_terms(u), state, steps=self.solver_steps,
                                scale=self.head_dim**-0.5)
