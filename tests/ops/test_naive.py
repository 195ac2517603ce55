"""The sequential reference against an independent float64 loop written here."""

import jax.numpy as jnp
import numpy as np
import pytest

from host_random import prism_inputs
from prism_jax.ops import naive_prism
from prism_jax.testing import assert_close
from quick_jit import quick_jit

naive = quick_jit(naive_prism, static_argnames=("output_final_state",))


def float64_loop(q, k, v, beta, g, s0, segment_ids=None):
  """Spec §2 literally, one token at a time, in float64 numpy."""
  q, k, v, beta, g = (np.asarray(x, np.float64) for x in (q, k, v, beta, g))
  B, T, H, K = q.shape
  L, V = v.shape[-2:]
  o = np.zeros((B, T, H, V))
  final = np.zeros((B, H, K, V))
  for b in range(B):
    for h in range(H):
      S = np.zeros((K, V)) if s0 is None else np.asarray(s0[b, h], np.float64)
      for t in range(T):
        if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
          S = np.zeros((K, V))
        k1 = k[b, t, h, 0]
        S = np.exp(g[b, t, h]) * (np.eye(K) - beta[b, t, h, 0] * np.outer(k1, k1)) @ S
        for l in range(L):
          S = S + np.outer(k[b, t, h, l], beta[b, t, h, l] * v[b, t, h, l])
        o[b, t, h] = K**-0.5 * S.T @ q[b, t, h]
      final[b, h] = S
  return o, final


@pytest.mark.parametrize("T,H,K,V,L,init", [
    (1, 1, 8, 8, 1, False),
    (23, 2, 12, 7, 3, True),
    (40, 3, 16, 16, 2, True),
], ids=lambda x: str(x))
def test_naive_matches_float64_loop(T, H, K, V, L, init):
  q, k, v, beta, g, s0 = prism_inputs(T * 7 + L, B=2, T=T, H=H, K=K, V=V, L=L,
                                      initial_state=init)
  o, final = naive(q, k, v, beta, g, initial_state=s0, output_final_state=True)
  o_ref, final_ref = float64_loop(q, k, v, beta, g, s0)
  assert_close("o", o_ref, o, 2e-6)
  assert_close("final_state", final_ref, final, 2e-6)


def test_naive_segments_match_float64_loop():
  q, k, v, beta, g, s0 = prism_inputs(5, B=2, T=30, H=2, K=8, V=8, L=2)
  seg = jnp.array([[0] * 10 + [1] * 5 + [2] * 15, [3] * 30])
  o, final = naive(q, k, v, beta, g, initial_state=s0, output_final_state=True, segment_ids=seg)
  o_ref, final_ref = float64_loop(q, k, v, beta, g, s0, np.asarray(seg))
  assert_close("o", o_ref, o, 2e-6)
  assert_close("final_state", final_ref, final, 2e-6)
