"""PRISM sequential recommender at the paper's scale of filtering (users >= 40, items >= 5).

Set data.path to a MovieLens u.data / ratings.dat or a user,item,timestamp CSV; without it
the synthetic log is used, generated long enough to pass the filter.
"""

from configs.base import base_config
from prism_jax.models import ModelConfig


def get_config():
  model = ModelConfig(vocab_size=1, d_model=128, num_layers=2, num_heads=2, head_dim=64,
                      mixer_pattern=("prism",), solver_steps=2, chunk_size=64, num_items=1)
  c = base_config("rec", model)
  c.preset = "rec_base"
  c.data.seq_len = 200
  c.data.batch_size = 64
  c.data.min_user_interactions = 40
  c.data.min_item_interactions = 5
  c.data.synthetic_users = 6000
  c.data.synthetic_items = 3000
  c.data.synthetic_min_len = 40
  c.data.synthetic_max_len = 200
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.0
  c.train.steps = 20000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.train.metrics_k = 10
  return c
