"""Orbax checkpoints of the train state: async, atomic, the last k plus the best by eval loss.

A checkpoint step directory holds "state" (params, optimizer state, step, RNG, counters as
arrays) and "meta" (JSON: data position, corpus fingerprint, model config). Restoring takes an
abstract state whose leaves carry the target shardings, so a checkpoint written on one mesh
loads onto any other.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message says what to do."""


def _checkpoint_dir(path: str) -> str:
  """Accept a run directory (with checkpoints/ inside) or the checkpoint directory itself."""
  inner = os.path.join(path, "checkpoints")
  return inner if os.path.isdir(inner) else path


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with this project's layout and error messages."""

  def __init__(self, directory: str, keep: int = 3, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=use_async)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, meta: dict, metrics: dict | None = None) -> None:
    """Start saving (returns at once when async); an existing step is left as it is."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=True)

  def read_meta(self, step: int) -> dict:
    try:
      args = ocp.args.Composite(meta=ocp.args.JsonRestore())
      return self.manager.restore(step, args=args)["meta"]
    except Exception as e:
      raise CheckpointError(_corrupt(self.directory, step, e)) from e

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """(state, meta) of `step`, placed as the shardings in `abstract_state` say."""
    meta = self.read_meta(step)
    check_shapes(_shapes_or_error(self.directory, step), abstract_state,
                 f"{self.directory}/{step}")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as e:
      raise CheckpointError(_corrupt(self.directory, step, e)) from e
    return restored, meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _corrupt(directory: str, step: int, error: Exception) -> str:
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return (f"checkpoint {directory}/{step} cannot be read ({type(error).__name__}: {first[:200]}); "
          f"delete that step directory to fall back to an earlier one, or use a new run_dir")


def _key_names(path) -> tuple[str, ...]:
  """Path keys as strings, so dict keys, list indices and namedtuple fields compare alike."""
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def stored_shapes(state_dir: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of the arrays saved in a checkpoint's "state" item, read from its metadata only."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)   # orbax warns that a step-level metadata file is absent
  try:
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  finally:
    logging.set_verbosity(level)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {_key_names(path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


def check_shapes(stored: dict, abstract, where: str, prefix: tuple[str, ...] = ()) -> None:
  """CheckpointError if a saved array's shape differs from the target's (a different model)."""
  for path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    key = prefix + _key_names(path)
    if key in stored and stored[key] != tuple(want.shape):
      raise CheckpointError(
          f"checkpoint {where} is incompatible with this model: {'/'.join(key)} has shape "
          f"{stored[key]}, the model wants {tuple(want.shape)}; use the run's own model config "
          "or a new run_dir")


def _shapes_or_error(directory: str, step: int) -> dict:
  try:
    return stored_shapes(os.path.join(directory, str(step), "state"))
  except Exception as e:
    raise CheckpointError(_corrupt(directory, step, e)) from e


def restore_params(path: str, abstract_params) -> tuple[dict, int]:
  """Weights only (for `init_from`): the params of the latest checkpoint under `path`."""
  directory = _checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"init_from={path!r} is not a directory; give a run directory or its "
                          "checkpoints/ directory")
  ckpt = Checkpointer(directory, use_async=False)
  step = ckpt.latest_step()
  if step is None:
    raise CheckpointError(f"init_from={path!r} holds no finished checkpoint")
  check_shapes(_shapes_or_error(directory, step), abstract_params, f"{directory}/{step}",
               prefix=("params",))
  try:
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args={"params": jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                               dtype=a.dtype), abstract_params)},
            partial_restore=True)))["state"]
  except Exception as e:
    raise CheckpointError(_corrupt(directory, step, e)) from e
  return restored["params"], step
