"""The native CPU kernels (vmjax/kernels.py) against their XLA references in vmjax.transforms
and vmjax.losses: values and gradients, odd shapes, both boundary modes, samples far outside."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmjax import kernels
from vmjax import losses
from vmjax import transforms

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="vmjax's native kernels could not be built on this machine "
    "(needs g++ and x86-64 Linux); the XLA path is what runs here")


def _sample_case(seed, image_shape, grid_shape, channels, batch=2):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, *image_shape, channels)).astype(np.float32)
  # Coordinates across and beyond the image (edges, far outside), plus exact integers.
  coords = np.stack([rng.uniform(-3.0, n + 2.0, size=(batch, *grid_shape))
                     for n in image_shape], axis=-1).astype(np.float32)
  coords[:, 0, 0, 0] = [0.0, 0.0, 0.0]
  coords[:, -1, -1, -1] = [n - 1 for n in image_shape]
  coords[:, 0, 1, 0] = [-40.0, 3.5, 1e4]
  return jnp.asarray(image), jnp.asarray(coords)


@pytest.mark.parametrize("mode", ["constant", "nearest"])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_trilinear_matches_the_xla_reference_and_scipy(mode, channels):
  image, coords = _sample_case(0, (7, 9, 11), (6, 5, 8), channels)
  native = jax.jit(lambda i, c: kernels.trilinear(i, c, mode))(image, coords)
  reference = transforms._trilinear_xla(image, coords, mode)
  np.testing.assert_allclose(native, reference, atol=1e-5)
  # and scipy's map_coordinates (an independent implementation) for one channel
  from scipy import ndimage
  scipy_mode = "grid-constant" if mode == "constant" else "nearest"
  expected = ndimage.map_coordinates(np.asarray(image[1, ..., 0], np.float64),
                                     np.moveaxis(np.asarray(coords[1], np.float64), -1, 0),
                                     order=1, mode=scipy_mode)
  np.testing.assert_allclose(native[1, ..., 0], expected, atol=1e-4)


@pytest.mark.parametrize("mode", ["constant", "nearest"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_shape,grid", [
    ((5, 8, 6), (5, 8, 6)), ((5, 8, 6), (3, 4, 17)),  # rows of 8 samples and a remainder
    ((1, 6, 9), (2, 3, 16))])  # an image one voxel deep: no sample has its corners inside
def test_trilinear_gradients_match_the_xla_reference(mode, channels, image_shape, grid):
  image, coords = _sample_case(1, image_shape, grid, channels)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=image.shape[:1] + coords.shape[1:4]
                                                        + (channels,)).astype(np.float32))

  def loss(fn):
    return jax.jit(jax.grad(lambda i, c: jnp.sum(weights * jnp.sin(fn(i, c, mode))),
                            argnums=(0, 1)))

  native = loss(kernels.trilinear)(image, coords)
  reference = loss(transforms._trilinear_xla)(image, coords)
  for n, r in zip(native, reference):
    np.testing.assert_allclose(n, r, atol=2e-5)


def test_trilinear_coordinate_gradient_matches_finite_differences():
  image, coords = _sample_case(3, (6, 6, 6), (3, 3, 3), 2, batch=1)
  coords = jnp.clip(coords, 0.3, 4.7)  # inside, away from integer kinks
  coords = coords.at[..., :].set(jnp.floor(coords) + 0.4)
  f = lambda c: jnp.sum(kernels.trilinear(image, c, "constant") ** 2)
  grad = jax.grad(f)(coords)
  eps = 1e-2
  for index in [(0, 0, 0, 0, 0), (0, 1, 2, 0, 1), (0, 2, 1, 2, 2)]:
    step = jnp.zeros_like(coords).at[index].set(eps)
    numeric = (f(coords + step) - f(coords - step)) / (2 * eps)
    np.testing.assert_allclose(grad[index], numeric, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("window", [1, 3, 9])
# The last shape's planes (21x25 voxels x 3 channels) span two blocks of the D pass and a part.
@pytest.mark.parametrize("shape", [(1, 5, 7, 4, 5), (2, 11, 3, 9, 2), (2, 12, 21, 25, 3)])
def test_box_sum_matches_the_xla_reference_and_a_numpy_loop(window, shape):
  x = jnp.asarray(np.random.default_rng(4).normal(size=shape).astype(np.float32))
  native = jax.jit(lambda x: kernels.box_sum(x, window))(x)
  np.testing.assert_allclose(native, losses.box_sum_xla(x, window), atol=1e-4)
  half = window // 2
  padded = np.pad(np.asarray(x, np.float64), [(0, 0)] + [(half, half)] * 3 + [(0, 0)])
  loop = np.zeros(shape)
  for a in range(window):
    for b in range(window):
      for c in range(window):
        loop += padded[:, a:a + shape[1], b:b + shape[2], c:c + shape[3]]
  np.testing.assert_allclose(native, loop, atol=1e-4)
  g = jnp.asarray(np.random.default_rng(5).normal(size=shape).astype(np.float32))
  grad_native = jax.grad(lambda x: jnp.sum(g * kernels.box_sum(x, window)))(x)
  grad_xla = jax.grad(lambda x: jnp.sum(g * losses.box_sum_xla(x, window)))(x)
  np.testing.assert_allclose(grad_native, grad_xla, atol=1e-4)


def test_the_default_functions_take_the_native_path_on_the_cpu():
  image, coords = _sample_case(6, (4, 4, 4), (4, 4, 4), 1, batch=1)
  hlo = jax.jit(lambda i, d: transforms.warp(i, d)).lower(image, coords).as_text()
  assert "vmjax_trilinear" in hlo
  x = jnp.ones((1, 6, 6, 6, 1))
  assert "vmjax_box_sum" in jax.jit(lambda a: losses.ncc_loss(a, a)).lower(x).as_text()


@pytest.mark.parametrize("shape", [(1, 3, 4, 5, 3), (2, 1, 6, 2, 1), (1, 8, 7, 9, 2)])
def test_upsample2_matches_jax_image_resize_and_its_transpose(shape):
  x = jnp.asarray(np.random.default_rng(7).normal(size=shape).astype(np.float32))
  big = (shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3], shape[4])
  reference = jax.image.resize(x, big, method="linear")
  native = jax.jit(kernels.upsample2)(x)
  np.testing.assert_allclose(native, reference, atol=1e-5)
  # The gradient is the transpose: <up(x), g> == <x, up^T(g)> for any g, and equals XLA's.
  g = jnp.asarray(np.random.default_rng(8).normal(size=big).astype(np.float32))
  grad_native = jax.jit(jax.grad(lambda x: jnp.sum(g * kernels.upsample2(x))))(x)
  grad_xla = jax.grad(lambda x: jnp.sum(g * jax.image.resize(x, big, method="linear")))(x)
  np.testing.assert_allclose(grad_native, grad_xla, atol=1e-4)
  np.testing.assert_allclose(float(jnp.sum(native * g)), float(jnp.sum(x * grad_native)),
                             rtol=1e-5)


def test_resize_field_by_two_takes_the_native_path_with_resize_values():
  disp = jnp.asarray(np.random.default_rng(9).normal(size=(1, 4, 5, 3, 3)).astype(np.float32))
  hlo = jax.jit(lambda d: transforms.resize_field(d, (8, 10, 6))).lower(disp).as_text()
  assert "vmjax_upsample2" in hlo
  expected = jax.image.resize(disp, (1, 8, 10, 6, 3), method="linear") * 2.0
  np.testing.assert_allclose(transforms.resize_field(disp, (8, 10, 6)), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 5, 6, 7), (2, 3, 1, 4), (1, 9, 4, 6)])
def test_compose_self_matches_compose_and_its_gradient(shape):
  rng = np.random.default_rng(10)
  # Displacements up to ~2x the volume: samples inside, on the edges and far outside (clamped).
  u = rng.normal(scale=max(shape[1:]) * 0.6, size=(*shape, 3)).astype(np.float32)
  u[:, 0, 0, 0] = [0.0, 0.0, 0.0]
  u[:, -1, -1, -1] = [40.0, -35.0, 0.5]
  u = jnp.asarray(u)
  reference = transforms.compose(u, u)
  native = jax.jit(kernels.compose_self)(u)
  np.testing.assert_allclose(native, reference, atol=1e-4)
  g = jnp.asarray(rng.normal(size=u.shape).astype(np.float32))
  grad_native = jax.jit(jax.grad(lambda u: jnp.sum(g * jnp.sin(kernels.compose_self(u)))))(u)
  grad_xla = jax.grad(lambda u: jnp.sum(g * jnp.sin(transforms.compose(u, u))))(u)
  # float32 rounding of sums of ~8 terms of size ~|u| (here up to ~40), amplified by sin.
  np.testing.assert_allclose(grad_native, grad_xla, atol=5e-4)


def test_compose_self_gradient_matches_finite_differences():
  # A smooth small field (no sample crosses a voxel boundary under the perturbation).
  rng = np.random.default_rng(11)
  u = jnp.asarray(rng.uniform(0.2, 0.3, size=(1, 4, 5, 4, 3)).astype(np.float32))
  f = lambda u: jnp.sum(kernels.compose_self(u) ** 2)
  grad = jax.grad(f)(u)
  eps = 1e-2
  for index in [(0, 0, 0, 0, 0), (0, 1, 2, 1, 1), (0, 2, 3, 2, 2), (0, 3, 4, 3, 0)]:
    step = jnp.zeros_like(u).at[index].set(eps)
    numeric = (f(u + step) - f(u - step)) / (2 * eps)
    np.testing.assert_allclose(grad[index], numeric, rtol=2e-2, atol=1e-3)


def test_integration_takes_the_native_squaring_on_the_cpu():
  v = jnp.asarray(np.random.default_rng(12).normal(size=(1, 6, 5, 4, 3)).astype(np.float32))
  hlo = jax.jit(lambda v: transforms.integrate_velocity(v, 5)).lower(v).as_text()
  assert "vmjax_compose_self" in hlo
  reference = v / 32.0
  for _ in range(5):
    reference = transforms.compose(reference, reference)
  np.testing.assert_allclose(transforms.integrate_velocity(v, 5), reference, atol=1e-5)


@pytest.mark.parametrize("shape", [(1,), (7, 5), (2, 9, 4, 3, 1)])
def test_mean_matches_numpy_in_float64_and_its_gradient(shape):
  x = np.random.default_rng(13).normal(loc=3.0, size=shape).astype(np.float32)
  native = jax.jit(kernels.mean)(jnp.asarray(x))
  np.testing.assert_allclose(float(native), np.mean(x.astype(np.float64)), rtol=1e-6)
  grad = jax.grad(lambda x: kernels.mean(jnp.sin(x)))(jnp.asarray(x))
  np.testing.assert_allclose(grad, np.cos(x) / x.size, rtol=1e-5, atol=1e-8)


def test_the_losses_take_the_mean_apart_on_the_cpu():
  x = jnp.asarray(np.random.default_rng(14).normal(size=(1, 6, 7, 5, 1)).astype(np.float32))
  y = x + 0.3 * jnp.asarray(np.random.default_rng(15).normal(size=x.shape).astype(np.float32))
  assert "vmjax_sum" in jax.jit(lambda a, b: losses.mse_loss(a, b)).lower(x, y).as_text()
  np.testing.assert_allclose(float(losses.mse_loss(x, y)),
                             np.mean((np.asarray(x, np.float64) - np.asarray(y)) ** 2), rtol=1e-5)


@pytest.mark.parametrize("mode", ["constant", "nearest"])
@pytest.mark.parametrize("channels", [1, 3])
def test_trilinear_of_a_displacement_matches_sampling_at_the_grid_plus_it(mode, channels):
  # relative=True samples each voxel of the field's grid (here not the image's) at its index
  # plus the displacement: the same values and gradients as the coordinates in memory.
  image, coords = _sample_case(16, (7, 9, 6), (5, 8, 11), channels)
  grid = transforms.identity_grid(coords.shape[1:4])[None]
  disp = coords - grid
  weights = jnp.asarray(np.random.default_rng(17).normal(size=coords.shape[:4] + (channels,))
                        .astype(np.float32))

  def loss(sample):
    return jax.jit(jax.value_and_grad(lambda i, d: jnp.sum(weights * jnp.sin(sample(i, d))),
                                      argnums=(0, 1)))

  native, (d_image, d_disp) = loss(lambda i, d: kernels.trilinear(i, d, mode, True))(image, disp)
  reference, (r_image, r_disp) = loss(
      lambda i, d: transforms._trilinear_xla(i, grid + d, mode))(image, disp)
  np.testing.assert_allclose(native, reference, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(d_image, r_image, atol=2e-5)
  np.testing.assert_allclose(d_disp, r_disp, atol=2e-5)
  assert "vmjax_trilinear" in jax.jit(transforms.warp).lower(image, disp).as_text()


# The last shapes' planes (their terms: 3 or 6 channels a voxel) span several blocks of the box
# sum's D pass and a part of one.
@pytest.mark.parametrize("shape,window", [((2, 7, 9, 11, 1), 3), ((1, 12, 10, 8, 2), 9),
                                          ((1, 5, 6, 7, 1), 5), ((1, 3, 4, 5, 1), 9),
                                          ((2, 11, 23, 19, 1), 9), ((1, 6, 17, 21, 2), 3)])
def test_ncc_matches_the_xla_reference_with_its_gradients(shape, window):
  rng = np.random.default_rng(18)
  fixed = rng.normal(size=shape).astype(np.float32)
  fixed[:, :2] = 1.0  # a constant region: clamped variances, cc ~ 0 there
  moved = (0.6 * fixed + rng.normal(size=shape)).astype(np.float32)
  fixed, moved = jnp.asarray(fixed), jnp.asarray(moved)
  native, native_grads = jax.jit(jax.value_and_grad(
      lambda f, m: kernels.ncc_loss(f, m, window), argnums=(0, 1)))(fixed, moved)
  reference, reference_grads = jax.value_and_grad(
      lambda f, m: losses.ncc_loss_xla(f, m, window), argnums=(0, 1))(fixed, moved)
  np.testing.assert_allclose(native, reference, rtol=1e-5)
  for n, r in zip(native_grads, reference_grads):
    np.testing.assert_allclose(n, r, rtol=1e-4, atol=1e-3 * float(jnp.max(jnp.abs(r))))
  # The loss's own path on the CPU is this kernel.
  assert "vmjax_ncc_grad" in jax.jit(jax.grad(
      lambda m: losses.ncc_loss(fixed, m, window))).lower(moved).as_text()


@pytest.mark.parametrize("shape", [(2, 12, 11, 13), (1, 7, 16, 9)])
def test_compose_self_of_a_smooth_field_matches_compose_and_its_gradient(shape):
  # Small smooth displacements: nearly every sample has all 8 corners inside the field (the
  # kernel's fast, vectorised path where the CPU has AVX2), the rest lie on the edges.
  rng = np.random.default_rng(19)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[1:]], indexing="ij"), -1)
  phases = rng.uniform(0, 2 * np.pi, size=(shape[0], 1, 1, 1, 3))
  u = jnp.asarray((1.3 * np.sin(0.4 * grid.sum(-1)[None, ..., None] + phases))
                  .astype(np.float32))
  np.testing.assert_allclose(jax.jit(kernels.compose_self)(u), transforms.compose(u, u),
                             atol=1e-5)
  g = jnp.asarray(rng.normal(size=u.shape).astype(np.float32))
  grad_native = jax.jit(jax.grad(lambda u: jnp.sum(g * jnp.sin(kernels.compose_self(u)))))(u)
  grad_xla = jax.grad(lambda u: jnp.sum(g * jnp.sin(transforms.compose(u, u))))(u)
  np.testing.assert_allclose(grad_native, grad_xla, atol=2e-5)


@pytest.mark.parametrize("amplitude", [1.3, 9.0])
def test_compose_self_gradient_scatters_in_slabs_as_compose(amplitude):
  """The squaring's gradient scatters straight into its output in slabs along D (2 per thread,
  the even ones side by side, then the odd ones) when the field's D component is small against
  them: here D = 12 per thread + 5, so slabs of >= 6 layers hold a reach of 2 (amplitude 1.3),
  and 9 voxels needs the per-thread buffers instead. Both match XLA's gradient, a batch of 2,
  writes crossing every slab boundary."""
  threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
  shape = (2, 12 * max(threads, 2) + 5, 6, 5)
  rng = np.random.default_rng(23)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[1:]], indexing="ij"), -1)
  phases = rng.uniform(0, 2 * np.pi, size=(shape[0], 1, 1, 1, 3))
  u = jnp.asarray((amplitude * np.sin(0.37 * grid.sum(-1)[None, ..., None] + phases))
                  .astype(np.float32))
  g = jnp.asarray(rng.normal(size=u.shape).astype(np.float32))
  grad_native = jax.jit(jax.grad(lambda u: jnp.sum(g * jnp.sin(kernels.compose_self(u)))))(u)
  grad_xla = jax.grad(lambda u: jnp.sum(g * jnp.sin(transforms.compose(u, u))))(u)
  np.testing.assert_allclose(grad_native, grad_xla, atol=2e-5 * amplitude)


@pytest.mark.parametrize("fixed_shape, moving_shape", [((13, 14, 12), (15, 11, 16)),
                                                       ((7, 9, 21), (10, 12, 9)),
                                                       ((6, 5, 11), (1, 8, 9))])
def test_affine_ncc_matches_the_xla_loss_and_its_gradient(fixed_shape, moving_shape):
  """The affine step's loss in two native passes against the loss as other platforms compute it
  (the resampling's trilinear samples, NCC in XLA, the gradient by autodiff): value and gradient
  with respect to the matrix, samples outside the moving image (0 there), rows longer and
  shorter than the 8-voxel vectors, and a moving image of one slice (the scalar path)."""
  from scipy import ndimage
  from vmjax import affine
  rng = np.random.default_rng(31)
  smooth = lambda shape: jnp.asarray(ndimage.gaussian_filter(rng.random(shape), 1.5),
                                     jnp.float32)
  fixed, moving = smooth(fixed_shape), smooth(moving_shape)
  matrix = np.eye(4)
  matrix[:3, :3] += rng.normal(scale=0.15, size=(3, 3))
  matrix[:3, 3] = [1.5, -2.0, 3.0]  # part of the fixed grid maps outside the moving image
  matrix = jnp.asarray(matrix, jnp.float32)
  reference = lambda a: -affine._ncc(fixed, affine.resample(moving, a, fixed.shape))
  native = lambda a: kernels.affine_ncc(fixed, moving, a[:3])
  np.testing.assert_allclose(native(matrix), reference(matrix), rtol=1e-5, atol=1e-6)
  g_ref = jax.grad(reference)(matrix)
  np.testing.assert_allclose(jax.grad(native)(matrix), g_ref, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(g_ref).max()))
  assert "vmjax_affine_ncc" in jax.jit(jax.grad(
      lambda a: affine.image_loss(fixed, moving, a))).lower(matrix).as_text()


def test_a_cpu_only_process_calls_the_native_path_without_a_platform_switch(monkeypatch):
  # Where a program could be lowered for another platform, lax.platform_dependent chooses the
  # path at lowering, and leaves a conditional around the call (XLA:CPU then copies its
  # operands); a CPU-only process (this one) calls the native path directly.
  from vmjax.native import build
  image, coords = _sample_case(20, (4, 5, 6), (4, 5, 6), 1, batch=1)
  assert build.cpu_only()
  alone = jax.jit(lambda i, d: transforms.warp(i, d)).lower(image, coords).as_text()
  monkeypatch.setattr(build, "cpu_only", lambda: False)
  switched = jax.jit(lambda i, d: transforms.warp(i, d)).lower(image, coords).as_text()
  assert "vmjax_trilinear" in alone and "stablehlo.case" not in alone
  assert "vmjax_trilinear" in switched and "stablehlo.case" in switched
