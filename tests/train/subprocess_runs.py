"""Running train.py as a subprocess in tests (the real program, real signals), and reading
what a run leaves behind."""

import json
import os
import subprocess
import sys
import time

from quick_jit import QUICK_BUILD_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A one-layer PRISM LM small enough to compile and step quickly on CPU.
TINY = [
    "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.head_dim=16", "--config.model.chunk_size=16", "--config.data.seq_len=32",
    "--config.data.batch_size=8", "--config.train.eval_batches=2", "--config.train.log_every=1",
    "--config.train.progress=False", "--config.sample.max_new_tokens=0",
]


def env_for(jax_cache: str, devices: int = 1) -> dict:
  env = dict(os.environ)
  env.update({"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": jax_cache,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
              "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"})
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  # These runs are tiny models for a few steps: building the programs is most of their time,
  # and unoptimised machine code builds in about half of it (tests/quick_jit.py).
  flags += QUICK_BUILD_FLAGS.split()
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def train_cmd(run_dir, *args, config=None) -> list[str]:
  cmd = [sys.executable, os.path.join(REPO, "train.py")]
  if config:
    cmd.append(f"--config={os.path.join(REPO, 'configs', config)}")
  return cmd + [f"--config.run_dir={run_dir}", *args]


def run_train(run_dir, *args, jax_cache, devices=1, config=None, timeout=600):
  """Run train.py to completion; returns the CompletedProcess (stdout and stderr as text)."""
  return subprocess.run(train_cmd(run_dir, *args, config=config), cwd=REPO, text=True,
                        capture_output=True, env=env_for(jax_cache, devices), timeout=timeout)


def start_train(run_dir, *args, jax_cache, devices=1, config=None, log=None):
  return subprocess.Popen(train_cmd(run_dir, *args, config=config), cwd=REPO, text=True,
                          stdout=log, stderr=subprocess.STDOUT, env=env_for(jax_cache, devices))


def wait_for(predicate, proc, timeout=400, what=""):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited (rc {proc.returncode}) before {what}")
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


def committed_steps(run_dir) -> list[int]:
  """Checkpoint steps whose directory orbax has committed (renamed into place)."""
  path = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def metrics(run_dir, kind="train") -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def saved_state(run_dir, step):
  """The raw saved train state of a checkpoint step (numpy leaves, saved structure)."""
  import orbax.checkpoint as ocp
  path = os.path.join(run_dir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)


def assert_ok(proc):
  assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n" \
                               f"stderr:\n{proc.stderr[-3000:]}"
