"""The PRISM mixer inside a Linen model through the NNX bridge: same numbers as the NNX
module, logical axes visible to Linen, and one optimiser step that lowers the loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prism_jax import layers, linen
from host_random import normal
from prism_jax.testing import assert_close
from quick_jit import quick_jit

D, H, K, B, T, VOCAB = 32, 2, 16, 2, 10, 23
# The sequential impl compiles fastest on CPU; which impl runs is irrelevant to the bridge.
OPTIONS = {"solver_steps": 2, "impl": "naive"}


class TinyLinenLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    x = x + linen.PrismMixer(D, H, K, options=OPTIONS, name="mixer")(nn.RMSNorm()(x))
    return nn.Dense(VOCAB)(nn.RMSNorm()(x))


def test_linen_model_trains_one_step():
  model = TinyLinenLM()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (B, T + 1), np.int32))
  variables = quick_jit(model.init)(jax.random.key(1), tokens[:, :-1])

  specs = nn.get_partition_spec(variables)["params"]["mixer"]["nnx"]
  assert tuple(specs["q_proj"]["kernel"]) == ("embed", "heads")
  assert tuple(specs["out"]["kernel"]) == ("heads", "embed")

  def loss_fn(params):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  params = variables["params"]
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @quick_jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  new_params, opt_state, loss, grads = train_step(params, opt_state)
  mixer_grads = jax.tree.leaves(nn.unbox(grads["mixer"]))
  assert mixer_grads and all(np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0
                             for g in mixer_grads)
  _, _, new_loss, _ = train_step(new_params, opt_state)  # the loss at the updated params
  assert float(new_loss) < float(loss)


def test_bridged_mixer_equals_the_nnx_module():
  x = normal(2, (B, T, D))
  bridged = linen.PrismMixer(D, H, K, options=OPTIONS)
  variables = quick_jit(bridged.init)(jax.random.key(3), x)
  nnx_mixer = layers.PrismMixer(D, H, K, rngs=nnx.Rngs(4), **OPTIONS)
  params = nn.unbox(variables["params"]["nnx"])
  nnx.update(nnx_mixer, nnx.State(jax.tree.map(jnp.asarray, params)))
  graphdef, state = nnx.split(nnx_mixer)
  assert_close("linen vs nnx", quick_jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x),
               quick_jit(bridged.apply)(variables, x))
