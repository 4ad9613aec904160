"""Checkpoints with orbax: periodic async saves, keep-last-K, the best by validation Dice,
skip-unreadable restore, and rebuilding a trained model from a workdir alone.

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
import jax.numpy as jnp
import ml_collections

from vmjax import networks


def _orbax():
  """``orbax.checkpoint``, imported where a checkpoint is written or read: importing it cost
  every command 0.13 s of start-up, also those that read none (``vmjax-register`` with the
  shipped model; 2-core AMD EPYC Zen 4, 2026-12-06)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


def _abstract(tree):
  ocp = _orbax()
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointManager:
  """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for vmjax train states."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict | None = None,
               max_to_keep: int | None = None, async_save: bool = True,
               best_metric: str | None = None):
    """``best_metric``: keep only the checkpoint with the highest value of this metric (given
    to :meth:`save`), instead of the newest ``max_to_keep``."""
    self.directory = os.path.abspath(directory)
    self.config = config
    keep = max_to_keep or (config.get("keep_checkpoints", 3) if config is not None else 3)
    best = {}
    if best_metric:
      keep = 1
      best = dict(best_fn=lambda metrics: metrics[best_metric], best_mode="max",
                  keep_checkpoints_without_metrics=False)
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save, **best)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def save(self, step: int, state, data_position: int | None = None,
           metrics: dict | None = None) -> None:
    """Saves ``state`` at ``step`` (asynchronously; see :meth:`wait_until_finished`), with the
    ``metrics`` a best-by-metric manager ranks it by."""
    meta = {"step": int(step),
            "data_position": int(step if data_position is None else data_position),
            "config": json.loads(self.config.to_json_best_effort()) if self.config else None}
    ocp = _orbax()
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True,
                       metrics=metrics)

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _readable(self, step: int | None, restore):
    """``restore(step)`` for ``step``, or for the newest step that restores without error."""
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if step is not None and step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}")
    for s in steps:
      try:
        return restore(s)
      except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
        if step is not None:
          raise ValueError(f"checkpoint at step {s} in {self.directory} is unreadable: "
                           f"{type(e).__name__}: {e}") from e
        logging.warning("checkpoint at step %d in %s is unreadable, skipping it: %s: %s", s,
                        self.directory, type(e).__name__, str(e).splitlines()[0][:300])
    return None

  def restore_latest(self, target, step: int | None = None):
    """Restores the newest readable checkpoint (or ``step``) into the structure of ``target``.

    Returns:
      ``(state, meta)``, or ``(target, None)`` when there is no readable checkpoint.
    """
    ocp = _orbax()

    def restore(s):
      out = self._manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
      return out["state"], out["meta"]
    return self._readable(step, restore) or (target, None)

  def restore_params(self, step: int):
    """The model parameters alone of the checkpoint at ``step`` (no optimizer state needed)."""
    ocp = _orbax()
    state = self._readable(step, lambda s: self._manager.restore(
        s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"])
    return jax.tree_util.tree_map(jnp.asarray, state["params"])

  def restore_meta(self, step: int | None = None) -> dict | None:
    """The JSON metadata (config, step, data position) of the newest readable checkpoint."""
    ocp = _orbax()
    return self._readable(step, lambda s: self._manager.restore(
        s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


# Where training keeps the checkpoint with the best validation Dice (beside ``checkpoints/``).
BEST = "best_checkpoint"


def _locate(path: str, best: bool = False) -> tuple[str, int | None]:
  """``(checkpoints directory, step or None)`` for a workdir or a ``.../checkpoints/<step>``."""
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(os.path.basename(path))
  directory = os.path.join(path, BEST if best else "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no {os.path.basename(directory)} directory in workdir {path}"
                            + (" (it is written when training validates with labels)"
                               if best else ""))
  return directory, None


def load_trained(path: str, best: bool = False):
  """Rebuilds a trained model from a training workdir (newest readable checkpoint; with
  ``best``, the one with the best validation Dice) or from one checkpoint directory
  ``workdir/checkpoints/<step>``, with nothing else needed: the network from the config stored
  with the checkpoint, the parameters alone from its state.

  Returns:
    ``(model, variables, config)``; ``vmjax.register(model, variables, moving, fixed)`` then
    registers pairs of any spatial shape divisible by ``2**model.levels``.
  """
  directory, step = _locate(path, best)
  manager = CheckpointManager(directory, max_to_keep=None)
  if step is None and not manager.all_steps():
    raise FileNotFoundError(f"no checkpoint in {directory}")
  meta = manager.restore_meta(step)
  if meta is None:
    raise FileNotFoundError(f"no readable checkpoint in {directory}")
  config = ml_collections.ConfigDict(meta["config"])
  model = networks.model_from_config(config.model)
  params = manager.restore_params(step if step is not None else meta["step"])
  return model, {"params": params}, config
