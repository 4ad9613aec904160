"""Warp, composition, integration and resizing against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import vmjax
from vmjax import transforms
from helpers import grid_points, smooth_field, smooth_field_fn, textured_volume

SHAPE = (12, 14, 16)


def scipy_warp(image, disp, order, mode="grid-constant"):
  """Reference: scipy.ndimage.map_coordinates, channel by channel, in float64."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape[1:4]], indexing="ij"), -1)
  out = np.zeros(image.shape, np.float64)
  for b in range(image.shape[0]):
    coords = (grid + disp[b]).transpose(3, 0, 1, 2).astype(np.float64)
    for c in range(image.shape[-1]):
      out[b, ..., c] = ndimage.map_coordinates(image[b, ..., c].astype(np.float64), coords,
                                               order=order, mode=mode)
  return out


@pytest.mark.parametrize("mode", ["constant", "nearest"])
def test_trilinear_warp_matches_scipy_on_smooth_field(mode):
  image = textured_volume(SHAPE, seed=1, batch=2, channels=2)
  disp = smooth_field(SHAPE, amplitude=3.0, seed=2, batch=2)
  got = np.asarray(vmjax.warp(jnp.asarray(image), jnp.asarray(disp), order=1, mode=mode))
  want = scipy_warp(image, disp, order=1, mode="grid-constant" if mode == "constant" else mode)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_nearest_warp_matches_scipy_and_keeps_labels():
  rng = np.random.default_rng(3)
  labels = rng.choice(np.array([0, 2, 7, 41]), size=(1, *SHAPE, 1)).astype(np.int32)
  disp = smooth_field(SHAPE, amplitude=2.5, seed=4)
  # Keep away from exact .5 ties, where round-half conventions may legitimately differ.
  frac = np.abs((disp % 1.0) - 0.5)
  disp = np.where(frac < 1e-3, disp + 0.01, disp).astype(np.float32)
  got = np.asarray(vmjax.warp(jnp.asarray(labels), jnp.asarray(disp), order=0))
  want = scipy_warp(labels, disp, order=0)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want.astype(np.int32))
  assert set(np.unique(got)) <= {0, 2, 7, 41}


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 3), (2, 1, -1)])
def test_integer_translation_reproduces_shifted_array(shift):
  image = textured_volume(SHAPE, seed=5)
  disp = np.broadcast_to(np.asarray(shift, np.float32), (1, *SHAPE, 3))
  got = np.asarray(vmjax.warp(jnp.asarray(image), jnp.asarray(disp)))
  # moved[x] = image[x + shift], zeros where x + shift falls outside.
  want = np.zeros_like(image)
  dst = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, SHAPE))
  src = tuple(slice(max(0, s), n + min(0, s)) for s, n in zip(shift, SHAPE))
  want[(0, *dst, 0)] = image[(0, *src, 0)]
  np.testing.assert_array_equal(got, want)


def test_warp_gradients_match_finite_differences():
  image = jnp.asarray(textured_volume((8, 9, 10), seed=6))
  disp = jnp.asarray(smooth_field((8, 9, 10), amplitude=1.3, seed=7))
  weights = jnp.asarray(np.random.default_rng(8).normal(size=image.shape).astype(np.float32))

  def objective(img, d):
    return jnp.sum(weights * vmjax.warp(img, d))

  g_img, g_disp = jax.grad(objective, argnums=(0, 1))(image, disp)
  rng = np.random.default_rng(9)
  eps = 1e-3
  for _ in range(6):
    idx = tuple(int(rng.integers(n)) for n in disp.shape[:4])
    for c in range(3):
      e = jnp.zeros_like(disp).at[idx + (c,)].set(eps)
      fd = (objective(image, disp + e) - objective(image, disp - e)) / (2 * eps)
      np.testing.assert_allclose(g_disp[idx + (c,)], fd, rtol=2e-2, atol=2e-3)
    e = jnp.zeros_like(image).at[idx + (0,)].set(eps)
    fd = (objective(image + e, disp) - objective(image - e, disp)) / (2 * eps)
    np.testing.assert_allclose(g_img[idx + (0,)], fd, rtol=2e-2, atol=2e-3)


def map_coordinates_warp(img, d, mode):
  """Reference warp: jax.scipy map_coordinates per batch and channel (autodiff'd by JAX)."""
  from jax.scipy import ndimage as jndimage
  coords = vmjax.identity_grid(img.shape[1:4]) + d
  return jnp.stack([jnp.stack([
      jndimage.map_coordinates(img[b, ..., c], [coords[b, ..., i] for i in range(3)],
                               order=1, mode=mode)
      for c in range(img.shape[-1])], axis=-1) for b in range(img.shape[0])])


