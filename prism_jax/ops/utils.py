"""Small helpers shared by the implementations of the PRISM recurrence."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Full float32 for every dot in the reference and chunked forms: on GPU the default precision
# of an f32 dot may be TF32, which the triangular solve and the state pass amplify.
HIGHEST = jax.lax.Precision.HIGHEST


def einsum32(spec: str, *operands: jax.Array) -> jax.Array:
  """`jnp.einsum` at full float32 precision with a float32 result."""
  return jnp.einsum(spec, *operands, precision=HIGHEST, preferred_element_type=jnp.float32)


def segment_starts(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """Boolean [B, T]: True where a new packed sequence begins (its state starts from zero).

  Position 0 never counts as a start: the first sequence continues from `initial_state`.
  """
  if segment_ids is None:
    return jnp.zeros((batch, length), dtype=bool)
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), dtype=bool), change], axis=1)
