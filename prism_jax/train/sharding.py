"""Device mesh (data, fsdp, tensor) and the placement of parameters, optimizer state and batches.

Parameters carry logical axis names (nnx metadata, e.g. ("embed", "mlp")); `mesh.rules` from
the config maps each logical name to mesh axes. Batches are split over data x fsdp on their
leading axis and replicated over tensor.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from prism_jax.layers.common import BATCH_AXES  # the batch axes the layers hint at too

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolve one -1 axis to the remaining devices; ValueError unless the product matches."""
  sizes = [data, fsdp, tensor]
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
      raise ValueError(f"mesh: data x fsdp x tensor = {sizes} does not fit {num_devices} "
                       f"devices (the fixed axes need a multiple of {known})")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh: data x fsdp x tensor = {sizes} needs {int(np.prod(sizes))} devices, "
                     f"{num_devices} are available; set mesh.data=-1 to use the rest")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axes_size(mesh: Mesh, axes) -> int:
  return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_mesh(logical: P | tuple, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
  """Mesh PartitionSpec for one array from its logical spec.

  A mesh axis is used at most once per array; a dim the mapped axes do not divide is left
  replicated (e.g. a vocabulary of 257 on tensor=2) rather than failing.
  """
  table = {name: target for name, target in rules}
  used, out = set(), []
  logical = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
  for dim, name in zip(shape, logical):
    target = table.get(name) if isinstance(name, str) else None
    axes = tuple(a for a in ((target,) if isinstance(target, str) else (target or ()))
                 if a is not None and mesh.shape[a] > 1 and a not in used)
    if axes and dim % _axes_size(mesh, axes):
      logging.info("logical axis %r of size %d not divisible by mesh axes %s: replicated",
                   name, dim, axes)
      axes = ()
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def tree_shardings(abstract, logical_specs, mesh: Mesh, rules):
  """NamedSharding for every leaf of `abstract` (arrays or ShapeDtypeStruct) from logical specs.

  `logical_specs` mirrors `abstract`; a leaf spec of None or P() means replicated.
  """
  def one(x, spec):
    spec = spec if spec is not None else P()
    return NamedSharding(mesh, logical_to_mesh(spec, x.shape, mesh, rules))
  return jax.tree.map(one, abstract, logical_specs,
                      is_leaf=lambda s: s is None or isinstance(s, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings,
                        mesh: Mesh):
  """Optimizer moments follow their parameter's sharding; counters are replicated."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def global_batch(mesh: Mesh, local: np.ndarray, global_rows: int) -> jax.Array:
  """A global array from this process's rows of the batch (leading axis split over processes)."""
  sharding = batch_sharding(mesh, local.ndim)
  return jax.make_array_from_process_local_data(sharding, local,
                                                (global_rows,) + tuple(local.shape[1:]))
