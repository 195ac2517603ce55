"""~130M-parameter PRISM LM (spec §7 throughput size) for GPUs and pods.

Point data.path at a uint16 `.bin` token file from a 50257-token tokenizer; the default
corpus (bytes) also runs, using only the first 256 rows of the embedding.
"""

from configs.base import base_config
from prism_jax.models import lm_130m_config


def get_config():
  c = base_config("lm", lm_130m_config())
  c.preset = "lm_130m"
  c.model.dtype = "bfloat16"
  c.data.seq_len = 2048
  c.data.batch_size = 32
  c.optim.lr = 1.5e-3
  c.optim.warmup_steps = 1000
  c.optim.grad_accum = 1
  c.train.steps = 20000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.checkpoint_every = 1000
  c.sample.max_new_tokens = 100
  return c
