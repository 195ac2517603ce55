"""L = 1 is Gated DeltaNet: compare with an independent GDN loop in the usual GDN shapes."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.ops import gated_delta_rule
from prism_jax.testing import assert_close
from quick_jit import quick_jit


def gdn_loop(q, k, v, beta, g, s0, scale):
  """S_t = α_t (S_{t−1} − β_t k_t (k_tᵀ S_{t−1})) + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t (float64).

  Written in the "delta" form: read the old value, move it toward v by β — the form Gated
  DeltaNet is usually stated in, so it is not the same expression as the PRISM code.
  """
  q, k, v, beta, g = (np.asarray(x, np.float64) for x in (q, k, v, beta, g))
  B, T, H, _ = q.shape
  S = np.array(s0, np.float64)  # [B, H, K, V]
  o = np.zeros(v.shape)
  for t in range(T):
    alpha = np.exp(g[:, t])[..., None, None]  # [B, H, 1, 1]
    decayed = alpha * S
    old = np.einsum("bhk,bhkv->bhv", k[:, t], decayed)
    new = beta[:, t][..., None] * (v[:, t] - old)
    S = decayed + np.einsum("bhk,bhv->bhkv", k[:, t], new)
    o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
  return o, S


@pytest.mark.parametrize("impl", ["naive", "chunk", "assoc"])
@pytest.mark.parametrize("T", [1, 45, 100])
def test_l1_equals_gated_deltanet(impl, T):
  B, H, K, V = 2, 3, 16, 24
  rng = np.random.default_rng(T)  # drawn on the host: tests/host_random.py says why
  q = rng.standard_normal((B, T, H, K), np.float32)
  k = rng.standard_normal((B, T, H, K), np.float32)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.standard_normal((B, T, H, V), np.float32)
  beta = rng.uniform(size=(B, T, H)).astype(np.float32)
  g = -rng.uniform(high=0.5, size=(B, T, H)).astype(np.float32)
  s0 = rng.standard_normal((B, H, K, V), np.float32)
  run = quick_jit(functools.partial(gated_delta_rule, output_final_state=True, scale=0.3,
                                    impl=impl, chunk_size=32))
  o, final = run(q, k, v, beta, g, initial_state=s0)
  o_ref, final_ref = gdn_loop(q, k, v, beta, g, s0, 0.3)
  assert_close("o", o_ref, o, 2e-5)
  assert_close("final_state", final_ref, final, 2e-5)


def test_gated_delta_rule_rejects_prism_shapes():
  x = jnp.ones((1, 4, 2, 1, 8))
  with pytest.raises(ValueError, match="gated_delta_rule: k must have rank 4"):
    gated_delta_rule(jnp.ones((1, 4, 2, 8)), x, jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2)),
                     jnp.zeros((1, 4, 2)))
