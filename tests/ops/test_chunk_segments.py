"""The chunked form processed one segment of positions at a time (its CPU layout) against the
sequential definition: outputs, final state and every gradient, with packed sequences that
restart inside and across segment boundaries and a padded tail."""

import jax
import jax.numpy as jnp
import pytest

from host_random import prism_inputs
from prism_jax.ops import chunk_prism, naive_prism
from prism_jax.testing import TOLERANCES, assert_close
from quick_jit import quick_jit

NAMES = ("dq", "dk", "dv", "dbeta", "dg", "ds0")


def _loss(fn, seg, **kw):
  def f(q, k, v, beta, g, s0):
    o, final = fn(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                  segment_ids=seg, **kw)
    return (jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(jnp.cos(final)), (o, final))
  return quick_jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))


@pytest.mark.parametrize("L, T, segment", [(1, 150, 32), (2, 150, 48), (3, 64, 16)])
def test_segments_match_naive(L, T, segment):
  q, k, v, beta, g, s0 = prism_inputs(300 + L, B=2, T=T, H=2, K=16, V=12, L=L)
  # Row 0 restarts inside a segment (t = 21) and exactly at a segment start (t = 2·segment);
  # row 1 never restarts.
  t = jnp.arange(T)
  seg = jnp.stack([jnp.cumsum((t == 21) | (t == 2 * segment)), jnp.zeros(T, jnp.int32)])
  (_, (o_ref, s_ref)), g_ref = _loss(naive_prism, seg)(q, k, v, beta, g, s0)
  (_, (o, s)), grads = _loss(chunk_prism, seg, chunk_size=16, segment_tokens=segment,
                             state_pass="scan")(q, k, v, beta, g, s0)
  assert_close("o", o_ref, o)
  assert_close("final state", s_ref, s)
  for name, r, x in zip(NAMES, g_ref, grads):
    assert_close(name, r, x, 1e-4)


def test_segments_bf16_match_naive():
  q, k, v, beta, g, s0 = prism_inputs(311, B=1, T=200, H=2, K=16, V=16, L=2,
                                      dtype=jnp.bfloat16)
  f32 = [a.astype(jnp.float32) for a in (q, k, v, beta, g)]
  (_, (o_ref, s_ref)), g_ref = _loss(naive_prism, None)(*f32, s0)
  (_, (o, s)), grads = _loss(chunk_prism, None, chunk_size=16, segment_tokens=64,
                             state_pass="scan")(q, k, v, beta, g, s0)
  tol = TOLERANCES[jnp.dtype(jnp.bfloat16)]
  assert o.dtype == jnp.bfloat16
  assert_close("o", o_ref, o)
  assert_close("final state", s_ref, s, tol)
  for name, r, x in zip(NAMES, g_ref, grads):
    assert_close(name, r, x, tol)


def test_segment_size_does_not_change_the_result():
  """The segment length is a memory layout, not a numerical choice (the whole sequence as one
  segment is the layout of accelerators)."""
  q, k, v, beta, g, s0 = prism_inputs(312, B=1, T=96, H=1, K=16, V=16, L=2)
  outs = [_loss(chunk_prism, None, chunk_size=16, segment_tokens=s, state_pass="scan")(
      q, k, v, beta, g, s0) for s in (16, 32, 96)]
  for (_, (o, final)), grads in outs[1:]:
    (_, (o0, final0)), grads0 = outs[0]
    assert_close("o", o0, o, 1e-5)
    assert_close("final state", final0, final, 1e-5)
    for name, r, x in zip(NAMES, grads0, grads):
      assert_close(name, r, x, 1e-5)


@pytest.mark.parametrize("bad", [0, 24, -16])
def test_segment_tokens_must_be_whole_chunks(bad):
  q, k, v, beta, g, _ = prism_inputs(7, B=1, T=64, H=1, K=8, V=8, L=1)
  with pytest.raises(ValueError, match="segment_tokens must be a positive multiple of "
                                       "chunk_size 16, got " + str(bad)):
    chunk_prism(q, k, v, beta, g, chunk_size=16, segment_tokens=bad)


def test_traced_scale_gets_its_gradient():
  """A learnable query scale: a traced array through the segments, with its cotangent."""
  q, k, v, beta, g, s0 = prism_inputs(313, B=1, T=96, H=2, K=16, V=8, L=2)

  def loss(fn, **kw):
    def f(scale):
      o, final = fn(q, k, v, beta, g, initial_state=s0, output_final_state=True, scale=scale,
                    **kw)
      return jnp.sum(jnp.sin(o)) + jnp.sum(final**2)
    return quick_jit(jax.value_and_grad(f))(jnp.float32(0.3))

  value_ref, d_ref = loss(naive_prism)
  value, d = loss(chunk_prism, chunk_size=16, segment_tokens=32, state_pass="scan")
  assert_close("loss", value_ref, value)
  assert_close("d scale", d_ref, d, 1e-4)
