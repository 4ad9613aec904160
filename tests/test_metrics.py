"""Jacobian determinant and Dice against analytic / hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

import vmjax


def affine_displacement(matrix, offset, shape):
  """u(x) = (A - I) x + b on a grid: the displacement of x -> A x + b."""
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"),
                  -1)
  disp = grid @ (np.asarray(matrix) - np.eye(3)).T + np.asarray(offset)
  return disp[None].astype(np.float32)


@pytest.mark.parametrize("matrix", [
    [[1.1, 0.05, 0.0], [0.0, 0.9, 0.1], [0.02, 0.0, 1.05]],
    [[0.7, 0.2, 0.0], [-0.1, 1.2, 0.0], [0.0, 0.3, 0.8]],
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]],  # a reflection: det -1, all folded
])
def test_jacobian_of_affine_field_is_det_a(matrix):
  disp = affine_displacement(matrix, [0.5, -1.0, 2.0], (7, 8, 9))
  det = np.asarray(vmjax.jacobian_determinant(jnp.asarray(disp)))
  assert det.shape == (1, 7, 8, 9)
  np.testing.assert_allclose(det[:, 1:-1, 1:-1, 1:-1], np.linalg.det(matrix), rtol=1e-4)
  expected_fold = float(np.linalg.det(matrix) <= 0)
  assert float(vmjax.folding_fraction(jnp.asarray(disp))[0]) == expected_fold


def test_folding_fraction_counts_a_hand_made_fold():
  # Plane 4 is pulled back to position 1, behind planes 2 and 3: the map x0 -> x0 + u0 stops
  # increasing there. The field varies along axis 0 only, so det J = d(x0 + u0)/dx0, computed by
  # hand with np.gradient's central differences.
  shape = (10, 4, 4)
  u = np.zeros((1, *shape, 3), np.float32)
  u[0, 4, :, :, 0] = -3.0
  mapped = np.arange(10, dtype=np.float64) + u[0, :, 0, 0, 0]
  derivative = np.gradient(mapped)
  expected = np.mean(derivative <= 0)
  assert expected > 0
  np.testing.assert_allclose(float(vmjax.folding_fraction(jnp.asarray(u))[0]), expected)


def test_dice_hand_computed():
  a = np.zeros((2, 4, 4, 4), np.int32)
  b = np.zeros_like(a)
  a[0, :2] = 1          # 32 voxels of label 1
  b[0, 1:3] = 1         # 32 voxels, overlap 16 -> 2*16/64 = 0.5
  a[0, 3, 0, 0] = 5     # label 5 only in a -> 0
  a[1, :, :, :2] = 3    # 32 voxels of label 3 in both -> 1
  b[1, :, :, :2] = 3
  got = np.asarray(vmjax.dice(jnp.asarray(a), jnp.asarray(b), [1, 3, 5]))
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got[0, [0, 2]], [0.5, 0.0])
  assert np.isnan(got[0, 1])  # label 3 absent from both maps of item 0
  np.testing.assert_allclose(got[1, 1], 1.0)
  assert np.isnan(got[1, 0]) and np.isnan(got[1, 2])


def test_dice_rejects_shape_mismatch():
  with pytest.raises(ValueError, match="differ"):
    vmjax.dice(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 4, 4, 5)), [1])


def test_jacobian_of_a_smooth_field_matches_numpy_per_voxel():
  """The cofactor determinant equals numpy's LU determinant of np.gradient's Jacobian at every
  voxel of a non-affine field (folds included)."""
  rng = np.random.default_rng(4)
  disp = rng.normal(size=(2, 6, 7, 5, 3)).astype(np.float32)
  grads = np.gradient(disp.astype(np.float64), axis=(1, 2, 3))
  jac = np.stack(grads, axis=-1) + np.eye(3)
  det = np.asarray(vmjax.jacobian_determinant(jnp.asarray(disp)))
  np.testing.assert_allclose(det, np.linalg.det(jac), rtol=1e-4, atol=1e-4)
  assert (det <= 0).any() and (det > 0).any()
