"""vmjax fields as ITK/ANTs displacement fields: analytic values, a lossless round trip between
grids, and (with antspyx installed) ANTs applying the file reproduces vmjax's moved image."""

import nibabel as nib
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from helpers import smooth_field
import vmjax
from vmjax import ants_io
from vmjax import io

FIXED_AFFINE = np.array([[-1.6, 0, 0, 18], [0, 0, 1.6, -15], [0, -1.6, 0, 17], [0, 0, 0, 1]])
MOVING_AFFINE = np.array([[0, 0, -1.5, 14], [1.5, 0, 0, -17], [0, 1.5, 0, -15], [0, 0, 0, 1]])


def volume(shape, affine, seed):
  rng = np.random.default_rng(seed)
  image = ndimage.gaussian_filter(rng.uniform(size=shape), 2.0).astype(np.float32)
  return io.Volume(image=image, seg=None, affine=affine, path=f"v{seed}")


def test_a_voxel_shift_is_its_world_vector_in_lps(tmp_path):
  grid = volume((6, 5, 4), np.diag([2.0, 3.0, 1.0, 1.0]), 0)
  disp = np.zeros((6, 5, 4, 3), np.float32)
  disp[..., 0], disp[..., 1] = 1.0, -2.0  # voxels along i and j
  ants_io.save_ants_warp(str(tmp_path / "w.nii.gz"), disp, grid, grid)
  img = nib.load(str(tmp_path / "w.nii.gz"))
  assert img.shape == (6, 5, 4, 1, 3) and img.header.get_intent()[0] == "vector"
  np.testing.assert_allclose(img.affine, grid.affine)
  # RAS (2, -6, 0) mm -> LPS (-2, 6, 0).
  np.testing.assert_allclose(np.asarray(img.dataobj)[2, 3, 1, 0], [-2.0, 6.0, 0.0], atol=1e-6)


def test_world_displacement_is_the_float64_difference_of_world_points():
  # Rotated, anisotropic, sheared grids far from the scanner's origin: q - p from the full
  # float64 points V_m (x + u) and V_f x, per voxel (a numpy reference written out).
  rng = np.random.default_rng(7)
  fixed_affine = np.eye(4)
  fixed_affine[:3] = np.c_[rng.normal(size=(3, 3)) + np.diag([0.9, 1.2, 1.4]), [-120, 95, 310]]
  moving_affine = np.eye(4)
  moving_affine[:3] = np.c_[rng.normal(size=(3, 3)) + np.diag([1.1, 0.8, 1.3]), [140, -80, -60]]
  fixed, moving = volume((7, 6, 5), fixed_affine, 4), volume((8, 7, 6), moving_affine, 5)
  disp = (smooth_field((7, 6, 5), amplitude=3.0, seed=6)[0] + 0.5).astype(np.float32)
  got = ants_io.world_displacement(disp, fixed, moving, flip=ants_io.RAS_TO_LPS)
  flip = np.array([-1.0, -1.0, 1.0])
  for x in [(0, 0, 0), (6, 5, 4), (3, 1, 2), (2, 4, 0)]:
    p = fixed_affine @ np.r_[x, 1.0]
    q = moving_affine @ np.r_[np.asarray(x, np.float64) + disp[x], 1.0]
    np.testing.assert_allclose(got[x], flip * (q - p)[:3], atol=2e-4)


def test_round_trip_between_grids_through_the_ants_file(tmp_path):
  fixed, moving = volume((10, 9, 11), FIXED_AFFINE, 1), volume((12, 10, 9), MOVING_AFFINE, 2)
  disp = smooth_field((10, 9, 11), amplitude=2.0, seed=3)[0] + 1.5
  ants_io.save_ants_warp(str(tmp_path / "w.nii.gz"), disp, fixed, moving)
  back, grid = ants_io.load_warp(str(tmp_path / "w.nii.gz"), moving)
  np.testing.assert_allclose(back, disp, atol=1e-4)
  np.testing.assert_allclose(grid.affine, FIXED_AFFINE)


def test_ants_applies_the_written_field_as_vmjax_does(tmp_path):
  ants = pytest.importorskip("ants", reason="antspyx not installed (pip install -r "
                             "requirements-ants.txt)")
  fixed, moving = volume((20, 18, 22), FIXED_AFFINE, 4), volume((24, 20, 18), MOVING_AFFINE, 5)
  # A smooth map from the fixed grid into the moving one: an affine part plus a deformation.
  index = np.asarray(vmjax.identity_grid(fixed.image.shape))
  world = index @ FIXED_AFFINE[:3, :3].T + FIXED_AFFINE[:3, 3]
  inv = np.linalg.inv(MOVING_AFFINE)
  disp = (world @ inv[:3, :3].T + inv[:3, 3] - index
          + smooth_field(fixed.image.shape, amplitude=1.0, seed=6)[0]).astype(np.float32)
  ours = np.asarray(vmjax.warp(jnp.asarray(moving.image)[None, ..., None],
                               jnp.asarray(disp)[None]))[0, ..., 0]
  for v, name in ((fixed, "fixed"), (moving, "moving")):
    nib.save(nib.Nifti1Image(v.image, v.affine), str(tmp_path / f"{name}.nii.gz"))
  ants_io.save_ants_warp(str(tmp_path / "w.nii.gz"), disp, fixed, moving)
  theirs = ants.apply_transforms(fixed=ants.image_read(str(tmp_path / "fixed.nii.gz")),
                                 moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
                                 transformlist=[str(tmp_path / "w.nii.gz")],
                                 interpolator="linear").numpy()
  # ANTs returns 0 for any point outside the moving image, vmjax interpolates towards 0 within
  # the last voxel: compare where the sampled point is a voxel inside.
  y = index + disp
  inside = np.all((y > 1) & (y < np.asarray(moving.image.shape) - 2), axis=-1)
  assert inside.mean() > 0.3
  np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-3)


def test_itk_geometry_is_what_itks_nifti_reader_makes_of_the_header(tmp_path):
  ants = pytest.importorskip("ants", reason="antspyx not installed (pip install -r "
                             "requirements-ants.txt)")
  for i, affine in enumerate((FIXED_AFFINE, MOVING_AFFINE, np.diag([0.9, 1.2, 2.0, 1.0]))):
    path = str(tmp_path / f"g{i}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), path)
    theirs = ants.image_read(path)
    origin, spacing, direction = ants_io.itk_geometry(affine)
    np.testing.assert_allclose(origin, theirs.origin, atol=1e-5)
    np.testing.assert_allclose(spacing, theirs.spacing, atol=1e-5)
    np.testing.assert_allclose(direction, theirs.direction, atol=1e-5)
