"""The causal language model and sampling from it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.layers import RMSNorm
from prism_jax.layers.common import annotated, check_segment_ids, dense, resolve_dtype
from prism_jax.models.blocks import Block
from prism_jax.models.config import ModelConfig


class Backbone(nnx.Module):
  """Token embeddings → N blocks (mixer per `cfg.mixer_pattern`) → final RMSNorm."""

  def __init__(self, cfg: ModelConfig, num_embeddings: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = resolve_dtype(cfg.dtype)
    param_dtype = resolve_dtype(cfg.param_dtype, "param_dtype")
    self.embed = nnx.Embed(num_embeddings, cfg.d_model, dtype=self.dtype,
                           param_dtype=param_dtype, rngs=rngs,
                           embedding_init=annotated(nnx.initializers.normal(cfg.init_std),
                                                    ("vocab", "embed")))
    self.blocks = nnx.List([Block(cfg, cfg.mixer_of_layer(i), rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)

  def _check_tokens(self, tokens: jax.Array, rank: int, layout: str) -> None:
    if tokens.ndim != rank or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array {layout}, got shape "
                       f"{tuple(tokens.shape)} dtype {tokens.dtype}")

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """Input vectors [..., D] of the ids `tokens`."""
    return self.embed(tokens)

  def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] → final hidden states [B, T, D]."""
    self._check_tokens(tokens, 2, "[B, T]")
    check_segment_ids(segment_ids, tokens)
    x = self.embed_tokens(tokens)
    for block in self.blocks:
      x = block(x, segment_ids)
    return self.final_norm(x)

  def init_cache(self, batch_size: int, max_len: int | None = None) -> list:
    """One cache per layer: recurrent state and conv window, or a KV cache of `max_len`
    (default `cfg.max_seq_len`) positions for attention layers."""
    return [b.init_cache(batch_size, max_len or self.cfg.max_seq_len) for b in self.blocks]

  def prefill_hidden(self, tokens: jax.Array, cache: list) -> tuple[jax.Array, list]:
    """The parallel (chunked) form from a cache: tokens [B, T] → ([B, T, D], new cache)."""
    self._check_tokens(tokens, 2, "[B, T]")
    return self._through_blocks("prefill", tokens, cache)

  def step_hidden(self, tokens: jax.Array, cache: list) -> tuple[jax.Array, list]:
    """One token per row: tokens [B] → ([B, D], new cache)."""
    self._check_tokens(tokens, 1, "[B]")
    return self._through_blocks("step", tokens, cache)

  def _through_blocks(self, method: str, tokens: jax.Array, cache: list):
    """Embed, run `Block.<method>(x, cache)` layer by layer, final norm; (hidden, caches)."""
    if len(cache) != len(self.blocks):
      raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}")
    x, new = self.embed_tokens(tokens), []
    for block, c in zip(self.blocks, cache):
      x, c = getattr(block, method)(x, c)
      new.append(c)
    return self.final_norm(x), new


class CausalLM(Backbone):
  """Decoder-only language model. `model(tokens [B, T], segment_ids)` → logits [B, T, vocab]
  float32. The output head is the transposed embedding (`cfg.tie_embeddings`) or its own
  Linear. `init_cache` / `prefill` / `decode_step` run it token by token in O(1) per token
  for recurrent layers."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, cfg.vocab_size, rngs=rngs)
    self.head = (None if cfg.tie_embeddings else
                 dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs,
                       dtype=self.dtype, param_dtype=resolve_dtype(cfg.param_dtype)))

  def logits(self, h: jax.Array) -> jax.Array:
    """Hidden [..., D] → logits [..., vocab] in float32."""
    out = self.embed.attend(h) if self.head is None else self.head(h)
    return out.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    return self.logits(self.hidden(tokens, segment_ids))

  def prefill(self, tokens: jax.Array, cache: list) -> tuple[jax.Array, list]:
    """tokens [B, T] after the cached context → (logits [B, T, vocab], new cache)."""
    h, cache = self.prefill_hidden(tokens, cache)
    return self.logits(h), cache

  def decode_step(self, tokens: jax.Array, cache: list) -> tuple[jax.Array, list]:
    """tokens [B] → (logits [B, vocab], new cache)."""
    h, cache = self.step_hidden(tokens, cache)
    return self.logits(h), cache


def count_parameters(cfg: ModelConfig) -> int:
  """Number of parameters of `CausalLM(cfg)`, from shapes only (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None):
  """Next token [B] from logits [B, vocab]: argmax at temperature 0, else a draw from
  softmax(logits / temperature) restricted to the top_k largest logits."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt, key, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  B, T0 = prompt.shape
  cache = model.init_cache(B, T0 + max_new_tokens)
  logits, cache = model.prefill(prompt, cache)
  keys = jax.random.split(key, max_new_tokens)
  first = _sample(logits[:, -1], keys[0], temperature, top_k)

  def body(carry, k):
    tok, cache = carry
    logits, cache = model.decode_step(tok, cache)
    return (_sample(logits, k, temperature, top_k), cache), tok

  (last, _), toks = jax.lax.scan(body, (first, cache), keys[1:])
  return jnp.concatenate([prompt, jnp.moveaxis(toks, 0, 1), last[:, None]], axis=1)


def generate(model: CausalLM, prompt: jax.Array, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, rng: jax.Array | None = None) -> jax.Array:
  """Extend prompt [B, T0] by `max_new_tokens` sampled tokens → [B, T0 + max_new_tokens].

  The prompt goes through the parallel (chunked) form once, then each new token is one
  `decode_step`. temperature 0 is greedy; `top_k` keeps only the k most likely tokens.
  """
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be an integer array [B, T0] with T0 >= 1, got shape "
                     f"{tuple(prompt.shape)} dtype {prompt.dtype}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= model.cfg.vocab_size:
    raise ValueError(f"top_k must be None or in [1, vocab_size={model.cfg.vocab_size}], got "
                     f"{top_k}")
  if max_new_tokens == 0:
    return prompt
  if rng is None:
    if temperature != 0:
      raise ValueError("generate: sampling with temperature > 0 needs an rng key")
    rng = jax.random.key(0)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt.astype(jnp.int32), rng, max_new_tokens,
                   float(temperature), top_k)
