"""Checkpoints with orbax: periodic async saves, keep-last-K, skip-unreadable restore, and
rebuilding a trained model from a workdir alone.

Each checkpoint ``<dir>/<step>/`` holds ``state`` (params, optimizer state, step, PRNG key) and
``meta`` (JSON: the config, the step, the data iterator's position). Orbax writes into a
temporary directory and renames it when complete, so a process killed mid-save never leaves a
checkpoint that is picked up half-written; one that is unreadable anyway (truncated, corrupted)
is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointManager:
  """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for vmjax train states."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict | None = None,
               max_to_keep: int | None = None, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.config = config
    keep = max_to_keep or (config.get("keep_checkpoints", 3) if config is not None else 3)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def save(self, step: int, state, data_position: int | None = None) -> None:
    """Saves ``state`` at ``step`` (asynchronously; see :meth:`wait_until_finished`)."""
    meta = {"step": int(step),
            "data_position": int(step if data_position is None else data_position),
            "config": json.loads(self.config.to_json_best_effort()) if self.config else None}
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore_latest(self, target):
    """Restores the newest readable checkpoint into the structure of ``target``.

    Returns:
      ``(state, meta)``, or ``(target, None)`` when there is no readable checkpoint.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]
      except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
        logging.warning("checkpoint at step %d in %s is unreadable, skipping it: %s: %s", step,
                        self.directory, type(e).__name__, str(e).splitlines()[0][:300])
    return target, None

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, from its newest readable checkpoint's metadata."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints directory in workdir {workdir}")
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=("state", "meta"))
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      return ml_collections.ConfigDict(meta["config"])
    except Exception as e:
      logging.warning("checkpoint metadata at step %d unreadable, skipping: %s", step, e)
  raise FileNotFoundError(f"workdir {workdir} has no readable checkpoint")


def load_trained(workdir: str):
  """Rebuilds a trained model from a training workdir alone.

  Returns:
    ``(model, variables, config)``; ``vmjax.register(model, variables, moving, fixed)`` then
    registers pairs of any spatial shape divisible by ``2**model.levels``.
  """
  from vmjax import train  # local import: train imports this module
  config = load_config(workdir)
  model = train.model_from_config(config.model)
  # Convolution weights do not depend on the volume size: the smallest valid grid will do.
  target = train.create_train_state(config, jax.random.PRNGKey(0), (2 ** model.levels,) * 3)
  manager = CheckpointManager(os.path.join(workdir, "checkpoints"), config)
  state, meta = manager.restore_latest(target)
  if meta is None:
    raise FileNotFoundError(f"workdir {workdir} has no readable checkpoint")
  return model, {"params": state.params}, config
