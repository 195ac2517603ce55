"""Checkpointer: round trip, the last k plus the best by eval loss, weights-only restore,
shape mismatches and damaged files reported as CheckpointError."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.train import sharding as shd
from prism_jax.train.checkpoint import CheckpointError, Checkpointer, restore_params


def _state(seed, width=6):
  rng = np.random.default_rng(seed)
  params = {"layers": {"0": {"w": jnp.asarray(rng.normal(size=(4, width)), jnp.float32)}},
            "norm": {"scale": jnp.asarray(rng.normal(size=(width,)), jnp.float32)}}
  return {"params": params, "opt_state": (jnp.asarray(seed, jnp.int32),
                                          jax.tree.map(lambda x: x * 0.5, params)),
          "step": jnp.asarray(seed, jnp.int32), "rng": jnp.asarray([seed, 7], jnp.uint32)}


def _abstract(tree):
  repl = shd.replicated(shd.make_mesh())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), tree)


def test_keeps_last_k_and_best(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "c"), keep=2, use_async=True)
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5}
  for step, loss in losses.items():
    ckpt.save(step, _state(step), {"step": step},
              None if loss is None else {"eval_loss": loss})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4, 5]          # best (2) plus the last two
  state, meta = ckpt.restore(5, _abstract(_state(0)))
  assert meta == {"step": 5}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(5))):
    np.testing.assert_array_equal(a, b)
  ckpt.close()


def test_weights_only_and_errors(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=3, use_async=False)
  ckpt.save(3, _state(3), {"step": 3})
  ckpt.close()
  params, step = restore_params(str(tmp_path / "run"), _abstract(_state(0)["params"]))
  assert step == 3
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_state(3)["params"])):
    np.testing.assert_array_equal(a, b)

  with pytest.raises(CheckpointError, match=r"incompatible with this model: params/layers/0/w "
                                            r"has shape \(4, 6\), the model wants \(4, 8\)"):
    restore_params(str(tmp_path / "run"), _abstract(_state(0, width=8)["params"]))
  with pytest.raises(CheckpointError, match="holds no finished checkpoint"):
    os.makedirs(tmp_path / "empty")
    restore_params(str(tmp_path / "empty"), _abstract(_state(0)["params"]))

  state_dir = tmp_path / "run" / "checkpoints" / "3" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  again = Checkpointer(str(tmp_path / "run" / "checkpoints"), use_async=False)
  with pytest.raises(CheckpointError, match="checkpoint .*/3 cannot be read .* delete that step"):
    again.restore(3, _abstract(_state(0)))
  again.close()
