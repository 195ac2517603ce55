"""ShortConv, RMSNorm, SwiGLU and LowRank against direct formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism_jax.layers import LowRank, RMSNorm, ShortConv, SwiGLU, l2norm
from host_random import normal
from prism_jax.testing import assert_close


def conv_loop(kernel, x, segment_ids):
  """y_t = Σ_i W_i x_{t−w+1+i} over taps inside the same segment, float64."""
  kernel, x = np.asarray(kernel, np.float64), np.asarray(x, np.float64)
  w = kernel.shape[0]
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for i in range(w):
        s = t - (w - 1) + i
        if s >= 0 and segment_ids[b, s] == segment_ids[b, t]:
          y[b, t] += kernel[i] * x[b, s]
  return y


@pytest.mark.parametrize("width", [1, 4])
def test_short_conv_matches_loop_with_segments_and_cache(width):
  C, B, T = 5, 2, 13
  conv = ShortConv(C, width, rngs=nnx.Rngs(width))
  x = np.asarray(normal(0, (B, T, C)))  # sliced on the host below
  seg = np.stack([np.arange(T) // 6, np.zeros(T, int)]).astype(np.int32)
  run = nnx.jit(lambda m, x, s, c: m(x, s, c))
  y, _ = run(conv, x, jnp.asarray(seg), None)
  assert_close("conv", conv_loop(conv.kernel[...], x, seg), y)
  # The window carries across calls: [0, 8) then [8, 13) == one call.
  y1, cache = run(conv, x[:, :8], None, None)
  y2, _ = run(conv, x[:, 8:], None, cache)
  y_full, _ = run(conv, x, None, None)
  assert_close("conv split", y_full, np.concatenate([y1, y2], 1))
  assert cache.shape == (B, width - 1, C)
  graphdef, state = nnx.split(conv)
  cot = normal(1, (B, T, C))
  grad = jax.jit(jax.grad(lambda st: jnp.sum(nnx.merge(graphdef, st)(x)[0] * cot)))(state)
  ref = jax.grad(lambda k: jnp.sum(conv_loop_jax(k, x) * cot))(conv.kernel[...])
  assert_close("conv kernel gradient", ref, grad["kernel"][...])


def conv_loop_jax(kernel, x):
  w, T = kernel.shape[0], x.shape[1]
  xp = jnp.pad(x, ((0, 0), (w - 1, 0), (0, 0)))
  return sum(kernel[i] * xp[:, i:i + T] for i in range(w))


def test_rmsnorm_swiglu_lowrank_l2norm_formulas():
  D, F = 8, 12
  x = normal(1, (3, D)) * 3.0
  norm = RMSNorm(D, eps=1e-6)
  norm.scale[...] = normal(2, (D,))
  x64 = np.asarray(x, np.float64)
  expected = x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
  assert_close("rmsnorm", expected, norm(x))
  mlp = SwiGLU(D, F, rngs=nnx.Rngs(0))
  k = lambda lin: np.asarray(lin.kernel[...], np.float64)
  a = x64 @ k(mlp.gate)
  assert_close("swiglu", ((a / (1 + np.exp(-a))) * (x64 @ k(mlp.up))) @ k(mlp.down), mlp(x))
  low = LowRank(D, F, 3, "heads", rngs=nnx.Rngs(0))
  assert low.down.kernel.shape == (D, 3) and low.up.kernel.shape == (3, F)
  assert np.linalg.matrix_rank(np.asarray(k(low.down) @ k(low.up))) == 3
  assert_close("l2norm", x64 / np.linalg.norm(x64, axis=-1, keepdims=True), l2norm(x))
  with pytest.raises(ValueError, match="RMSNorm: x has last axis 5, expected 8"):
    norm(jnp.ones((2, 5)))
  with pytest.raises(ValueError, match="ShortConv: width must be >= 1, got 0"):
    ShortConv(4, 0, rngs=nnx.Rngs(0))
