"""Typed configuration of the models and its presets."""

from __future__ import annotations

import dataclasses

from prism_jax.layers.common import DTYPES
from prism_jax.ops.api import IMPLS

MIXERS = ("prism", "gdn", "la", "gla", "mom", "attention", "explicit")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of `CausalLM` and `SequentialRecommender`.

  `mixer_pattern` is cycled over the layers: ("prism",) is all-PRISM, and
  ("prism", "prism", "prism", "attention") the 3 : 1 hybrid. Names: "prism", "gdn" (Gated
  DeltaNet), "la" (linear attention), "gla", "mom" (mixture of memories), "attention"
  (softmax) and "explicit" (the state-dependent solver of spec §6).
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 2
  head_dim: int = 64
  value_head_dim: int | None = None  # None: equal to head_dim
  mixer_pattern: tuple[str, ...] = ("prism",)
  solver_steps: int = 2
  conv_width: int = 4
  mlp_hidden: int | None = None  # None: round(8/3 · d_model) up to a multiple of 64
  use_nonlinearity: bool = True
  use_short_conv: bool = True
  use_gain: bool = True
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  impl: str = "auto"
  chunk_size: int = 64
  num_items: int = 0
  key_rank: int | None = None  # low-rank projection of the keys k^{l≥2}; None = full rank
  gain_rank: int | None = None  # low-rank projection of the gains p^l; None = full rank
  num_memories: int = 4  # MoM
  top_k_memories: int = 2  # MoM
  gla_gate_rank: int = 16  # rank of the GLA / MoM decay projection
  gla_chunk_size: int = 16  # chunk of the diagonal-decay recurrence (LA, GLA, MoM)
  attention_num_heads: int | None = None  # None: num_heads
  attention_num_kv_heads: int | None = None  # None: attention heads (no grouping)
  attention_head_dim: int | None = None  # None: head_dim
  rope_theta: float = 10000.0
  max_seq_len: int = 2048  # default KV-cache length
  norm_eps: float = 1e-6
  init_std: float = 0.02  # embedding init

  def __post_init__(self):
    # A list given where a tuple is expected would break hashing of the frozen dataclass.
    if isinstance(self.mixer_pattern, list):
      object.__setattr__(self, "mixer_pattern", tuple(self.mixer_pattern))
    positive = ["vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "solver_steps",
                "conv_width", "num_memories", "top_k_memories", "gla_gate_rank",
                "gla_chunk_size", "max_seq_len"]
    optional_positive = ["value_head_dim", "mlp_hidden", "key_rank", "gain_rank",
                         "attention_num_heads", "attention_num_kv_heads",
                         "attention_head_dim"]
    for name in positive + optional_positive:
      val = getattr(self, name)
      if val is None and name in optional_positive:
        continue
      if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {val!r}")
    if isinstance(self.num_items, bool) or not isinstance(self.num_items, int) \
        or self.num_items < 0:
      raise ValueError(f"ModelConfig.num_items must be an int >= 0, got {self.num_items!r}")
    if not self.mixer_pattern or not isinstance(self.mixer_pattern, tuple):
      raise ValueError(f"ModelConfig.mixer_pattern must be a non-empty tuple of names from "
                       f"{MIXERS}, got {self.mixer_pattern!r}")
    unknown = [m for m in self.mixer_pattern if m not in MIXERS]
    if unknown:
      raise ValueError(f"ModelConfig.mixer_pattern has unknown mixers {unknown}; known: "
                       f"{MIXERS}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name} must be one of {tuple(DTYPES)}, got "
                         f"{getattr(self, name)!r}")
    if self.impl not in IMPLS:
      raise ValueError(f"ModelConfig.impl must be one of {IMPLS}, got {self.impl!r}")
    c = self.chunk_size
    if isinstance(c, bool) or not isinstance(c, int) or c < 16 or c & (c - 1):
      raise ValueError(f"ModelConfig.chunk_size must be a power of two >= 16, got {c!r}")
    if self.top_k_memories > self.num_memories:
      raise ValueError(f"ModelConfig.top_k_memories={self.top_k_memories} exceeds "
                       f"num_memories={self.num_memories}")
    if "attention" in self.mixer_pattern:
      heads, kv = self.attn_heads, self.attn_kv_heads
      if self.attn_head_dim % 2:
        raise ValueError(f"ModelConfig.attention_head_dim (or head_dim) must be even for "
                         f"RoPE, got {self.attn_head_dim}")
      if heads % kv:
        raise ValueError(f"ModelConfig.attention_num_heads={heads} must be a multiple of "
                         f"attention_num_kv_heads={kv}")

  @property
  def attn_heads(self) -> int:
    return self.attention_num_heads or self.num_heads

  @property
  def attn_kv_heads(self) -> int:
    return self.attention_num_kv_heads or self.attn_heads

  @property
  def attn_head_dim(self) -> int:
    return self.attention_head_dim or self.head_dim

  @property
  def mlp_hidden_size(self) -> int:
    if self.mlp_hidden is not None:
      return self.mlp_hidden
    return -(-round(8 * self.d_model / 3) // 64) * 64

  def mixer_of_layer(self, layer: int) -> str:
    return self.mixer_pattern[layer % len(self.mixer_pattern)]


# Parameter counts of the presets as built by `CausalLM` (checked by tests/models).
TINY_LM_PARAMS = 593_156
LM_130M_PARAMS = 133_782_600


def tiny_lm_config(**overrides) -> ModelConfig:
  """Byte-level LM that trains on a CPU in minutes: D 128, 2 PRISM layers of 2 heads × 64,
  L = 2, SwiGLU 384, tied embeddings: 593,156 parameters (`TINY_LM_PARAMS`)."""
  base = dict(vocab_size=256, d_model=128, num_layers=2, num_heads=2, head_dim=64,
              solver_steps=2, chunk_size=64, max_seq_len=512)
  return ModelConfig(**{**base, **overrides})


def lm_130m_config(**overrides) -> ModelConfig:
  """The 0.13B LM of the paper's throughput runs: D 768, 12 PRISM layers of 6 heads × 128,
  L = 2, SwiGLU 2048, GPT-2 vocabulary (50257), tied embeddings, and rank-64 projections for
  the second key and the gains (spec §3 allows both low-rank).

  133,782,600 parameters (`LM_130M_PARAMS`), 38,597,376 of them the embedding. With full-rank
  keys and gains (`key_rank=None, gain_rank=None`) it would be 152,067,144.
  """
  base = dict(vocab_size=50257, d_model=768, num_layers=12, num_heads=6, head_dim=128,
              solver_steps=2, key_rank=64, gain_rank=64, chunk_size=64, max_seq_len=2048)
  return ModelConfig(**{**base, **overrides})
