"""Causal softmax self-attention with rotary position embeddings and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.layers.common import check_input, check_segment_ids, dense, same_segment_mask


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary embedding on x [B, T, N, Dh] at integer positions [B, T] (rotate-half layout):
  pairs (x_i, x_{i+Dh/2}) turn by the angle position · theta^{−2i/Dh}."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, Dh/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


IMPLEMENTATIONS = ("auto", "xla", "cudnn")


class CausalSelfAttention(nnx.Module):
  """softmax(Q Kᵀ / sqrt(Dh) + mask) V with RoPE on Q and K, via `jax.nn.dot_product_attention`.

  x [B, T, D] → [B, T, D]. The mask is causal and, with segment_ids, block-diagonal over the
  packed sequences (RoPE is relative, so absolute positions across a pack are harmless).
  `num_kv_heads` < `num_heads` gives grouped-query attention. The decode cache holds keys and
  values [B, max_len, N_kv, Dh] and the number of filled positions.

  `implementation`: "xla" materialises the [T, T] scores (any backend, any mask); "cudnn" is
  cuDNN's fused flash attention (GPU, bf16/fp16, head_dim a multiple of 8 up to 128, causal mask
  only: memory linear in T); "auto" takes cuDNN for the causal training call wherever it
  applies and XLA otherwise (packed segments, the cache, CPU/TPU, float32).
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               num_kv_heads: int | None = None, rope_theta: float = 10000.0,
               max_len: int = 2048, dtype=jnp.float32, param_dtype=jnp.float32,
               implementation: str = "auto", rngs: nnx.Rngs):
    num_kv_heads = num_kv_heads or num_heads
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"CausalSelfAttention: implementation must be one of {IMPLEMENTATIONS}, "
                       f"got {implementation!r}")
    for name, val in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim),
                      ("num_kv_heads", num_kv_heads), ("max_len", max_len)):
      if not isinstance(val, int) or val < 1:
        raise ValueError(f"CausalSelfAttention: {name} must be a positive int, got {val!r}")
    if head_dim % 2:
      raise ValueError(f"CausalSelfAttention: head_dim must be even for RoPE, got {head_dim}")
    if num_heads % num_kv_heads:
      raise ValueError(f"CausalSelfAttention: num_heads={num_heads} must be a multiple of "
                       f"num_kv_heads={num_kv_heads}")
    self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
    self.num_kv_heads, self.rope_theta, self.max_len = num_kv_heads, rope_theta, max_len
    self.dtype, self.implementation = dtype, implementation
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = dense(d_model, num_heads * head_dim, ("embed", "heads"), **kw)
    self.k_proj = dense(d_model, num_kv_heads * head_dim, ("embed", "heads"), **kw)
    self.v_proj = dense(d_model, num_kv_heads * head_dim, ("embed", "heads"), **kw)
    self.out = dense(num_heads * head_dim, d_model, ("heads", "embed"), **kw)

  def _qkv(self, x: jax.Array, positions: jax.Array):
    B, T, _ = x.shape
    x = x.astype(self.dtype)
    q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

  def _attend(self, q, k, v, mask, x):
    """Attention with `mask`, or cuDNN's causal flash attention where mask is None."""
    kw = (dict(mask=mask) if mask is not None
          else dict(is_causal=True, implementation="cudnn"))
    o = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), **kw)
    return self.out(o.reshape(*o.shape[:2], -1)).astype(x.dtype)

  def _fused(self, q: jax.Array, segment_ids: jax.Array | None) -> bool:
    """Whether the causal training call runs as cuDNN flash attention."""
    if self.implementation != "auto":
      return self.implementation == "cudnn"
    return (segment_ids is None and jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and self.head_dim % 8 == 0 and self.head_dim <= 128)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    check_input("x", x, 3, "[B, T, D]", self.d_model)
    check_segment_ids(segment_ids, x)
    B, T, _ = x.shape
    q, k, v = self._qkv(x, jnp.broadcast_to(jnp.arange(T), (B, T)))
    if not self._fused(q, segment_ids):
      return self._attend(q, k, v, same_segment_mask(segment_ids, B, T), x)
    if segment_ids is not None:
      raise ValueError("CausalSelfAttention: implementation='cudnn' takes no segment_ids "
                       "(its mask is causal only); use 'xla' or 'auto' for packed sequences")
    return self._attend(q, k, v, None, x)

  def init_cache(self, batch_size: int, max_len: int | None = None) -> dict:
    """Empty KV cache of `max_len` positions (default: the module's max_len)."""
    S = max_len or self.max_len
    shape = (batch_size, S, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "index": jnp.zeros((), jnp.int32)}

  def prefill(self, x: jax.Array, cache: dict | None = None,
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Attend x [B, T, D] after the cached positions and append its keys and values."""
    check_input("x", x, 3, "[B, T, D]", self.d_model)
    if segment_ids is not None:
      raise ValueError("CausalSelfAttention.prefill: segment_ids are not supported with a cache "
                       "(one sequence per row)")
    B, T, _ = x.shape
    cache = cache or self.init_cache(B, T)
    S = cache["k"].shape[1]
    start = cache["index"]
    q, k, v = self._qkv(x, jnp.broadcast_to(start + jnp.arange(T), (B, T)))
    ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
    cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
    visible = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]  # [T, S]
    y = self._attend(q, ck, cv, visible[None, None], x)
    return y, {"k": ck, "v": cv, "index": start + T}

  def step(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token: x [B, D] → (y [B, D], cache with the token appended)."""
    check_input("x", x, 2, "[B, D]", self.d_model)
    y, cache = self.prefill(x[:, None], cache)
    return y[:, 0], cache
