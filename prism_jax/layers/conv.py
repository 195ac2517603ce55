"""Causal depthwise convolution over time with a decode cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.layers.common import annotated, check_input


class ShortConv(nnx.Module):
  """Causal depthwise conv of width w:  y_t = Σ_{i=0..w−1} W_i ⊙ x_{t−w+1+i}.

  Taps that reach into an earlier packed sequence (a different segment id) or before the start
  are zero, so every sequence starts from an empty window. The decode cache holds the last
  w − 1 inputs [B, w − 1, C]; `__call__` continues from it when given (the cache counts as the
  beginning of the first segment).
  """

  def __init__(self, channels: int, width: int = 4, *, rngs: nnx.Rngs, use_bias: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if width < 1:
      raise ValueError(f"ShortConv: width must be >= 1, got {width}")
    self.channels, self.width, self.dtype = channels, width, dtype
    # Each channel sees only `width` inputs, so fan-in is the width (not the channel count).
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=0, out_axis=1)
    self.kernel = nnx.Param(annotated(init, (None, "embed"))(rngs.params(), (width, channels),
                                                             param_dtype))
    self.bias = (nnx.Param(annotated(nnx.initializers.zeros, ("embed",))(
        rngs.params(), (channels,), param_dtype)) if use_bias else None)

  def init_cache(self, batch_size: int, dtype=None) -> jax.Array:
    """Empty window: [B, w − 1, C] zeros."""
    return jnp.zeros((batch_size, self.width - 1, self.channels), dtype or self.dtype)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [B, T, C] → (y [B, T, C], new cache [B, w − 1, C])."""
    check_input("x", x, 3, "[B, T, C]", self.channels)
    B, T, _ = x.shape
    w = self.width
    if cache is None:
      cache = self.init_cache(B, x.dtype)
    elif tuple(cache.shape) != (B, w - 1, self.channels):
      raise ValueError(f"ShortConv cache has shape {tuple(cache.shape)}, expected "
                       f"{(B, w - 1, self.channels)}")
    xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, w − 1 + T, C]
    kernel = self.kernel[...].astype(self.dtype)
    if segment_ids is not None:
      # The cached inputs belong to the first segment, as the recurrent state does.
      seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], w - 1, axis=1), segment_ids], 1)
    y = jnp.zeros((B, T, self.channels), jnp.float32)
    for i in range(w):
      tap = xp[:, i:i + T].astype(self.dtype) * kernel[i]  # input at t − (w − 1 − i)
      if segment_ids is not None:
        keep = (seg[:, i:i + T] == segment_ids)[..., None]
        tap = jnp.where(keep, tap, 0)
      y = y + tap.astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype), xp[:, T:]

  def step(self, x: jax.Array, cache: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token: x [B, C] → (y [B, C], new cache [B, w − 1, C])."""
    check_input("x", x, 2, "[B, C]", self.channels)
    y, cache = self(x[:, None], cache=cache)
    return y[:, 0], cache
