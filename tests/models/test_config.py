"""ModelConfig validation and the presets' parameter counts."""

import dataclasses

import pytest

from prism_jax.models import (LM_130M_PARAMS, TINY_LM_PARAMS, ModelConfig, count_parameters,
                              lm_130m_config, tiny_lm_config)


def prism_lm_params(cfg: ModelConfig) -> int:
  """Parameter count of an all-PRISM CausalLM, by hand from spec §3 (independent of the
  modules): per layer the anchor conv, q, k¹, k^{2..L} (maybe low-rank), v, β, α (+ bias),
  gains (maybe low-rank), u map when H·V ≠ D, output gate, head norm, W_o, two RMSNorms and
  the SwiGLU; then the embedding, the final norm and an untied head."""
  D, H, K, L = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.solver_steps
  V = cfg.value_head_dim or K
  lowrank = lambda rank, out: D * out if rank is None else D * rank + rank * out
  mixer = (cfg.conv_width * D + D * H * K * 2 + D * H * V + D * H * L + D * H + H
           + (lowrank(cfg.key_rank, (L - 1) * H * K) if L > 1 else 0)
           + lowrank(cfg.gain_rank, L * H * V) + (D * H * V if H * V != D else 0)
           + D * H * V + V + H * V * D)
  block = mixer + 2 * D + 3 * D * cfg.mlp_hidden_size
  head = 0 if cfg.tie_embeddings else D * cfg.vocab_size
  return cfg.num_layers * block + cfg.vocab_size * D + D + head


def report(name: str, cfg: ModelConfig) -> int:
  """Print and return a preset's size (run pytest -s to see it)."""
  n = count_parameters(cfg)
  embed = cfg.vocab_size * cfg.d_model
  print(f"{name}: {n:,} parameters ({embed:,} embedding, {n - embed:,} other); D={cfg.d_model} "
        f"layers={cfg.num_layers} heads={cfg.num_heads}x{cfg.head_dim} L={cfg.solver_steps}")
  return n


def test_tiny_preset_size():
  cfg = tiny_lm_config()
  assert report("tiny_lm_config", cfg) == TINY_LM_PARAMS == prism_lm_params(cfg)
  assert cfg.mlp_hidden_size == 384


def test_130m_preset_size():
  cfg = lm_130m_config()
  assert (cfg.d_model, cfg.num_layers, cfg.head_dim, cfg.solver_steps, cfg.vocab_size) == (
      768, 12, 128, 2, 50257)
  n = report("lm_130m_config", cfg)
  assert n == LM_130M_PARAMS == prism_lm_params(cfg)
  assert 125e6 < n < 140e6
  full = lm_130m_config(key_rank=None, gain_rank=None)
  assert report("lm_130m_config full-rank", full) == prism_lm_params(full) == 152_067_144


def test_prism_count_covers_every_option():
  cfg = ModelConfig(vocab_size=50, d_model=40, num_layers=2, num_heads=3, head_dim=8,
                    value_head_dim=6, solver_steps=3, key_rank=2, gain_rank=5, conv_width=3,
                    tie_embeddings=False, mlp_hidden=24)
  assert count_parameters(cfg) == prism_lm_params(cfg)


@pytest.mark.parametrize("field,value,pattern", [
    ("d_model", 0, r"ModelConfig.d_model must be a positive int, got 0"),
    ("num_heads", -2, r"ModelConfig.num_heads must be a positive int, got -2"),
    ("head_dim", 2.5, r"ModelConfig.head_dim must be a positive int, got 2.5"),
    ("solver_steps", 0, r"ModelConfig.solver_steps must be a positive int"),
    ("mlp_hidden", 0, r"ModelConfig.mlp_hidden must be a positive int"),
    ("key_rank", 0, r"ModelConfig.key_rank must be a positive int"),
    ("num_items", -1, r"ModelConfig.num_items must be an int >= 0, got -1"),
    ("mixer_pattern", ("prism", "mamba"), r"mixer_pattern has unknown mixers \['mamba'\]"),
    ("mixer_pattern", (), r"ModelConfig.mixer_pattern must be a non-empty tuple"),
    ("dtype", "float64", r"ModelConfig.dtype must be one of"),
    ("param_dtype", "int8", r"ModelConfig.param_dtype must be one of"),
    ("impl", "fast", r"ModelConfig.impl must be one of"),
    ("chunk_size", 48, r"ModelConfig.chunk_size must be a power of two >= 16, got 48"),
    ("top_k_memories", 5, r"ModelConfig.top_k_memories=5 exceeds num_memories=4"),
], ids=lambda v: str(v)[:20])
def test_bad_values_name_the_field(field, value, pattern):
  with pytest.raises(ValueError, match=pattern):
    ModelConfig(**{field: value})


def test_attention_layers_need_consistent_heads():
  with pytest.raises(ValueError, match=r"attention_head_dim \(or head_dim\) must be even"):
    ModelConfig(head_dim=15, mixer_pattern=("prism", "attention"))
  with pytest.raises(ValueError, match=r"attention_num_heads=4 must be a multiple of "
                                       r"attention_num_kv_heads=3"):
    ModelConfig(mixer_pattern=("attention",), attention_num_heads=4, attention_num_kv_heads=3)
  ModelConfig(head_dim=15, mixer_pattern=("prism",))  # odd head dims are fine without RoPE


def test_config_is_frozen_and_hashable():
  cfg = ModelConfig(mixer_pattern=["prism", "attention"])
  assert cfg.mixer_pattern == ("prism", "attention")
  assert hash(cfg) == hash(dataclasses.replace(cfg))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 3
