"""Presets load, validate and convert to ModelConfig; bad keys and values name themselves."""

import importlib

import pytest

from prism_jax.models import ModelConfig
from prism_jax.train.config import model_config, validate_config

PRESETS = ["lm_tiny", "lm_130m", "rec_tiny", "rec_base", "probe"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_builds_model_config(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  validate_config(cfg)
  assert cfg.preset == name
  mc = model_config(cfg, **({"num_items": 10} if cfg.task == "rec" else {}))
  assert isinstance(mc, ModelConfig) and isinstance(mc.mixer_pattern, tuple)
  assert cfg.data.batch_size % cfg.optim.grad_accum == 0


def test_presets_match_the_issue():
  tiny = importlib.import_module("configs.lm_tiny").get_config()
  big = importlib.import_module("configs.lm_130m").get_config()
  assert tiny.task == "lm" and tiny.model.vocab_size == 256 and tiny.model.d_model <= 256
  assert big.model.d_model == 768 and big.model.num_layers == 12 and big.model.dtype == "bfloat16"
  assert big.model.param_dtype == "float32"
  probe = importlib.import_module("configs.probe").get_config()
  assert (probe.model.d_model, probe.model.vocab_size, probe.data.seq_len,
          probe.model.solver_steps, probe.train.steps) == (16, 64, 128, 2, 10000)
  rec = importlib.import_module("configs.rec_base").get_config()
  assert (rec.data.min_user_interactions, rec.data.min_item_interactions) == (40, 5)


def _tiny():
  return importlib.import_module("configs.lm_tiny").get_config()


def test_unknown_keys_are_named():
  cfg = _tiny()
  cfg.unlock()
  cfg.optim.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r"^optim.learning_rate: unknown config key"):
    validate_config(cfg)
  cfg = _tiny()
  cfg.unlock()
  cfg.model.widthh = 3
  with pytest.raises(ValueError, match=r"^model.widthh: unknown model setting"):
    validate_config(cfg)


@pytest.mark.parametrize("key,value,message", [
    ("optim.lr", 0.0, "optim.lr: got 0.0, need > 0"),
    ("optim.b2", 1.0, "optim.b2: got 1.0, need in [0, 1)"),
    ("data.val_percent", 100.0, "data.val_percent"),
    ("data.token_dtype", "int8", "data.token_dtype: got 'int8'"),
    ("train.eval_every", 0, "train.eval_every: got 0, need >= 1"),
    ("train.profile_steps", (5, 2), "train.profile_steps"),
    ("mesh.fsdp", 0, "mesh.fsdp: got 0"),
    ("mesh.rules", (("embed", "model"),), "mesh.rules"),
    ("mode", "serve", "mode: got 'serve'"),
    ("model.dtype", "float8", "ModelConfig.dtype"),
    ("model.num_heads", 0, "ModelConfig.num_heads"),
])
def test_invalid_values_name_the_key(key, value, message):
  cfg = _tiny()
  section, _, leaf = key.rpartition(".")
  (cfg[section] if section else cfg)[leaf] = value
  with pytest.raises(ValueError) as info:
    validate_config(cfg)
  assert message in str(info.value)


def test_probe_task_needs_its_generators():
  from prism_jax.train.tasks import make_task
  cfg = importlib.import_module("configs.probe").get_config()
  try:
    importlib.import_module("prism_jax.data.synthetic")
  except ModuleNotFoundError:
    with pytest.raises(ValueError, match="prism_jax.data.synthetic"):
      make_task(cfg)
  else:
    task = make_task(cfg)
    batch = task.train_batch(0)
    assert batch["tokens"].shape == (cfg.data.batch_size, cfg.data.seq_len)
    assert batch["mask"].any() and not (task.train_batch(1)["tokens"] == batch["tokens"]).all()
    assert (task.eval_batches()[0]["tokens"] != batch["tokens"]).any()
    cfg.data.probe_task = "sorting"
    with pytest.raises(ValueError, match="data.probe_task: got 'sorting'"):
      make_task(cfg)
