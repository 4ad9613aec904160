"""Data: preparing volumes for the network, and a stateless, shardable pair sampler.

Volumes are read by :mod:`vmjax.io` (NIfTI, MGH, npz). Registration data sets are small (tens
to hundreds of volumes), so each process loads its shard once into memory; the sampler is a
pure function of ``(seed, step, process)``, which makes the data iterator's position simply the
step number (exact resume) and shards cleanly across hosts. Augmentation runs on the accelerator
inside the jitted train step (``vmjax.augment``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from vmjax import augment
from vmjax import checks
from vmjax import io
from vmjax.checks import DataError
from vmjax.io import Volume

def normalize_intensity(image: np.ndarray, method: str) -> np.ndarray:
  """``"percentile"``: divide by the 99.5th percentile and clip to [0, 1]; ``"foreground"``: the
  same with the 99.5th percentile of the non-zero voxels only (skull-stripped scans, whose
  background would otherwise set the scale; how OASIS-TRT-20 was prepared); ``"minmax"``: scale
  to [0, 1]; ``"none"``: unchanged."""
  if method == "none":
    return image
  if method == "minmax":
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)
  if method in ("percentile", "foreground"):
    # The non-zero voxels picked from a flat view in memory order (no copy of a NIfTI's
    # Fortran-ordered array): numpy's boolean indexing of a 3-D array took 50 ms of a
    # 256x256x160 scan, of its flat view 5 ms (2-core AMD EPYC Zen 4, 2026-12-06).
    flat = np.ravel(image, order="K")
    values = flat[flat != 0] if method == "foreground" and image.any() else flat
    hi = float(np.percentile(values, 99.5))
    hi = hi if hi > 0 else float(image.max()) or 1.0
    out = np.divide(image, hi, dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)
  raise DataError(f"unknown intensity normalisation {method!r} (percentile, foreground, "
                  "minmax, none)")


def downsample(volume: Volume, factor: int) -> Volume:
  """Integer downsampling: mean of ``factor``^3 blocks for the image, the block centre's label."""
  if factor == 1:
    return volume
  shape = tuple(n // factor * factor for n in volume.image.shape)
  image = volume.image[:shape[0], :shape[1], :shape[2]]
  image = image.reshape(shape[0] // factor, factor, shape[1] // factor, factor,
                        shape[2] // factor, factor).mean(axis=(1, 3, 5))
  seg = None
  if volume.seg is not None:
    c = factor // 2
    seg = volume.seg[c:shape[0]:factor, c:shape[1]:factor, c:shape[2]:factor]
  affine = volume.affine.copy()
  affine[:3, :3] = affine[:3, :3] * factor
  return dataclasses.replace(volume, image=image.astype(np.float32), seg=seg, affine=affine,
                             header=None)


def fit_shape(volume: Volume, shape: Sequence[int]) -> Volume:
  """Centre-crops and/or zero-pads a volume to ``shape``."""
  def fit(array):
    out = np.zeros(shape, array.dtype)
    src, dst = [], []
    for n, t in zip(array.shape, shape):
      if n >= t:
        start = (n - t) // 2
        src.append(slice(start, start + t))
        dst.append(slice(0, t))
      else:
        start = (t - n) // 2
        src.append(slice(0, n))
        dst.append(slice(start, start + n))
    out[tuple(dst)] = array[tuple(src)]
    return out
  shape = tuple(int(n) for n in shape)
  if volume.image.shape == shape:
    return volume
  return dataclasses.replace(volume, image=fit(volume.image),
                             seg=None if volume.seg is None else fit(volume.seg), header=None)


def prepare(volume: Volume, normalize: str = "percentile", factor: int = 1,
            shape: Sequence[int] | None = None) -> Volume:
  """Normalises intensities, downsamples by ``factor``, then fits to ``shape`` (if given)."""
  volume = dataclasses.replace(volume, image=normalize_intensity(volume.image, normalize))
  volume = downsample(volume, factor)
  return fit_shape(volume, shape) if shape else volume


def load_set(spec, seg_replace=None, what="data", normalize="percentile", factor=1, shape=None,
             shard: tuple[int, int] = (0, 1)) -> list[Volume]:
  """Loads this process's shard ``(index, count)`` of a data specification, prepared, and checks
  that every volume has the same shape."""
  volumes = [prepare(v, normalize, factor, shape)
             for v in _load_any(spec, seg_replace, what, shard)]
  check_same_shape(volumes, what)
  return volumes


def check_same_shape(volumes: Sequence[Volume], what: str) -> None:
  """Raises :class:`DataError` unless all prepared ``volumes`` share the first one's shape."""
  first = volumes[0]
  for v in volumes[1:]:
    if v.image.shape != first.image.shape:
      raise DataError(f"{what}: {v.path} has shape {v.image.shape} after preparation, but "
                      f"{first.path} has {first.image.shape}; set data.shape to fit them all")


def read_labels(spec) -> list[int]:
  """Label list: a sequence of ints, a comma-separated string, or a text file (one per line)."""
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return []
  if isinstance(spec, str):
    if os.path.isfile(spec):
      with open(spec) as f:
        return [int(t) for t in f.read().replace(",", " ").split()]
    return [int(t) for t in spec.replace(",", " ").split()]
  return [int(t) for t in spec]


class PairSampler:
  """Draws training pairs as a pure function of ``(seed, step, process)``.

  ``mode="atlas"``: moving = a random subject, fixed = the atlas. ``mode="pairs"``: moving and
  fixed two different random subjects. ``batch(step)`` returns numpy arrays with a leading
  ``(local_devices, per_device_batch)``: images ``(..., D, H, W, 1)`` float32 and, when every
  volume has labels, ``*_seg`` ``(..., D, H, W, 1)`` int32.
  """

  def __init__(self, subjects: list[Volume], mode: str, atlas: Volume | None, seed: int,
               process_index: int = 0):
    if mode not in ("atlas", "pairs"):
      raise DataError(f"data.mode must be 'atlas' or 'pairs', got {mode!r}")
    if mode == "atlas" and atlas is None:
      raise DataError("data.mode='atlas' needs data.atlas")
    if mode == "pairs" and len(subjects) < 2:
      raise DataError(f"data.mode='pairs' needs at least 2 training subjects, got "
                      f"{len(subjects)}")
    if atlas is not None and atlas.image.shape != subjects[0].image.shape:
      raise DataError(f"atlas {atlas.path} has shape {atlas.image.shape} but training subject "
                      f"{subjects[0].path} has {subjects[0].image.shape}")
    self.subjects, self.mode, self.atlas = subjects, mode, atlas
    self.seed, self.process_index = seed, process_index
    everyone = subjects + ([atlas] if atlas is not None else [])
    self.has_seg = all(v.seg is not None for v in everyone)

  def indices(self, step: int, count: int) -> np.ndarray:
    """``(count, 2)`` subject indices (moving, fixed; fixed = -1 for the atlas)."""
    rng = np.random.default_rng([self.seed, step, self.process_index])
    n = len(self.subjects)
    moving = rng.integers(n, size=count)
    if self.mode == "atlas":
      return np.stack([moving, np.full(count, -1)], axis=1)
    fixed = (moving + rng.integers(1, n, size=count)) % n  # never the same subject
    return np.stack([moving, fixed], axis=1)

  def batch(self, step: int, local_devices: int, per_device: int) -> dict[str, np.ndarray]:
    pairs = self.indices(step, local_devices * per_device)
    pick = lambda i: self.atlas if i < 0 else self.subjects[i]
    out = {"moving": [pick(m).image for m, _ in pairs], "fixed": [pick(f).image for _, f in pairs]}
    if self.has_seg:
      out["moving_seg"] = [pick(m).seg for m, _ in pairs]
      out["fixed_seg"] = [pick(f).seg for _, f in pairs]
    shape = (local_devices, per_device) + self.subjects[0].image.shape + (1,)
    return {k: np.stack(v).reshape(shape) for k, v in out.items()}


MNI152_SPEC = "nilearn:mni152"


def load_mni152() -> Volume:
  """The MNI152 2009 T1 template shipped inside the ``nilearn`` wheel (no download), with labels
  1 = grey matter, 2 = white matter from its tissue probability maps (> 0.5, the likelier)."""
  try:
    from nilearn import datasets
  except ImportError as e:
    raise DataError(f"{MNI152_SPEC} needs the optional package nilearn "
                    "(pip install -r requirements-demo.txt)") from e
  t1 = datasets.load_mni152_template(resolution=1)
  gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), np.float32)
  wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
  gm, wm = gm / max(gm.max(), 1e-6), wm / max(wm.max(), 1e-6)
  seg = np.where(np.maximum(gm, wm) > 0.5, np.where(gm >= wm, 1, 2), 0).astype(np.int32)
  return Volume(image=np.asarray(t1.get_fdata(), np.float32), seg=seg,
                affine=np.asarray(t1.affine), path=MNI152_SPEC, header=t1.header)


