"""Affine registration in world coordinates: a known affine between two differently oriented
and spaced grids is recovered; resampling matches scipy."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from vmjax import affine
from vmjax import io


def rotation(axis, angle):
  c, s = np.cos(angle), np.sin(angle)
  i, j = [a for a in range(3) if a != axis]
  r = np.eye(3)
  r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
  return r


def phantom(shape, seed=0):
  """An asymmetric textured ellipsoid (no rotational symmetry), background 0."""
  rng = np.random.default_rng(seed)
  texture = ndimage.gaussian_filter(rng.uniform(size=shape), 2.5)
  texture = (texture - texture.min()) / (texture.max() - texture.min())
  g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
  inside = ((g / np.array([0.8, 0.7, 0.75])) ** 2).sum(-1) < 1
  return ((texture + 0.5 * (g[..., 0] > 0.2) + 0.3 * (g[..., 1] < -0.3)) * inside).astype(
      np.float32)


# Fixed: RAS, 2 mm. Moving: ASL (as the native OASIS scans), 1.5 mm, another size.
FIXED_AFFINE = np.array([[2.0, 0, 0, -48], [0, 2.0, 0, -56], [0, 0, 2.0, -44], [0, 0, 0, 1]])
MOVING_AFFINE = np.array([[0, 0, -1.5, 60], [1.5, 0, 0, -70], [0, 1.5, 0, -60], [0, 0, 0, 1]])


def moving_for(fixed, world, shape, affine_m=MOVING_AFFINE):
  """The moving scan showing ``fixed``'s content through ``world`` (fixed world -> moving
  world): ``moving(y) = fixed(V_f^-1 world^-1 V_m y)``, sampled with scipy."""
  v2v = np.linalg.inv(fixed.affine) @ np.linalg.inv(world) @ affine_m
  image = ndimage.affine_transform(fixed.image, v2v[:3, :3], v2v[:3, 3], output_shape=shape,
                                   order=1, mode="constant")
  return io.Volume(image=(image * 300).astype(np.float32), seg=None, affine=affine_m, path="m")


@pytest.mark.parametrize("seed", [0, 1])
def test_known_affine_is_recovered_across_orientations_and_spacings(seed):
  rng = np.random.default_rng(seed)
  fixed = io.Volume(image=phantom((48, 56, 44), seed), seg=None, affine=FIXED_AFFINE, path="f")
  linear = (rotation(2, rng.uniform(-0.2, 0.2)) @ rotation(0, rng.uniform(-0.15, 0.15))
            @ np.diag(rng.uniform(0.92, 1.08, size=3)))
  linear[0, 1] += 0.03
  world = np.eye(4)
  world[:3, :3] = linear
  world[:3, 3] = rng.uniform(-10, 10, size=3)
  moving = moving_for(fixed, world, (90, 80, 84))
  found = affine.affine_register(moving, fixed, spacings=(6.0, 3.0))
  np.testing.assert_allclose(found[:3, :3], world[:3, :3], atol=0.01)
  np.testing.assert_allclose(found[:3, 3], world[:3, 3], atol=0.5)  # mm (voxels are 1.5-2 mm)
  np.testing.assert_array_equal(found[3], [0, 0, 0, 1])


@pytest.mark.parametrize("scale", [0.0, 1e-4, 0.4])
def test_params_to_matrix_is_the_documented_composition(scale):
  """``init · C · [R K | t] · C^-1`` written out in numpy with scipy's rotation of the rotation
  vector (Rodrigues' series near 0), shears above the diagonal, scales on K's columns."""
  from scipy.spatial.transform import Rotation
  rng = np.random.default_rng(1)
  p = (rng.normal(size=12) * scale).astype(np.float32)
  centre = rng.normal(size=3) * 40
  init = np.eye(4)
  init[:3] += rng.normal(size=(3, 4)) * 0.1
  shear = np.eye(3)
  shear[0, 1], shear[0, 2], shear[1, 2] = p[9:12]
  local = np.eye(4)
  local[:3, :3] = Rotation.from_rotvec(p[:3]).as_matrix() @ shear @ np.diag(np.exp(p[6:9]))
  local[:3, 3] = p[3:6] * affine.TRANSLATION_SCALE
  to_centre = np.eye(4)
  to_centre[:3, 3] = centre
  expected = init @ to_centre @ local @ np.linalg.inv(to_centre)
  got = affine.params_to_matrix(jnp.asarray(p), jnp.asarray(centre, jnp.float32),
                                jnp.asarray(init, jnp.float32))
  np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("order", ["C", "F"])
def test_levels_are_block_means_and_the_centre_of_mass_is_the_weighted_mean(order):
  """A level is the mean of each whole block (a numpy loop; the remainder dropped), factors per
  axis from the spacing, its affine at the block centres; the centre of mass is the
  intensity-weighted mean voxel (negative voxels weigh 0) in world mm."""
  rng = np.random.default_rng(2)
  image = np.asarray(rng.normal(size=(13, 10, 8)), np.float32, order=order)
  vox = np.diag([1.0, 1.5, 3.0, 1.0])
  vox[:3, 3] = [5.0, -2.0, 1.0]
  volume = io.Volume(image=image, seg=None, affine=vox, path="v")
  level, level_affine = affine._level(volume, 3.0)  # factors 3, 2, 1
  expected = np.zeros((4, 5, 8))
  for i, j, k in np.ndindex(expected.shape):
    expected[i, j, k] = image[3 * i:3 * i + 3, 2 * j:2 * j + 2, k].mean()
  np.testing.assert_allclose(level, expected, atol=1e-6)
  np.testing.assert_allclose(level_affine @ [1, 1, 1, 1], vox @ [4.0, 2.5, 1.0, 1.0])
  weights = np.maximum(image, 0).astype(np.float64)
  index = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1)
  centre = (weights[..., None] * index).sum(axis=(0, 1, 2)) / weights.sum()
  np.testing.assert_allclose(affine.centre_of_mass(volume), (vox @ [*centre, 1.0])[:3],
                             rtol=1e-10)


def test_resample_matches_scipy_and_labels_stay_labels():
  rng = np.random.default_rng(3)
  image = ndimage.gaussian_filter(rng.uniform(size=(12, 14, 10)), 1.0).astype(np.float32)
  v2v = np.eye(4)
  v2v[:3, :3] = rotation(1, 0.3) * 1.1
  v2v[:3, 3] = [1.5, -2.0, 0.7]
  out = np.asarray(affine.resample(jnp.asarray(image), jnp.asarray(v2v, jnp.float32),
                                   (11, 13, 9)))
  ref = ndimage.affine_transform(image, v2v[:3, :3], v2v[:3, 3], output_shape=(11, 13, 9),
                                 order=1, mode="grid-constant")
  np.testing.assert_allclose(out, ref, atol=1e-5)
  seg = rng.integers(0, 4, size=(12, 14, 10)).astype(np.int32) * 7
  volume = io.Volume(image=image, seg=seg, affine=np.eye(4), path="s")
  moved = affine.resample_volume(volume, v2v, np.eye(4), (11, 13, 9))
  assert set(np.unique(moved.seg)) <= {0, 7, 14, 21}
  expected = ndimage.affine_transform(seg, v2v[:3, :3], v2v[:3, 3], output_shape=(11, 13, 9),
                                      order=0, mode="grid-constant")
  agree = (moved.seg == expected).mean()
  assert agree > 0.97, agree  # nearest neighbour: only exact .5 ties may round differently
