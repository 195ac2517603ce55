"""The parallel pass over chunks (prefix scan of the chunks' affine state maps) against the
sequential definition: outputs, final state and every gradient, with packed segments."""

import jax
import jax.numpy as jnp
import pytest

from prism_jax.ops import chunk_prism, naive_prism, prism_recurrence
from prism_jax.ops.chunk import use_parallel_pass
from host_random import prism_inputs
from prism_jax.testing import TOLERANCES, assert_close
from quick_jit import quick_jit


@pytest.mark.parametrize("L, T", [(1, 200), (3, 97)])
def test_parallel_pass_matches_naive(L, T):
  q, k, v, beta, g, s0 = prism_inputs(100 + L, B=2, T=T, H=2, K=16, V=12, L=L)
  # Two restarts in row 0, none in row 1; chunks of 16 give 13 and 7 of them (not powers of 2).
  seg = jnp.stack([jnp.cumsum((jnp.arange(T) == 30) | (jnp.arange(T) == 81)),
                   jnp.zeros(T, jnp.int32)])

  def loss(fn, **kw):
    def f(q, k, v, beta, g, s0):
      o, final = fn(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                    segment_ids=seg, **kw)
      return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(final)), (o, final)
    return quick_jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))

  (_, (o_ref, s_ref)), g_ref = loss(naive_prism)(q, k, v, beta, g, s0)
  (_, (o, s)), grads = loss(chunk_prism, chunk_size=16, state_pass="parallel")(
      q, k, v, beta, g, s0)
  assert_close("o", o_ref, o)
  assert_close("final state", s_ref, s)
  for name, r, x in zip(("dq", "dk", "dv", "dbeta", "dg", "ds0"), g_ref, grads):
    assert_close(name, r, x, 1e-4)


def test_long_bf16_matches_naive():
  """bf16 inputs over 71 chunks: the automatic pass and product precision of the backend
  (on GPU/TPU the parallel pass and fast float32 products) stay within the bf16 tolerance."""
  q, k, v, beta, g, s0 = prism_inputs(8, B=1, T=4500, H=1, K=16, V=16, L=2,
                                      dtype=jnp.bfloat16)

  def loss(impl):
    def f(q, k, v, beta, g, s0):
      o, final = prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                  impl=impl)
      return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(final**2), (o, final)
    return quick_jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))

  # The reference sees the same values in float32, so its gradients are not rounded to bf16.
  f32 = [a.astype(jnp.float32) for a in (q, k, v, beta, g)]
  (_, (o_ref, s_ref)), g_ref = loss("naive")(*f32, s0)
  (_, (o, s)), grads = loss("chunk")(q, k, v, beta, g, s0)
  assert_close("o", o_ref, o)
  assert_close("final state", s_ref, s, TOLERANCES[jnp.dtype(jnp.bfloat16)])
  for name, r, x in zip(("dq", "dk", "dv", "dbeta", "dg", "ds0"), g_ref, grads):
    assert_close(name, r, x, TOLERANCES[jnp.dtype(jnp.bfloat16)])


def test_state_pass_choice():
  q, k, v, beta, g, _ = prism_inputs(7, B=1, T=16, H=1, K=8, V=8, L=1)
  with pytest.raises(ValueError, match="state_pass must be"):
    chunk_prism(q, k, v, beta, g, chunk_size=16, state_pass="tree")
  assert use_parallel_pass(10_000) == (jax.default_backend() != "cpu")
  assert not use_parallel_pass(1)
