"""Check a run's ConfigDict before anything is built, and turn its model section into ModelConfig.

Every error is a ValueError whose message starts with the offending key (`optim.lr: ...`).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from configs.base import TASKS, base_config
from prism_jax.data.rec import FORMATS
from prism_jax.data.text import TOKEN_DTYPES


def _model_cls():
  from prism_jax.models import ModelConfig
  return ModelConfig


def _unknown_keys(cfg, ref, prefix=""):
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in ref:
      yield path
    elif isinstance(cfg[key], ml_collections.ConfigDict) and key != "model":
      yield from _unknown_keys(cfg[key], ref[key], path + ".")


def model_config(cfg: ml_collections.ConfigDict, **overrides):
  """ModelConfig from `cfg.model` (sequences become tuples); ValueError names `model.<field>`."""
  cls = _model_cls()
  fields = {f.name for f in dataclasses.fields(cls)}
  values = {}
  for key, value in cfg.model.items():
    if key not in fields:
      raise ValueError(f"model.{key}: unknown model setting; known: {sorted(fields)}")
    values[key] = tuple(value) if isinstance(value, list) else value
  values.update(overrides)
  try:
    return cls(**values)
  except (ValueError, TypeError) as e:
    raise ValueError(f"model: {e}") from e


def _check(cond: bool, key: str, value, need: str) -> None:
  if not cond:
    raise ValueError(f"{key}: got {value!r}, need {need}")


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the key for unknown keys and invalid values (no compilation)."""
  _check(cfg.get("task") in TASKS, "task", cfg.get("task"), f"one of {TASKS}")
  reference = base_config(cfg.task, _model_cls()())
  unknown = sorted(_unknown_keys(cfg, reference))
  if unknown:
    raise ValueError(f"{unknown[0]}: unknown config key (all unknown: {unknown})")
  _check(cfg.mode in ("train", "sample"), "mode", cfg.mode, "'train' or 'sample'")
  d, o, t, m = cfg.data, cfg.optim, cfg.train, cfg.mesh
  _check(d.seq_len >= 1, "data.seq_len", d.seq_len, ">= 1")
  _check(d.batch_size >= 1, "data.batch_size", d.batch_size, ">= 1")
  _check(0 < d.val_percent < 100, "data.val_percent", d.val_percent, "in (0, 100)")
  _check(d.token_dtype in TOKEN_DTYPES, "data.token_dtype", d.token_dtype, f"one of {TOKEN_DTYPES}")
  _check(d.format in FORMATS, "data.format", d.format, f"one of {FORMATS}")
  _check(d.on_error in ("skip", "raise"), "data.on_error", d.on_error, "'skip' or 'raise'")
  _check(d.min_user_interactions >= 3, "data.min_user_interactions", d.min_user_interactions,
         ">= 3 (train, validation and test need one item each)")
  _check(d.min_item_interactions >= 1, "data.min_item_interactions", d.min_item_interactions,
         ">= 1")
  _check(o.lr > 0, "optim.lr", o.lr, "> 0")
  _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
  _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
  _check(0 <= o.b1 < 1, "optim.b1", o.b1, "in [0, 1)")
  _check(0 <= o.b2 < 1, "optim.b2", o.b2, "in [0, 1)")
  _check(o.eps > 0, "optim.eps", o.eps, "> 0")
  _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
  _check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, ">= 0 (0 = off)")
  _check(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, ">= 1")
  _check(d.batch_size % o.grad_accum == 0, "optim.grad_accum", o.grad_accum,
         f"a divisor of data.batch_size={d.batch_size}")
  _check(t.steps >= 1, "train.steps", t.steps, ">= 1")
  for key in ("log_every", "eval_every", "checkpoint_every", "eval_batches", "keep_checkpoints",
              "max_bad_steps", "metrics_k"):
    _check(t[key] >= 1, f"train.{key}", t[key], ">= 1")
  prof = tuple(t.profile_steps)
  _check(len(prof) == 2 and 0 <= prof[0] <= prof[1], "train.profile_steps", prof,
         "(first, last) with 0 <= first <= last; (0, 0) = off")
  _check(cfg.sample.max_new_tokens >= 0, "sample.max_new_tokens", cfg.sample.max_new_tokens,
         ">= 0")
  _check(cfg.sample.temperature >= 0, "sample.temperature", cfg.sample.temperature, ">= 0")
  _check(cfg.sample.top_k >= 0, "sample.top_k", cfg.sample.top_k, ">= 0 (0 = off)")
  for axis in ("data", "fsdp", "tensor"):
    _check(m[axis] == -1 or m[axis] >= 1, f"mesh.{axis}", m[axis], ">= 1 or -1 (the rest)")
  _check([m.data, m.fsdp, m.tensor].count(-1) <= 1, "mesh", (m.data, m.fsdp, m.tensor),
         "at most one axis set to -1")
  for rule in m.rules:
    _check(len(rule) == 2 and isinstance(rule[0], str), "mesh.rules", rule,
           "(logical_axis, mesh_axis or tuple of mesh axes or None) pairs")
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for a in targets:
      _check(a in (None, "data", "fsdp", "tensor"), "mesh.rules", rule,
             "mesh axes among data, fsdp, tensor")
  _check(not cfg.init_from or os.path.isdir(cfg.init_from), "init_from", cfg.init_from,
         "a run directory or its checkpoints/ directory")
  model_config(cfg)
