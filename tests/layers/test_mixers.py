"""Every token mixer: sequence form == step-by-step decode == split prefill, packed sequences
do not interact, and every parameter gets a finite, non-zero gradient.

Shapes are fixed per mixer so that each test compiles only a few functions (CPU CI time).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism_jax.layers import (CausalSelfAttention, ExplicitSolver, GatedDeltaNet,
                              GatedLinearAttention, LinearAttention, MixtureOfMemories,
                              PrismMixer)
from host_random import normal
from prism_jax.testing import assert_close
from quick_jit import quick_init, quick_jit

D, H, K, B, T, PIECE = 32, 2, 16, 2, 21, 7

MIXERS = {
    # H·V != D brings in the learned map u = W_u U; k² and the gains are low-rank.
    "prism": lambda rngs: PrismMixer(D, H, K, value_head_dim=12, solver_steps=3, key_rank=4,
                                     gain_rank=6, chunk_size=16, rngs=rngs),
    "gdn": lambda rngs: GatedDeltaNet(D, H, K, impl="naive", rngs=rngs),
    "la": lambda rngs: LinearAttention(D, H, K, chunk_size=8, rngs=rngs),
    "gla": lambda rngs: GatedLinearAttention(D, H, K, gate_rank=4, chunk_size=8, rngs=rngs),
    "mom": lambda rngs: MixtureOfMemories(D, H, K, num_memories=3, top_k=2, gate_rank=4,
                                          chunk_size=8, rngs=rngs),
    "explicit": lambda rngs: ExplicitSolver(D, H, K, solver_steps=2, rngs=rngs),
    "attention": lambda rngs: CausalSelfAttention(D, H, K, num_kv_heads=1, max_len=T,
                                                  rngs=rngs),
}


class Compiled:
  """Jitted entry points of one mixer at fixed shapes: x [B, T, D], pieces of PIECE tokens."""

  def __init__(self, mixer):
    self.mixer = mixer
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
    self.params = params
    merge = lambda p: nnx.merge(graphdef, p, rest)

    def loss(p, x, segment_ids, cotangent):
      y = merge(p)(x, segment_ids)
      return jnp.sum(y * cotangent), y

    self.value_and_grad = quick_jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

    @quick_jit
    def prefill(p, x, cache):
      return merge(p).prefill(x, cache)

    @quick_jit
    def steps(p, x, cache):
      def body(cache, x_t):
        y_t, cache = merge(p).step(x_t, cache)
        return cache, y_t
      cache, y = jax.lax.scan(body, cache, jnp.moveaxis(x, 1, 0))
      return jnp.moveaxis(y, 0, 1), cache

    self.prefill, self.steps = prefill, steps

  def forward(self, x, segment_ids):
    # The gradient function also returns y: reusing it saves a second compile per mixer.
    (_, _), y = self.value_and_grad(self.params, x, segment_ids, np.zeros_like(x))
    return np.asarray(y)


@pytest.fixture(scope="module", params=list(MIXERS))
def case(request):
  return request.param, Compiled(quick_init(MIXERS[request.param], seed=1))


def single_segment():
  return jnp.zeros((B, T), jnp.int32)


def test_forward_equals_step_by_step_decode_and_split_prefill(case):
  """One forward pass == token-by-token `step` from an empty cache == prefill(7) →
  prefill(7) → 7 steps (the cache carries state, conv window and KV between calls)."""
  name, c = case
  x = np.asarray(normal(2, (B, T, D)))  # sliced on the host below (no compiles)
  y = c.forward(x, single_segment())
  assert y.shape == (B, T, D) and y.dtype == jnp.float32
  assert float(np.std(y)) > 1e-3

  cache, pieces = c.mixer.init_cache(B, T), []
  for start in range(0, T, PIECE):
    y_piece, cache = c.steps(c.params, x[:, start:start + PIECE], cache)
    pieces.append(y_piece)
  assert_close(f"{name}: steps vs forward", y, np.concatenate(pieces, axis=1), tol=1e-5)

  cache = c.mixer.init_cache(B, T)
  y1, cache = c.prefill(c.params, x[:, :PIECE], cache)
  y2, cache = c.prefill(c.params, x[:, PIECE:2 * PIECE], cache)
  y3, _ = c.steps(c.params, x[:, 2 * PIECE:], cache)
  assert_close(f"{name}: prefill, prefill, steps vs forward", y,
               np.concatenate([y1, y2, y3], axis=1), tol=1e-5)


def test_packed_sequences_do_not_interact(case):
  """With segment ids each packed sequence gives what it gives alone: the recurrent state,
  the conv window and the attention mask all restart at a boundary. A sequence run alone
  sits at the start of a row followed by unrelated tokens (causality makes them irrelevant)."""
  name, c = case
  lengths = [(6, 11, 4), (15, 2, 4)]
  x = np.asarray(normal(3, (B, T, D)))
  segment_ids = jnp.asarray(np.stack([np.repeat(np.arange(3), n) for n in lengths]))
  y = c.forward(x, segment_ids)
  starts = [np.cumsum((0,) + row[:-1]) for row in lengths]
  for i in range(3):
    alone = np.array(normal(4 + i, (B, T, D)))
    for b in range(B):
      s, n = starts[b][i], lengths[b][i]
      alone[b, :n] = x[b, s:s + n]
    y_alone = c.forward(alone, single_segment())
    for b in range(B):
      s, n = starts[b][i], lengths[b][i]
      assert_close(f"{name}: row {b} segment {i}", y_alone[b, :n], y[b, s:s + n], tol=1e-5)
  # Without the ids the same packed rows do interact.
  assert not np.allclose(y, c.forward(x, single_segment()), atol=1e-4)


def test_every_parameter_gets_a_finite_nonzero_gradient(case):
  name, c = case
  x = normal(8, (B, T, D))
  cotangent = normal(9, (B, T, D))
  (grads, gx), _ = c.value_and_grad(c.params, x, single_segment(), cotangent)
  flat = nnx.to_flat_state(grads)
  assert len(flat) == len(nnx.to_flat_state(c.params))
  for path, g in flat:
    g = np.asarray(g.get_value())
    assert np.all(np.isfinite(g)), f"{name}: non-finite gradient at {path}"
    assert np.max(np.abs(g)) > 0, f"{name}: zero gradient at {path}"
  assert np.all(np.isfinite(np.asarray(gx))) and np.max(np.abs(np.asarray(gx))) > 0


def test_parameters_carry_logical_axis_names(case):
  name, c = case
  allowed = {"embed", "heads", "kv", "mlp", "vocab", None}
  values = dict(nnx.to_flat_state(c.params))
  for path, spec in nnx.to_flat_state(nnx.get_partition_spec(c.params)):
    names = tuple(spec.get_value())
    assert len(names) == values[path].get_value().ndim, f"{name}: {path} has spec {names}"
    assert set(names) <= allowed, f"{name}: {path} has spec {names}"


def test_bad_inputs_are_named(case):
  name, c = case
  with pytest.raises(ValueError, match=r"x must have last axis 32"):
    c.mixer(jnp.ones((B, 5, D + 1)))
  with pytest.raises(ValueError, match=r"x must have rank 3"):
    c.mixer(jnp.ones((5, D)))
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 4\), expected"):
    c.mixer(jnp.ones((B, 5, D)), jnp.zeros((B, 4), jnp.int32))


def apply(module, x):
  graphdef, state = nnx.split(module)
  return quick_jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def test_bfloat16_compute_tracks_float32():
  """bf16 matmuls with float32 parameters and state stay close to the float32 module."""
  kw = dict(solver_steps=2, chunk_size=16)
  f32 = quick_init(lambda rngs: PrismMixer(D, H, K, rngs=rngs, **kw), seed=0)
  bf16 = quick_init(lambda rngs: PrismMixer(D, H, K, dtype=jnp.bfloat16, rngs=rngs, **kw), seed=1)
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  x = normal(12, (B, T, D))
  y32 = apply(f32, x)
  y16 = apply(bf16, normal(12, (B, T, D), jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  # bf16 keeps 8 mantissa bits and the error compounds over the projections, the solver and
  # the recurrence: ~1e-2 relative RMS is what bf16 activations give; a real bug gives O(1).
  assert_close("prism: bf16 vs f32", y32, y16.astype(jnp.float32), tol=3e-2)
