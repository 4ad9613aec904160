"""Scan files: reading and writing volumes with their world coordinates.

Formats: NIfTI (``.nii``, ``.nii.gz``), FreeSurfer MGH (``.mgz``, ``.mgh``) through nibabel, and
VoxelMorph-style ``.npz`` (key ``vol``, optional ``seg``; no world coordinates, identity affine).
Reading checks what a registration needs and raises one :class:`vmjax.checks.DataError` naming
the file: one 3-D volume (a 4-D file with one volume is accepted), finite values, not all zero,
an invertible affine, integral label values (labels stored as float are cast). Writing keeps
the reference scan's affine and header (voxel sizes, qform/sform) and is atomic
(:mod:`vmjax.atomic`): a crash never leaves a half-written output.
"""

from __future__ import annotations

import dataclasses
import glob
import io as io_lib
import os
import struct
from typing import Sequence
import zlib

import nibabel as nib
import numpy as np

from vmjax import kernels
from vmjax.atomic import atomic_path
from vmjax.checks import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MGH_SUFFIXES = (".mgz", ".mgh")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + MGH_SUFFIXES + (".npz",)


@dataclasses.dataclass
class Volume:
  """One scan: ``image`` ``(D, H, W)`` float32, optional ``seg`` ``(D, H, W)`` int32 labels,
  ``affine`` the 4x4 voxel-to-world (mm) matrix, ``header`` the NIfTI/MGH header if any."""
  image: np.ndarray
  seg: np.ndarray | None
  affine: np.ndarray
  path: str
  header: object = None


def _suffix(path: str, what: str) -> str:
  for suffix in IMAGE_SUFFIXES:
    if path.lower().endswith(suffix):
      return suffix
  raise DataError(f"{what} file {path} has an unsupported extension (use one of "
                  f"{', '.join(IMAGE_SUFFIXES)})")


def _read_array(path: str, what: str):
  """Reads an array from NIfTI, MGH or npz; returns ``(array or dict of arrays, affine,
  header)``."""
  if not os.path.exists(path):
    raise DataError(f"{what} file not found: {path}")
  if os.path.isdir(path):
    raise DataError(f"{what} {path} is a directory, not a scan file")
  suffix = _suffix(path, what)
  try:
    if suffix == ".npz":
      with np.load(path) as npz:
        arrays = {k: np.asarray(npz[k]) for k in npz.keys()}
      return arrays, np.eye(4), None
    img = nib.load(path)
    return np.asanyarray(img.dataobj), np.asarray(img.affine, np.float64), img.header
  except Exception as e:  # nibabel/numpy raise many kinds; report one clear error
    raise DataError(f"cannot read {what} file {path}: {type(e).__name__}: {e}") from e


def _as_3d(array: np.ndarray, path: str, what: str) -> np.ndarray:
  array = np.asarray(array)
  while array.ndim > 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 4:
    raise DataError(f"{what} {path} holds {array.shape[-1]} volumes (shape {array.shape}); "
                    "give one 3-D volume (e.g. extract it with fslroi or nibabel)")
  if array.ndim != 3:
    raise DataError(f"{what} in {path} must be a 3-D volume, got shape {array.shape}")
  return array


def _check_affine(affine: np.ndarray, path: str) -> None:
  if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
    matrix = np.array2string(affine, precision=4, separator=",").replace("\n", "")
    raise DataError(f"scan {path} has a singular or non-finite affine (voxel-to-world matrix) "
                    f"{matrix}: fix its header (sform/qform)")


def as_labels(array: np.ndarray, path: str) -> np.ndarray:
  """An int32 label map; float labels must hold integral values."""
  array = np.asarray(array)
  if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
    return array.astype(np.int32)
  if not np.isfinite(array).all():
    raise DataError(f"label map {path} contains NaN or Inf values")
  rounded = np.rint(array)
  if np.abs(array - rounded).max(initial=0.0) > 1e-3:
    raise DataError(f"label map {path} holds non-integral values (e.g. "
                    f"{array.flat[int(np.argmax(np.abs(array - rounded)))]:.4g}): is it an "
                    "image rather than labels?")
  return rounded.astype(np.int32)


def load_volume(path: str, seg_path: str | None = None) -> Volume:
  """Reads an image (and labels: the npz's ``seg`` or ``seg_path``) into a :class:`Volume`."""
  path = str(path)
  data, affine, header = _read_array(path, "image")
  seg = None
  if isinstance(data, dict):
    if "vol" not in data:
      raise DataError(f"image file {path} has no 'vol' array (keys: {sorted(data)})")
    image = data["vol"]
    seg = data.get("seg")
  else:
    image = data
  image = c_order(_as_3d(image, path, "image"), np.float32)
  if not np.isfinite(image).all():
    raise DataError(f"image {path} contains NaN or Inf values")
  if not image.any():
    raise DataError(f"image {path} is empty (all zeros)")
  _check_affine(affine, path)
  path_for_seg = path
  if seg_path is not None:
    path_for_seg = str(seg_path)
    seg, _, _ = _read_array(path_for_seg, "label")
    if isinstance(seg, dict):
      if not {"seg", "vol"} & set(seg):
        raise DataError(f"label file {seg_path} has neither 'seg' nor 'vol' (keys: {sorted(seg)})")
      seg = seg["seg"] if "seg" in seg else seg["vol"]
  if seg is not None:
    seg = _as_3d(seg, path_for_seg, "labels")
    if seg.shape != image.shape:
      raise DataError(f"labels {path_for_seg} shape {seg.shape} does not match image {path} "
                      f"shape {image.shape}")
    seg = as_labels(seg, path_for_seg)
  return Volume(image=image, seg=seg, affine=affine, path=path, header=header)


