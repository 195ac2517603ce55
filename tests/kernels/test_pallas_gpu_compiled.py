"""The GPU kernels compiled for a real GPU (skipped without one): interpret-mode cases, plus
L = 4, a non-power-of-two head dim, the shared-memory fallback, every Mosaic GPU stage, and the
acceptance shape B4 T4096 H16 K=V=128 L=2 bf16 against the sequential reference. Few distinct
shapes: every new shape recompiles the kernels (float32 cases take about a minute on the H200)."""

import warnings

import jax
import jax.numpy as jnp
import pytest

from kernel_checks import CASES, case_id, check_against_naive
from pallas_kernels import pallas_prism
from prism_jax.ops import naive_prism
from prism_jax.testing import assert_close, random_prism_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

GPU_CASES = [
    CASES[0],
    CASES[1],
    (2, 300, 3, 96, 96, 3, 64, True, True, jnp.bfloat16),
    (1, 200, 2, 64, 48, 2, 64, True, True, jnp.float32),
    (1, 200, 2, 32, 32, 4, 64, True, True, jnp.float32),
    (2, 1000, 4, 64, 64, 2, 64, True, True, jnp.bfloat16),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_compiled_matches_naive(case):
  check_against_naive(case, backend="gpu", interpret=False, seed=len(case_id(case)))


def test_compiled_jax_backward_matches_naive():
  check_against_naive(GPU_CASES[3], backend="gpu", interpret=False, backward="jax", seed=5)


def test_float32_at_head_dim_128_falls_back_once_and_matches():
  q, k, v, beta, g, _ = random_prism_inputs(jax.random.key(6), 1, 70, 2, 96, 96, 2)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    o, _ = pallas_prism(q, k, v, beta, g, interpret=False)
  assert [str(w.message) for w in caught if "falls back" in str(w.message)], "no warning"
  assert_close("o", naive_prism(q, k, v, beta, g)[0], o)


@pytest.mark.parametrize("stages,blocks,case", [
    # Every stage on Mosaic GPU, the passes at 32 columns (16 programs of 64 would be narrowed).
    ("all,narrow", None, (2, 300, 4, 128, 128, 1, 64, True, True, jnp.bfloat16)),
    # Every stage at L = 2 (the WY side's second write on Mosaic too), the passes at 64 columns.
    ("all", "64,4,3,64,4,64,8,2,1", (1, 200, 2, 64, 64, 2, 64, True, True, jnp.bfloat16)),
    # L = 3: the WY side on Mosaic, one program per write after the first, and the state side
    # with one write's dP in shared memory at a time; the passes and apply_inverse on Triton
    # (their shared memory holds L ≤ 2).
    ("all", None, (1, 200, 2, 128, 128, 3, 64, True, True, jnp.bfloat16)),
    # The pass forming U and Wk itself at L = 1, with and without the backward's residuals.
    ("all,wy_pass", "64,4,3,64,4,64,8,2,1",
     (2, 300, 4, 128, 128, 1, 64, True, True, jnp.bfloat16)),
], ids=["L1-narrow", "L2-wide", "L3-further", "L1-wy-pass"])
def test_compiled_mosaic_stages_match_naive(stages, blocks, case, monkeypatch):
  monkeypatch.setenv("PRISM_MOSAIC_STAGES", stages)
  if blocks:
    monkeypatch.setenv("PRISM_GPU_BLOCKS", blocks)
  check_against_naive(case, backend="gpu", interpret=False, seed=9,
                      forward_alone="wy_pass" in stages)


@pytest.mark.slow
def test_acceptance_shape():
  check_against_naive((4, 4096, 16, 128, 128, 2, 64, True, False, jnp.bfloat16), backend="gpu",
                      interpret=False, seed=1)
