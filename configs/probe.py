"""Mechanistic probing (spec §7): D = 16 (2 heads of 8, as benchmarks/probing.py), vocab 64,
length 128, PRISM L = 2, 10k steps, and the runner's optimiser (Adam 3e-3, 100 warmup steps,
cosine decay to 0, clipping at 1, no weight decay), so `train.py --config=configs/probe.py`
trains the model the probing table reports on.

The task generators live in prism_jax.data.synthetic (data.probe_task picks one). The table's
LA and MoM baselines run without PRISM's short convolution: with `--config.model.mixer_pattern`
set to one of them, also pass `--config.model.use_short_conv=False` (as probing.py's
BASELINE_OVERRIDES does).
"""

from configs.base import base_config
from prism_jax.models import ModelConfig


def get_config():
  model = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, head_dim=8,
                      mixer_pattern=("prism",), solver_steps=2, chunk_size=32)
  c = base_config("probe", model)
  c.preset = "probe"
  c.data.seq_len = 128
  c.data.batch_size = 64
  c.data.probe_task = "parity"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.0
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.train.steps = 10000
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.sample.max_new_tokens = 0
  return c
