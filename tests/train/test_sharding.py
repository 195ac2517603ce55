"""Mesh shapes and the logical-axis -> mesh-axis mapping (on an abstract 2 x 2 x 2 mesh)."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from configs.base import LOGICAL_AXIS_RULES
from prism_jax.train import sharding as shd

MESH = AbstractMesh((2, 2, 2), shd.MESH_AXES)


def test_mesh_shape_fills_one_axis():
  assert shd.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
  assert shd.mesh_shape(1, -1, 1, 8) == (1, 8, 1)
  assert shd.mesh_shape(4, 1, 2, 8) == (4, 1, 2)
  with pytest.raises(ValueError, match="needs 4 devices, 8 are available"):
    shd.mesh_shape(2, 1, 2, 8)
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    shd.mesh_shape(-1, 3, 1, 8)


@pytest.mark.parametrize("logical,shape,expected", [
    (("vocab", "embed"), (256, 32), P("tensor", "fsdp")),
    (("embed", "mlp"), (32, 128), P("fsdp", "tensor")),
    (("embed", "heads", "kv"), (32, 4, 16), P("fsdp", "tensor", None)),
    (("vocab", "embed"), (257, 32), P(None, "fsdp")),        # 257 rows: not divisible, replicated
    (("heads", "mlp"), (4, 128), P("tensor", None)),         # tensor already used by heads
    (("batch", None), (8, 5), P(("data", "fsdp"), None)),
    ((None,), (7,), P(None)),
    ((), (3, 3), P(None, None)),
], ids=["embedding", "mlp-in", "heads", "odd-vocab", "axis-once", "batch", "none", "unnamed"])
def test_logical_to_mesh(logical, shape, expected):
  assert shd.logical_to_mesh(P(*logical), shape, MESH, LOGICAL_AXIS_RULES) == expected


def test_tree_shardings_and_optimizer_state_follow_params():
  import optax
  mesh = shd.make_mesh()
  params = {"w": jax.ShapeDtypeStruct((4, 6), np.float32), "b": jax.ShapeDtypeStruct((6,),
                                                                                     np.float32)}
  logical = {"w": P("embed", "mlp"), "b": None}
  shardings = shd.tree_shardings(params, logical, mesh, LOGICAL_AXIS_RULES)
  assert set(shardings) == {"w", "b"}
  tx = optax.adam(1e-3)
  opt = shd.opt_state_shardings(tx, params, shardings, mesh)
  flat = jax.tree.leaves(opt)
  assert len(flat) == len(jax.tree.leaves(jax.eval_shape(tx.init, params)))
  assert all(s.mesh.shape == mesh.shape for s in flat)


def _constraints(fn, x):
  jaxpr = jax.make_jaxpr(fn)(x)
  return [e.params["sharding"].spec for e in jaxpr.eqns
          if e.primitive.name == "sharding_constraint"]


def test_shard_batch_hints_the_batch_axes_only_under_a_mesh():
  from prism_jax.layers.common import shard_batch
  x = np.zeros((8, 3, 5), np.float32)
  assert _constraints(shard_batch, x) == []          # no mesh: untouched

  auto = AbstractMesh((2, 2, 2), shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def under_mesh(x):
    with jax.sharding.use_abstract_mesh(auto):
      return shard_batch(x)

  (spec,) = _constraints(under_mesh, x)
  assert spec[0] == shd.BATCH_AXES and all(s is P.UNCONSTRAINED for s in spec[1:])
  assert _constraints(under_mesh, np.zeros((6, 3), np.float32)) == []  # 6 rows do not split in 4