def _seg_path_for(image_path: str, seg_replace: Sequence[str] | None) -> str | None:
  if not seg_replace or image_path.endswith(".npz"):
    return None
  old, new = seg_replace
  head, name = os.path.split(image_path)
  if old not in name:
    return None
  candidate = os.path.join(head, name.replace(old, new))
  return candidate if os.path.exists(candidate) else None


def resolve_sources(spec, seg_replace: Sequence[str] | None = None,
                    what: str = "data") -> list[tuple[str, str | None]]:
  """Expands a data specification into ``[(image_path, seg_path_or_None), ...]``.

  ``spec`` is a glob pattern, a directory (its scan files), a ``.txt`` list file (one
  ``image [labels]`` per line, paths relative to the list), or a sequence of those, also as one
  comma-separated string. NIfTI/MGH labels are found by replacing ``seg_replace[0]`` with
  ``seg_replace[1]`` in the image's file name (e.g. ``("t1", "labels")``); files so named are
  not taken as images.
  """
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    raise DataError(f"no {what} given (empty setting)")
  if isinstance(spec, str) and "," in spec:
    spec = [item for item in spec.split(",") if item.strip()]
  if not isinstance(spec, str):
    out = []
    for item in spec:
      out.extend(resolve_sources(item, seg_replace, what))
    return out
  if spec.endswith(".txt") and os.path.isfile(spec):
    base = os.path.dirname(os.path.abspath(spec))
    out = []
    with open(spec) as f:
      for line in f:
        parts = line.replace(",", " ").split()
        if not parts or parts[0].startswith("#"):
          continue
        paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in parts[:2]]
        out.append((paths[0], paths[1] if len(paths) > 1 else _seg_path_for(paths[0],
                                                                             seg_replace)))
    if not out:
      raise DataError(f"{what} list file {spec} lists no files")
    return out
  if os.path.isdir(spec):
    names = sorted(n for n in os.listdir(spec) if n.lower().endswith(IMAGE_SUFFIXES))
    if seg_replace:
      names = [n for n in names if seg_replace[1] not in n]
    if not names:
      raise DataError(f"{what} directory {spec} contains no {'/'.join(IMAGE_SUFFIXES)} files")
    paths = [os.path.join(spec, n) for n in names]
  else:
    paths = sorted(glob.glob(spec))
    if not paths:
      if any(c in spec for c in "*?["):
        raise DataError(f"no {what} files match {spec}")
      raise DataError(f"{what} file not found: {spec}")
  return [(p, _seg_path_for(p, seg_replace)) for p in paths]


def c_order(array, dtype) -> np.ndarray:
  """``array`` as a C-ordered numpy array of ``dtype``. A Fortran-ordered one (a NIfTI's data as
  nibabel reads it) is transposed by the native kernel (its transpose is C-ordered:
  :func:`vmjax.kernels.reverse_axes_on_host`): a 256x256x160 scan in ~7 ms where numpy's copy
  took 63 ms, and every later copy onto the device is free, where each ``jax.device_put`` of the
  Fortran-ordered scan took 23-32 ms (2-core AMD EPYC Zen 4, 2026-12-06)."""
  array = np.asarray(array, dtype)
  if array.ndim < 2 or array.flags.c_contiguous or not array.flags.f_contiguous:
    return np.ascontiguousarray(array)
  out = kernels.reverse_axes_on_host(array.T)
  return np.ascontiguousarray(array) if out is None else out


def fortran_order(array) -> np.ndarray:
  """``array`` (jax or numpy) on the host as a Fortran-ordered numpy array of the same shape,
  NIfTI's data order, transposed by the native kernel (numpy's where it cannot): nibabel then
  writes it with one copy instead of a strided transposition (a 256x256x160x3 field: 0.02 +
  0.15 s against 0.39 s; 2-core AMD EPYC Zen 4, 2026-12-06)."""
  array = np.ascontiguousarray(np.asarray(array))
  out = kernels.reverse_axes_on_host(array)
  return np.asfortranarray(array) if out is None else out.T


