"""Losses against direct numpy references and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmjax
from helpers import smooth_field, textured_volume


def ncc_reference(fixed, moved, window):
  """VoxelMorph's local NCC written out voxel by voxel with explicit window loops (float64)."""
  f = fixed.astype(np.float64)
  m = moved.astype(np.float64)
  half = window // 2
  n = window ** 3
  batch, d, h, w, channels = f.shape
  cc = np.zeros(f.shape)
  for b in range(batch):
    for c in range(channels):
      for x in range(d):
        for y in range(h):
          for z in range(w):
            sf = sm = sff = smm = sfm = 0.0
            for i in range(x - half, x + half + 1):
              for j in range(y - half, y + half + 1):
                for k in range(z - half, z + half + 1):
                  if 0 <= i < d and 0 <= j < h and 0 <= k < w:  # zero padding
                    a, bb = f[b, i, j, k, c], m[b, i, j, k, c]
                    sf += a
                    sm += bb
                    sff += a * a
                    smm += bb * bb
                    sfm += a * bb
            mu_f, mu_m = sf / n, sm / n
            cross = sfm - mu_m * sf - mu_f * sm + mu_f * mu_m * n
            var_f = sff - 2 * mu_f * sf + mu_f * mu_f * n
            var_m = smm - 2 * mu_m * sm + mu_m * mu_m * n
            cc[b, x, y, z, c] = cross * cross / (var_f * var_m + 1e-5)
  return -cc.mean()


@pytest.mark.parametrize("window", [3, 5])
def test_ncc_matches_direct_loop(window):
  rng = np.random.default_rng(0)
  fixed = rng.uniform(size=(2, 6, 7, 5, 1)).astype(np.float32)
  moved = (0.6 * fixed + 0.4 * rng.uniform(size=fixed.shape)).astype(np.float32)
  got = float(vmjax.ncc_loss(jnp.asarray(fixed), jnp.asarray(moved), window=window))
  np.testing.assert_allclose(got, ncc_reference(fixed, moved, window), rtol=1e-4)


def test_ncc_of_identical_textured_images_is_minus_one():
  image = jnp.asarray(textured_volume((32, 32, 32), seed=1))
  np.testing.assert_allclose(float(vmjax.ncc_loss(image, image)), -1.0, atol=1e-3)
  # Independent textures correlate only through the zero padding at the border.
  other = jnp.asarray(textured_volume((32, 32, 32), seed=2))
  assert float(vmjax.ncc_loss(image, other)) > -0.6


def test_ncc_is_finite_on_constant_regions():
  zeros = jnp.zeros((1, 16, 16, 16, 1))
  ones = jnp.ones((1, 16, 16, 16, 1))
  for a, b in [(zeros, zeros), (ones, ones), (zeros, ones), (3.7 * ones, ones)]:
    value, grad = jax.value_and_grad(vmjax.ncc_loss, argnums=1)(a, b)
    assert np.isfinite(float(value))
    assert np.isfinite(np.asarray(grad)).all()


def test_ncc_gradient_matches_finite_differences():
  fixed = jnp.asarray(textured_volume((8, 8, 8), seed=3), jnp.float32)
  moved = jnp.asarray(textured_volume((8, 8, 8), seed=4), jnp.float32)
  loss = lambda m: vmjax.ncc_loss(fixed, m, window=5)
  grad = np.asarray(jax.grad(loss)(moved))
  rng = np.random.default_rng(5)
  # f32 central differences: compare along a random direction for a well-conditioned check.
  direction = jnp.asarray(rng.normal(size=moved.shape).astype(np.float32))
  eps = 1e-2
  fd = (loss(moved + eps * direction) - loss(moved - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(np.sum(grad * np.asarray(direction)), float(fd), rtol=2e-2)


def test_ncc_rejects_even_window_and_shape_mismatch():
  x = jnp.zeros((1, 8, 8, 8, 1))
  with pytest.raises(ValueError, match="odd"):
    vmjax.ncc_loss(x, x, window=4)
  with pytest.raises(ValueError, match="shape"):
    vmjax.ncc_loss(x, jnp.zeros((1, 8, 8, 9, 1)))


def test_mse_matches_numpy():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(2, 2, 5, 6, 7, 1)).astype(np.float32)
  np.testing.assert_allclose(float(vmjax.mse_loss(a, b)), np.mean((a - b) ** 2), rtol=1e-5)


def test_grad_loss_matches_numpy():
  disp = smooth_field((6, 7, 8), amplitude=2.0, seed=7, batch=2)
  want = np.mean([np.mean(np.diff(disp.astype(np.float64), axis=ax) ** 2) for ax in (1, 2, 3)])
  np.testing.assert_allclose(float(vmjax.grad_loss(jnp.asarray(disp))), want, rtol=1e-5)
  # A constant field (pure translation) is perfectly smooth.
  assert float(vmjax.grad_loss(jnp.ones((1, 5, 5, 5, 3)))) == 0.0


def test_soft_dice_loss_hand_computed():
  a = np.zeros((1, 2, 2, 2, 2), np.float32)
  b = np.zeros_like(a)
  a[0, 0, :, :, 0] = 1  # label 0: 4 voxels in a
  b[0, :, 0, :, 0] = 1  # label 0: 4 voxels in b, overlap 2 -> dice 0.5
  a[0, 1, :, :, 1] = 1  # label 1: 4 voxels
  b[0, 1, :, :, 1] = 1  # identical -> dice 1
  np.testing.assert_allclose(float(vmjax.soft_dice_loss(a, b)), 1 - (0.5 + 1.0) / 2, rtol=1e-6)
