"""Transforms other tools read: a vmjax displacement as an ITK/ANTs displacement field.

ITK (and so ``antsApplyTransforms``, ``ants.apply_transforms``) reads a NIfTI displacement field
as a 5-D image ``(X, Y, Z, 1, 3)`` with vector intent on the fixed scan's grid, each voxel
holding ``q - p`` in LPS millimetres: ``p`` the voxel's physical point, ``q`` the moving scan's
point it maps to. NIfTI's affine is RAS, ITK's physical space LPS: the first two components flip
sign. vmjax's field ``u`` (voxels: the moving voxel ``x + u(x)`` for fixed voxel ``x``) gives
``q = V_m (x + u(x))`` and ``p = V_f x`` (``V`` the voxel-to-world matrices).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from vmjax.atomic import atomic_path
from vmjax.io import Volume
from vmjax.io import save_nifti

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def world_displacement(disp: np.ndarray, fixed: Volume, moving: Volume) -> np.ndarray:
  """``q - p`` in RAS mm, ``(D, H, W, 3)``, for a voxel field ``disp`` on the fixed grid."""
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in disp.shape[:3]],
                              indexing="ij"), axis=-1)
  q = (grid + disp) @ moving.affine[:3, :3].T + moving.affine[:3, 3]
  p = grid @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
  return (q - p).astype(np.float32)


def save_ants_warp(path: str, disp: np.ndarray, fixed: Volume, moving: Volume) -> None:
  """Writes ``disp`` as an ITK displacement field NIfTI (atomically)."""
  lps = world_displacement(np.asarray(disp, np.float64), fixed, moving) * RAS_TO_LPS
  img = nib.Nifti1Image(lps[:, :, :, None, :].astype(np.float32), fixed.affine)
  img.header.set_intent("vector")
  img.header.set_xyzt_units("mm")
  with atomic_path(path) as tmp:
    save_nifti(img, tmp)
