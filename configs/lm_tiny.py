"""Tiny byte-level PRISM LM on the standard-library sources: trains on a laptop CPU in minutes."""

from configs.base import base_config
from prism_jax.models import tiny_lm_config


def get_config():
  c = base_config("lm", tiny_lm_config())
  c.preset = "lm_tiny"
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.train.steps = 400
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  return c