@pytest.mark.parametrize("mode,channels", [("constant", 2), ("nearest", 3), ("nearest", 12)])
def test_warp_vjp_matches_autodiff_of_map_coordinates(mode, channels):
  """The hand-written trilinear VJP equals JAX's autodiff through map_coordinates (batch 2,
  displacements reaching outside the volume; 12 channels takes the einsum channel sum)."""
  image = jnp.asarray(textured_volume((8, 9, 10), seed=10, batch=2, channels=channels))
  disp = jnp.asarray(smooth_field((8, 9, 10), amplitude=3.0, seed=11, batch=2))
  weights = jnp.asarray(np.random.default_rng(12).normal(size=image.shape).astype(np.float32))

  def reference(img, d):
    return map_coordinates_warp(img, d, mode)

  def objective(fn, img, d):
    return jnp.sum(weights * fn(img, d))

  got = jax.grad(lambda i, d: objective(lambda a, b: vmjax.warp(a, b, mode=mode), i, d),
                 argnums=(0, 1))(image, disp)
  want = jax.grad(lambda i, d: objective(reference, i, d), argnums=(0, 1))(image, disp)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_compose_matches_analytic_composition():
  # c(x) = b(x) + a(x + b(x)), with a evaluated exactly from its formula.
  shape = (20, 22, 24)
  a_fn = smooth_field_fn(shape, amplitude=1.5, seed=11)
  b = smooth_field(shape, amplitude=1.5, seed=12)
  a = a_fn(grid_points(shape))[None].astype(np.float32)
  want = b[0] + a_fn(grid_points(shape) + b[0])
  got = np.asarray(vmjax.compose(jnp.asarray(a), jnp.asarray(b)))[0]
  inner = (slice(3, -3),) * 3  # sampling beyond the edge uses edge values, not the formula
  # Trilinear interpolation error of a sinusoid of ~14-voxel wavelength: a few hundredths.
  np.testing.assert_allclose(got[inner], want[inner], atol=0.06)
  assert np.abs(got[inner] - want[inner]).mean() < 0.02
  # Not the other order: b(x) + a(x) + ... would differ by far more than that.
  assert np.abs(got - (a[0] + b[0])).max() > 0.1


def test_compose_equals_sequential_warps():
  shape = (20, 22, 24)
  image = ndimage.gaussian_filter(textured_volume(shape, seed=10), (0, 3, 3, 3, 0))
  a = jnp.asarray(smooth_field(shape, amplitude=1.5, seed=11))
  b = jnp.asarray(smooth_field(shape, amplitude=1.5, seed=12))
  sequential = np.asarray(vmjax.warp(vmjax.warp(jnp.asarray(image), a), b))
  once = np.asarray(vmjax.warp(jnp.asarray(image), vmjax.compose(a, b)))
  swapped = np.asarray(vmjax.warp(jnp.asarray(image), vmjax.compose(b, a)))
  inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
  # Twice-interpolated vs once: equal up to interpolation error, far below the wrong order's.
  err = np.abs(sequential[inner] - once[inner]).mean()
  wrong = np.abs(sequential[inner] - swapped[inner]).mean()
  assert err < 0.02 * image.std() and err < 0.25 * wrong


def test_compose_of_translations_adds_them():
  shape = (10, 10, 10)
  a = np.broadcast_to(np.float32([1.0, -2.0, 0.5]), (1, *shape, 3))
  b = np.broadcast_to(np.float32([0.25, 1.0, -1.0]), (1, *shape, 3))
  np.testing.assert_allclose(vmjax.compose(jnp.asarray(a), jnp.asarray(b)), a + b, atol=1e-6)


def test_integrated_velocity_is_inverted_by_negated_velocity():
  shape = (24, 24, 24)
  v = jnp.asarray(smooth_field(shape, amplitude=2.0, seed=13))
  forward = vmjax.integrate_velocity(v, steps=7)
  backward = vmjax.integrate_velocity(-v, steps=7)
  residual = np.asarray(vmjax.compose(forward, backward))[:, 4:-4, 4:-4, 4:-4]
  size = np.abs(np.asarray(forward)).max()
  assert size > 1.0  # a real deformation, not ~identity
  # Up to the interpolation error of 2 x 7 trilinear compositions.
  assert np.abs(residual).max() < 0.1 * size and np.abs(residual).mean() < 0.02 * size
  not_inverse = np.asarray(vmjax.compose(forward, forward))[:, 4:-4, 4:-4, 4:-4]
  assert np.abs(not_inverse).mean() > 10 * np.abs(residual).mean()
  assert float(vmjax.folding_fraction(forward)[0]) == 0.0


