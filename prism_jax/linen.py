"""The mixers as Flax Linen modules, through `flax.nnx.bridge`, for Linen code bases.

    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        return x + PrismMixer(d_model=64, num_heads=2, head_dim=32)(nn.RMSNorm()(x))

The NNX module's parameters appear as Linen params under the mixer's scope, boxed in
`bridge.NNXMeta` that keeps their logical axis names (`nn.get_partition_spec(variables)` reads
them), so `init`, `apply`, `jax.grad` and optax work unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
from flax.core import FrozenDict
from flax.nnx import bridge

from prism_jax import layers


class _Bridged(nn.Module):
  """Shared body: build the NNX class with the fields below and call it."""

  d_model: int
  num_heads: int
  head_dim: int
  options: Mapping[str, Any] = FrozenDict()

  nnx_class = None

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    module = bridge.to_linen(self.nnx_class, self.d_model, self.num_heads, self.head_dim,
                             name="nnx", **dict(self.options))
    return module(x, segment_ids)


class PrismMixer(_Bridged):
  """`prism_jax.layers.PrismMixer` as a Linen module; `options` holds its keyword arguments
  (solver_steps, conv_width, ablation flags, impl, chunk_size, dtypes, ...)."""

  nnx_class = layers.PrismMixer


class GatedDeltaNet(_Bridged):
  """`prism_jax.layers.GatedDeltaNet` as a Linen module."""

  nnx_class = layers.GatedDeltaNet
