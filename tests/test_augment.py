"""Augmentation: deterministic, invertible deformations, labels stay labels."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

import vmjax
from vmjax import augment
from helpers import textured_volume

SHAPE = (24, 24, 24)


def aug_config(**kw):
  cfg = ml_collections.ConfigDict(dict(deform_std=2.0, deform_spacing=8.0, gamma_std=0.1,
                                       bias_std=0.1, noise_std=0.02))
  cfg.update(kw)
  return cfg


def test_same_key_same_output_and_different_keys_differ():
  image = jnp.asarray(textured_volume(SHAPE, seed=0))
  fn = jax.jit(lambda k: augment.augment_volume(k, image, None, aug_config())[0])
  a, b = fn(jax.random.PRNGKey(1)), fn(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - fn(jax.random.PRNGKey(2))).mean()) > 1e-3


def test_random_displacement_is_smooth_invertible_and_sized():
  disp = augment.random_displacement(jax.random.PRNGKey(3), 2, SHAPE, std=2.0, spacing=8.0)
  assert disp.shape == (2, *SHAPE, 3)
  assert float(vmjax.folding_fraction(disp).max()) == 0.0
  rms = float(jnp.sqrt(jnp.mean(disp ** 2)))
  assert 0.5 < rms < 6.0


def test_labels_are_deformed_with_the_image_and_stay_labels():
  image = jnp.asarray(ndimage.gaussian_filter(textured_volume(SHAPE, seed=4), (0, 2, 2, 2, 0)))
  image = (image - image.min()) / (image.max() - image.min())
  seg = (image > 0.5).astype(jnp.int32) * 7
  moved, moved_seg = augment.augment_volume(jax.random.PRNGKey(5), image, seg,
                                            aug_config(gamma_std=0.0, bias_std=0.0,
                                                       noise_std=0.0))
  assert moved_seg.dtype == jnp.int32 and set(np.unique(moved_seg)) <= {0, 7}
  # Without intensity changes, thresholding the moved image mostly reproduces the moved labels.
  agreement = float(jnp.mean((moved > 0.5) == (moved_seg == 7)))
  unmoved_agreement = float(jnp.mean((moved > 0.5) == (seg == 7)))
  assert agreement > 0.95 and agreement > unmoved_agreement + 0.05


def test_intensity_augmentation_keeps_shape_and_is_bounded():
  image = jnp.asarray(textured_volume(SHAPE, seed=6))
  out = augment.random_intensity(jax.random.PRNGKey(7), image, gamma_std=0.2, bias_std=0.2,
                                 noise_std=0.0)
  assert out.shape == image.shape and float(out.min()) >= 0.0
  corr = np.corrcoef(np.asarray(out).ravel(), np.asarray(image).ravel())[0, 1]
  assert 0.8 < corr < 1.0
