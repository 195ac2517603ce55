"""A residual block and the mixer factory that maps config names to layers."""

from __future__ import annotations

import jax
from flax import nnx

from prism_jax.layers import (CausalSelfAttention, ExplicitSolver, GatedDeltaNet,
                              GatedLinearAttention, LinearAttention, MixtureOfMemories,
                              PrismMixer, RMSNorm, SwiGLU)
from prism_jax.layers.common import resolve_dtype, shard_batch
from prism_jax.models.config import ModelConfig


def make_mixer(name: str, cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The token mixer called `name` (one of config.MIXERS) with the sizes of `cfg`."""
  kw = dict(dtype=resolve_dtype(cfg.dtype),
            param_dtype=resolve_dtype(cfg.param_dtype, "param_dtype"), rngs=rngs)
  shared = dict(value_head_dim=cfg.value_head_dim, conv_width=cfg.conv_width,
                use_short_conv=cfg.use_short_conv, norm_eps=cfg.norm_eps, **kw)
  D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
  recurrence = dict(impl=cfg.impl, chunk_size=cfg.chunk_size)
  diag = dict(chunk_size=cfg.gla_chunk_size)
  if name == "prism":
    return PrismMixer(D, H, K, solver_steps=cfg.solver_steps,
                      use_nonlinearity=cfg.use_nonlinearity, use_gain=cfg.use_gain,
                      key_rank=cfg.key_rank, gain_rank=cfg.gain_rank, **recurrence, **shared)
  if name == "gdn":
    return GatedDeltaNet(D, H, K, **recurrence, **shared)
  if name == "la":
    return LinearAttention(D, H, K, **diag, **shared)
  if name == "gla":
    return GatedLinearAttention(D, H, K, gate_rank=cfg.gla_gate_rank, **diag, **shared)
  if name == "mom":
    return MixtureOfMemories(D, H, K, num_memories=cfg.num_memories, top_k=cfg.top_k_memories,
                             gate_rank=cfg.gla_gate_rank, **diag, **shared)
  if name == "explicit":
    return ExplicitSolver(D, H, K, solver_steps=cfg.solver_steps, **shared)
  if name == "attention":
    return CausalSelfAttention(D, cfg.attn_heads, cfg.attn_head_dim,
                               num_kv_heads=cfg.attn_kv_heads, rope_theta=cfg.rope_theta,
                               max_len=cfg.max_seq_len, **kw)
  raise ValueError(f"unknown mixer {name!r}")


class Block(nnx.Module):
  """x ← x + Mixer(RMSNorm(x));  x ← x + SwiGLU(RMSNorm(x)).   x [B, T, D]."""

  def __init__(self, cfg: ModelConfig, mixer: str, *, rngs: nnx.Rngs):
    dtype = resolve_dtype(cfg.dtype)
    param_dtype = resolve_dtype(cfg.param_dtype, "param_dtype")
    self.mixer_name = mixer
    self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.mixer = make_mixer(mixer, cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden_size, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    x = shard_batch(x)
    x = x + self.mixer(self.mixer_norm(x), segment_ids)
    return shard_batch(x + self.mlp(self.mlp_norm(x)))

  def init_cache(self, batch_size: int, max_len: int | None = None):
    return self.mixer.init_cache(batch_size, max_len)

  def prefill(self, x: jax.Array, cache) -> tuple[jax.Array, object]:
    """The parallel form of the block from a decode cache; x [B, T, D]."""
    y, cache = self.mixer.prefill(self.mixer_norm(x), cache)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache

  def step(self, x: jax.Array, cache) -> tuple[jax.Array, object]:
    """One token; x [B, D]."""
    y, cache = self.mixer.step(self.mixer_norm(x), cache)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache
