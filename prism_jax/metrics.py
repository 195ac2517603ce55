"""Ranking metrics of sequential recommendation, one value per example (jit-able).

Scores are [N, I] over the whole catalogue, column 0 being the padding item, which never
counts. The rank of the target is the number of other real items scored at least as high
(ties count against the target, so a constant scorer earns nothing):

    rank    = #{i ∉ {0, target} : s_i ≥ s_target}            (0 = best)
    Hit@K   = [rank < K]
    NDCG@K  = [rank < K] / log₂(rank + 2)                      (one relevant item)
    AUC     = (#{s_i < s_target} + ½ #{s_i = s_target}) / (I − 2)   over the I − 2 negatives
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(scores: jax.Array, target: jax.Array) -> None:
  if scores.ndim != 2:
    raise ValueError(f"scores must have shape [N, I], got {tuple(scores.shape)}")
  if scores.shape[1] < 3:
    raise ValueError(f"scores needs at least 2 real items besides padding (I >= 3), got "
                     f"shape {tuple(scores.shape)}")
  if target.shape != scores.shape[:1]:
    raise ValueError(f"target must have shape [N] = {scores.shape[:1]}, got "
                     f"{tuple(target.shape)}")
  if not jnp.issubdtype(target.dtype, jnp.integer):
    raise ValueError(f"target must have an integer dtype, got {target.dtype}")


def _compare(scores: jax.Array, target: jax.Array):
  """(above, equal) counts over the negatives: items other than padding and the target."""
  _check(scores, target)
  scores = scores.astype(jnp.float32)
  s_t = jnp.take_along_axis(scores, target[:, None], axis=1)  # [N, 1]
  items = jnp.arange(scores.shape[1])
  negative = (items[None, :] != 0) & (items[None, :] != target[:, None])  # [N, I]
  above = jnp.sum(negative & (scores > s_t), axis=1)
  equal = jnp.sum(negative & (scores == s_t), axis=1)
  return above, equal


def target_rank(scores: jax.Array, target: jax.Array) -> jax.Array:
  """0-based rank [N] (int32) of the target, ties counted against it."""
  above, equal = _compare(scores, target)
  return (above + equal).astype(jnp.int32)


def hit_at_k(scores: jax.Array, target: jax.Array, k: int) -> jax.Array:
  """[N] float32: 1 where the target is among the top k real items."""
  return (target_rank(scores, target) < k).astype(jnp.float32)


def ndcg_at_k(scores: jax.Array, target: jax.Array, k: int) -> jax.Array:
  """[N] float32: 1 / log₂(rank + 2) when rank < k, else 0."""
  rank = target_rank(scores, target).astype(jnp.float32)
  return jnp.where(rank < k, 1.0 / jnp.log2(rank + 2.0), 0.0)


def auc(scores: jax.Array, target: jax.Array) -> jax.Array:
  """[N] float32: fraction of negatives scored below the target (ties count one half)."""
  above, equal = _compare(scores, target)
  negatives = scores.shape[1] - 2
  return (negatives - above - 0.5 * equal).astype(jnp.float32) / negatives