def _load_any(spec, seg_replace, what, shard):
  """Volumes of a specification (the MNI152 template, or files), unprepared."""
  if spec == MNI152_SPEC:
    return [load_mni152()]
  sources = io.resolve_sources(spec, seg_replace, what)
  index, count = shard
  mine = sources[index::count]
  if not mine:
    raise DataError(f"{what}: {len(sources)} file(s) cannot be sharded over {count} processes")
  return [io.load_volume(i, s) for i, s in mine]


@dataclasses.dataclass
class Dataset:
  """Everything the training loop needs from the data."""
  sampler: PairSampler
  val_pairs: list  # [(moving Volume, fixed Volume)]
  labels: list  # evaluation labels
  spatial_shape: tuple


def build(config, shard: tuple[int, int] = (0, 1), levels: int | None = None) -> Dataset:
  """Loads and checks the data described by ``config.data`` (see ``configs/default.py``).

  Args:
    shard: ``(process_index, process_count)``: this process loads only its share of the
      training subjects.
    levels: network depth; volumes must be divisible by ``2**levels``.
  """
  d = config.data
  seg_replace = tuple(d.seg_replace) if d.seg_replace else None
  shape = tuple(d.shape) if d.shape else None

  def load(spec, what, shard=(0, 1)):
    return load_set(spec, seg_replace, what, d.normalize, d.downsample, shape, shard)

  train = load(d.train, "data.train", shard)
  atlas = load(d.atlas, "data.atlas")[0] if d.atlas else None
  check_same_shape(train + ([atlas] if atlas else []), "data.train and data.atlas")
  spatial_shape = train[0].image.shape
  if levels:
    multiple = 2 ** levels
    if any(n % multiple for n in spatial_shape):
      raise DataError(f"prepared volumes have shape {spatial_shape}, not divisible by "
                      f"2**{levels}={multiple}; set data.shape, e.g. "
                      f"{checks.divisible_shape(spatial_shape, multiple)}")
  sampler = PairSampler(train, d.mode, atlas, config.seed, process_index=shard[0])

  val_pairs = []
  if d.val:
    val = load(d.val, "data.val")
    if d.mode == "atlas":
      val_pairs = [(v, atlas) for v in val]
    else:
      val_pairs = [(val[i], val[(i + 1) % len(val)]) for i in range(len(val))]
  if d.val_synthetic:
    val_pairs += augment.synthetic_pairs(atlas or train[0], d.val_synthetic, d.val_seed,
                                         config.augment)
  for moving, fixed in val_pairs:
    if moving.image.shape != spatial_shape:
      raise DataError(f"validation volume {moving.path} has shape {moving.image.shape}, "
                      f"training volumes {spatial_shape}")

  labels = read_labels(d.labels)
  if not labels:
    reference = atlas or train[0]
    if reference.seg is not None:
      labels = [int(x) for x in np.unique(reference.seg) if x != 0]
  return Dataset(sampler=sampler, val_pairs=val_pairs, labels=labels, spatial_shape=spatial_shape)
