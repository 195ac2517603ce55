"""Small PRISM sequential recommender on the seeded synthetic log (offline, CPU, about a minute)."""

from configs.base import base_config
from prism_jax.models import ModelConfig


def get_config():
  # num_items is filled from the data once the k-core filter has run.
  model = ModelConfig(vocab_size=1, d_model=64, num_layers=2, num_heads=2, head_dim=32,
                      mixer_pattern=("prism",), solver_steps=2, chunk_size=16, num_items=1)
  c = base_config("rec", model)
  c.preset = "rec_tiny"
  c.data.seq_len = 32
  c.data.batch_size = 32
  c.data.synthetic_users = 600
  c.data.synthetic_items = 300
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.train.steps = 300
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  return c
