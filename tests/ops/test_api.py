"""Input validation: bad shapes, ranks, dtypes and options fail with a message naming them."""

import jax
import jax.numpy as jnp
import pytest

from host_random import prism_inputs
from prism_jax.ops import prism_recurrence, prism_step


@pytest.fixture(scope="module")
def inputs():
  return prism_inputs(0, B=2, T=5, H=2, K=8, V=6, L=2)


def call(q, k, v, beta, g, s0=None, **kw):
  return prism_recurrence(q, k, v, beta, g, initial_state=s0, **kw)


@pytest.mark.parametrize("which,bad,pattern", [
    ("q", jnp.ones((2, 5, 2)), r"q must have rank 4 \[B, T, H, K\], got shape \(2, 5, 2\)"),
    ("k", jnp.ones((2, 5, 2, 2, 7)), r"k has shape \(2, 5, 2, 2, 7\), expected \(2, 5, 2, 2, 8\)"),
    ("k", jnp.ones((2, 5, 2, 8)), r"k must have rank 5"),
    ("v", jnp.ones((2, 4, 2, 2, 6)), r"v has shape \(2, 4, 2, 2, 6\), expected \(2, 5, 2, 2, 6\)"),
    ("beta", jnp.ones((2, 5, 2, 3)), r"beta has shape \(2, 5, 2, 3\), expected \(2, 5, 2, 2\)"),
    ("g", jnp.ones((2, 5, 3)), r"g has shape \(2, 5, 3\), expected \(2, 5, 2\)"),
    ("q", jnp.ones((2, 5, 2, 8), jnp.int32), r"q must have a floating dtype, got int32"),
    ("s0", jnp.ones((2, 2, 6, 8)), r"initial_state has shape \(2, 2, 6, 8\), expected"),
], ids=["q-rank", "k-dim", "k-rank", "v-length", "beta-L", "g-heads", "q-int", "s0-KV"])
def test_bad_arrays_are_named(inputs, which, bad, pattern):
  args = dict(zip(("q", "k", "v", "beta", "g", "s0"), inputs))
  args[which] = bad
  with pytest.raises(ValueError, match=pattern):
    call(**args)


@pytest.mark.parametrize("kw,pattern", [
    (dict(impl="fast"), r"impl must be one of .* got 'fast'"),
    (dict(chunk_size=48), r"chunk_size must be a power of two >= 16, got 48"),
    (dict(chunk_size=8), r"chunk_size must be a power of two >= 16, got 8"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), r"segment_ids has shape \(2, 4\)"),
    (dict(segment_ids=jnp.zeros((2, 5))), r"segment_ids must have an integer dtype"),
])
def test_bad_options_are_named(inputs, kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    call(*inputs, **kw)


def test_validation_is_static_under_jit(inputs):
  q, k, v, beta, g, s0 = inputs
  with pytest.raises(ValueError, match="g has shape"):
    jax.jit(call)(q, k, v, beta, g[:, :, :1], s0)


def test_step_validation(inputs):
  q, k, v, beta, g = (x[:, 0] for x in inputs[:5])  # drop the time axis
  s0 = inputs[5]
  with pytest.raises(ValueError, match=r"state has shape \(2, 2, 6, 8\), expected \(2, 2, 8, 6\)"):
    prism_step(q, k, v, beta, g, jnp.swapaxes(s0, -1, -2))
  with pytest.raises(ValueError, match=r"g must have rank 2 \[B, H\]"):
    prism_step(q, k, v, beta, g[..., None], s0)


def test_auto_picks_the_kernels_only_where_they_were_measured_faster(monkeypatch):
  from prism_jax.ops import resolve_impl
  x = lambda K, L, dtype: (jnp.zeros((1, 8, 1, K), dtype), jnp.zeros((1, 8, 1, L, K), dtype))
  assert resolve_impl("auto", *x(64, 2, jnp.bfloat16)) == "chunk"  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert resolve_impl("auto", *x(64, 2, jnp.bfloat16)) == "pallas"
  assert resolve_impl("auto", *x(96, 3, jnp.bfloat16)) == "pallas"  # padded to 128
  assert resolve_impl("auto", *x(64, 2, jnp.float32)) == "chunk"  # not timed
  assert resolve_impl("auto", *x(64, 5, jnp.bfloat16)) == "chunk"  # the kernels take L <= 4
  assert resolve_impl("auto", *x(64, 2, jnp.bfloat16), chunk_size=128) == "chunk"
  assert resolve_impl("chunk", *x(64, 2, jnp.bfloat16)) == "chunk"
  monkeypatch.setattr(jax, "device_count", lambda: 2)  # the custom calls are not partitioned
  assert resolve_impl("auto", *x(64, 2, jnp.bfloat16)) == "chunk"
