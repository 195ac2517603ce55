"""The front and back ends that every recurrent mixer of this package shares.

    U = SiLU(ShortConv(x))                        anchor (SiLU(x) when the conv is switched off)
    o = recurrence(projections of U)              [B, T, H, V], defined by the subclass
    y = W_o (RMSNorm_head(o) ⊙ SiLU(W_g x))       back to [B, T, D]

Subclasses implement `_sequence` (the parallel form over T) and `_step` (one token); this class
turns them into the common mixer interface: `__call__(x, segment_ids)`, `prefill(x, cache)`,
`init_cache(batch_size, max_len)` and `step(x, cache)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.layers.common import RMSNorm, check_input, check_segment_ids, dense, shard_batch
from prism_jax.layers.conv import ShortConv


class RecurrentMixer(nnx.Module):
  """Base of the recurrent token mixers: x [B, T, D] → y [B, T, D] with an O(1) decode cache
  {"conv": [B, w − 1, D] window or None, "state": recurrent state (float32)}."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               value_head_dim: int | None = None, conv_width: int = 4,
               use_short_conv: bool = True, norm_eps: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, val in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim),
                      ("value_head_dim", value_head_dim or head_dim),
                      ("conv_width", conv_width)):
      if not isinstance(val, int) or val < 1:
        raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {val!r}")
    self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
    self.value_head_dim = value_head_dim or head_dim
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv = (ShortConv(d_model, conv_width, **kw) if use_short_conv else None)
    hv = num_heads * self.value_head_dim
    self.out_norm = RMSNorm(self.value_head_dim, eps=norm_eps, axis_name="kv",
                            param_dtype=param_dtype)
    self.gate = dense(d_model, hv, ("embed", "heads"), **kw)
    self.out = dense(hv, d_model, ("heads", "embed"), **kw)

  def state_shape(self, batch_size: int) -> tuple[int, ...]:
    return (batch_size, self.num_heads, self.head_dim, self.value_head_dim)

  def init_cache(self, batch_size: int, max_len: int | None = None) -> dict:
    """Zero state and empty conv window; `max_len` is ignored (the cache is O(1) in length)."""
    del max_len
    return {"conv": None if self.conv is None else self.conv.init_cache(batch_size),
            "state": jnp.zeros(self.state_shape(batch_size), jnp.float32)}

  def anchor(self, x: jax.Array, segment_ids: jax.Array | None = None,
             conv_cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """U = SiLU(ShortConv(x)) [B, T, D] and the new conv window (SiLU(x) without the conv)."""
    if self.conv is None:
      return jax.nn.silu(x.astype(self.dtype)), None
    c, conv_cache = self.conv(x.astype(self.dtype), segment_ids, conv_cache)
    return jax.nn.silu(c), conv_cache

  def _output(self, o: jax.Array, x: jax.Array) -> jax.Array:
    """W_o (RMSNorm_head(o) ⊙ SiLU(W_g x)): o [..., H, V], x [..., D] → [..., D] in x's dtype."""
    gate = jax.nn.silu(self.gate(x.astype(self.dtype)))  # [..., H·V]
    o = self.out_norm(o.astype(self.dtype)).reshape(gate.shape) * gate
    return self.out(o).astype(x.dtype)

  def _sequence(self, u, segment_ids, state):
    """(o [B, T, H, V], final state) from U [B, T, D] and the incoming state (None = zero)."""
    raise NotImplementedError

  def _step(self, u, state):
    """(o [B, H, V], new state) from U [B, D] for one token."""
    raise NotImplementedError

  def prefill(self, x: jax.Array, cache: dict | None = None,
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The parallel form over x [B, T, D] continuing from `cache`; returns (y, new cache)."""
    check_input("x", x, 3, "[B, T, D]", self.d_model)
    check_segment_ids(segment_ids, x)
    cache = cache or {"conv": None, "state": None}
    u, conv_cache = self.anchor(x, segment_ids, cache["conv"])
    o, state = self._sequence(shard_batch(u), segment_ids, cache["state"])
    return self._output(shard_batch(o), x), {"conv": conv_cache, "state": state}

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] → y [B, T, D]; packed sequences (segment_ids [B, T]) do not interact."""
    return self.prefill(x, None, segment_ids)[0]

  def step(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token: x [B, D] → (y [B, D], new cache)."""
    check_input("x", x, 2, "[B, D]", self.d_model)
    u, conv_cache = self.anchor(x[:, None], None, cache["conv"])
    o, state = self._step(u[:, 0], cache["state"])
    return self._output(o, x), {"conv": conv_cache, "state": state}
