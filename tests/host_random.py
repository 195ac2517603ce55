"""Random test arrays drawn on the host with numpy.

On the CPU, XLA compiles jax.random's threefry generator anew for every array shape, at about
a second per array (5 s for one call of prism_jax.testing.random_prism_inputs): more than most
op checks take to compile and run. These draw the same distributions with numpy and hand JAX
finished arrays, which costs no compile.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def normal(seed, shape, dtype=jnp.float32):
  """Standard normal values of `shape`, as a jax array of `dtype`."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32).astype(dtype))


def prism_inputs(seed, B=2, T=37, H=2, K=32, V=32, L=2, dtype=jnp.float32, initial_state=True,
                 decay=(1.0, 4.0)):
  """What prism_jax.testing.random_prism_inputs draws, for an integer seed.

  Keys are L2-normalised, gates are sigmoids, and the log-decay is log σ(x) with x drawn from
  N(mean, 1) for mean uniform in `decay` per head.

  Returns (q, k, v, beta, g, initial_state or None); the state is float32.
  """
  rng = np.random.default_rng(seed)
  draw = lambda *shape: rng.standard_normal(shape, np.float32)
  q = draw(B, T, H, K)
  k = draw(B, T, H, L, K)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = draw(B, T, H, L, V)
  beta = 1 / (1 + np.exp(-draw(B, T, H, L)))
  mean = rng.uniform(decay[0], decay[1], (1, 1, H)).astype(np.float32)
  g = -np.logaddexp(0, -(mean + draw(B, T, H)))                   # log σ(x)
  s0 = jnp.asarray(draw(B, H, K, V)) if initial_state else None
  cast = lambda x: jnp.asarray(x.astype(np.float32).astype(dtype))
  return cast(q), cast(k), cast(v), cast(beta), cast(g), s0
