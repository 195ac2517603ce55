"""Small helpers shared by the implementations of the PRISM recurrence."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Full float32 for every dot in the reference and chunked forms: on GPU the default precision
# of an f32 dot may be TF32, which the triangular solve and the state pass amplify.
HIGHEST = jax.lax.Precision.HIGHEST


def einsum32(spec: str, *operands: jax.Array, precision=HIGHEST) -> jax.Array:
  """`jnp.einsum` with a float32 result, at full float32 precision unless told otherwise."""
  return jnp.einsum(spec, *operands, precision=precision, preferred_element_type=jnp.float32)


def segment_starts(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """Boolean [B, T]: True where a new packed sequence begins (its state starts from zero).

  Position 0 never counts as a start: the first sequence continues from `initial_state`.
  """
  if segment_ids is None:
    return jnp.zeros((batch, length), dtype=bool)
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), dtype=bool), change], axis=1)


def chunked_sequence_index(segment_ids: jax.Array | None, batch: int, length: int,
                           chunk: int) -> tuple[jax.Array, jax.Array]:
  """Index of the packed sequence at each position, laid out by chunks, for chunked forms.

  Returns (seq [B, 1, N, C], seq_before [B, 1, N]): seq counts segment starts up to each
  position (padding past T continues the last sequence); seq_before is the index just before
  each chunk, i.e. of the state entering it (chunk 0 continues the initial state).
  """
  pad = (-length) % chunk
  seq = jnp.cumsum(segment_starts(segment_ids, batch, length).astype(jnp.int32), axis=1)
  seq = jnp.pad(seq, ((0, 0), (0, pad)), mode="edge").reshape(batch, 1, -1, chunk)
  seq_before = jnp.concatenate([seq[:, :, :1, 0], seq[:, :, :-1, -1]], axis=2)
  return seq, seq_before
