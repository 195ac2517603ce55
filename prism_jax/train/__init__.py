"""Training: config checks, optimizer, mesh and shardings, jitted step, checkpoints, the loop."""

from prism_jax.train.checkpoint import CheckpointError, Checkpointer, restore_params
from prism_jax.train.config import model_config, validate_config
from prism_jax.train.loop import Trainer, TrainingStopped, sample_from_run, sample_text
from prism_jax.train.optim import decay_mask, lr_schedule, make_optimizer
from prism_jax.train.sharding import logical_to_mesh, make_mesh
from prism_jax.train.step import init_state, make_train_step

__all__ = [
    "CheckpointError", "Checkpointer", "Trainer", "TrainingStopped", "decay_mask", "init_state",
    "logical_to_mesh", "lr_schedule", "make_mesh", "make_optimizer", "make_train_step",
    "model_config", "restore_params", "sample_from_run", "sample_text", "validate_config",
]