def test_integration_value_and_gradient_match_unrolled_map_coordinates():
  """Scaling and squaring (a loop of compositions) against an unrolled reference built on
  map_coordinates, value and gradient with respect to the velocity."""
  v = jnp.asarray(smooth_field((10, 11, 12), amplitude=2.5, seed=14))
  weights = jnp.asarray(np.random.default_rng(15).normal(size=v.shape).astype(np.float32))

  def reference(vel, steps=4):
    disp = vel / 2.0 ** steps
    for _ in range(steps):
      disp = disp + map_coordinates_warp(disp, disp, "nearest")
    return disp

  np.testing.assert_allclose(vmjax.integrate_velocity(v, 4), reference(v), atol=1e-5)
  got = jax.grad(lambda x: jnp.sum(weights * vmjax.integrate_velocity(x, 4)))(v)
  want = jax.grad(lambda x: jnp.sum(weights * reference(x)))(v)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_integration_of_constant_velocity_is_that_translation():
  v = jnp.broadcast_to(jnp.float32([0.8, -1.6, 2.4]), (1, 8, 8, 8, 3))
  np.testing.assert_allclose(vmjax.integrate_velocity(v, steps=5), v, atol=1e-5)
  np.testing.assert_array_equal(vmjax.integrate_velocity(v, steps=0), v)


def test_resize_field_rescales_vectors():
  # An affine field u(x) = A x sampled on a coarse grid must become ~A x' on the fine grid with
  # vectors scaled by the size ratio; constant fields just scale.
  coarse = jnp.broadcast_to(jnp.float32([1.0, 2.0, -1.0]), (1, 6, 7, 8, 3))
  fine = vmjax.resize_field(coarse, (12, 14, 16))
  assert fine.shape == (1, 12, 14, 16, 3)
  np.testing.assert_allclose(fine, np.broadcast_to([2.0, 4.0, -2.0], fine.shape), atol=1e-6)
  assert vmjax.resize_field(coarse, (6, 7, 8)) is coarse


@pytest.mark.parametrize("shape", [(1, 8, 10, 12), (2, 2, 4, 6), (1, 4, 16, 2)])
def test_halving_a_field_is_jax_image_resize(shape):
  """Halving even sizes (the network's velocity) takes the written-out kernel: the values and
  gradients of ``jax.image.resize(method="linear")`` (antialiased, edges renormalised), the
  vectors halved; an axis of 2 voxels included."""
  rng = np.random.default_rng(0)
  disp = jnp.asarray(rng.normal(size=shape + (3,)), jnp.float32)
  half = tuple(n // 2 for n in shape[1:])
  reference = lambda d: jax.image.resize(d, (shape[0],) + half + (3,), method="linear") * 0.5
  np.testing.assert_allclose(vmjax.resize_field(disp, half), reference(disp), atol=1e-6)
  g = jnp.asarray(rng.normal(size=(shape[0],) + half + (3,)), jnp.float32)
  grad = lambda f: jax.grad(lambda d: jnp.sum(g * f(d)))(disp)
  np.testing.assert_allclose(grad(lambda d: vmjax.resize_field(d, half)), grad(reference),
                             atol=1e-6)


def test_warp_rejects_bad_shapes():
  with pytest.raises(ValueError, match="differ in batch size"):
    vmjax.warp(jnp.zeros((2, 8, 8, 8, 1)), jnp.zeros((1, 8, 8, 9, 3)))
  with pytest.raises(ValueError, match="order"):
    vmjax.warp(jnp.zeros((1, 8, 8, 8, 1)), jnp.zeros((1, 8, 8, 8, 3)), order=3)
  with pytest.raises(ValueError, match=r"\(B, D, H, W, C\)"):
    vmjax.warp(jnp.zeros((8, 8, 8)), jnp.zeros((1, 8, 8, 8, 3)))


@pytest.mark.parametrize("order", [0, 1])
def test_warp_from_another_grid_matches_scipy(order):
  """A field on one grid sampling an image on another: the output is on the field's grid."""
  rng = np.random.default_rng(7)
  image = rng.uniform(size=(9, 11, 7)).astype(np.float32)
  if order == 0:
    image = np.floor(image * 5).astype(np.float32)
  disp = rng.uniform(-2, 2, size=(6, 5, 8, 3)).astype(np.float32)
  out = np.asarray(vmjax.warp(jnp.asarray(image)[None, ..., None], jnp.asarray(disp)[None],
                              order=order))[0, ..., 0]
  coords = grid_points((6, 5, 8)) + disp
  ref = ndimage.map_coordinates(image, np.moveaxis(coords, -1, 0), order=order,
                                mode="grid-constant")
  if order == 0:  # exact .5 ties may round differently
    assert out.shape == (6, 5, 8) and (out == ref).mean() > 0.99
  else:
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_apply_affine_matches_numpy():
  """Per-component multiply-adds equal a float64 matrix product, for a grid and for points."""
  rng = np.random.default_rng(2)
  m = np.eye(4)
  m[:3] = rng.normal(size=(3, 4)) * [1, 1, 1, 20]
  shape = (5, 6, 7)
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"),
                  -1)
  want = grid @ m[:3, :3].T + m[:3, 3]
  got = transforms.apply_affine(m, vmjax.identity_grid(shape))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  points = rng.normal(size=(4, 3)) * 100
  np.testing.assert_allclose(transforms.apply_affine(m[:3], jnp.asarray(points, jnp.float32)),
                             points @ m[:3, :3].T + m[:3, 3], rtol=1e-5, atol=1e-3)
