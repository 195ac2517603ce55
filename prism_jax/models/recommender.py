"""Next-item prediction over an item catalogue (the paper's sequential recommendation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.models.config import ModelConfig
from prism_jax.models.lm import Backbone


class SequentialRecommender(Backbone):
  """Item ids [B, T] (1..num_items, 0 = padding) → hidden states [B, T, D] through the blocks
  of `cfg.mixer_pattern`; `scores(h)` = h · Eᵀ over the item embeddings E [num_items + 1, D].

  Padding positions enter as zero vectors. Column 0 of the scores is the padding item: mask it
  (see `prism_jax.metrics`).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.num_items < 1:
      raise ValueError(f"SequentialRecommender needs ModelConfig.num_items >= 1, got "
                       f"{cfg.num_items}")
    super().__init__(cfg, cfg.num_items + 1, rngs=rngs)

  def __call__(self, items: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_tokens(items, 2, "[B, T]")
    return self.hidden(items, segment_ids)

  def embed_tokens(self, items: jax.Array) -> jax.Array:
    """Item vectors [..., D], zero for the padding id 0."""
    return self.embed(items) * (items != 0)[..., None].astype(self.dtype)

  def scores(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] → float32 scores [..., num_items + 1]."""
    return self.embed.attend(hidden).astype(jnp.float32)
