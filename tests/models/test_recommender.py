"""SequentialRecommender: padding, scores over the catalogue, packed users, and metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism_jax.metrics import auc, hit_at_k
from prism_jax.models import ModelConfig, SequentialRecommender
from prism_jax.testing import assert_close

ITEMS, B, T = 40, 2, 12
CFG = ModelConfig(vocab_size=1, num_items=ITEMS, d_model=32, num_layers=1, num_heads=2,
                  head_dim=16, mixer_pattern=("prism",), chunk_size=16, mlp_hidden=48)


def test_hidden_scores_and_padding():
  rec = SequentialRecommender(CFG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(rec)
  run = jax.jit(lambda st, items, seg: nnx.merge(graphdef, st)(items, seg))
  items = jax.random.randint(jax.random.key(1), (B, T), 1, ITEMS + 1, jnp.int32)
  items = items.at[:, :3].set(0)  # left padding
  seg = jnp.zeros((B, T), jnp.int32)
  hidden = run(state, items, seg)
  assert hidden.shape == (B, T, CFG.d_model)
  scores = rec.scores(hidden)
  assert scores.shape == (B, T, ITEMS + 1) and scores.dtype == jnp.float32
  assert_close("scores", hidden @ rec.embed.embedding[...].T, scores)
  # Padding enters as zeros: whatever the padding row holds, nothing changes.
  rec.embed.embedding[...] = rec.embed.embedding[...].at[0].set(7.0)
  assert_close("padding is inert", hidden, run(nnx.state(rec), items, seg), tol=1e-6)
  # Two users packed in one row score as they do alone.
  packed_seg = jnp.asarray(np.tile(np.repeat([0, 1], [5, 7]), (B, 1)), jnp.int32)
  packed = run(state, items, packed_seg)
  alone = run(state, jnp.roll(items, -5, axis=1), seg)
  assert_close("second user", alone[:, :7], packed[:, 5:], tol=1e-5)
  n = B * T
  flat = scores.reshape(n, -1)
  target = items.reshape(n).clip(1)
  assert np.all((0 <= auc(flat, target)) & (auc(flat, target) <= 1))
  assert hit_at_k(flat, target, ITEMS).min() == 1.0  # every item is in the top |catalogue|


def test_needs_items():
  with pytest.raises(ValueError, match="needs ModelConfig.num_items >= 1, got 0"):
    SequentialRecommender(ModelConfig(), rngs=nnx.Rngs(0))
