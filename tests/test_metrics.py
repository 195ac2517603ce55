"""Hit@K, NDCG@K and AUC against a sort-based reference, including ties and padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.metrics import auc, hit_at_k, ndcg_at_k, target_rank


def reference(scores, target, k):
  """Per example: sort the real items (ids ≥ 1) best first, ties placing the target last."""
  hits, ndcgs, aucs = [], [], []
  for s, t in zip(np.asarray(scores, np.float64), np.asarray(target)):
    others = [i for i in range(1, len(s)) if i != t]
    order = sorted(others + [t], key=lambda i: (-s[i], i == t))  # target after equal scores
    rank = order.index(t)
    hits.append(float(rank < k))
    ndcgs.append(1 / np.log2(rank + 2) if rank < k else 0.0)
    below = sum(s[i] < s[t] for i in others) + 0.5 * sum(s[i] == s[t] for i in others)
    aucs.append(below / len(others))
  return np.array(hits), np.array(ndcgs), np.array(aucs)


@pytest.mark.parametrize("k", [1, 5, 30])
def test_metrics_match_reference(k):
  N, I = 64, 41
  ks = jax.random.split(jax.random.key(k), 2)
  # Rounded scores make ties common; a huge padding score must never count.
  scores = jnp.round(jax.random.normal(ks[0], (N, I)) * 2) / 2
  scores = scores.at[:, 0].set(100.0)
  target = jax.random.randint(ks[1], (N,), 1, I)
  hit, ndcg, area = jax.jit(lambda s, t: (hit_at_k(s, t, k), ndcg_at_k(s, t, k), auc(s, t)))(
      scores, target)
  ref_hit, ref_ndcg, ref_auc = reference(scores, target, k)
  np.testing.assert_array_equal(hit, ref_hit)
  np.testing.assert_allclose(ndcg, ref_ndcg, rtol=1e-6)
  np.testing.assert_allclose(area, ref_auc, rtol=1e-6)
  assert hit.shape == ndcg.shape == area.shape == (N,) and hit.dtype == jnp.float32


def test_extremes():
  scores = jnp.asarray([[9.0, 5.0, 1.0, 2.0, 3.0],    # target 1 is the best real item
                        [9.0, 5.0, 1.0, 2.0, 3.0],    # target 2 is the worst
                        [0.0, 1.0, 1.0, 1.0, 1.0]])   # all tied: ranked last, AUC one half
  target = jnp.asarray([1, 2, 3])
  np.testing.assert_array_equal(target_rank(scores, target), [0, 3, 3])
  np.testing.assert_array_equal(hit_at_k(scores, target, 1), [1, 0, 0])
  np.testing.assert_allclose(ndcg_at_k(scores, target, 4), [1, 1 / np.log2(5), 1 / np.log2(5)])
  np.testing.assert_allclose(auc(scores, target), [1, 0, 0.5])


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match=r"scores must have shape \[N, I\]"):
    auc(jnp.ones((3,)), jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"target must have shape \[N\] = \(3,\), got \(4,\)"):
    auc(jnp.ones((3, 5)), jnp.ones((4,), jnp.int32))
  with pytest.raises(ValueError, match="target must have an integer dtype"):
    hit_at_k(jnp.ones((3, 5)), jnp.ones((3,)), 2)
