"""benchmarks/scaling.py on 8 fake CPU devices (sharded losses and a checkpoint moved from 8
devices to 1), and the lm_1b preset counted from abstract shapes (nothing allocated)."""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))
from subprocess_runs import REPO, env_for  # noqa: E402


def test_scaling_losses_match_one_device_and_checkpoint_moves(tmp_path, jax_cache):
  out = tmp_path / "scaling.json"
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "scaling.py"), "--presets", "tiny",
         "--meshes", "2x2x2", "--weak", "2", "--warmup", "1",
         "--timed", "3", "--check-steps", "4", "--json", str(out),
         "--markdown", str(tmp_path / "scaling.md")]
  proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=900,
                        env=env_for(jax_cache, devices=8))
  assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  report = json.loads(out.read_text())
  rows = {(r["mesh"], r["kind"]): r for r in report["rows"]}
  assert set(rows) == {("1 device", "strong"), ("DP2 x FSDP2 x TP2", "strong"), ("DP2", "weak")}
  one, sharded = rows[("1 device", "strong")], rows[("DP2 x FSDP2 x TP2", "strong")]
  weak = rows[("DP2", "weak")]
  assert (one["devices"], sharded["devices"], weak["devices"]) == (1, 8, 2)
  assert len(one["losses"]) == len(sharded["losses"]) == 4
  # The updates must move the loss, or agreeing losses would say nothing about the gradients.
  assert one["losses"][-1] < one["losses"][0] - 1e-3
  # Float32 compute: only the order of cross-device sums differs (tests/train/test_sharded.py).
  np.testing.assert_allclose(sharded["losses"], one["losses"], rtol=2e-5)
  assert sharded["loss_ok"] and sharded["loss_rel_diff"] <= 2e-5
  assert sharded["state_bytes"] < one["state_bytes"]    # FSDP and TP split the state
  assert weak["batch"] == 2 * one["batch"] and weak["efficiency"] > 0
  assert weak["losses"][0] != one["losses"][0]          # a different (doubled) batch
  (ckpt,) = report["checkpoints"]
  assert ckpt["saved_devices"] == 8 and ckpt["bitwise_equal"] and ckpt["loss_ok"]
  assert abs(ckpt["next_loss_saved_mesh"] - ckpt["next_loss_restored"]) <= \
      2e-5 * ckpt["next_loss_restored"]
  table = (tmp_path / "scaling.md").read_text()
  assert "| tiny | DP2 x FSDP2 x TP2 | strong | 8 |" in table and report["commit"] in table


def test_lm_1b_preset_counts_and_shards_without_allocating():
  from configs import lm_1b
  from prism_jax.models import CausalLM
  from prism_jax.train import sharding as shd
  from prism_jax.train.config import model_config, validate_config
  cfg = lm_1b.get_config()
  validate_config(cfg)
  mc = model_config(cfg)
  assert (mc.d_model, mc.num_heads, mc.head_dim, mc.solver_steps, mc.vocab_size) == \
      (2048, 16, 128, 2, 50257)
  abstract = nnx.eval_shape(lambda: CausalLM(mc, rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(abstract, nnx.Param, ...)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
  params = nnx.to_pure_dict(params)
  shapes = [a.shape for a in jax.tree.leaves(params)]
  count = sum(int(np.prod(s)) for s in shapes)
  print(f"lm_1b: {count:,} parameters")
  assert count == lm_1b.LM_1B_PARAMS and 1.0e9 <= count <= 1.3e9

  # Parameters and both AdamW moments, float32, on FSDP = 4 versus one device.
  mesh = jax.sharding.AbstractMesh((1, 4, 1), shd.MESH_AXES)
  rules = tuple(tuple(r) for r in cfg.mesh.rules)
  specs = jax.tree.map(lambda a, s: shd.logical_to_mesh(s, a.shape, mesh, rules), params,
                       logical, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  per_device = 0
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
    split = [int(np.prod([mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax or ())]))
             for ax in tuple(spec) + (None,) * (leaf.ndim - len(spec))]
    per_device += int(np.prod([d // k for d, k in zip(leaf.shape, split)]))
  print(f"lm_1b train state: {12 * count / 2**30:.2f} GiB unsharded, "
        f"{12 * per_device / 2**30:.2f} GiB per device on FSDP 4")
  # Whole on every device: norms, biases and the rank-64 up-projections of the second key and
  # the gains ((None, "heads"): no axis on fsdp), 0.64% of the parameters, so ~2% above 1/4.
  assert count / 4 <= per_device <= 1.03 * count / 4
