"""Small building blocks shared by the layers: annotated parameters, projections, norms.

Every parameter carries logical axis names ("embed", "heads", "kv", "mlp", "vocab", or None for
an axis that is never sharded) in its `out_sharding` metadata; `nnx.get_partition_spec(state)`
reads them back as `PartitionSpec`s of logical names. Eager sharding is off so modules build
without a mesh; the training code maps logical names to mesh axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str, field: str = "dtype"):
  """Map a dtype name ("float32", "bfloat16", "float16") to the jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"{field} must be one of {tuple(DTYPES)}, got {name!r}")
  return DTYPES[name]


def annotated(init, axes: Axes):
  """An initializer whose parameters carry the logical axis names `axes`."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def dense(in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs,
          use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
          init_std: float | None = None, bias_init=nnx.initializers.zeros) -> nnx.Linear:
  """A Linear layer with logical axis names `axes` = (input axis, output axis) on its kernel.

  The default kernel init is LeCun normal (std = in_features^-1/2); `init_std` overrides it.
  """
  kernel_init = (nnx.initializers.lecun_normal() if init_std is None
                 else nnx.initializers.normal(init_std))
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, kernel_init=annotated(kernel_init, axes),
                    bias_init=annotated(bias_init, axes[1:]), rngs=rngs)


class LowRank(nnx.Module):
  """x ↦ W_up (W_down x): a rank-r factorisation of a D_in × D_out projection, or a full
  Linear when `rank` is None."""

  def __init__(self, in_features: int, out_features: int, rank: int | None, out_axis: str,
               *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if rank is None:
      self.down = None
      self.up = dense(in_features, out_features, ("embed", out_axis), **kw)
    else:
      self.down = dense(in_features, rank, ("embed", None), **kw)
      self.up = dense(rank, out_features, (None, out_axis), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.up(x if self.down is None else self.down(x))


BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch (prism_jax.train.sharding)


def shard_batch(x: jax.Array) -> jax.Array:
  """Keep x's leading (batch) axis split over the mesh's batch axes, other axes left to XLA.

  A no-op unless a mesh with those axes is active (`jax.sharding.use_abstract_mesh`, as the
  training step sets it). Under FSDP the parameters are sharded over "fsdp" too, and without
  this hint XLA may gather whole activations onto every device around the parameter gathers.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  if size == 1 or x.shape[0] % size:
    return x
  spec = jax.sharding.PartitionSpec(axes, *[jax.sharding.PartitionSpec.UNCONSTRAINED]
                                    * (x.ndim - 1))
  return jax.lax.with_sharding_constraint(x, spec)


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / ‖x‖ over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) ⊙ w over the last axis (float32 statistics, x's dtype out).

  `axis_name` labels the scale for sharding ("embed" for the residual stream, "kv" for a
  per-head norm over the value dimension).
  """

  def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str | None = "embed",
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # the scale starts at one
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(axis_name,),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.scale.shape[0]:
      raise ValueError(f"RMSNorm: x has last axis {x.shape[-1]}, expected "
                       f"{self.scale.shape[0]} (x shape {tuple(x.shape)})")
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  """y = W_down (SiLU(W_gate x) ⊙ W_up x), x [..., D] → [..., D], hidden size F."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = dense(d_model, hidden, ("embed", "mlp"), **kw)
    self.up = dense(d_model, hidden, ("embed", "mlp"), **kw)
    self.down = dense(hidden, d_model, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def same_segment_mask(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """Causal attention mask [B, 1, T, T]: query t may see key j iff j ≤ t and both lie in the
  same packed sequence."""
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
  if segment_ids is None:
    return jnp.broadcast_to(causal, (batch, 1, length, length))
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return causal & same


def check_input(name: str, x: jax.Array, rank: int, layout: str, last: int | None = None):
  """ValueError naming `name` when x's rank or last axis break the layout."""
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")
  if last is not None and x.shape[-1] != last:
    raise ValueError(f"{name} must have last axis {last} {layout}, got shape {tuple(x.shape)}")


def check_segment_ids(segment_ids: jax.Array | None, x: jax.Array) -> None:
  if segment_ids is None:
    return
  if tuple(segment_ids.shape) != tuple(x.shape[:2]):
    raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected [B, T] = "
                     f"{tuple(x.shape[:2])} from x {tuple(x.shape)}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")
