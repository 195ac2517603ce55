"""Defaults shared by every preset, and the logical-axis -> mesh-axis rules (the only place).

Every preset starts from `base_config(task)` and changes values; it never adds keys, so a key
that is not here is a typo and fails before anything is built.
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

# Layers name their parameter axes logically; these rules place each logical axis on mesh axes
# ("data", "fsdp", "tensor"). A logical axis not listed, or a dim the mesh axes do not divide,
# stays replicated. "batch" is the leading axis of every input batch.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("items", "tensor"),
)

TASKS = ("lm", "rec", "probe")


def _placeholder_type(annotation) -> type:
  text = annotation if isinstance(annotation, str) else repr(annotation)
  for name, kind in (("int", int), ("float", float), ("str", str), ("bool", bool)):
    if name in text:
      return kind
  raise TypeError(f"cannot infer an override type from annotation {annotation!r}")


def model_section(model_config) -> ml_collections.ConfigDict:
  """The ModelConfig dataclass as a ConfigDict (None fields stay overridable by type)."""
  hints = typing.get_type_hints(type(model_config))
  section = ml_collections.ConfigDict()
  for field in dataclasses.fields(model_config):
    value = getattr(model_config, field.name)
    if value is None:
      value = config_dict.placeholder(_placeholder_type(hints.get(field.name, field.type)))
    section[field.name] = value
  return section


def base_config(task: str, model_config) -> ml_collections.ConfigDict:
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  c = ml_collections.ConfigDict()
  c.task = task
  c.preset = ""                  # name of the preset; the default run_dir is runs/<preset>
  c.mode = "train"               # "train" or "sample"
  c.seed = 0
  c.run_dir = ""
  c.init_from = ""               # a checkpoint directory (or run dir) to take weights from
  c.model = model_section(model_config)

  c.data = ml_collections.ConfigDict()
  c.data.path = ""               # "" = default data (stdlib sources / synthetic log)
  c.data.format = "auto"         # text: auto; rec: auto, udata, ratings_dat, csv
  c.data.token_dtype = "uint16"  # .bin token files
  c.data.val_percent = 5.0       # text: share of files (by path hash) or tail held out
  c.data.seq_len = 128           # text window / recommendation history length
  c.data.batch_size = 16         # global batch (all processes, before accumulation splits it)
  c.data.on_error = "skip"       # rec: malformed lines "skip" (counted) or "raise"
  c.data.min_user_interactions = 5
  c.data.min_item_interactions = 5
  c.data.synthetic_users = 1000
  c.data.synthetic_items = 500
  c.data.synthetic_min_len = 10
  c.data.synthetic_max_len = 50
  c.data.probe_task = "mqar"

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.min_lr_ratio = 0.1     # cosine decays to lr * min_lr_ratio at train.steps
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False
  c.optim.decay_norms_and_biases = False
  c.optim.clip_norm = 1.0        # 0 disables clipping
  c.optim.grad_accum = 1         # micro-batches per update (divides data.batch_size)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 500
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 3   # the last k, plus the best by eval loss
  c.train.async_checkpoints = True
  c.train.max_bad_steps = 5      # non-finite updates in a row before the run stops
  c.train.progress = True
  c.train.profile_steps = (0, 0)  # (first, last) update traced by jax.profiler into <run>/profile
  c.train.metrics_k = 10         # rec: Hit@K / NDCG@K

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "def "
  c.sample.max_new_tokens = 200
  c.sample.temperature = 0.8
  c.sample.top_k = 0             # 0 = no top-k filter

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = LOGICAL_AXIS_RULES

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # also on when JAX_COORDINATOR_ADDRESS is set
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0   # 0 = let jax detect
  c.distributed.process_id = -1     # -1 = let jax detect
  c.distributed.cpu_collectives = "gloo"

  c.debug = ml_collections.ConfigDict()
  c.debug.nan_steps = (-1,)      # update numbers (1-based, as logged) whose loss is made NaN
  c.debug.sleep_per_step = 0.0   # seconds; slows a run down so tests can interrupt it
  return c
