"""SIGTERM saves and exits cleanly; kill -9 then restart gives the uninterrupted run's params."""

import os
import signal

import jax
import numpy as np

from subprocess_runs import (TINY, assert_ok, committed_steps, metrics, run_train, saved_state,
                      start_train, wait_for)

ARGS = TINY + ["--config.train.steps=16", "--config.train.checkpoint_every=4",
               "--config.train.eval_every=8"]


def test_sigterm_then_kill9_then_resume_equals_uninterrupted(tmp_path, jax_cache, small_corpus):
  args = ARGS + [f"--config.data.path={small_corpus}"]
  straight = tmp_path / "straight"
  assert_ok(run_train(straight, *args, jax_cache=jax_cache))

  broken = tmp_path / "broken"
  slow = args + ["--config.debug.sleep_per_step=0.5"]
  with open(tmp_path / "log1", "w") as log:
    proc = start_train(broken, *slow, jax_cache=jax_cache, log=log)
    wait_for(lambda: 4 in committed_steps(broken), proc, what="the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
  text = (tmp_path / "log1").read_text()
  assert "SIGTERM: saved checkpoint" in text, text[-2000:]
  stopped_at = max(committed_steps(broken))
  assert 4 <= stopped_at < 16

  with open(tmp_path / "log2", "w") as log:
    proc = start_train(broken, *slow, jax_cache=jax_cache, log=log)
    wait_for(lambda: any(s > stopped_at and s % 4 == 0 for s in committed_steps(broken)), proc,
             what="a checkpoint after the resume")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=120) == -signal.SIGKILL
  assert f"resumed from {broken}/checkpoints/{stopped_at}" in (tmp_path / "log2").read_text()
  assert max(committed_steps(broken)) < 16

  final = run_train(broken, *args, jax_cache=jax_cache)
  assert_ok(final)
  assert "resumed from" in final.stdout

  want, got = saved_state(straight, 16), saved_state(broken, 16)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  # The log reads as one run: every step once, with the uninterrupted run's losses.
  straight_losses = {r["step"]: r["loss"] for r in metrics(straight)}
  broken_records = metrics(broken)
  assert [r["step"] for r in broken_records] == list(range(1, 17))
  assert {r["step"]: r["loss"] for r in broken_records} == straight_losses
  for name in ("loss.png", "config.json"):
    assert os.path.exists(broken / name)
  assert os.listdir(broken / "tensorboard")