def save_nifti(img: nib.Nifti1Image, path: str) -> None:
  """``nib.save`` for a NIfTI image, except that a ``.nii.gz`` is streamed into the gzip file as
  nibabel serialises the image, by vmjax's own writers: a field (4-D or more: ``(D, H, W, 3)``
  voxels, ITK's ``(X, Y, Z, 1, 3)``) in stored (uncompressed) deflate blocks
  (:class:`_StoredGzip`), an image or label map deflated with run-length matching only
  (:class:`_RunLengthGzip`). Float displacements hardly compress, and deflating them was the
  slowest part of writing a registration's outputs: a 256x256x160x3 warp of OASIS-TRT-20,
  126 MB: Huffman-only 1.12 s; zlib's level 0 on nibabel's bytes 0.6 s; streamed 0.2-0.4 s,
  most of it the file system's (2-core AMD EPYC Zen 4, 2026-12-06; gzip's default level 1
  took 2.3x Huffman's time for 1 % less on a Zen 3, 2026-12-01). A warped scan (85 % zero
  background): nibabel's gzip level 1 0.20 s to 14.0 % of its size, run-length matching
  0.10 s to 13.3 % (same machine, 2026-12-06). Any gzip reader (nibabel, ITK, FSL) reads both
  as usual; a ``.nii`` path is written uncompressed."""
  if not str(path).endswith(".gz"):
    nib.save(img, path)
    return
  with open(path, "wb") as f:
    stream = (_StoredGzip if len(img.shape) >= 4 else _RunLengthGzip)(f)
    img.to_stream(stream)
    stream.finish()


class _GzipStream:
  """A write-only file object that wraps what is written to it in a gzip stream (RFC 1952);
  ``seek`` only to where it is (nibabel's writer then pads to the data offset itself), and
  :meth:`finish` ends the stream."""

  def __init__(self, f):
    self._f = f
    self._size = 0

  def write(self, data) -> int:
    view = memoryview(data).cast("B")
    self._size += len(view)
    self._write(view)
    return len(view)

  def tell(self) -> int:
    return self._size

  def seek(self, offset: int, whence: int = 0) -> int:
    if whence != 0 or offset != self._size:
      raise io_lib.UnsupportedOperation("a gzip stream is written forwards only")
    return offset

  def read(self, *_):
    raise io_lib.UnsupportedOperation("write-only stream")

  def flush(self) -> None:
    self._f.flush()


class _StoredGzip(_GzipStream):
  """Stored deflate blocks (RFC 1951 BTYPE 00): a CRC-32 and a 5-byte header per 64 KiB, the
  data itself passed to the file as memory views, never copied."""

  _BLOCK = 0xFFFF  # the largest stored block

  def __init__(self, f):
    super().__init__(f)
    self._crc = 0
    # magic, deflate, no flags, no mtime (reproducible files), no extra flags, OS unknown
    f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

  def _write(self, view) -> None:
    self._crc = zlib.crc32(view, self._crc)
    for start in range(0, len(view), self._BLOCK):
      block = view[start:start + self._BLOCK]
      self._f.write(struct.pack("<BHH", 0, len(block), len(block) ^ 0xFFFF))
      self._f.write(block)

  def finish(self) -> None:
    """The final (empty) block, then the CRC-32 and the size modulo 2**32."""
    self._f.write(b"\x01\x00\x00\xff\xff")
    self._f.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))


class _RunLengthGzip(_GzipStream):
  """zlib's deflate with run-length matching only (``Z_RLE``: repeats of the previous byte
  string, Huffman-coded), zlib's own gzip wrapper (no mtime)."""

  def __init__(self, f):
    super().__init__(f)
    self._z = zlib.compressobj(1, zlib.DEFLATED, 31, 8, zlib.Z_RLE)

  def _write(self, view) -> None:
    self._f.write(self._z.compress(view))

  def finish(self) -> None:
    self._f.write(self._z.flush())


def save_volume(path: str, array: np.ndarray, like: Volume | None = None,
                key: str = "vol") -> None:
  """Saves ``array`` ((D, H, W) or (D, H, W, K)) to ``path`` atomically.

  Args:
    path: ``.nii``/``.nii.gz`` (NIfTI), ``.mgz``/``.mgh`` (MGH) or ``.npz`` (key ``key``).
    like: the :class:`Volume` whose affine and header (voxel sizes, qform/sform) the output
      keeps; identity affine if None.
  """
  path = str(path)
  suffix = _suffix(path, "output")
  array = np.asarray(array)
  with atomic_path(path) as tmp:
    if suffix == ".npz":
      np.savez_compressed(tmp, **{key: array})
      return
    affine = like.affine if like is not None else np.eye(4)
    if suffix in MGH_SUFFIXES:
      nib.save(nib.MGHImage(array, affine), tmp)
      return
    header = like.header if like is not None and isinstance(like.header,
                                                            nib.Nifti1Header) else None
    img = nib.Nifti1Image(array, affine, header=None if header is None else header.copy())
    if header is not None:
      img.set_qform(*header.get_qform(coded=True))
      img.set_sform(*header.get_sform(coded=True))
      img.header.set_data_dtype(array.dtype)
      img.header.set_slope_inter(1.0, 0.0)
    save_nifti(img, tmp)
