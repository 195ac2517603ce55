"""The jitted update: exact gradient accumulation, AdamW against a hand-written reference,
non-finite steps skipped, weight-decay mask and learning-rate schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from prism_jax.train import optim
from prism_jax.train.step import init_state, make_train_step
from quick_jit import quick_jit
from toy import ToyLM

OPTIM = dict(lr=1e-2, warmup_steps=3, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.1, decay_embeddings=False, decay_norms_and_biases=False,
             clip_norm=1.0)


def _setup(seed=0, **optim_overrides):
  model = ToyLM(rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def loss_sum(p, batch, rng):
    tokens = batch["tokens"]
    logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    mask = batch["mask"][:, 1:]
    return (ce * mask).sum(), mask.sum()

  cfg = ml_collections.ConfigDict({**OPTIM, **optim_overrides})
  tx, schedule = optim.make_optimizer(cfg, 20, params)
  return params, loss_sum, tx, schedule


def _batch(rng, rows=8, length=13):
  tokens = rng.integers(0, 32, (rows, length)).astype(np.int32)
  mask = (rng.random((rows, length)) < 0.7).astype(np.float32)   # uneven tokens per row
  return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}


def test_accumulation_equals_full_batch():
  params, loss_sum, tx, _ = _setup()
  rng = np.random.default_rng(0)
  batches = [_batch(rng) for _ in range(3)]
  states = {}
  for accum in (1, 4):
    step = quick_jit(make_train_step(loss_sum, tx, accum))
    state = init_state(params, tx, 0)
    losses = []
    for b in batches:
      state, m = step(state, b, jnp.float32(3e-3), jnp.asarray(False))
      losses.append(float(m["loss"]))
    states[accum] = (state, losses)
  for accum in (4,):
    np.testing.assert_allclose(states[accum][1], states[1][1], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(states[accum][0]["params"]),
                    jax.tree.leaves(states[1][0]["params"])):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_update_is_adamw_with_clipping():
  params, loss_sum, tx, _ = _setup()
  batch = _batch(np.random.default_rng(1))
  step = quick_jit(make_train_step(loss_sum, tx, 1))
  state = init_state(params, tx, 0)
  lrs = [1e-2, 5e-3]
  expected = jax.tree.map(np.asarray, params)
  mask = optim.decay_mask(params)
  m = jax.tree.map(np.zeros_like, expected)
  v = jax.tree.map(np.zeros_like, expected)
  grad = quick_jit(jax.grad(lambda p: loss_sum(p, batch, None)[0] / loss_sum(p, batch, None)[1]))
  for t, lr in enumerate(lrs, start=1):
    g = jax.tree.map(np.asarray, grad(jax.tree.map(jnp.asarray, expected)))
    norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in jax.tree.leaves(g)))
    g = jax.tree.map(lambda x: x * min(1.0, OPTIM["clip_norm"] / norm), g)
    m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
    v = jax.tree.map(lambda a, b: 0.95 * a + 0.05 * b * b, v, g)
    expected = jax.tree.map(
        lambda p, a, b, dec: p - lr * (a / (1 - 0.9 ** t) / (np.sqrt(b / (1 - 0.95 ** t)) + 1e-8)
                                       + (0.1 * p if dec else 0.0)), expected, m, v, mask)
    state, metrics = step(state, batch, jnp.float32(lr), jnp.asarray(False))
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_poisoned_step_is_skipped_and_counted():
  params, loss_sum, tx, _ = _setup()
  rng = np.random.default_rng(2)
  step = quick_jit(make_train_step(loss_sum, tx, 2))
  state = init_state(params, tx, 0)
  state, _ = step(state, _batch(rng), jnp.float32(1e-2), jnp.asarray(False))
  before = jax.tree.map(np.asarray, state)
  state, metrics = step(state, _batch(rng), jnp.float32(1e-2), jnp.asarray(True))
  assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
  assert int(state["skipped"]) == 1 and int(state["bad_in_row"]) == 1 and int(state["step"]) == 2
  for key in ("params", "opt_state", "rng"):
    for a, b in zip(jax.tree.leaves(state[key]), jax.tree.leaves(before[key])):
      np.testing.assert_array_equal(a, b)
  state, metrics = step(state, _batch(rng), jnp.float32(1e-2), jnp.asarray(False))
  assert bool(metrics["finite"]) and int(state["bad_in_row"]) == 0 and int(state["skipped"]) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["params"]),
                                                       jax.tree.leaves(before["params"])))


def test_decay_mask():
  params, _, _, _ = _setup()
  mask = optim.decay_mask(params)
  assert mask["embed"]["embedding"] is False and mask["up"]["bias"] is False
  assert mask["up"]["kernel"] is True and mask["down"]["kernel"] is True
  everything = optim.decay_mask(params, decay_embeddings=True, decay_norms_and_biases=True)
  assert all(jax.tree.leaves(everything))
  norms = {"block": {"norm": {"scale": np.ones(4)}, "attn_norm": {"scale": np.ones(4)}}}
  assert not any(jax.tree.leaves(optim.decay_mask(norms)))


def test_schedule_warmup_then_cosine():
  schedule = optim.lr_schedule(1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10)], [0.0, 0.5, 1.0], atol=1e-7)
  assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(0.1, rel=1e-5)
  assert float(schedule(500)) == pytest.approx(0.1, rel=1e-5)
