"""Non-finite steps are skipped, K in a row stop the run with the last good checkpoint intact;
missing data, corrupt and incompatible checkpoints give one-line errors."""

import os
import shutil

import numpy as np
import pytest

from subprocess_runs import TINY, assert_ok, committed_steps, metrics, run_train, saved_state

ARGS = TINY + ["--config.train.steps=16", "--config.train.checkpoint_every=4",
               "--config.train.eval_every=8"]


def _one_line_error(proc, rc, *fragments):
  tails = f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  assert proc.returncode == rc, f"rc {proc.returncode}\n{tails}"
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in last, last
  return last


def test_nan_steps_skip_then_stop_with_good_checkpoint(tmp_path, jax_cache, small_corpus):
  run_dir = tmp_path / "nan"
  proc = run_train(run_dir, *ARGS, f"--config.data.path={small_corpus}",
                   "--config.debug.nan_steps=(3, 6, 7, 8)", "--config.train.max_bad_steps=3",
                   jax_cache=jax_cache)
  last = _one_line_error(proc, 3, "stopped at step 8: 3 non-finite updates in a row",
                         f"last good checkpoint is {run_dir}/checkpoints/4")
  assert "step 3: non-finite loss or gradient, update skipped (1 skipped so far" in proc.stdout
  assert committed_steps(run_dir) == [4]
  skipped = [r["step"] for r in metrics(run_dir) if r.get("skipped_step")]
  assert skipped == [3, 6, 7, 8]
  logged = [(r["step"], r["loss"]) for r in metrics(run_dir) if "loss" in r]
  assert [s for s, _ in logged] == list(range(1, 8))
  assert all(np.isfinite(loss) == (s not in skipped) for s, loss in logged)
  state = saved_state(run_dir, 4)
  assert int(state["skipped"]) == 1 and int(state["step"]) == 4
  assert all(np.isfinite(x).all() for x in map(np.asarray, _leaves(state["params"])))
  assert last.count("\n") == 0

  # The same command without the injected NaNs resumes from the good checkpoint and finishes.
  resumed = run_train(run_dir, *ARGS, f"--config.data.path={small_corpus}", jax_cache=jax_cache)
  assert_ok(resumed)
  assert f"resumed from {run_dir}/checkpoints/4" in resumed.stdout

  # A corrupt checkpoint names itself and says what to do.
  newest = max(committed_steps(run_dir))
  for root, _, files in os.walk(run_dir / "checkpoints" / str(newest) / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  corrupt = run_train(run_dir, *ARGS, f"--config.data.path={small_corpus}", jax_cache=jax_cache)
  _one_line_error(corrupt, 2, f"checkpoint {run_dir}/checkpoints/{newest} cannot be read",
                  "delete that step directory")
  shutil.rmtree(run_dir / "checkpoints" / str(newest))

  wider = run_train(run_dir, *ARGS, f"--config.data.path={small_corpus}",
                    "--config.model.d_model=48", jax_cache=jax_cache)
  _one_line_error(wider, 2, "was written by a different model", "d_model",
                  "new run_dir")


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def test_unknown_key_on_the_command_line(tmp_path, jax_cache):
  _one_line_error(run_train(tmp_path / "c", *TINY, "--config.optim.warmup=3",
                            jax_cache=jax_cache, timeout=300), 2,
                  "config.optim.warmup: unknown config key")


@pytest.mark.parametrize("override,message", [
    (("data", "path", "/no/such/corpus"), "data.path='/no/such/corpus' does not exist"),
    (("optim", "grad_accum", 3), "optim.grad_accum: got 3, need a divisor of data.batch_size"),
    (("mesh", "tensor", 3), "mesh: data x fsdp x tensor = [-1, 1, 3] does not fit"),
    ((None, "init_from", "/no/such/run"), "init_from: got '/no/such/run', need a run directory"),
    (("model", "chunk_size", 24), "model: ModelConfig.chunk_size must be a power of two"),
], ids=["missing-data", "grad-accum", "mesh", "init-from", "model-field"])
def test_bad_settings_fail_before_compiling(override, message):
  from configs.lm_tiny import get_config
  from prism_jax.train.loop import Trainer
  cfg = get_config()
  section, key, value = override
  (cfg[section] if section else cfg)[key] = value
  with pytest.raises(ValueError) as info:
    Trainer(cfg)
  assert message in str(info.value)
  assert "\n" not in str(info.value)


def test_empty_corpus_says_so(tmp_path):
  from configs.lm_tiny import get_config
  from prism_jax.train.loop import Trainer
  (tmp_path / "empty.txt").write_bytes(b"")
  cfg = get_config()
  cfg.data.path = str(tmp_path / "empty.txt")
  with pytest.raises(ValueError, match="is empty or too small to split"):
    Trainer(cfg)
