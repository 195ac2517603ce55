"""A two-layer next-token model with logical axis names, for tests that must not depend on the
real models: it reads the current and the previous token (a learnable bigram/trigram table)."""

import jax.numpy as jnp
from flax import nnx


def _init(init, axes):
  return nnx.with_partitioning(init, axes, eager_sharding=False)


class ToyLM(nnx.Module):

  def __init__(self, vocab: int = 32, width: int = 16, hidden: int = 32, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs,
                           embedding_init=_init(nnx.initializers.normal(0.5), ("vocab", "embed")))
    self.prev = nnx.Linear(width, width, use_bias=False, rngs=rngs,
                           kernel_init=_init(nnx.initializers.lecun_normal(), ("embed", "mlp")))
    self.up = nnx.Linear(width, hidden, rngs=rngs,
                         kernel_init=_init(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                         bias_init=_init(nnx.initializers.zeros, ("mlp",)))
    self.down = nnx.Linear(hidden, vocab, rngs=rngs,
                           kernel_init=_init(nnx.initializers.lecun_normal(), ("mlp", "vocab")),
                           bias_init=_init(nnx.initializers.zeros, ("vocab",)))

  def __call__(self, tokens, segment_ids=None):
    x = self.embed(tokens)                                   # [B, T, D]
    shifted = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]   # previous token, zeros at t = 0
    h = jnp.tanh(self.up(x + self.prev(shifted)))            # [B, T, H]
    return self.down(h)                                      # [B, T, vocab]
