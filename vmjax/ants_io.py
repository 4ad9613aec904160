"""vmjax fields as ITK/ANTs files and back: every conversion between vmjax's voxel convention and
ITK's physical (LPS) space lives here.

ITK (and so ``antsApplyTransforms``, ``ants.apply_transforms``) reads a NIfTI displacement field
as a 5-D image ``(X, Y, Z, 1, 3)`` with vector intent on the fixed scan's grid, each voxel
holding ``q - p`` in LPS millimetres: ``p`` the voxel's physical point, ``q`` the moving scan's
point it maps to. NIfTI's affine is RAS, ITK's physical space LPS: the first two components flip
sign (:data:`RAS_TO_LPS`, the one definition of that flip). vmjax's field ``u`` (voxels: the
moving voxel ``x + u(x)`` for fixed voxel ``x``) gives ``q = V_m (x + u(x))`` and ``p = V_f x``
(``V`` the voxel-to-world matrices).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np

from vmjax import transforms
from vmjax.atomic import atomic_path
from vmjax.checks import DataError
from vmjax.io import Volume
from vmjax.io import fortran_order
from vmjax.io import save_nifti

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])  # its own inverse: LPS -> RAS is the same flip


def index_grid(shape) -> np.ndarray:
  """Every voxel's index ``(D, H, W, 3)`` (float64): the numpy identity grid
  (:func:`vmjax.transforms.identity_grid` is the jax one)."""
  return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape[:3]],
                              indexing="ij"), axis=-1)


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
  return points @ affine[:3, :3].T + affine[:3, 3]


def itk_geometry(affine: np.ndarray) -> tuple[list, list, np.ndarray]:
  """``(origin, spacing, direction)`` of an ITK image for a NIfTI voxel-to-world ``affine``
  (RAS), as ITK's NIfTI reader converts it (LPS)."""
  linear = np.asarray(affine, np.float64)[:3, :3]
  spacing = np.linalg.norm(linear, axis=0)
  return (list(RAS_TO_LPS * affine[:3, 3]), list(spacing),
          RAS_TO_LPS[:, None] * (linear / spacing))


def world_displacement(disp, fixed: Volume, moving: Volume,
                       flip: np.ndarray | None = None) -> jax.Array:
  """``q - p`` in RAS mm, ``(D, H, W, 3)`` float32, for a voxel field ``disp`` on the fixed grid
  (``flip``: a per-component sign applied to the result, e.g. :data:`RAS_TO_LPS`).

  Computed as ``M_m u + (M_m - M_f) x + (t_m - t_f)`` (``M``, ``t`` the affines' linear parts
  and translations): no millimetre coordinates of the size of the scanner's origin cancel, so
  float32 rounds only the result (1e-4 mm at 600 mm) where the float64 difference of
  ``V_m (x + u)`` and ``V_f x`` took a 256x256x160 field 5x as long; the voxel index enters per
  axis (its products in float64, then float32), broadcast, never as a grid; one fused XLA pass
  (0.52 s in numpy)."""
  flip = np.ones(3) if flip is None else np.asarray(flip, np.float64)
  m_lin, f_lin = moving.affine[:3, :3], fixed.affine[:3, :3]
  lin = (flip[:, None] * m_lin).astype(np.float32)
  diff = flip[:, None] * (m_lin - f_lin)
  offset = (flip * (moving.affine[:3, 3] - fixed.affine[:3, 3])).astype(np.float32)
  index = [np.arange(n, dtype=np.float64) for n in np.shape(disp)[:3]]
  per_axis = [[(diff[r, a] * index[a]).astype(np.float32) for a in range(3)] for r in range(3)]
  return _world_displacement(jnp.asarray(disp, jnp.float32), np.c_[lin, offset], per_axis)


@jax.jit
def _world_displacement(disp, linear, per_axis):
  """``linear · u`` (3x4: ``M_m`` and ``t_m - t_f``, flipped) plus the index terms per axis."""
  index_terms = jnp.stack([per_axis[r][0][:, None, None] + per_axis[r][1][None, :, None]
                           + per_axis[r][2][None, None, :] for r in range(3)], axis=-1)
  return transforms.apply_affine(linear, disp) + index_terms


def save_ants_warp(path: str, disp, fixed: Volume, moving: Volume) -> None:
  """Writes ``disp`` (a vmjax voxel field on the fixed grid, jax or numpy) as an ITK
  displacement field NIfTI (atomically)."""
  lps = fortran_order(world_displacement(disp, fixed, moving, flip=RAS_TO_LPS))
  img = nib.Nifti1Image(lps[:, :, :, None, :], fixed.affine)
  img.header.set_intent("vector")
  img.header.set_xyzt_units("mm")
  with atomic_path(path) as tmp:
    save_nifti(img, tmp)


def load_warp(warp_path: str, moving: Volume) -> tuple[np.ndarray, Volume]:
  """Either warp file ``vmjax-register`` writes as a vmjax voxel field into ``moving``'s grid
  ``(D, H, W, 3)``, and the fixed grid it lives on (a Volume of zeros with the file's header):
  ``--warp`` (voxels, ``(D, H, W, 3)``; ``moving`` must then be the registered moving grid) or
  ``--warp_ants`` / any ITK displacement field ``(D, H, W, 1, 3)`` in LPS mm (``moving`` may be
  on any grid of the moving scan's world). Raises :class:`DataError` naming the file."""
  if not os.path.exists(warp_path):
    raise DataError(f"warp file not found: {warp_path}")
  try:
    img = nib.load(warp_path)
    field = np.asarray(img.dataobj, np.float64)
  except Exception as e:  # nibabel raises many kinds
    raise DataError(f"cannot read warp file {warp_path}: {type(e).__name__}: {e}") from e
  grid = Volume(image=np.zeros(field.shape[:3], np.float32), seg=None,
                affine=np.asarray(img.affine, np.float64), path=warp_path, header=img.header)
  if field.ndim == 5 and field.shape[3:] == (1, 3):  # ITK displacement, LPS mm
    index = index_grid(field.shape)
    q = _apply(grid.affine, index) + field[:, :, :, 0, :] * RAS_TO_LPS
    return (_apply(np.linalg.inv(moving.affine), q) - index).astype(np.float32), grid
  if field.ndim == 4 and field.shape[3] == 3:
    return field.astype(np.float32), grid
  raise DataError(f"warp {warp_path} has shape {field.shape}: expected (D, H, W, 3) "
                  "(vmjax voxels) or (D, H, W, 1, 3) (ANTs/ITK displacement field)")
