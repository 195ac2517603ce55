"""~1.1B-parameter PRISM LM, the size that needs FSDP on devices with less than ~40 GB.

The 130M recipe scaled up: D 2048, 18 PRISM layers of 16 heads x 128, L = 2, SwiGLU 5504,
GPT-2 vocabulary (50257), tied embeddings, rank-64 second key and gains. 1,102,903,840
parameters (`LM_1B_PARAMS`, counted from abstract shapes by tests/test_scaling.py). In float32
with AdamW's two moments the train state is 12.3 GiB before gradients and activations, so the
preset shards parameters and optimizer state over every device (mesh.fsdp = -1, mesh.data = 1):
each of n devices holds 1/n of it (3.1 GiB on 4).

Activations dominate beyond that (no rematerialisation): XLA's estimate of one step's peak is
~86 GiB on one device at 4 x 2048 tokens and ~156 GiB at 8 x 2048, ~54 GiB per device for
8 x 2048 on FSDP 4. The global batch of 32 x 2048 is therefore taken as 4 micro-batches
(optim.grad_accum); raise grad_accum when fewer devices hold it.
"""

from configs.base import base_config
from prism_jax.models import lm_130m_config

LM_1B_PARAMS = 1_102_903_840


def lm_1b_model_config():
  return lm_130m_config(d_model=2048, num_layers=18, num_heads=16, head_dim=128)


def get_config():
  c = base_config("lm", lm_1b_model_config())
  c.preset = "lm_1b"
  c.model.dtype = "bfloat16"
  c.data.seq_len = 2048
  c.data.batch_size = 32
  c.optim.grad_accum = 4
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 50000
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.eval_batches = 16
  c.train.checkpoint_every = 1000
  c.sample.max_new_tokens = 100
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
