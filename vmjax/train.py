"""Training: train state, the pmapped train step, evaluation, and the training loop.

Layout follows flax's ``examples/imagenet``: ``create_train_state``, ``train_step`` (pmapped,
gradients and metrics averaged with ``lax.pmean`` over the device axis), ``train_and_evaluate``.
Everything is read from an ``ml_collections`` config (``configs/default.py`` documents it).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from absl import logging
import flax.jax_utils
from flax.training import train_state
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vmjax import augment
from vmjax import checkpoints
from vmjax import conv
from vmjax import data as data_lib
from vmjax import losses
from vmjax import metrics as metrics_lib
from vmjax import networks
from vmjax import plots
from vmjax import summaries
from vmjax import transforms
from vmjax.atomic import atomic_path
from vmjax.native import build

AXIS = "devices"


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the base PRNG key (per-step keys are folded in from the step)."""
  rng: jax.Array


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """Adam (VoxelMorph: lr 1e-4), optionally with global-norm gradient clipping."""
  adam = optax.adam(opt_cfg.learning_rate, b1=opt_cfg.b1, b2=opt_cfg.b2)
  if opt_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), adam)
  return adam


def create_train_state(model: networks.VxmDense, config, rng: jax.Array,
                       spatial_shape) -> TrainState:
  """Initialises ``model`` (:func:`vmjax.networks.model_from_config`) for ``spatial_shape``
  volumes and the optimizer of ``config``."""
  init_rng, state_rng = jax.random.split(rng)
  variables = networks.init_variables(model, init_rng, spatial_shape)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            tx=make_optimizer(config.optimizer), rng=state_rng)
  # A typed step counter: a Python int would change type after the first step and recompile.
  return state.replace(step=jnp.zeros((), jnp.int32))


def augment_batch(rng: jax.Array, batch: dict, aug_cfg) -> dict:
  """Augments the moving image (and the fixed one if ``aug_cfg.fixed``) with its labels."""
  batch = dict(batch)
  names = ("moving", "fixed") if aug_cfg.fixed else ("moving",)
  for key, name in zip(jax.random.split(rng, len(names)), names):
    batch[name], seg = augment.augment_volume(key, batch[name], batch.get(f"{name}_seg"),
                                              aug_cfg)
    if seg is not None:
      batch[f"{name}_seg"] = seg
  return batch


def _augmentation_enabled(aug_cfg) -> bool:
  return any(aug_cfg[k] > 0 for k in ("deform_std", "gamma_std", "bias_std", "noise_std"))


def make_train_step(model: networks.VxmDense, config, seg_labels=(),
                    axis_name: str | None = AXIS):
  """``train_step(state, batch) -> (state, metrics)``.

  With ``axis_name`` (inside ``jax.pmap``) gradients and metrics are averaged over devices with
  ``lax.pmean``, so N devices with a batch each update like one device with N batches.
  """
  loss_cfg, aug_cfg = config.loss, config.augment
  augmenting = _augmentation_enabled(aug_cfg)
  seg_labels = tuple(seg_labels)

  def train_step(state: TrainState, batch: dict):
    if augmenting:
      rng = jax.random.fold_in(state.rng, state.step)
      if axis_name is not None:
        rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
      batch = augment_batch(rng, batch, aug_cfg)
    grad_fn = jax.value_and_grad(losses.compute_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, model, batch, loss_cfg, seg_labels)
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)
      metrics = lax.pmean(metrics, axis_name)
    # A non-finite loss or gradient is skipped: parameters and optimizer state stay as they
    # were (the step still counts, so data position and PRNG stay aligned with it).
    finite = jnp.isfinite(metrics["loss"])
    for g in jax.tree_util.tree_leaves(grads):
      finite &= jnp.all(jnp.isfinite(g))
    updated = state.apply_gradients(grads=grads)
    def keep(new, old):
      return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    state = updated.replace(params=keep(updated.params, state.params),
                            opt_state=keep(updated.opt_state, state.opt_state))
    return state, {**metrics, "finite": finite.astype(jnp.float32)}

  return train_step


