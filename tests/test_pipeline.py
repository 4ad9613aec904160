"""The whole path: one composed field equals affine-then-deformable applied in sequence, scans on
different grids need the affine step, and a batch of pairs registers each pair as alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from helpers import smooth_field, tiny_config
import vmjax
from vmjax import affine
from vmjax import checks
from vmjax import io
from vmjax import networks
from vmjax import pipeline
from vmjax import pretrained
from vmjax import registration

SPACE_AFFINE = np.array([[2.0, 0, 0, -16], [0, 2.0, 0, -16], [0, 0, 2.0, -16], [0, 0, 0, 1]])
# Three orientations: the model's RAS, a fixed LIA and a moving ASL grid.
FIXED_AFFINE = np.array([[-1.6, 0, 0, 18], [0, 0, 1.6, -15], [0, -1.6, 0, 17], [0, 0, 0, 1]])
MOVING_AFFINE = np.array([[0, 0, -1.5, 14], [1.5, 0, 0, -17], [0, 1.5, 0, -15], [0, 0, 0, 1]])


def world(angle, shift):
  c, s = np.cos(angle), np.sin(angle)
  m = np.eye(4)
  m[:2, :2] = [[c, -s], [s, c]]
  m[:3, 3] = shift
  return m


def voxel_map(shape, matrix):
  """``matrix · x`` for every voxel ``x`` of a grid, in numpy (float64)."""
  x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
  return x @ matrix[:3, :3].T + matrix[:3, 3]


def smooth_image(shape, seed):
  rng = np.random.default_rng(seed)
  image = ndimage.gaussian_filter(rng.uniform(size=shape), 3.0)
  return ((image - image.min()) / (image.max() - image.min()) + 0.1).astype(np.float32)


def setting():
  space = pretrained.ModelSpace(shape=(16, 16, 16), affine=SPACE_AFFINE, template=None)
  fixed = io.Volume(image=smooth_image((20, 18, 22), 0), seg=None, affine=FIXED_AFFINE, path="f")
  moving = io.Volume(image=smooth_image((24, 20, 18), 1), seg=None, affine=MOVING_AFFINE,
                     path="m")
  a_fixed, a_moving = world(0.1, [1.0, -0.5, 0.3]), world(-0.15, [-0.8, 0.6, 1.2])
  disp = smooth_field((16, 16, 16), amplitude=1.2, seed=5)[0]
  return space, fixed, moving, a_fixed, a_moving, disp


def test_composed_field_matches_a_numpy_scipy_reference():
  space, fixed, moving, a_fixed, a_moving, disp = setting()
  u = np.asarray(pipeline.compose_on_fixed_grid(fixed, moving, space, a_fixed, a_moving,
                                                jnp.asarray(disp)))
  x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in fixed.image.shape],
                           indexing="ij"), -1).reshape(-1, 3)
  homog = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  t = (np.linalg.inv(SPACE_AFFINE) @ np.linalg.inv(a_fixed) @ FIXED_AFFINE @ homog.T)[:3]
  d = np.stack([ndimage.map_coordinates(disp[..., c].astype(np.float64), t, order=1,
                                        mode="nearest") for c in range(3)])
  moved_t = np.concatenate([t + d, np.ones((1, t.shape[1]))])
  y = (np.linalg.inv(MOVING_AFFINE) @ a_moving @ SPACE_AFFINE @ moved_t)[:3].T
  np.testing.assert_allclose(u.reshape(-1, 3), y - x, atol=2e-4)


@pytest.mark.parametrize("disp_shape", [(7, 6, 5), (1, 5, 6)])
def test_the_composition_on_the_cpu_is_one_native_pass_with_the_xla_values(disp_shape):
  """The CPU's composition (one kernel) against the XLA program it replaces there: grid points
  that map beyond every edge of the field (clamped), a rough field, an axis of one voxel (the
  kernel's general path)."""
  rng = np.random.default_rng(3)
  disp = jnp.asarray(rng.normal(scale=2.0, size=disp_shape + (3,)), jnp.float32)
  to_model = np.eye(4)
  to_model[:3, :3] = np.diag([0.9, -0.7, 0.8]) + rng.normal(scale=0.1, size=(3, 3))
  to_model[:3, 3] = [-3.0, 9.0, -2.0]
  to_moving = world(0.3, [2.0, -1.0, 0.5])
  args = (jnp.asarray(to_model, jnp.float32), jnp.asarray(to_moving, jnp.float32), disp)
  shape = (13, 11, 12)
  native = pipeline._composed(shape, *args)
  assert "vmjax_compose_affine" in jax.jit(pipeline._composed, static_argnums=0).lower(
      shape, *args).as_text()
  reference = jax.jit(pipeline._composed_xla, static_argnums=0)(shape, *args)
  np.testing.assert_allclose(native, reference, atol=1e-4)


def test_composed_warp_equals_affine_then_deformable_in_sequence():
  space, fixed, moving, a_fixed, a_moving, disp = setting()
  u = pipeline.compose_on_fixed_grid(fixed, moving, space, a_fixed, a_moving, jnp.asarray(disp))
  once = np.asarray(vmjax.warp(jnp.asarray(moving.image)[None, ..., None], u[None]))[0, ..., 0]
  # In sequence: moving -> model grid (affine), deform there, model grid -> fixed grid.
  in_space = affine.resample_volume(moving, a_moving, SPACE_AFFINE, space.shape)
  deformed = np.asarray(vmjax.warp(jnp.asarray(in_space.image)[None, ..., None],
                                   jnp.asarray(disp)[None], mode="nearest"))[0, ..., 0]
  back = np.linalg.inv(SPACE_AFFINE) @ np.linalg.inv(a_fixed) @ FIXED_AFFINE
  twice = ndimage.affine_transform(deformed, back[:3, :3], back[:3, 3],
                                   output_shape=fixed.image.shape, order=1, mode="nearest")
  # Compare where every stage stayed well inside its grid (one resampling vs three: the
  # sequence reads zeros beyond the moving scan's and the model's grids).
  t = np.asarray(voxel_map(fixed.image.shape, back))
  y = np.asarray(u) + np.asarray(vmjax.identity_grid(fixed.image.shape))
  inside = (np.all((t > 2) & (t < 13), axis=-1)
            & np.all((y > 3) & (y < np.asarray(moving.image.shape) - 4), axis=-1))
  assert inside.sum() > 300, inside.sum()
  np.testing.assert_allclose(once[inside], twice[inside], atol=0.03)
  assert np.corrcoef(once[inside], twice[inside])[0, 1] > 0.99


def test_affine_none_on_different_grids_is_a_clear_error():
  _, fixed, moving, *_ = setting()
  with pytest.raises(checks.DataError, match="--affine=none needs both scans on one voxel grid"):
    pipeline.register_native_volumes(None, None, None, moving, fixed, affine="none")


def test_inverse_composition_maps_back():
  """Forward field on the fixed grid, inverse on the moving grid (from integrate(v) and
  integrate(-v) on the model's grid): a fixed voxel there and back lands on itself."""
  space, fixed, moving, a_fixed, a_moving, _ = setting()
  velocity = jnp.asarray(smooth_field((16, 16, 16), amplitude=0.8, seed=8))
  forward = vmjax.integrate_velocity(velocity, 7)[0]
  backward = vmjax.integrate_velocity(-velocity, 7)[0]
  u = np.asarray(pipeline.compose_on_fixed_grid(fixed, moving, space, a_fixed, a_moving, forward))
  v = np.asarray(pipeline.compose_on_fixed_grid(moving, fixed, space, a_moving, a_fixed,
                                                backward))
  x = np.asarray(vmjax.identity_grid(fixed.image.shape))
  y = x + u
  back = y + np.stack([ndimage.map_coordinates(v[..., c], np.moveaxis(y, -1, 0), order=1,
                                               mode="nearest") for c in range(3)], -1)
  # Where the path stays inside both grids and the model's grid (edges extrapolate).
  to_model = np.linalg.inv(SPACE_AFFINE) @ np.linalg.inv(a_fixed) @ FIXED_AFFINE
  t = np.asarray(voxel_map(fixed.image.shape, to_model))
  inside = (np.all((t > 2) & (t < 13), axis=-1)
            & np.all((y > 1) & (y < np.asarray(moving.image.shape) - 2), axis=-1))
  assert inside.sum() > 300
  err = np.linalg.norm(back - x, axis=-1)[inside]
  assert err.max() < 0.15 and err.mean() < 0.03, (err.max(), err.mean())


@pytest.mark.slow
def test_a_batch_of_native_pairs_registers_each_pair_as_alone():
  """register_native_volume_batch (affine steps per pair, one network call and one refinement
  for all on the model's grid, composition per pair) gives each pair the field, moved scan and
  refinement steps it gets alone, with and without a given fixed alignment."""
  config = tiny_config()
  config.model.int_steps, config.model.int_downsize = 5, 2
  model = networks.model_from_config(config.model)
  variables = vmjax.init_variables(model, jax.random.PRNGKey(3), (8, 8, 8))
  variables = jax.tree_util.tree_map(lambda p: p * 3e4 if p.ndim == 5 and p.shape[-1] == 3
                                     else p, variables)  # a field far from zero
  template = io.Volume(image=smooth_image((16, 16, 16), 7), seg=None, affine=SPACE_AFFINE,
                       path="template")
  space = pretrained.ModelSpace(shape=(16, 16, 16), affine=SPACE_AFFINE, template=template)
  _, fixed, moving, *_ = setting()
  other = io.Volume(image=smooth_image((18, 22, 20), 2), seg=None, affine=FIXED_AFFINE, path="o")
  pairs = [(moving, fixed), (other, fixed), (moving, other)]
  alignments = [pipeline.align_to_space(fixed, space), None, None]
  instance = registration.InstanceOptimisation(steps=40, tol=0.05)
  batch = pipeline.register_native_volume_batch(model, variables, config, pairs, space,
                                                instance=instance, diagnostics=False,
                                                fixed_alignments=alignments)
  for (m, f), alignment, out in zip(pairs, alignments, batch):
    alone = pipeline.register_native_volumes(model, variables, config, m, f, space,
                                             instance=instance, diagnostics=False,
                                             fixed_alignment=alignment)
    assert out["disp"].shape == f.image.shape + (3,)
    np.testing.assert_allclose(out["disp"], alone["disp"], atol=2e-4)
    np.testing.assert_allclose(out["moved"], alone["moved"], atol=2e-4)
    np.testing.assert_allclose(out["world"], alone["world"], atol=1e-6)
    assert out["steps"] == alone["steps"] < 40
