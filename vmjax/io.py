"""Writing outputs: NIfTI and npz, atomically (a temporary file in the same directory, then
``os.replace``), so a crash never leaves a half-written output behind."""

from __future__ import annotations

import os
import tempfile

import numpy as np


def _suffix(path: str) -> str:
  for suffix in (".nii.gz", ".nii", ".npz"):
    if path.endswith(suffix):
      return suffix
  raise ValueError(f"output {path}: unsupported extension (use .nii.gz, .nii or .npz)")


def save_volume(path: str, array: np.ndarray, like=None, key: str = "vol") -> None:
  """Saves ``array`` ((D, H, W) or (D, H, W, K)) to ``path`` atomically.

  Args:
    path: ``.nii``/``.nii.gz`` (NIfTI) or ``.npz`` (key ``key``).
    like: a :class:`vmjax.data.Volume` whose affine and header (voxel sizes, qform/sform) the
      NIfTI output keeps.
  """
  path = str(path)
  suffix = _suffix(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
  os.close(fd)
  try:
    if suffix == ".npz":
      np.savez_compressed(tmp, **{key: array})
    else:
      import nibabel as nib
      affine = like.affine if like is not None else np.eye(4)
      header = like.header.copy() if like is not None and like.header is not None else None
      img = nib.Nifti1Image(np.asarray(array), affine, header=header)
      if header is not None:
        img.set_qform(*like.header.get_qform(coded=True))
        img.set_sform(*like.header.get_sform(coded=True))
        img.header.set_data_dtype(np.asarray(array).dtype)
        img.header.set_slope_inter(1.0, 0.0)
      nib.save(img, tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
