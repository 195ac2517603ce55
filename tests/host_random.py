"""Random test arrays drawn on the host with numpy.

On the CPU, XLA compiles jax.random's threefry generator anew for every array shape, at about
a second per array: more than most op checks take to compile and run. These draw with numpy
and hand JAX finished arrays, which costs no compile; `prism_inputs` is
prism_jax.testing.random_prism_inputs (drawn with numpy too).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from prism_jax.testing import random_prism_inputs as prism_inputs  # noqa: F401 - re-exported


def normal(seed, shape, dtype=jnp.float32):
  """Standard normal values of `shape`, as a jax array of `dtype`."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32).astype(dtype))