def make_eval_step(model: networks.VxmDense, config, labels):
  """``eval_step(params, moving, fixed, moving_seg, fixed_seg) -> metrics`` (jitted, one pair
  batch): image loss, folding fraction, and per-label Dice before and after registration."""
  sim = losses.image_loss(config.loss)
  labels = tuple(labels)

  @jax.jit
  def eval_step(params, moving, fixed, moving_seg, fixed_seg):
    disp = model.apply({"params": params}, moving, fixed)
    out = {"image": sim(fixed, transforms.warp(moving, disp)),
           "folding": metrics_lib.folding_fraction(disp)[0]}
    if labels:
      moved_seg = transforms.warp(moving_seg, disp, order=0)
      out["dice"] = metrics_lib.dice(moved_seg, fixed_seg, labels)[0]
      out["dice_before"] = metrics_lib.dice(moving_seg, fixed_seg, labels)[0]
    return out

  return eval_step


def evaluate(eval_step, params, pairs, labels) -> dict:
  """Mean metrics over validation pairs ``[(moving Volume, fixed Volume), ...]``."""
  results = []
  for moving, fixed in pairs:
    expand = lambda a: jnp.asarray(a)[None, ..., None]
    has_seg = labels and moving.seg is not None and fixed.seg is not None
    zeros = jnp.zeros((1, *moving.image.shape, 1), jnp.int32)
    out = eval_step(params, expand(moving.image), expand(fixed.image),
                    expand(moving.seg) if has_seg else zeros,
                    expand(fixed.seg) if has_seg else zeros)
    results.append(jax.device_get(out))
  summary = {"image": float(np.mean([r["image"] for r in results])),
             "folding": float(np.mean([r["folding"] for r in results]))}
  if labels and "dice" in results[0]:
    summary["dice"] = float(np.nanmean([r["dice"] for r in results]))
    summary["dice_before"] = float(np.nanmean([r["dice_before"] for r in results]))
  return summary


def example_figure(path: str, model, params, pair) -> None:
  """One held-out pair drawn (moving, fixed, moved, field, warped grid, Jacobian) to a PNG."""
  if not plots.available():
    logging.warning("matplotlib not installed: no figure (pip install -r requirements-demo.txt)")
    return
  moving, fixed = pair
  m, f = (jnp.asarray(v.image)[None, ..., None] for v in (moving, fixed))
  disp = model.apply({"params": params}, m, f)
  plots.registration_figure(path, moving.image, fixed.image,
                            np.asarray(transforms.warp(m, disp))[0, ..., 0], np.asarray(disp[0]),
                            np.asarray(metrics_lib.jacobian_determinant(disp))[0],
                            title="held-out validation pair")
  logging.info("example registration drawn to %s", path)


