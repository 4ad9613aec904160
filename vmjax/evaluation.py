"""Evaluation of registration methods on labelled pairs: Dice per structure, folding, time.

Methods share one interface, ``method(moving, fixed) -> Outcome``, on
:class:`vmjax.io.Volume` pairs on the same grid, so ``identity`` (the affine-only input),
``vmjax`` (with or without instance optimisation; or the whole path from native grids) and ANTs
(antspyx, optional; several presets) are measured the same way on the same pairs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tempfile
import time
from typing import Callable

from absl import logging
import jax
import numpy as np

from vmjax import ants_io
from vmjax import metrics
from vmjax import pipeline
from vmjax import registration
from vmjax.atomic import atomic_path

def scan_name(path: str | None) -> str:
  """``folder/file`` of a scan's path: short, and tells apart scans that share a file name
  (every OASIS scan is ``t1.nii.gz``)."""
  if not path:
    return str(path)
  return os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))),
                      os.path.basename(path))


def dice_per_label(seg_a: np.ndarray, seg_b: np.ndarray, labels) -> np.ndarray:
  """Dice of each label (NaN where absent from both) of two label maps of any equal shape:
  :func:`vmjax.metrics.dice` on one pair, as numpy."""
  return np.asarray(metrics.dice(np.asarray(seg_a)[None], np.asarray(seg_b)[None], labels)[0],
                    np.float64)


@dataclasses.dataclass
class Outcome:
  """What one method produced for one pair."""
  moved: np.ndarray | None
  moved_seg: np.ndarray
  disp: np.ndarray | None  # (D, H, W, 3) voxels, for vmjax-style methods
  folding_count: int
  folding_fraction: float
  seconds: float
  compile_seconds: float = 0.0  # one-off compilation this pair paid for (first of a shape)


def folding_stats(jacobian_det: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, float]:
  """Count and fraction of voxels (inside ``mask`` if given) with Jacobian determinant <= 0."""
  values = jacobian_det if mask is None else jacobian_det[mask]
  count = int((values <= 0).sum())
  return count, count / max(values.size, 1)


def identity_method(moving, fixed) -> Outcome:
  """The affine-only input (VoxelMorph's "Affine" row): no deformation at all."""
  del fixed
  return Outcome(moving.image, moving.seg, np.zeros((*moving.image.shape, 3), np.float32), 0,
                 0.0, 0.0)


def _outcome(out: dict, seconds: float, compile_seconds: float) -> Outcome:
  det = out.get("jacobian_det")
  if det is None:
    det = metrics.jacobian_determinant(out["disp"][None])[0]
  count, fraction = folding_stats(np.asarray(det))
  return Outcome(np.asarray(out["moved"]), np.asarray(out["moved_seg"]), np.asarray(out["disp"]),
                 count, fraction, seconds, compile_seconds)


def timed_method(register: Callable, register_batch: Callable | None = None) -> Callable:
  """A registration function ``register(moving, fixed) -> dict`` (``disp``, ``moved``,
  ``moved_seg``, optionally ``jacobian_det``) as a method. ``seconds`` excludes compilation: the
  first call of each shape runs twice, and the difference is reported as ``compile_seconds``.

  With ``register_batch(pairs) -> [dict, ...]`` (pairs of one grid shape in one call) the
  method also has ``.batch(pairs) -> [Outcome, ...]``, whose ``seconds`` are the call's time
  divided among its pairs (:func:`evaluate_methods` with ``batch_size``)."""
  compiled = set()

  def timed(fn, key):
    def call():
      start = time.perf_counter()
      out = fn()
      jax.block_until_ready([o["disp"] for o in out])
      return out, time.perf_counter() - start

    first = None
    if key not in compiled:
      _, first = call()
      compiled.add(key)
    out, seconds = call()
    return out, seconds, 0.0 if first is None else max(first - seconds, 0.0)

  def run(moving, fixed) -> Outcome:
    (out,), seconds, compile_seconds = timed(lambda: [register(moving, fixed)],
                                             (1, moving.image.shape, fixed.image.shape))
    return _outcome(out, seconds, compile_seconds)

  def batch(pairs) -> list[Outcome]:
    key = (len(pairs), pairs[0][0].image.shape, pairs[0][1].image.shape)
    outs, seconds, compile_seconds = timed(lambda: register_batch(pairs), key)
    return [_outcome(out, seconds / len(pairs), compile_seconds if i == 0 else 0.0)
            for i, out in enumerate(outs)]

  if register_batch is not None:
    run.batch = batch
  return run


def vmjax_method(model, variables, config,
                 instance: registration.InstanceOptimisation | None = None) -> Callable:
  """A vmjax model on pairs already aligned on one grid
  (:func:`registration.register_aligned_volumes`; batches:
  :func:`registration.register_aligned_volume_batch`)."""
  return timed_method(
      lambda moving, fixed: registration.register_aligned_volumes(
          model, variables, config, moving, fixed, instance),
      lambda pairs: registration.register_aligned_volume_batch(
          model, variables, config, pairs, instance))


def vmjax_pipeline_method(model, variables, config, space, deformable: bool = True,
                          instance: registration.InstanceOptimisation | None = None
                          ) -> Callable:
  """The whole path from any grids (:func:`pipeline.register_native_volumes`: affine to the model's
  template, the network, the composed field on the fixed grid); ``deformable=False``: the
  affine step alone."""
  return timed_method(lambda moving, fixed: pipeline.register_native_volumes(
      model, variables, config, moving, fixed, space, "affine", instance,
      deformable=deformable))


def ants_available() -> bool:
  try:
    import ants  # noqa: F401
  except ImportError:
    return False
  return True


# The ANTs presets evaluate.py knows: antspyx's type_of_transform names. "SyN" is its quick
# default (affine + SyN with mutual information, reg_iterations (40, 20, 0): no iterations at
# full resolution); "SyNCC" uses cross-correlation; "antsRegistrationSyN[s]" is the
# antsRegistrationSyN.sh recipe (rigid + affine + SyN, CC, iterations down to full resolution).
ANTS_PRESETS = ("Affine", "SyN", "SyNCC", "antsRegistrationSyN[s]", "antsRegistrationSyNQuick[s]")


def ants_image(array: np.ndarray, like):
  """An ANTs image of ``array`` with the geometry of the Volume ``like`` (spacing, origin,
  direction), converted from NIfTI's RAS to ITK's LPS as ITK's NIfTI reader does."""
  import ants
  origin, spacing, direction = ants_io.itk_geometry(like.affine)
  return ants.from_numpy(np.asarray(array, np.float32), origin=origin, spacing=spacing,
                         direction=direction)


def ants_method(type_of_transform: str = "SyN", cache_dir: str | None = None) -> Callable:
  """ANTs (antspyx) with a preset of :data:`ANTS_PRESETS` as a method, on images with their
  real geometry; labels warped with its transforms (nearest neighbour); folding from ANTs'
  Jacobian determinant of the deformable warp. With ``cache_dir`` each pair's outcome is kept
  (``ants_<preset>_<moving>_<fixed>.npz``) and reused by a rerun: these presets take minutes."""
  import ants

  def cache_path(moving, fixed):
    if cache_dir is None:
      return None
    name = "_".join([type_of_transform, scan_name(moving.path), scan_name(fixed.path)])
    return os.path.join(cache_dir, "ants_" + re.sub(r"[^A-Za-z0-9.-]+", "-", name) + ".npz")

  def run(moving, fixed) -> Outcome:
    cached = cache_path(moving, fixed)
    if cached and os.path.exists(cached):
      with np.load(cached) as c:
        logging.info("ANTs %s: cached result %s", type_of_transform, cached)
        return Outcome(c["moved"], c["moved_seg"], None, int(c["folding_count"]),
                       float(c["folding_fraction"]), float(c["seconds"]))
    fixed_img, moving_img = ants_image(fixed.image, fixed), ants_image(moving.image, moving)
    start = time.perf_counter()
    reg = ants.registration(fixed=fixed_img, moving=moving_img,
                            type_of_transform=type_of_transform)
    seconds = time.perf_counter() - start
    moved_seg = ants.apply_transforms(fixed=fixed_img, moving=ants_image(moving.seg, moving),
                                      transformlist=reg["fwdtransforms"],
                                      interpolator="nearestNeighbor").numpy()
    warps = [t for t in reg["fwdtransforms"] if t.endswith((".nii.gz", ".nii"))]
    if warps:
      det = ants.create_jacobian_determinant_image(fixed_img, warps[0]).numpy()
      count, fraction = folding_stats(det)
    else:
      count, fraction = 0, 0.0
    for path in set(reg["fwdtransforms"]) | set(reg["invtransforms"]):
      # antspyx leaves its transform files in the temp dir: remove them (only those).
      if os.path.isfile(path) and os.path.dirname(os.path.abspath(path)) == tempfile.gettempdir():
        os.unlink(path)
    outcome = Outcome(reg["warpedmovout"].numpy().astype(np.float32),
                      np.rint(moved_seg).astype(np.int32), None, count, fraction, seconds)
    if cached:
      with atomic_path(cached) as tmp:
        np.savez_compressed(tmp, moved=outcome.moved, moved_seg=outcome.moved_seg,
                            folding_count=count, folding_fraction=fraction, seconds=seconds)
    return outcome

  return run


def _batches(pairs, batch_size: int):
  """Consecutive runs of at most ``batch_size`` pair indices whose grids share one shape."""
  runs = []
  for _, group in itertools.groupby(
      range(len(pairs)), key=lambda i: (pairs[i][0].image.shape, pairs[i][1].image.shape)):
    group = list(group)
    runs += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
  return runs


def evaluate_methods(methods: dict, pairs, labels, batch_size: int = 1) -> list[dict]:
  """Runs every method on every pair; methods that take batches (``.batch``, e.g.
  :func:`vmjax_method`) get up to ``batch_size`` pairs of one grid shape per call.

  Returns:
    one record per (method, pair): ``method``, ``pair``, ``dice`` (per label, ``(L,)``),
    ``folding_count``, ``folding_fraction``, ``seconds``, and the ``outcome``.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for p, (moving, fixed) in enumerate(pairs):
    if moving.seg is None or fixed.seg is None:
      raise ValueError(f"pair {p} ({moving.path} -> {fixed.path}) has no labels to evaluate")
  batched = {}  # method -> {pair: Outcome}, computed batch by batch up front
  for name, method in methods.items():
    if batch_size > 1 and hasattr(method, "batch"):
      batched[name] = {}
      for run in _batches(pairs, batch_size):
        outcomes = method.batch([pairs[i] for i in run])
        logging.info("pairs %s %s: %s in one batch, %.1f s per pair (+ %.1f s compile)",
                     ",".join(str(i + 1) for i in run), name, len(run), outcomes[0].seconds,
                     outcomes[0].compile_seconds)
        batched[name].update(zip(run, outcomes))
  records = []
  for p, (moving, fixed) in enumerate(pairs):
    for name, method in methods.items():
      if name in batched:
        outcome = batched[name][p]
      else:
        outcome = method(moving, fixed)
        logging.info("pair %d/%d %s: %s %.1f s (+ %.1f s compile)", p + 1, len(pairs),
                     scan_name(moving.path), name, outcome.seconds, outcome.compile_seconds)
      records.append({"method": name, "pair": p, "moving": moving.path, "fixed": fixed.path,
                      "dice": dice_per_label(outcome.moved_seg, fixed.seg, labels),
                      "folding_count": outcome.folding_count,
                      "folding_fraction": outcome.folding_fraction,
                      "seconds": outcome.seconds, "outcome": outcome})
  return records


def summarize(records: list[dict]) -> dict:
  """Per method: Dice (mean over labels per pair, then mean ± std over pairs), folding %,
  seconds per pair."""
  summary = {}
  for name in dict.fromkeys(r["method"] for r in records):
    rows = [r for r in records if r["method"] == name]
    per_pair = np.array([np.nanmean(r["dice"]) for r in rows])
    summary[name] = {
        "pairs": len(rows),
        "dice_mean": float(per_pair.mean()), "dice_std": float(per_pair.std()),
        "folding_percent_mean": float(100 * np.mean([r["folding_fraction"] for r in rows])),
        "folding_count_mean": float(np.mean([r["folding_count"] for r in rows])),
        "seconds_per_pair": float(np.mean([r["seconds"] for r in rows])),
        "compile_seconds": float(sum(r["outcome"].compile_seconds for r in rows
                                     if "outcome" in r)),
    }
  return summary
