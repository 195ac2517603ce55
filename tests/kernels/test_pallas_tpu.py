"""TPU kernels against the sequential reference, compiled on a TPU and elsewhere in Pallas TPU
interpret mode (on the CPU), and lowered for a TPU on any machine: Pallas's TPU lowering checks
every block shape against Mosaic TPU's tiling rules and every primitive against what it can
lower, so a kernel a TPU would reject at those steps fails here. (Mosaic's layout passes and the
compile run inside libtpu, on a TPU only.)"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from kernel_checks import (case_id, check_against_naive, lowered_forward_and_backward,
                           random_case)

INTERPRET = jax.default_backend() != "tpu"

# (B, T, H, K, V, L, chunk, initial state, packed segments, dtype)
TPU_CASES = [
    (1, 37, 2, 48, 32, 2, 16, True, True, jnp.float32),
    (1, 40, 1, 32, 32, 3, 16, False, False, jnp.bfloat16),
    (1, 100, 2, 64, 64, 1, 64, True, True, jnp.float32),
    # K = 96 padded to 128 lanes, V = 64 the whole lane dim; four writes.
    (1, 70, 1, 96, 64, 4, 32, True, True, jnp.bfloat16),
    (2, 150, 1, 128, 128, 2, 64, True, True, jnp.bfloat16),
]


@pytest.mark.parametrize("case", TPU_CASES, ids=case_id)
def test_matches_naive(case):
  check_against_naive(case, backend="tpu", interpret=INTERPRET, seed=len(case_id(case)) + 1)


def test_jax_backward_matches_naive():
  check_against_naive(TPU_CASES[0], backend="tpu", interpret=INTERPRET, backward="jax", seed=4)


LOWERING_SHAPES = [
    pytest.param(dtype, K, V, L, C, id=f"{jnp.dtype(dtype).name}-K{K}-V{V}-L{L}-C{C}")
    for dtype, (K, V), L, C in itertools.product(
        (jnp.float32, jnp.bfloat16), ((64, 64), (128, 128), (96, 96), (128, 64), (32, 256)),
        (1, 2, 3, 4), (32, 64))]


@pytest.mark.parametrize("dtype,K,V,L,C", LOWERING_SHAPES)
def test_forward_and_backward_lower_for_a_tpu(dtype, K, V, L, C):
  args, segment_ids, _, _ = random_case((2, 200, 2, K, V, L, C, True, True, dtype), seed=L)
  text = lowered_forward_and_backward(args, "tpu", segment_ids=segment_ids, chunk_size=C,
                                      backend="tpu")
  # prepare, state_forward, output, state_backward, grads: each a Mosaic TPU kernel.
  assert text.count("tpu_custom_call") == 5
