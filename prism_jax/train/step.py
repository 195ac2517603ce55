"""The jitted training and evaluation steps over a plain-dict train state.

State: {"params", "opt_state", "step", "rng", "bad_in_row", "skipped"}. One update:

    g = (Σ_micro ∇ Σ_tokens ℓ) / Σ_micro n_tokens        (gradient accumulation, exact mean)
    if loss and ‖g‖ are finite: params, opt_state <- AdamW(g)   else: keep both, count the skip
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

# loss_sum_fn(params, batch, rng) -> (Σ token losses, number of tokens), both float32 scalars.
LossSumFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, jax.Array]]


def init_state(params, tx: optax.GradientTransformation, seed: int) -> dict:
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(seed)),
          "bad_in_row": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}


def _split_micro(batch: dict, grad_accum: int) -> dict:
  """[B, ...] -> [A, B / A, ...] taking rows i, i + A, ... into micro-batch i.

  Strided rows keep each micro-batch spread over the same devices as the full batch.
  """
  def split(x):
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(loss_sum_fn: LossSumFn, tx: optax.GradientTransformation, grad_accum: int):
  """step(state, batch, lr, poison) -> (state, metrics).

  `tx` is the optimizer without its learning rate; the update is p <- p - lr · tx(g).
  `poison` (bool) makes the loss NaN (a test hook for the non-finite path).
  """

  def step(state: dict, batch: dict, lr: jax.Array, poison: jax.Array):
    params = state["params"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    poison_scale = jnp.where(poison, jnp.nan, 1.0).astype(jnp.float32)

    def micro_grads(carry, inputs):
      grad_acc, loss_acc, count_acc = carry
      index, micro = inputs
      def objective(p):
        loss_sum, count = loss_sum_fn(p, micro, jax.random.fold_in(rng, index))
        return loss_sum * poison_scale, count
      (loss_sum, count), grads = jax.value_and_grad(objective, has_aux=True)(params)
      grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
      return (grad_acc, loss_acc + loss_sum, count_acc + count), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if grad_accum == 1:
      # No scan for the common case: it costs compile time and blocks some fusions on CPU.
      (grads, loss_sum, count), _ = micro_grads(carry, (0, batch))
    else:
      (grads, loss_sum, count), _ = jax.lax.scan(
          micro_grads, carry, (jnp.arange(grad_accum), _split_micro(batch, grad_accum)))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, params)
    loss = loss_sum / count
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    direction, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, direction)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "params": keep(new_params, params),
        "opt_state": keep(new_opt, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
        "bad_in_row": jnp.where(finite, 0, state["bad_in_row"] + 1),
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": count}
    return new_state, metrics

  return step

