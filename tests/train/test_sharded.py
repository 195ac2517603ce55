"""8 fake CPU devices (data x fsdp x tensor = 2 x 2 x 2) train like 1 device; checkpoints move
between device counts; two processes with jax.distributed train three steps together."""

import os
import socket
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

from subprocess_runs import (REPO, TINY, assert_ok, env_for, metrics, run_train, train_cmd)

ARGS = TINY + ["--config.train.steps=6", "--config.train.checkpoint_every=3",
               "--config.train.eval_every=3", "--config.optim.warmup_steps=2"]


def _tiny_abstract_params():
  from prism_jax.models import CausalLM, tiny_lm_config
  from prism_jax.train import sharding as shd
  cfg = tiny_lm_config(d_model=32, num_layers=1, num_heads=2, head_dim=16, chunk_size=16)
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
  repl = shd.replicated(shd.make_mesh())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), params)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_2x2x2_mesh_and_two_processes_match_one_device(tmp_path, jax_cache, small_corpus):
  args = ARGS + [f"--config.data.path={small_corpus}"]
  one, eight = tmp_path / "one", tmp_path / "eight"
  assert_ok(run_train(one, *args, "--config.train.profile_steps=(2, 3)", jax_cache=jax_cache))
  traces = [n for _, _, names in os.walk(one / "profile") for n in names]
  assert any(n.endswith(".xplane.pb") for n in traces), traces
  sharded = run_train(eight, *args, "--config.mesh.data=2", "--config.mesh.fsdp=2",
                      "--config.mesh.tensor=2", jax_cache=jax_cache, devices=8)
  assert_ok(sharded)
  assert "'data': 2, 'fsdp': 2, 'tensor': 2" in sharded.stdout
  # Float32 sums split over devices round differently; 6 steps of AdamW keep that at ~1e-6.
  np.testing.assert_allclose([r["loss"] for r in metrics(eight)],
                             [r["loss"] for r in metrics(one)], rtol=2e-5)
  np.testing.assert_allclose([r["eval_loss"] for r in metrics(eight, "eval")],
                             [r["eval_loss"] for r in metrics(one, "eval")], rtol=2e-5)

  from prism_jax.train.checkpoint import restore_params
  abstract = _tiny_abstract_params()
  from_eight, step = restore_params(str(eight), abstract)
  from_one, _ = restore_params(str(one), abstract)
  assert step == 6
  for a, b in zip(jax.tree.leaves(from_eight), jax.tree.leaves(from_one)):
    assert len(a.sharding.device_set) == 1
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

  # The whole train state (optimizer moments included) resumes on one device.
  resumed = run_train(eight, *[a for a in args if "steps=6" not in a], "--config.train.steps=8",
                      jax_cache=jax_cache)
  assert_ok(resumed)
  assert f"resumed from {eight}/checkpoints/6" in resumed.stdout
  assert [r["step"] for r in metrics(eight)] == list(range(1, 9))

  # Two processes (one CPU device each) joined by jax.distributed take the first three steps
  # together (the learning rate of the updates before step 3 is in warm-up, so the shorter run
  # sees the same schedule).
  if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
    pytest.skip(f"jax {jax.__version__} has no CPU collectives option; cannot run two CPU "
                "processes as one mesh")
  two = tmp_path / "two"
  dist = args + ["--config.train.steps=3", "--config.distributed.initialize=True",
                 f"--config.distributed.coordinator_address=127.0.0.1:{_free_port()}",
                 "--config.distributed.num_processes=2"]
  procs = [subprocess.Popen(train_cmd(two, *dist, f"--config.distributed.process_id={i}"),
                            cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_for(jax_cache)) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"rc {p.returncode}\n{out[-2000:]}\n{err[-3000:]}"
  assert "'data': 2" in outs[0][0] and "parameters" not in outs[1][0]   # process 0 reports
  assert [r["step"] for r in metrics(two)] == [1, 2, 3]
  np.testing.assert_allclose([r["loss"] for r in metrics(two)],
                             [r["loss"] for r in metrics(one)][:3], rtol=2e-5)
  assert os.path.isdir(two / "checkpoints" / "3")