class _Preemption:
  """When to stop for a preemption notice (SIGTERM): after the same step on every process.

  One process: a SIGTERM handler sets a flag, read after each step. Several processes
  (``jax.distributed``): JAX's preemption service owns SIGTERM; a notice reaching any process is
  relayed to all, and ``multihost_utils.reached_preemption_sync_point(step)`` turns true on
  every process at the same step (the largest step any of them has reached, plus one). So all
  processes write that step's checkpoint together and leave the loop together, instead of one
  leaving while the others wait for it in the next ``pmean``.
  """

  def __init__(self, multihost: bool):
    self.multihost = multihost
    self.requested = False
    self._previous = None
    if not multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: writing a checkpoint, then stopping")
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after ``step`` (call it after every step)."""
    if self.multihost:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def format_eta(seconds: float) -> str:
  """``H:MM:SS`` for a progress log."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from ``workdir/checkpoints`` if there is one) and evaluates.

  Returns:
    the last validation summary (empty if there is no validation data).
  """
  if config.get("distributed", False) and not jax.distributed.is_initialized():
    jax.distributed.initialize()  # the cluster's own settings (TPU pod, SLURM, Open MPI, k8s)
  process, processes = jax.process_index(), jax.process_count()
  local_devices, devices = jax.local_device_count(), jax.device_count()

  model = networks.model_from_config(config.model)  # the run's one model
  backend = jax.default_backend()
  logging.info("platform %s, %s; convolutions: %s", backend,
               build.cpu_model() if backend == "cpu" else jax.devices()[0].device_kind,
               conv.describe_path())
  dataset = data_lib.build(config, shard=(process, processes), levels=model.levels)
  spatial_shape = dataset.spatial_shape
  os.makedirs(workdir, exist_ok=True)  # after the data checks: a bad input leaves nothing behind
  per_device = config.per_device_batch_size
  logging.info("devices: %d (%d local, process %d of %d); global batch %d = %d per device x %d "
               "devices; volumes %s; %d training subjects on this process",
               devices, local_devices, process, processes, per_device * devices, per_device,
               devices, spatial_shape, len(dataset.sampler.subjects))

  state = create_train_state(model, config, jax.random.PRNGKey(config.seed), spatial_shape)
  manager = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"), config)
  best = checkpoints.CheckpointManager(os.path.join(workdir, checkpoints.BEST), config,
                                       best_metric="dice")
  state, meta = manager.restore_latest(state)
  start = int(state.step)
  if meta is not None:
    logging.info("resumed from checkpoint at step %d (data position %d)", start,
                 meta.get("data_position", start))
  else:
    logging.info("no checkpoint in %s: starting from step 0", manager.directory)

  p_step = jax.pmap(make_train_step(model, config, dataset.labels), axis_name=AXIS,
                    donate_argnums=(0,))
  eval_step = make_eval_step(model, config, dataset.labels)
  # Through an identity pmap so the state already has the sharding p_step returns (else the
  # second step compiles p_step again).
  p_state = jax.pmap(lambda s: s, axis_name=AXIS)(flax.jax_utils.replicate(state))
  writer = summaries.MetricWriter(workdir, enabled=process == 0, resume_step=start)
  if process == 0:
    with atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  preemption = _Preemption(multihost=processes > 1)
  num_steps = config.num_steps
  summary: dict[str, Any] = {}

  def unreplicate(tree):
    """The first local device's copy of replicated values, on the host. Never ``x[0]`` of the
    global array: with several processes that is a computation over every process's devices
    (and a hang when they do not all dispatch it alike)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0))[0], tree)

  def save(step):
    manager.save(step, unreplicate(p_state), data_position=step)

  tick, tick_step = time.time(), start
  patience, skipped = config.get("nonfinite_patience", 10), 0
  try:
    for step in range(start, num_steps):
      batch = dataset.sampler.batch(step, local_devices, per_device)
      p_state, step_metrics = p_step(p_state, batch)
      done = step + 1
      # One scalar per step from the device (a sync; the step's own compute dominates).
      if float(unreplicate(step_metrics["finite"])):
        skipped = 0
      else:
        skipped += 1
        logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row; "
                        "the run stops at %d)", done, skipped, patience)
        if skipped >= patience:
          raise FloatingPointError(
              f"training diverged: {skipped} consecutive non-finite steps up to step {done} "
              f"(config.nonfinite_patience={patience}); the last good checkpoint is step "
              f"{manager.latest_step()} in {manager.directory}")
      if done % config.log_every == 0 or done == num_steps:
        step_metrics = {k: float(v) for k, v in unreplicate(step_metrics).items()}
        now = time.time()
        steps_per_s = (done - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, done
        rates = {"steps_per_s": steps_per_s, "pairs_per_s": steps_per_s * per_device * devices}
        logging.info("step %d/%d  %s  %.3f steps/s  %.2f pairs/s  ETA %s", done, num_steps,
                     "  ".join(f"{k}={v:.5f}" for k, v in step_metrics.items()),
                     rates["steps_per_s"], rates["pairs_per_s"],
                     format_eta((num_steps - done) / max(steps_per_s, 1e-9)))
        writer.write(done, {**{f"train/{k}": v for k, v in step_metrics.items()}, **rates})
      if dataset.val_pairs and (done % config.eval_every == 0 or done == num_steps):
        summary = evaluate(eval_step, unreplicate(p_state.params), dataset.val_pairs,
                           dataset.labels)
        logging.info("validation at step %d: %s", done,
                     "  ".join(f"{k}={v:.4f}" for k, v in summary.items()))
        writer.write(done, {f"val/{k}": v for k, v in summary.items()})
        if "dice" in summary:
          best.save(done, unreplicate(p_state), data_position=done,
                    metrics={"dice": summary["dice"]})
      stop = preemption.reached(done)
      if done % config.checkpoint_every == 0 or done == num_steps or stop:
        save(done)
      if stop:
        logging.warning("preemption: stopped at step %d (all %d processes); checkpoint written",
                        done, processes)
        break
  finally:
    manager.wait_until_finished()
    best.wait_until_finished()
    writer.close()
    preemption.restore()
  if summary and "dice" in summary:
    logging.info("validation Dice before registration %.4f -> after %.4f (%d pairs)",
                 summary["dice_before"], summary["dice"], len(dataset.val_pairs))
  if dataset.val_pairs and process == 0:
    example_figure(os.path.join(workdir, "registration.png"), model,
                   unreplicate(p_state.params), dataset.val_pairs[0])
  logging.info("checkpoints in %s (latest step %s; best validation Dice: step %s in %s)",
               manager.directory, manager.latest_step(), best.latest_step(), best.directory)
  return summary
