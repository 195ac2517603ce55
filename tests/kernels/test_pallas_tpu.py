"""TPU kernels in Pallas TPU interpret mode (runs on CPU) against the sequential reference."""

import jax.numpy as jnp
import pytest

from kernel_checks import case_id, check_against_naive

INTERPRET = True

# (B, T, H, K, V, L, chunk, initial state, packed segments, dtype)
TPU_CASES = [
    (1, 37, 2, 48, 32, 2, 16, True, True, jnp.float32),
    (1, 40, 1, 32, 32, 3, 16, False, False, jnp.bfloat16),
]


@pytest.mark.parametrize("case", TPU_CASES, ids=case_id)
def test_matches_naive(case):
  check_against_naive(case, backend="tpu", interpret=INTERPRET, seed=len(case_id(case)) + 1)
