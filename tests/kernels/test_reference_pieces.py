"""The sequential reference of the kernel checks, computed in pieces (one batch row and a group of
heads at a time, for shapes whose whole backward would not fit a device) equals the whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_checks as kc
from prism_jax.ops import naive_prism


@pytest.mark.parametrize("case", [(2, 40, 4, 16, 8, 2, 16, True, True, jnp.float32),
                                  (3, 30, 6, 8, 8, 1, 16, False, False, jnp.float32)])
def test_reference_in_pieces_equals_the_whole(case, monkeypatch):
  inputs, segment_ids, do, ds = kc.random_case(case, seed=int(np.random.default_rng().integers(99)))
  whole = kc._loss_and_grads(naive_prism, inputs, segment_ids, do, ds)
  B, T, H, K, V = case[:5]
  monkeypatch.setattr(kc, "REFERENCE_STATE_BYTES", T * 2 * K * V * 4)  # two heads per piece
  pieces = kc._reference_in_pieces(inputs, segment_ids, do, ds)
  assert len(jax.tree.leaves(pieces)) == len(jax.tree.leaves(whole))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(pieces)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
